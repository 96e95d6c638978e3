"""`arcface_head` with the prototypes sharded by class over torch.distributed ranks.

Face recognition outgrows one device through its classifier (WebFace42M: about 2.06 million
identities); insightface's PartialFC answers by giving each rank a slice of the classes. This
module does the same on top of the fused head, with torch.distributed as the engine (gloo on
CPUs, NCCL on GPUs):

- Rank r of `world` holds the contiguous classes `shard_range(C, r, world)` and its own rows of
  the global batch (the row counts may differ between ranks).
- Forward: all-gather the embeddings and labels; one fused local pass over the shard (the
  kernel op `head_forward`, or its eager twin for the reference backend) where rows whose label
  lives on another shard count as ignored, so that they get the plain log-sum-exp and the
  nearest negative over every local class; then per row across ranks: log-sum-exp by an
  all-reduce of the max and one of the rescaled sums (the owner's local log-sum-exp holds the
  margin at the label, the others' do not: together the global one with the margin), cos_pos
  from the owning rank, the nearest negative as (value, global index), lowest index on ties.
- Backward: the local `head_backward` with the global log-sum-exp gives the shard's dW, which
  stays local, and the shard's part of the embedding gradient of the whole batch, which is
  summed over ranks by a reduce-scatter that leaves each rank its own rows.

Gradient convention. With reduction "mean" or "sum" the loss is ONE number, the reduction over
the global batch, bitwise the same on every rank, and every rank must backpropagate it with the
same factor (each calls `loss.backward()`). Then the prototype shard gets exactly its slice of
the single-process gradient. The embedding gradient is, by default (`embedding_grad="ddp"`),
world × the derivative of the loss with respect to this rank's rows: DistributedDataParallel
averages the backbone gradients over ranks, and the average of those is the single-process
backbone gradient, as in PartialFC. With `embedding_grad="exact"` it is the derivative itself;
average-free data parallelism (summing backbone gradients over ranks by hand) then gives the
single-process gradient. With reduction "none" each rank gets its own rows' weighted losses and
the objective is the sum over ranks of what each rank backpropagates; the same two conventions
hold for it. Keep the head out of DDP (its shards differ by rank and must not be averaged).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn

from . import reference
from .backends import kernel_op, resolve_backend
from .reference import IGNORE_INDEX, MARGIN_MODES, REDUCTIONS, HeadOutput, HeadRows, stat_dtype
from .validation import FLOAT_DTYPES, validate_head_inputs, validate_kernel_options

EMBEDDING_GRADS = ("ddp", "exact")

PROTOTYPE_INIT_STD = 0.01
"""The prototypes start as N(0, 0.01²), as insightface's PartialFC initialises them."""

PROTOTYPE_INIT_BLOCK = 16384
"""The init draws each block of this many rows from its own seeded generator, so a shard draws
only its own blocks and the rows come out the same for every world size."""

_NO_INDEX = torch.iinfo(torch.int64).max


def shard_range(num_classes: int, rank: int, world: int) -> Tuple[int, int]:
    """The classes [start, stop) of `rank`: `num_classes // world + (rank < num_classes % world)`
    contiguous classes, in rank order."""
    for name, value in (("num_classes", num_classes), ("rank", rank), ("world", world)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if world < 1:
        raise ValueError(f"world must be at least 1, got {world}")
    if not 0 <= rank < world:
        raise ValueError(f"rank must lie in [0, world={world}), got {rank}")
    if num_classes < world:
        raise ValueError(f"num_classes={num_classes} is smaller than the world size {world}: "
                         "every rank needs at least one class")
    base, extra = divmod(num_classes, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


class _Group:
    """The ranks the head is sharded over; one lone rank when torch.distributed is not initialised."""

    def __init__(self, process_group: Optional[dist.ProcessGroup]) -> None:
        initialised = dist.is_available() and dist.is_initialized()
        self.group = process_group
        if not initialised:
            if process_group is not None:
                raise ValueError("process_group was given but torch.distributed is not initialised")
            self.rank, self.world = 0, 1
            return
        self.rank, self.world = dist.get_rank(process_group), dist.get_world_size(process_group)
        if self.rank < 0:
            raise ValueError("this process is not a member of process_group")

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[world, *x.shape]: every rank's x (same shape on every rank)."""
        if self.world == 1:
            return x.unsqueeze(0)
        out = x.new_empty((self.world * x.shape[0], *x.shape[1:]))
        dist.all_gather_single(out, x.contiguous(), group=self.group)
        return out.view(self.world, *x.shape)

    def all_reduce(self, x: torch.Tensor, op: dist.ReduceOp.RedOpType) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(x, op=op, group=self.group)
        return x

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        """x is [world, ...] on every rank: this rank's block of the sum over ranks."""
        if self.world == 1:
            return x[0]
        out = x.new_empty(x.shape[1:])
        dist.reduce_scatter_single(out, x.flatten(0, 1).contiguous(), group=self.group)
        return out

    def all_gather_object(self, obj: Any) -> List[Any]:
        out: List[Any] = [None] * self.world
        if self.world == 1:
            out[0] = obj
        else:
            dist.all_gather_object(out, obj, group=self.group)
        return out


# --------------------------------------------------------------------------------------------
# Validation: every rank raises, or none does (a rank that raised alone would leave the others
# waiting in the next collective).
# --------------------------------------------------------------------------------------------

# What every rank must agree on, with how to print it.
_SHARED_FIELDS: Dict[str, Callable[[float], str]] = {
    "num_classes": lambda v: str(int(v)),
    "D (embeddings.shape[1])": lambda v: str(int(v)),
    "dtype": lambda v: str(FLOAT_DTYPES[int(v)]).replace("torch.", ""),
    "scale": repr,
    "margin": repr,
    "margin_mode": lambda v: MARGIN_MODES[int(v)],
    "ignore_index": lambda v: str(int(v)),
    "reduction": lambda v: REDUCTIONS[int(v)],
    "sample_weight given": lambda v: str(bool(v)),
    "embedding_grad": lambda v: EMBEDDING_GRADS[int(v)],
}


def _check_local(group: _Group, embeddings, prototype_shard, labels, ui_center, sample_weight, *,
                 num_classes, scale, margin, margin_mode, ri_form, ignore_index, reduction,
                 backend, embedding_grad, chunk_size, grad_filter_eps) -> Tuple[int, int, str]:
    """Validates this rank's arguments; its class range and concrete backend."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool):
        raise TypeError(f"num_classes must be an int, got {type(num_classes).__name__}")
    start, stop = shard_range(num_classes, group.rank, group.world)
    if not isinstance(prototype_shard, torch.Tensor) or prototype_shard.dim() != 2:
        raise ValueError("prototype_shard must be a 2-D tensor [classes of this rank, D]")
    if prototype_shard.shape[0] != stop - start:
        raise ValueError(
            f"prototype_shard has {prototype_shard.shape[0]} rows, but rank {group.rank} of {group.world} "
            f"holds the classes [{start}, {stop}) of num_classes={num_classes}: {stop - start} rows "
            "(see shard_range)")
    validate_head_inputs(
        embeddings, prototype_shard, labels, ui_center, sample_weight,
        scale=scale, margin=margin, margin_mode=margin_mode, ri_form=ri_form,
        ignore_index=ignore_index, reduction=reduction, num_classes=num_classes,
    )
    if embedding_grad not in EMBEDDING_GRADS:
        raise ValueError(f"embedding_grad must be one of {EMBEDDING_GRADS}, got {embedding_grad!r}")
    validate_kernel_options(chunk_size, grad_filter_eps)
    chosen = resolve_backend(backend, "head", embeddings.device, embeddings.dtype)
    if grad_filter_eps and chosen != "triton":
        raise ValueError(f"grad_filter_eps is implemented by the triton backend only, not {chosen!r}")
    return start, stop, chosen


def _agree(group: _Group, device: torch.device, error: Optional[BaseException],
           values: Sequence[float]) -> List[int]:
    """One all-gather of [failed, batch, *values] per rank; raises on every rank if any rank's
    arguments failed or the ranks disagree. The batch size of each rank."""
    mine = torch.tensor([float(error is not None), *values], dtype=torch.float64, device=device)
    meta = group.all_gather(mine).cpu()
    failed = [rank for rank in range(group.world) if meta[rank, 0] != 0]
    if failed:
        messages = group.all_gather_object(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        raise ValueError(f"rank {failed[0]} of {group.world} rejected its arguments ({messages[failed[0]]})")
    for column, (name, show) in enumerate(_SHARED_FIELDS.items(), start=2):
        column_values = meta[:, column]
        if bool((column_values != column_values[0]).any()):
            per_rank = ", ".join(f"rank {r}: {show(float(v))}" for r, v in enumerate(column_values))
            raise ValueError(f"{name} differs across ranks ({per_rank}); every rank must pass the same")
    return [int(b) for b in meta[:, 1]]


def _device_of(*candidates: object) -> torch.device:
    for x in candidates:
        if isinstance(x, torch.Tensor):
            return x.device
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# The local pass: the kernel ops, or the same contract in eager PyTorch for `reference`
# --------------------------------------------------------------------------------------------

def _reference_head_forward(embeddings, prototypes, labels, scale, margin, margin_mode, ignore_index,
                            chunk_size, grad_filter_eps) -> HeadRows:
    """`head_forward` (ree_kernels/head.py) in eager PyTorch."""
    return reference.arcface_rows(embeddings, prototypes, labels, scale=scale, margin=margin,
                                  margin_mode=margin_mode, ignore_index=ignore_index)


def _reference_head_backward(embeddings, prototypes, labels, lse, row_grad, scale, margin, margin_mode,
                             chunk_size, grad_filter_eps) -> Tuple[torch.Tensor, torch.Tensor]:
    """`head_backward` in eager PyTorch: the gradients of Σ row_grad_i·loss_i where the softmax
    is taken against the given `lse` (over all shards), not against this shard's logits."""
    with torch.enable_grad():
        emb = embeddings.detach().requires_grad_(True)
        protos = prototypes.detach().requires_grad_(True)
        # The label is in range or has no target: no ignore_index is needed here.
        out = reference.arcface_logits(emb, protos, labels, scale=scale, margin=margin,
                                       margin_mode=margin_mode, ignore_index=-1)
        logits = out.logits
        # d loss_i / d logit_ij = softmax_ij − [j is the target]; the rest is the chain rule.
        dlogits = row_grad[:, None] * (torch.exp(logits.detach() - lse[:, None]) - out.target.to(logits.dtype))
        return torch.autograd.grad((dlogits * logits).sum(), (emb, protos))


def _local_ops(backend: str) -> Tuple[Callable, Callable]:
    if backend == "reference":
        return _reference_head_forward, _reference_head_backward
    return kernel_op(backend, "head_forward"), kernel_op(backend, "head_backward")


class _ShardPass(NamedTuple):
    """Everything the autograd function needs besides its two differentiable inputs. The global
    batch is laid out padded: rank r's rows at [r·max_batch, r·max_batch + batch_r)."""

    group: _Group
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
    neg_index = torch.where(is_nearest, local.neg_index + p.start, _NO_INDEX)
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
            # The RI needs the global statistics: cos_ui and ri (the kernels' last outputs) come after the combine.
            local = HeadRows(*p.forward_op(gathered, shard.contiguous(), p.local_labels, p.scale, p.margin,
                                           p.margin_mode, p.local_ignore, p.chunk_size, p.grad_filter_eps)[:5])
        loss_rows, cos_pos, cos_neg, neg_index, lse = _combine(p, local)
        ctx.save_for_backward(gathered, shard, lse)
        ctx.shard_pass = p
        ctx.batch = embeddings.shape[0]
        ctx.mark_non_differentiable(cos_pos, cos_neg, neg_index, lse)
        return loss_rows, cos_pos, cos_neg, neg_index, lse

    @staticmethod
    def backward(ctx, grad_loss_rows, *_):
        gathered, shard, lse = ctx.saved_tensors
        p: _ShardPass = ctx.shard_pass
        # Ignored and padding rows have a zero loss coefficient, hence a zero row gradient.
        row_grad = grad_loss_rows.to(lse.dtype).contiguous()
        if p.reduction == "none":  # each rank's gradients sit on its own rows only
            row_grad = p.group.all_reduce(row_grad.clone(), dist.ReduceOp.SUM)
        with torch.autocast(gathered.device.type, enabled=False):
            grad_all, grad_shard = p.backward_op(gathered, shard.contiguous(), p.local_labels, lse, row_grad,
                                                 p.scale, p.margin, p.margin_mode, p.chunk_size,
                                                 p.grad_filter_eps)
        grad_mine = p.group.reduce_scatter(grad_all.reshape(p.group.world, p.max_batch, -1))[: ctx.batch]
        if p.embedding_grad == "ddp":
            grad_mine = grad_mine * p.group.world
        return grad_mine, grad_shard, None


def sharded_arcface_head(
    embeddings: torch.Tensor,
    prototype_shard: torch.Tensor,
    labels: torch.Tensor,
    ui_center: Optional[torch.Tensor] = None,
    *,
    num_classes: int,
    process_group: Optional[dist.ProcessGroup] = None,
    scale: float = 64.0,
    margin: float = 0.5,
    margin_mode: str = "arcface",
    ri_form: str = "product",
    sample_weight: Optional[torch.Tensor] = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    backend: str = "auto",
    embedding_grad: str = "ddp",
    chunk_size: int = 0,
    grad_filter_eps: float = 0.0,
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
        embedding_grad: "ddp" (default) or "exact": the gradient convention of the module
            docstring; it scales the embedding gradient only.
        The other options are those of `arcface_head`, and must agree across ranks.

    Returns:
        HeadOutput for this rank's rows: the loss ("mean", "sum": over the global batch, the
        same on every rank; "none": this rank's rows), the statistics with `neg_index` a global
        class id and `lse` over all classes. Every rank must call this with its arguments, and
        then backpropagate, at the same step; bad or inconsistent arguments raise the same
        error on every rank.
    """
    group = _Group(process_group)
    options = dict(num_classes=num_classes, scale=scale, margin=margin, margin_mode=margin_mode,
                   ri_form=ri_form, ignore_index=ignore_index, reduction=reduction, backend=backend,
                   embedding_grad=embedding_grad, chunk_size=chunk_size, grad_filter_eps=grad_filter_eps)
    error: Optional[BaseException] = None
    shared: List[float] = [0.0] * (1 + len(_SHARED_FIELDS))
    try:
        start, stop, chosen = _check_local(group, embeddings, prototype_shard, labels, ui_center,
                                           sample_weight, **options)
        shared = [embeddings.shape[0], num_classes, embeddings.shape[1], FLOAT_DTYPES.index(embeddings.dtype),
                  scale, margin, MARGIN_MODES.index(margin_mode), ignore_index, REDUCTIONS.index(reduction),
                  sample_weight is not None, EMBEDDING_GRADS.index(embedding_grad)]
    except Exception as err:  # noqa: BLE001 - every rank must hear of it before anyone raises
        error = err
    batches = _agree(group, _device_of(embeddings, prototype_shard, labels), error, shared)

    max_batch = max(batches)
    sdt = stat_dtype(embeddings.dtype)
    pad = max_batch - embeddings.shape[0]
    labels_all = group.all_gather(nn.functional.pad(labels, (0, pad), value=ignore_index)).flatten()
    weights_all = None
    if sample_weight is not None:
        weights_all = group.all_gather(nn.functional.pad(sample_weight.detach().double(), (0, pad))).flatten()
    ignored = labels_all == ignore_index
    owned = (labels_all >= start) & (labels_all < stop) & ~ignored
    local_ignore = ignore_index if ignore_index < 0 else -1  # never a local class id
    forward_op, backward_op = _local_ops(chosen)
    shard_pass = _ShardPass(
        group=group, max_batch=max_batch, start=start,
        local_labels=torch.where(owned, labels_all - start, local_ignore), owned=owned, ignored=ignored,
        forward_op=forward_op, backward_op=backward_op, scale=float(scale), margin=float(margin),
        margin_mode=margin_mode, local_ignore=local_ignore, chunk_size=chunk_size,
        grad_filter_eps=float(grad_filter_eps), reduction=reduction, embedding_grad=embedding_grad,
    )
    loss_rows, cos_pos, cos_neg, neg_index, lse = _ShardedRows.apply(embeddings, prototype_shard, shard_pass)

    coef = reference.loss_coefficients(labels_all, weights_all, ignore_index, reduction, loss_rows.dtype)
    loss = reference.reduce_rows(loss_rows, coef, reduction)
    mine = slice(group.rank * max_batch, group.rank * max_batch + embeddings.shape[0])
    if reduction == "none":
        loss = loss[mine]
    loss = loss.to(sdt)
    rows = HeadRows(loss_rows[mine].to(sdt), cos_pos[mine], cos_neg[mine], neg_index[mine], lse[mine])
    return reference.head_output(loss, rows, embeddings, ui_center, ri_form)


# --------------------------------------------------------------------------------------------
# The module and its checkpoints
# --------------------------------------------------------------------------------------------

def _block_seed(seed: int, block: int) -> int:
    """A 32-bit seed per (seed, block) (the CPU generator keeps only 32 bits): splitmix64."""
    z = (seed * 2 ** 32 + block + 0x9E3779B97F4A7C15) % 2 ** 64
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 % 2 ** 64
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB % 2 ** 64
    return (z ^ (z >> 31)) % 2 ** 32


def init_prototypes(
    num_classes: int,
    embedding_dim: int,
    start: int = 0,
    stop: Optional[int] = None,
    *,
    seed: int = 0,
    dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Rows [start, stop) of the seeded N(0, 0.01²) prototype init of `num_classes` classes.

    The rows are the same whichever slice is asked for, so the shards of any world size
    concatenate to the single-process init of the same seed."""
    stop = num_classes if stop is None else stop
    if not 0 <= start < stop <= num_classes:
        raise ValueError(f"need 0 <= start < stop <= num_classes, got [{start}, {stop}) of {num_classes}")
    if not isinstance(seed, int) or not 0 <= seed < 2 ** 32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    blocks = []
    for block in range(start // PROTOTYPE_INIT_BLOCK, (stop - 1) // PROTOTYPE_INIT_BLOCK + 1):
        generator = torch.Generator().manual_seed(_block_seed(seed, block))
        values = torch.randn(PROTOTYPE_INIT_BLOCK, embedding_dim, generator=generator) * PROTOTYPE_INIT_STD
        first = block * PROTOTYPE_INIT_BLOCK
        blocks.append(values[max(start - first, 0): min(stop - first, PROTOTYPE_INIT_BLOCK)])
    return torch.cat(blocks).to(device=device, dtype=dtype or torch.get_default_dtype())


def _class_range(state: Mapping[str, Any], what: str) -> Tuple[int, int, int]:
    try:
        extra = state["_extra_state"]
        return int(extra["num_classes"]), int(extra["class_start"]), int(extra["class_stop"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"{what} is not a ShardedArcFaceHead state dict (no class range: {err!r})") from None


def merge_state_dicts(shards: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """The full (single-process) state dict from the state dicts of all the shards, in any order."""
    if not shards:
        raise ValueError("shards is empty")
    ranges = sorted((_class_range(s, f"shards[{i}]"), i) for i, s in enumerate(shards))
    num_classes = ranges[0][0][0]
    expected_start = 0
    for (classes, start, stop), i in ranges:
        if classes != num_classes:
            raise ValueError(f"shards[{i}] has num_classes={classes}, another has {num_classes}")
        if start != expected_start:
            raise ValueError(f"the shards do not tile [0, {num_classes}): a gap or overlap at class "
                             f"{min(start, expected_start)}")
        if shards[i]["weight"].shape[0] != stop - start:
            raise ValueError(f"shards[{i}] holds classes [{start}, {stop}) but its weight has "
                             f"{shards[i]['weight'].shape[0]} rows")
        expected_start = stop
    if expected_start != num_classes:
        raise ValueError(f"the shards cover [0, {expected_start}) of num_classes={num_classes}")
    weight = torch.cat([shards[i]["weight"] for _, i in ranges])
    return {"weight": weight, "_extra_state": {"num_classes": num_classes, "class_start": 0,
                                               "class_stop": num_classes}}


def shard_state_dict(full: Mapping[str, Any], rank: int, world: int) -> Dict[str, Any]:
    """Rank `rank`'s state dict for `world` ranks from a full one (`merge_state_dicts`, or a
    one-process head's `state_dict()`)."""
    num_classes, start, stop = _class_range(full, "full")
    if (start, stop) != (0, num_classes):
        raise ValueError(f"full holds classes [{start}, {stop}) of {num_classes}, not all of them: "
                         "merge the shards first (merge_state_dicts)")
    start, stop = shard_range(num_classes, rank, world)
    return {"weight": full["weight"][start:stop].clone(),
            "_extra_state": {"num_classes": num_classes, "class_start": start, "class_stop": stop}}


def gather_shard(shard: torch.Tensor, num_classes: int, *, process_group: Optional[dist.ProcessGroup] = None,
                 dst: Optional[int] = 0) -> Optional[torch.Tensor]:
    """The full [num_classes, ...] tensor from every rank's rows `shard_range(num_classes, rank,
    world)` of it (the prototype shard, or optimiser state of the same rows), on rank `dst` of
    the process group (None on the others), or on every rank with dst=None. A collective."""
    group = _Group(process_group)
    start, stop = shard_range(num_classes, group.rank, group.world)
    if shard.dim() == 0 or shard.shape[0] != stop - start:
        raise ValueError(f"shard has shape {tuple(shard.shape)}, but rank {group.rank} of {group.world} holds "
                         f"the rows [{start}, {stop}) of {num_classes}")
    if group.world == 1:
        return shard
    rows = -(-num_classes // group.world)
    padded = shard.new_zeros((rows, *shard.shape[1:]))
    padded[: stop - start] = shard
    if dst is None:
        gathered: Optional[torch.Tensor] = group.all_gather(padded)
    else:
        gathered = padded.new_empty((group.world, *padded.shape)) if group.rank == dst else None
        dist.gather(padded, None if gathered is None else list(gathered.unbind(0)),
                    group=process_group, group_dst=dst)
    if gathered is None:
        return None
    sizes = [stop - start for start, stop in (shard_range(num_classes, r, group.world) for r in range(group.world))]
    return torch.cat([gathered[r, :size] for r, size in enumerate(sizes)])


def _check_range_before_loading(module: "ShardedArcFaceHead", state_dict, prefix, *_) -> None:
    """Checks the class range before load_state_dict copies a weight of the same shape."""
    if prefix + "_extra_state" in state_dict:
        module.set_extra_state(state_dict[prefix + "_extra_state"])


class ShardedArcFaceHead(nn.Module):
    """The ArcFace prototypes of this rank's classes and `sharded_arcface_head` over them: the
    class-parallel twin of `ree.models.ArcFaceHead` (same constructor order and forward), as
    insightface's PartialFC_V2 with sample_rate=1.

    `weight` holds the classes [class_start, class_stop) of `num_classes` (`shard_range` of this
    rank in `process_group`; all of them without torch.distributed), initialised N(0, 0.01²) so
    that the shards of any world size concatenate to the one-process init of the same `seed`.
    `state_dict()` records the class range, and loading a state dict of another range raises:
    re-shard checkpoints for another world size with `merge_state_dicts` / `shard_state_dict`,
    or gather the full one with `gather_state_dict`. The weight is cast to the embeddings' dtype
    in the forward (bfloat16/float16 under autocast), so it keeps float32 master values.
    Keep it out of DistributedDataParallel, and read the gradient convention (`embedding_grad`)
    in the module docstring of ree_kernels.distributed.
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        *,
        process_group: Optional[dist.ProcessGroup] = None,
        seed: int = 0,
        scale: float = 64.0,
        margin: float = 0.5,
        margin_mode: str = "arcface",
        ri_form: str = "product",
        ignore_index: int = IGNORE_INDEX,
        backend: str = "auto",
        embedding_grad: str = "ddp",
        chunk_size: int = 0,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if not isinstance(embedding_size, int) or isinstance(embedding_size, bool) or embedding_size < 1:
            raise ValueError(f"embedding_size must be a positive int, got {embedding_size!r}")
        group = _Group(process_group)
        self.process_group = process_group
        self.num_classes = num_classes
        self.class_start, self.class_stop = shard_range(num_classes, group.rank, group.world)
        self.scale, self.margin, self.margin_mode, self.ri_form = scale, margin, margin_mode, ri_form
        self.ignore_index, self.backend, self.embedding_grad, self.chunk_size = (
            ignore_index, backend, embedding_grad, chunk_size)
        self.weight = nn.Parameter(init_prototypes(num_classes, embedding_size, self.class_start,
                                                   self.class_stop, seed=seed, dtype=dtype, device=device))
        self.register_load_state_dict_pre_hook(_check_range_before_loading)

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        *,
        ui_center: Optional[torch.Tensor] = None,
        sample_weight: Optional[torch.Tensor] = None,
        reduction: str = "mean",
        return_stats: bool = False,
    ) -> Union[torch.Tensor, HeadOutput]:
        """The loss of this rank's [B_r, D] embeddings with [B_r] global labels (the whole
        HeadOutput with return_stats=True). Every rank of the group calls it at every step."""
        weight = self.weight
        if isinstance(embeddings, torch.Tensor) and embeddings.is_floating_point():
            weight = weight.to(embeddings.dtype)
        out = sharded_arcface_head(
            embeddings, weight, labels, ui_center, num_classes=self.num_classes, process_group=self.process_group,
            scale=self.scale, margin=self.margin, margin_mode=self.margin_mode, ri_form=self.ri_form,
            sample_weight=sample_weight, ignore_index=self.ignore_index, reduction=reduction, backend=self.backend,
            embedding_grad=self.embedding_grad, chunk_size=self.chunk_size,
        )
        return out if return_stats else out.loss

    def get_extra_state(self) -> Dict[str, int]:
        return {"num_classes": self.num_classes, "class_start": self.class_start, "class_stop": self.class_stop}

    def set_extra_state(self, state: Any) -> None:
        saved = _class_range({"_extra_state": state}, "the loaded state dict")
        mine = (self.num_classes, self.class_start, self.class_stop)
        if saved != mine:
            raise ValueError(
                f"the state dict holds classes [{saved[1]}, {saved[2]}) of num_classes={saved[0]}, but this "
                f"head holds [{mine[1]}, {mine[2]}) of {mine[0]}: re-shard it with "
                "shard_state_dict(merge_state_dicts(shards), rank, world)")

    def gather_state_dict(self, dst: Optional[int] = 0) -> Optional[Dict[str, Any]]:
        """The full state dict, on rank `dst` of the process group (None on the others), or on
        every rank with dst=None. A collective: every rank must call it."""
        weight = gather_shard(self.state_dict()["weight"], self.num_classes, process_group=self.process_group,
                              dst=dst)
        if weight is None:
            return None
        return {"weight": weight, "_extra_state": {"num_classes": self.num_classes, "class_start": 0,
                                                   "class_stop": self.num_classes}}

    def extra_repr(self) -> str:
        return (f"embedding_size={self.weight.shape[1]}, classes [{self.class_start}, {self.class_stop}) of "
                f"{self.num_classes}, scale={self.scale}, margin={self.margin}, margin_mode={self.margin_mode!r}, "
                f"backend={self.backend!r}, embedding_grad={self.embedding_grad!r}")
