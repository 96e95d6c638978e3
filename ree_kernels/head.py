"""`arcface_head`: the ArcFace loss with the REE statistics, on any backend (docs/spec.md §2–§4).

Every kernel backend implements three ops with one contract (schemas in csrc/ops.cpp; the
Triton ones mirror them with a `triton_` prefix):

- `head_forward(embeddings, prototypes, labels, scale, margin, margin_mode, ignore_index,
  chunk_size, grad_filter_eps, ui_center=None, ri_form="product") -> (loss_rows, cos_pos,
  cos_neg, neg_index, lse, cos_ui, ri)`: the per-row pass of `reference.arcface_rows`, without a
  B × C tensor, completed with `reference.cosine_to_ui` (ui_center: [D], any float dtype, or
  None: cos_ui NaN) and `reference.recognizability_index` of form `ri_form` (d^UI = 1 without
  ui_center; NaN on rows without a target). Every output is [B], int64 for neg_index, else the
  statistics dtype (`reference.stat_dtype`).
- `head_backward(embeddings, prototypes, labels, lse, row_grad, scale, margin, margin_mode,
  chunk_size, grad_filter_eps) -> (grad_embeddings, grad_prototypes)`: the gradients of
  Σ row_grad_i·loss_i, recomputing the cosines as the forward computed them. A label outside
  [0, C) has no target term.
- `head_forward_with_grad(embeddings, prototypes, labels, row_coef, <options>, ui_center=None,
  ri_form="product") -> (loss, loss_rows, cos_pos, cos_neg, neg_index, lse, grad_embeddings,
  grad_prototypes, cos_ui, ri)`: the forward that also returns the gradients of
  loss = Σ row_coef_i·loss_i, for backends where that beats recomputing (`GRAD_IN_FORWARD`); the
  backward then only scales them.
- Each takes a last optional `class_index`: int64 [C'] distinct rows of prototypes (PartialFC
  sampling). The op then sees the C' classes class_index[0..C') in that order, reading those rows
  through the index (no C' × D copy): labels and neg_index are positions in class_index, and
  grad_prototypes is [C', D], row j the gradient of prototype class_index[j]. The autograd
  formula below scatters it into the [C, D] gradient that `prototypes` needs (zero elsewhere):
  the kernels then never write, nor zero-fill, the C − C' rows that get no gradient.

This module registers their fake kernels and autograd formulas, and composes them with the
reduction, which every backend shares with the reference. The ops are differentiable once: their
backward is a fused kernel (or a saved gradient), so a backward with create_graph=True raises
rather than return a gradient that cannot be differentiated again.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import functorch, reference
from .backends import (
    CUDA_EMULATED,
    CUDA_EMULATION_PREFIX,
    DESCRIPTIONS,
    EXTENSION_ERROR,
    chunk_size_for,
    kernel_op,
    resolve_backend,
)
from .reference import IGNORE_INDEX, HeadOutput, stat_dtype
from .validation import validate_class_index, validate_head_inputs, validate_kernel_options

GRAD_IN_FORWARD = frozenset(b.name for b in DESCRIPTIONS if b.grad_in_forward)
"""Backends whose `head_forward_with_grad` is faster than forward + recomputing backward."""


def _grad_prototypes_like(prototypes, class_index):
    """The op's grad_prototypes: [C, D], or [C', D] with a class index."""
    if class_index is None:
        return torch.empty_like(prototypes)
    return prototypes.new_empty(class_index.shape[0], prototypes.shape[1])


def _head_forward_fake(embeddings, prototypes, labels, scale, margin, margin_mode, ignore_index,
                       chunk_size, grad_filter_eps, ui_center=None, ri_form="product", class_index=None):
    batch = embeddings.shape[0]
    row = embeddings.new_empty(batch, dtype=stat_dtype(embeddings.dtype))
    return (row, row.clone(), row.clone(), embeddings.new_empty(batch, dtype=torch.int64), row.clone(),
            row.clone(), row.clone())


def _head_forward_with_grad_fake(embeddings, prototypes, labels, row_coef, scale, margin, margin_mode,
                                 ignore_index, chunk_size, grad_filter_eps, ui_center=None, ri_form="product",
                                 class_index=None):
    *rows, cos_ui, ri = _head_forward_fake(embeddings, prototypes, labels, scale, margin, margin_mode, ignore_index,
                                           chunk_size, grad_filter_eps)
    loss = rows[0].new_empty(())
    return (loss, *rows, torch.empty_like(embeddings), _grad_prototypes_like(prototypes, class_index), cos_ui, ri)


def _head_backward_fake(embeddings, prototypes, labels, lse, row_grad, scale, margin, margin_mode,
                        chunk_size, grad_filter_eps, class_index=None):
    return torch.empty_like(embeddings), _grad_prototypes_like(prototypes, class_index)


def _scatter_rows(grad: torch.Tensor, shape: torch.Size, class_index: Optional[torch.Tensor]) -> torch.Tensor:
    """The [C, D] gradient of `prototypes` from the op's [C', D] one: row j goes to class_index[j],
    every other row is exactly 0."""
    if class_index is None:
        return grad
    return grad.new_zeros(shape).index_copy_(0, class_index, grad)


def refuse_double_backward(
    op: str,
    alternative: str = "use backend='reference', whose eager PyTorch differentiates any number of times",
    inputs_require_grad: bool = True,
    backend: Optional[str] = None,
) -> None:
    """Raises inside a backward run with create_graph=True (the only time a backward runs with
    grad mode on), before a kernel computes a gradient that autograd could not differentiate
    again: without this, a gradient penalty would silently add nothing (the saved gradients of
    `head_forward_with_grad` are constants) or fail inside the kernel.

    torch.func.grad always runs its backward with create_graph=True, to compose with outer
    transforms; `inputs_require_grad` (`functorch.requires_second_derivative` of the op's
    inputs) tells a second derivative (create_graph=True, grad of grad) from a first one.

    Raises:
        RuntimeError: naming the op, with `alternative` (what does differentiate twice).
    """
    if torch.is_grad_enabled() and inputs_require_grad:
        which = "" if backend is None else f" (backend={backend!r})"
        raise RuntimeError(
            f"{op} can be differentiated once only{which}: its backward is a fused kernel, so a backward "
            f"with create_graph=True (a gradient penalty, a Hessian-vector product, torch.func.grad of "
            f"grad) cannot go through it; {alternative}")


def _graph_is_kept() -> bool:
    """Whether the running backward keeps the graph (retain_graph=True). A private torch query:
    where it is missing, assume it does, which is always safe (and costs a C × D copy)."""
    query = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if query is None else bool(query())


def _may_scale_in_place(*saved: torch.Tensor) -> bool:
    """Whether the saved gradients may be scaled in place: only in an eager backward on plain
    tensors at their last use. A traced backward (torch.compile, opcheck: FunctionalTensor or
    FakeTensor) must not mutate values that are also outputs of the forward graph, and with
    retain_graph=True they must survive for the next backward."""
    return (all(type(t) is torch.Tensor for t in saved) and not torch.compiler.is_compiling()
            and not functorch.transform_active() and not _graph_is_kept())


def _scaled(grad: torch.Tensor, grad_out: torch.Tensor, in_place: bool) -> torch.Tensor:
    """grad · grad_out, multiplied in at least float32 and rounded once to grad's dtype: an
    upstream gradient that fits in float32 (GradScaler's 2^16) must not overflow a float16
    factor inside the op."""
    if grad.dtype in (torch.float16, torch.bfloat16):
        return (grad.float() * grad_out.float()).to(grad.dtype)
    factor = grad_out.to(grad.dtype)
    return grad.mul_(factor) if in_place else grad * factor


def register_head_ops(prefix: str) -> None:
    """Registers the fake kernels and the autograd of `ree::{prefix}head_*`."""
    backward_op = getattr(torch.ops.ree, f"{prefix}head_backward")
    forward_name, with_grad_name = f"ree::{prefix}head_forward", f"ree::{prefix}head_forward_with_grad"

    def setup_forward(ctx, inputs, output):
        embeddings, prototypes, labels = inputs[:3]
        scale, margin, margin_mode, _, chunk_size, grad_filter_eps = inputs[3:9]
        class_index = inputs[11] if len(inputs) > 11 else None
        ctx.save_for_backward(embeddings, prototypes, labels, output[4], class_index)
        ctx.options = (scale, margin, margin_mode, chunk_size, grad_filter_eps)
        ctx.num_inputs = len(inputs)
        ctx.mark_non_differentiable(*output[1:])  # the statistics
        ctx.differentiated = functorch.requires_second_derivative(embeddings, prototypes)
        ctx.backend = functorch.backend_of(forward_name, embeddings.device)

    def backward_forward(ctx, grad_loss_rows, *_):
        refuse_double_backward(forward_name, inputs_require_grad=ctx.differentiated, backend=ctx.backend)
        embeddings, prototypes, labels, lse, class_index = ctx.saved_tensors
        # Grad mode is on here only where nothing differentiates the result (torch.func.grad's
        # backward, refused above otherwise): the backward op must not record a graph there.
        with torch.no_grad():
            extra = () if class_index is None else (class_index,)
            grad_e, grad_w = backward_op(embeddings, prototypes, labels, lse,
                                         grad_loss_rows.to(lse.dtype).contiguous(), *ctx.options, *extra)
            grad_w = _scatter_rows(grad_w, prototypes.shape, class_index)
        return (grad_e, grad_w) + (None,) * (ctx.num_inputs - 2)

    def setup_with_grad(ctx, inputs, output):
        class_index = inputs[12] if len(inputs) > 12 else None
        ctx.save_for_backward(output[6], output[7], class_index)
        ctx.prototypes_shape = inputs[1].shape
        ctx.differentiated = functorch.requires_second_derivative(*inputs[:2])
        ctx.backend = functorch.backend_of(with_grad_name, inputs[0].device)
        ctx.num_inputs = len(inputs)
        ctx.mark_non_differentiable(*output[1:])  # the statistics and the saved gradients
        # Only `loss` gets a gradient: materialising zeros for the others would allocate a C × D tensor.
        ctx.set_materialize_grads(False)

    def backward_with_grad(ctx, grad_loss, *_):
        if grad_loss is None:  # the loss got no gradient (grads are not materialised)
            return (None,) * ctx.num_inputs
        refuse_double_backward(with_grad_name, inputs_require_grad=ctx.differentiated, backend=ctx.backend)
        grad_e, grad_w, class_index = ctx.saved_tensors
        # At their last use, scaling in place keeps a single C × D gradient at the peak.
        in_place = _may_scale_in_place(grad_e, grad_w)
        grads = (_scaled(grad_e, grad_loss, in_place),
                 _scatter_rows(_scaled(grad_w, grad_loss, in_place), ctx.prototypes_shape, class_index))
        return grads + (None,) * (ctx.num_inputs - 2)

    torch.library.register_fake(forward_name)(_head_forward_fake)
    torch.library.register_fake(f"ree::{prefix}head_backward")(_head_backward_fake)
    torch.library.register_autograd(forward_name, backward_forward, setup_context=setup_forward)
    functorch.register(forward_name, setup_forward, backward_forward)
    if hasattr(torch.ops.ree, f"{prefix}head_forward_with_grad"):  # only GRAD_IN_FORWARD backends need it
        torch.library.register_fake(with_grad_name)(_head_forward_with_grad_fake)
        torch.library.register_autograd(with_grad_name, backward_with_grad, setup_context=setup_with_grad)
        functorch.register(with_grad_name, setup_with_grad, backward_with_grad)


if EXTENSION_ERROR is None:
    register_head_ops("")
if CUDA_EMULATED:
    register_head_ops(CUDA_EMULATION_PREFIX)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def arcface_head(
    embeddings: torch.Tensor,
    prototypes: torch.Tensor,
    labels: torch.Tensor,
    ui_center: Optional[torch.Tensor] = None,
    *,
    scale: float = 64.0,
    margin: float = 0.5,
    margin_mode: str = "arcface",
    ri_form: str = "product",
    sample_weight: Optional[torch.Tensor] = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    backend: str = "auto",
    chunk_size: int = 0,
    grad_filter_eps: float = 0.0,
    differentiable_stats: bool = False,
    class_index: Optional[torch.Tensor] = None,
) -> HeadOutput:
    """ArcFace loss over normalised prototypes, with the REE per-row statistics (docs/spec.md §2).

    Args:
        embeddings: [B, D] backbone embeddings, not normalised; float32, bfloat16, float16 or
            float64 (what the backend takes: `backends.DESCRIPTIONS`).
        prototypes: [C, D] class prototypes (the ArcFace weight), not normalised, same dtype.
        labels: [B] int64 class ids in [0, C), or `ignore_index`.
        ui_center: [D] centre of the unrecognizable instances (UITracker.center), or None.
        scale: s in (0, reference.MAX_SCALE]; margin: m in radians, in [0, π/2);
            margin_mode: φ, one of reference.MARGIN_MODES (docs/spec.md §3).
        ri_form: the [R] recognizability index form "product" | "ratio" | "sum" (docs/spec.md §1.4),
            or "crfiqa", CR-FIQA's certainty ratio (`reference.recognizability_index`).
        sample_weight: [B] row weights (no gradient), or None for 1.
        ignore_index: the label of rows that add no loss (their statistics are NaN, see HeadOutput).
        reduction: "mean" (weighted, over rows not ignored) | "sum" | "none" ([B], weighted).
        backend: "auto" | "reference" | "cpu" | "cuda" | "triton" (`backends.BACKENDS`).
        chunk_size: the kernels' tiling override, 0 for automatic; what it means and accepts
            depends on the backend (`backends.DESCRIPTIONS`). Under backend="auto" it is fitted
            into the chosen backend's range, so a value tuned for one backend never fails on
            another; a backend asked for by name raises on a value it does not take.
        grad_filter_eps: Triton only: skip backward tiles whose |softmax − one-hot| < eps
            everywhere (0, the default, is exact).
        class_index: int64 [C'] distinct classes in [0, C) (PartialFC sampling,
            `ree.models.sample_classes`), or None for all C. The loss then runs over these C'
            classes only, reading their prototypes through the index: `labels` and the returned
            `neg_index` are positions in class_index, and the prototypes' gradient is exactly 0 on
            every row not in it. The same as `prototypes[class_index]` with those labels.
        differentiable_stats: make cos_pos, cos_neg, cos_ui and ri differentiable with respect
            to the embeddings, the prototypes (the rows y_i and neg_index_i) and ui_center, with
            the same values (an ablation of the paper's detached RI target). Off: they carry no
            gradient and cost nothing more.

    Returns:
        HeadOutput (see its docstring for every field). `loss` is differentiable with respect
        to embeddings and prototypes, once (create_graph=True raises on the kernel backends;
        the reference differentiates any number of times).

    Raises:
        TypeError: an argument of the wrong type or dtype, or a dtype the backend does not take.
        ValueError: bad shapes, devices or options, a scalar out of range, a label out of range
            (CPU tensors; on CUDA a device-side assertion, see validate_head_inputs), a
            chunk_size the named backend does not take, grad_filter_eps on a backend without it.
        RuntimeError: the backend cannot run here (not built, not installed, another device).
    """
    num_classes = None if class_index is None else validate_class_index(class_index, prototypes)
    validate_head_inputs(
        embeddings, prototypes, labels, ui_center, sample_weight,
        scale=scale, margin=margin, margin_mode=margin_mode, ri_form=ri_form,
        ignore_index=ignore_index, reduction=reduction, num_classes=num_classes,
    )
    validate_kernel_options(chunk_size, grad_filter_eps)
    if not isinstance(differentiable_stats, bool):
        raise TypeError(f"differentiable_stats must be a bool, got {type(differentiable_stats).__name__}")
    chosen = resolve_backend(backend, "head", embeddings.device, embeddings.dtype)
    chunk_size = chunk_size_for(backend, chosen, chunk_size)
    if grad_filter_eps and chosen != "triton":
        raise ValueError(f"grad_filter_eps is implemented by the triton backend only, not {chosen!r}")
    if chosen == "reference":
        # The specification materialises everything, the sampled prototypes included.
        sampled = prototypes if class_index is None else prototypes.index_select(0, class_index)
        out = reference.arcface_head(
            embeddings, sampled, labels, ui_center,
            scale=scale, margin=margin, margin_mode=margin_mode, ri_form=ri_form,
            sample_weight=sample_weight, ignore_index=ignore_index, reduction=reduction,
        )
    else:
        embeddings_c, prototypes_c = embeddings.contiguous(), prototypes.contiguous()
        labels_c = labels.contiguous()
        options = (float(scale), float(margin), margin_mode, ignore_index, chunk_size, float(grad_filter_eps),
                   ui_center, ri_form) + (() if class_index is None else (class_index.contiguous(),))
        coef = reference.loss_coefficients(
            labels_c, sample_weight, ignore_index, reduction, stat_dtype(embeddings.dtype))
        if (reduction != "none" and chosen in GRAD_IN_FORWARD and _needs_grad(embeddings, prototypes)
                and embeddings.dtype == coef.dtype):
            # Not for half inputs: their gradients would be computed unscaled and stored in half,
            # where a loss scaler's small gradients underflow; the backward op scales first.
            loss, _, cos_pos, cos_neg, neg_index, lse, _, _, cos_ui, ri = functorch.call(
                kernel_op(chosen, "head_forward_with_grad"), embeddings_c, prototypes_c, labels_c,
                coef.contiguous(), *options)
        else:
            loss_rows, cos_pos, cos_neg, neg_index, lse, cos_ui, ri = functorch.call(
                kernel_op(chosen, "head_forward"), embeddings_c, prototypes_c, labels_c, *options)
            loss = reference.reduce_rows(loss_rows, coef, reduction)
        out = HeadOutput(loss, cos_pos, cos_neg, neg_index, cos_ui, ri, lse)
    if differentiable_stats:
        # An ablation: with a class index it differentiates through a gathered copy.
        sampled = prototypes if class_index is None else prototypes.index_select(0, class_index)
        out = reference.attach_statistic_gradients(out, embeddings, sampled, labels, ui_center,
                                                   ignore_index=ignore_index, ri_form=ri_form)
    return out
