"""`sharded_arcface_head`: the forward and backward of the class-sharded head (the package
docstring describes the passes and the gradient convention)."""
from __future__ import annotations

import math
from typing import Any, Callable, List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ..backends import FLOAT_DTYPES, kernel_op
from ..contract import (
    MARGIN_MODES,
    REDUCTIONS,
    HeadOptions,
    HeadOutput,
    HeadRows,
    loss_coefficients,
    reduce_rows,
    stat_dtype,
)
from ..registration import reference_op, refuse_double_backward
from ..sampling import num_sampled, sample_classes
from ..statistics import head_output
from .checks import EMBEDDING_GRADS, SHARED_FIELDS, LocalCheck, agree, check_local, device_of
from .group import Group

_NO_INDEX = torch.iinfo(torch.int64).max

# --------------------------------------------------------------------------------------------
# The local pass: the kernel ops, or the same contract in eager PyTorch for `reference`
# --------------------------------------------------------------------------------------------

def _local_ops(backend: str) -> Tuple[Callable, Callable]:
    if backend == "reference":
        return reference_op("head_forward"), reference_op("head_backward")
    return kernel_op(backend, "head_forward"), kernel_op(backend, "head_backward")


class _ShardPass(NamedTuple):
    """Everything the autograd function needs besides its two differentiable inputs. The global
    batch is laid out padded: rank r's rows at [r·max_batch, r·max_batch + batch_r)."""

    group: Group
    max_batch: int
    start: int
    local_labels: torch.Tensor  # the local label of owned rows, a negative value elsewhere
    owned: torch.Tensor  # [global] the label lives on this shard
    ignored: torch.Tensor  # [global] the label is ignore_index (padding included)
    forward_op: Callable
    backward_op: Callable
    scale: float
    margin: float
    margin_mode: str
    local_ignore: int
    chunk_size: int
    grad_filter_eps: float
    reduction: str
    embedding_grad: str
    class_index: Optional[torch.Tensor]  # this shard's sampled classes (local ids), or None


def _combine(p: _ShardPass, local: HeadRows) -> Tuple[torch.Tensor, ...]:
    """The per-row results over all shards from this shard's: (loss_rows, cos_pos, cos_neg,
    neg_index, lse), the same on every rank, in float64: the values of several shards meet here,
    and float32 roundings in the combine and in the reduction over the global batch would add
    up to more error than one single-process pass has (the vectors are only [B] long)."""
    lse_local, loss_local, cos_pos_local, cos_neg_local = (
        x.double() for x in (local.lse, local.loss, local.cos_pos, local.cos_neg))
    has_negative = local.neg_index >= 0  # False: this shard's only class is the row's label
    peaks = torch.stack([lse_local, torch.where(has_negative, cos_neg_local, -math.inf)])
    lse_max, cos_neg = p.group.all_reduce(peaks, dist.ReduceOp.MAX)
    # The owner's target logit s·φ(cos_pos) is lse − loss of its pass, exact in float64: φ taken
    # again of the rounded cos_pos would be off by up to s·sin(m)·sqrt(2·ulp) near cos = 1.
    # NaN logits make the sums NaN, and so every output that depends on them.
    sums = torch.stack([torch.exp(lse_local - lse_max), torch.where(p.owned, cos_pos_local, 0.0),
                        torch.where(p.owned, lse_local - loss_local, 0.0)])
    exp_sum, cos_pos, target_logit = p.group.all_reduce(sums, dist.ReduceOp.SUM)
    lse = lse_max + torch.log(exp_sum)

    is_nearest = has_negative & (cos_neg_local == cos_neg)
    local_index = local.neg_index
    if p.class_index is not None:  # a position in the sampled set
        local_index = p.class_index[local_index.clamp_min(0)]
    neg_index = torch.where(is_nearest, local_index + p.start, _NO_INDEX)
    p.group.all_reduce(neg_index, dist.ReduceOp.MIN)  # ties between shards: the lowest global index
    cos_neg = torch.where(cos_neg == -math.inf, -1.0, cos_neg)  # C = 1: no negative anywhere
    neg_index = torch.where(neg_index == _NO_INDEX, -1, neg_index)  # that, or NaN cosines

    cos_pos = torch.where(p.ignored, math.nan, cos_pos)
    loss_rows = torch.where(p.ignored, 0.0, lse - target_logit)
    sdt = local.lse.dtype
    return loss_rows, cos_pos.to(sdt), cos_neg.to(sdt), neg_index, lse.to(sdt)


class _ShardedRows(torch.autograd.Function):
    """(this rank's embeddings, its prototype shard) -> the per-row results of the global batch."""

    @staticmethod
    def forward(ctx, embeddings: torch.Tensor, shard: torch.Tensor, p: _ShardPass):
        padded = embeddings.new_zeros((p.max_batch, embeddings.shape[1]))
        padded[: embeddings.shape[0]] = embeddings
        gathered = p.group.all_gather(padded).flatten(0, 1)
        # The local pass computes in the inputs' dtype, as the kernel ops do under autocast too, so
        # that the eager backward recomputes exactly the forward's logits.
        with torch.autocast(gathered.device.type, enabled=False):
            extra = () if p.class_index is None else (None, "product", p.class_index)
            outputs = p.forward_op(gathered, shard.contiguous(), p.local_labels, p.scale, p.margin,
                                   p.margin_mode, p.local_ignore, p.chunk_size, p.grad_filter_eps, *extra)
            # The RI needs the global statistics: cos_ui and ri (the kernels' last outputs) come after the combine.
            local = HeadRows(*outputs[:len(HeadRows._fields)])
        loss_rows, cos_pos, cos_neg, neg_index, lse = _combine(p, local)
        ctx.save_for_backward(gathered, shard, lse)
        ctx.shard_pass = p
        ctx.batch = embeddings.shape[0]
        ctx.mark_non_differentiable(cos_pos, cos_neg, neg_index, lse)
        return loss_rows, cos_pos, cos_neg, neg_index, lse

    @staticmethod
    def backward(ctx, grad_loss_rows, *_):
        refuse_double_backward("sharded_arcface_head",
                               "use the single-process arcface_head with backend='reference' for that")
        gathered, shard, lse = ctx.saved_tensors
        p: _ShardPass = ctx.shard_pass
        # Ignored and padding rows have a zero loss coefficient, hence a zero row gradient.
        row_grad = grad_loss_rows.to(lse.dtype).contiguous()
        if p.reduction == "none":  # each rank's gradients sit on its own rows only
            row_grad = p.group.all_reduce(row_grad.clone(), dist.ReduceOp.SUM)
        with torch.autocast(gathered.device.type, enabled=False):
            extra = () if p.class_index is None else (p.class_index,)
            grad_all, grad_shard = p.backward_op(gathered, shard.contiguous(), p.local_labels, lse, row_grad,
                                                 p.scale, p.margin, p.margin_mode, p.chunk_size,
                                                 p.grad_filter_eps, *extra)
        if p.class_index is not None:  # [C', D] -> the shard's [C_r, D], exactly 0 off the sampled rows
            grad_shard = grad_shard.new_zeros(shard.shape).index_copy_(0, p.class_index, grad_shard)
        grad_mine = p.group.reduce_scatter(grad_all.reshape(p.group.world, p.max_batch, -1))[: ctx.batch]
        if p.embedding_grad == "ddp":
            grad_mine = grad_mine * p.group.world
        return grad_mine, grad_shard, None


def _check_all_ranks(group: Group, embeddings, prototype_shard, labels, ui_center, sample_weight, *,
                     num_classes, embedding_grad, sample_rate, options: dict) -> Tuple[LocalCheck, List[int]]:
    """Checks this rank's arguments and agrees with the others (`checks.agree`): every rank
    raises, or none. This rank's check and every rank's batch size."""
    error: Optional[BaseException] = None
    shared: List[float] = [0.0] * (1 + len(SHARED_FIELDS))
    local: Optional[LocalCheck] = None
    opts = HeadOptions()
    try:
        opts = HeadOptions(**options)
        local = check_local(group, embeddings, prototype_shard, labels, ui_center, sample_weight,
                            num_classes=num_classes, embedding_grad=embedding_grad, **options)
        num_sampled(num_classes, sample_rate)  # checks the rate
        if sample_rate < 1.0 and opts.ignore_index >= 0:
            raise ValueError(f"sample_rate < 1 needs a negative ignore_index, got {opts.ignore_index}")
        shared = [embeddings.shape[0], num_classes, embeddings.shape[1], FLOAT_DTYPES.index(embeddings.dtype),
                  opts.scale, opts.margin, MARGIN_MODES.index(opts.margin_mode), opts.ignore_index,
                  REDUCTIONS.index(opts.reduction), sample_weight is not None, EMBEDDING_GRADS.index(embedding_grad)]
    except Exception as err:  # noqa: BLE001 - every rank must hear of it before anyone raises
        error = err
    batches = agree(group, device_of(embeddings, prototype_shard, labels), error, shared,
                    None if local is None else local.label_summary, num_classes, opts.ignore_index)
    return local, batches


def _shard_pass(group: Group, local: LocalCheck, labels_all: torch.Tensor, max_batch: int, embedding_grad: str,
                sample_rate: float, generator: Optional[torch.Generator],
                on_sample: Optional[Callable[[torch.Tensor], None]]) -> _ShardPass:
    """This shard's view of the global batch: which rows it owns, their local labels, and its
    sampled classes (PartialFC) with `sample_rate` < 1."""
    start, stop, opts = local.start, local.stop, local.options
    ignored = labels_all == opts.ignore_index
    owned = (labels_all >= start) & (labels_all < stop) & ~ignored
    local_ignore = opts.ignore_index if opts.ignore_index < 0 else -1  # never a local class id
    local_labels = torch.where(owned, labels_all - start, local_ignore)
    class_index = None
    if sample_rate < 1.0:
        # This shard's classes among the global batch's labels, and its own uniform others.
        class_index, local_labels = sample_classes(local_labels, stop - start, sample_rate, ignore_index=local_ignore,
                                                   generator=generator)
        if on_sample is not None:
            on_sample(class_index + start)
    forward_op, backward_op = _local_ops(opts.backend)
    return _ShardPass(
        group=group, max_batch=max_batch, start=start, local_labels=local_labels, owned=owned, ignored=ignored,
        forward_op=forward_op, backward_op=backward_op, scale=float(opts.scale), margin=float(opts.margin),
        margin_mode=opts.margin_mode, local_ignore=local_ignore, chunk_size=opts.chunk_size,
        grad_filter_eps=float(opts.grad_filter_eps), reduction=opts.reduction, embedding_grad=embedding_grad,
        class_index=class_index,
    )


def sharded_arcface_head(
    embeddings: torch.Tensor,
    prototype_shard: torch.Tensor,
    labels: torch.Tensor,
    ui_center: Optional[torch.Tensor] = None,
    *,
    num_classes: int,
    process_group: Optional[dist.ProcessGroup] = None,
    sample_weight: Optional[torch.Tensor] = None,
    embedding_grad: str = "ddp",
    sample_rate: float = 1.0,
    generator: Optional[torch.Generator] = None,
    on_sample: Optional[Callable[[torch.Tensor], None]] = None,
    **options: Any,
) -> HeadOutput:
    """`arcface_head` over the global batch of `process_group`, with the prototypes sharded by class.

    Args:
        embeddings: [B_r, D] this rank's rows (B_r may differ between ranks).
        prototype_shard: [C_r, D] this rank's prototypes: the classes `shard_range(num_classes,
            rank, world)`.
        labels: [B_r] global class ids in [0, num_classes), or `ignore_index`.
        ui_center, sample_weight: as in `arcface_head`, for this rank's rows.
        num_classes: C, the total over all shards.
        process_group: the ranks that share the batch and the classes (default: the world; a
            lone process when torch.distributed is not initialised).
        embedding_grad: "ddp" (default) or "exact": the gradient convention of the package
            docstring; it scales the embedding gradient only.
        sample_rate: PartialFC's class sampling (r < 1): each shard runs over its classes among
            the global batch's labels plus uniformly drawn others of its own, ⌈r·C_r⌉ in all
            (`ree_kernels.sample_classes`); the other prototypes of the shard get an exactly
            zero gradient. Needs a negative ignore_index. 1: every class.
        generator: the random source of this rank's draw, or None for torch's default one.
        on_sample: called with the shard's sampled classes ([C'] global ids, ascending) at each draw.
        **options: the head's options, the keywords of `contract.HeadOptions` as `arcface_head`
            takes them; they must agree across ranks.

    Returns:
        HeadOutput for this rank's rows: the loss ("mean", "sum": over the global batch, the
        same on every rank; "none": this rank's rows), the statistics with `neg_index` a global
        class id and `lse` over all classes. Every rank must call this with its arguments, and
        then backpropagate, at the same step; bad or inconsistent arguments raise the same
        error on every rank. Differentiable once (create_graph=True raises).

    Raises:
        TypeError, ValueError: as `arcface_head` does, on the rank whose argument is bad; the
            other ranks raise ValueError naming that rank (and so do all ranks when a shared
            option differs across them). A shard of the wrong size raises ValueError.
        RuntimeError: the backend cannot run here.
    """
    group = Group(process_group)
    local, batches = _check_all_ranks(group, embeddings, prototype_shard, labels, ui_center, sample_weight,
                                      num_classes=num_classes, embedding_grad=embedding_grad,
                                      sample_rate=sample_rate, options=options)
    opts, max_batch = local.options, max(batches)
    pad = max_batch - embeddings.shape[0]
    labels_all = group.all_gather(nn.functional.pad(labels, (0, pad), value=opts.ignore_index)).flatten()
    weights_all = None
    if sample_weight is not None:
        weights_all = group.all_gather(nn.functional.pad(sample_weight.detach().double(), (0, pad))).flatten()
    shard_pass = _shard_pass(group, local, labels_all, max_batch, embedding_grad, sample_rate, generator, on_sample)
    loss_rows, cos_pos, cos_neg, neg_index, lse = _ShardedRows.apply(embeddings, prototype_shard, shard_pass)

    coef = loss_coefficients(labels_all, weights_all, opts.ignore_index, opts.reduction, loss_rows.dtype)
    loss = reduce_rows(loss_rows, coef, opts.reduction)
    mine = slice(group.rank * max_batch, group.rank * max_batch + embeddings.shape[0])
    if opts.reduction == "none":
        loss = loss[mine]
    sdt = stat_dtype(embeddings.dtype)
    rows = HeadRows(loss_rows[mine].to(sdt), cos_pos[mine], cos_neg[mine], neg_index[mine], lse[mine])
    return head_output(loss.to(sdt), rows, embeddings, ui_center, opts.ri_form)
