"""`arcface_head`: the ArcFace loss with the REE statistics, on any backend (docs/spec.md §2–§4).

Every kernel backend implements three ops with one contract (schemas in csrc/ops.cpp; the
Triton ones mirror them with a `triton_` prefix):

- `head_forward(embeddings, prototypes, labels, scale, margin, margin_mode, ignore_index,
  chunk_size, grad_filter_eps, ui_center=None, ri_form="product") -> (loss_rows, cos_pos,
  cos_neg, neg_index, lse, cos_ui, ri)`: the per-row pass of `reference.arcface_rows`, without a
  B × C tensor, completed with `statistics.cosine_to_ui` (ui_center: [D], any float dtype, or
  None: cos_ui NaN) and `statistics.recognizability_index` of form `ri_form` (d^UI = 1 without
  ui_center; NaN on rows without a target). Every output is [B], int64 for neg_index, else the
  statistics dtype (`contract.stat_dtype`).
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

`registration` registers their fake kernels and autograd formulas; this module validates the
inputs (once per call), chooses the backend and composes the ops with the reduction, which every
backend shares with the reference.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from . import registration
from .backends import DESCRIPTIONS, chunk_size_for, kernel_op, resolve_backend
from .contract import HeadOptions, HeadOutput, loss_coefficients, reduce_rows, stat_dtype
from .statistics import attach_statistic_gradients
from .validation import validate_class_index, validate_head_inputs

GRAD_IN_FORWARD = frozenset(b.name for b in DESCRIPTIONS if b.grad_in_forward)
"""Backends whose `head_forward_with_grad` is faster than forward + recomputing backward."""


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _check(embeddings: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor,
           ui_center: Optional[torch.Tensor], sample_weight: Optional[torch.Tensor],
           class_index: Optional[torch.Tensor], differentiable_stats: bool, options: dict) -> HeadOptions:
    """Validates every argument of `arcface_head`, once; the options with the concrete backend
    and the chunk_size it takes."""
    opts = HeadOptions(**options)
    num_classes = None if class_index is None else validate_class_index(class_index, prototypes)
    validate_head_inputs(embeddings, prototypes, labels, ui_center, sample_weight, num_classes=num_classes, **options)
    if not isinstance(differentiable_stats, bool):
        raise TypeError(f"differentiable_stats must be a bool, got {type(differentiable_stats).__name__}")
    chosen = resolve_backend(opts.backend, "head", embeddings.device, embeddings.dtype)
    chunk_size = chunk_size_for(opts.backend, chosen, opts.chunk_size)
    if opts.grad_filter_eps and chosen != "triton":
        raise ValueError(f"grad_filter_eps is implemented by the triton backend only, not {chosen!r}")
    return opts._replace(backend=chosen, chunk_size=chunk_size)


def _selected(prototypes: torch.Tensor, class_index: Optional[torch.Tensor]) -> torch.Tensor:
    """The prototypes the loss runs over, as a copy with a class index (what the eager paths take)."""
    return prototypes if class_index is None else prototypes.index_select(0, class_index)


def _kernel_head(embeddings: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor,
                 ui_center: Optional[torch.Tensor], sample_weight: Optional[torch.Tensor],
                 class_index: Optional[torch.Tensor], opts: HeadOptions) -> HeadOutput:
    """The head on the kernel backend `opts.backend`: the forward op, or the forward that also
    computes the gradients where that is faster, and the reduction."""
    embeddings_c, prototypes_c, labels_c = embeddings.contiguous(), prototypes.contiguous(), labels.contiguous()
    args = (float(opts.scale), float(opts.margin), opts.margin_mode, opts.ignore_index, opts.chunk_size,
            float(opts.grad_filter_eps), ui_center, opts.ri_form) + (
        () if class_index is None else (class_index.contiguous(),))
    coef = loss_coefficients(labels_c, sample_weight, opts.ignore_index, opts.reduction, stat_dtype(embeddings.dtype))
    if (opts.reduction != "none" and opts.backend in GRAD_IN_FORWARD and _needs_grad(embeddings, prototypes)
            and embeddings.dtype == coef.dtype):
        # Not for half inputs: their gradients would be computed unscaled and stored in half,
        # where a loss scaler's small gradients underflow; the backward op scales first.
        loss, _, cos_pos, cos_neg, neg_index, lse, _, _, cos_ui, ri = registration.call(
            kernel_op(opts.backend, "head_forward_with_grad"), embeddings_c, prototypes_c, labels_c,
            coef.contiguous(), *args)
    else:
        loss_rows, cos_pos, cos_neg, neg_index, lse, cos_ui, ri = registration.call(
            kernel_op(opts.backend, "head_forward"), embeddings_c, prototypes_c, labels_c, *args)
        loss = reduce_rows(loss_rows, coef, opts.reduction)
    return HeadOutput(loss, cos_pos, cos_neg, neg_index, cos_ui, ri, lse)


def _reference_head(embeddings: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor,
                    ui_center: Optional[torch.Tensor], sample_weight: Optional[torch.Tensor],
                    class_index: Optional[torch.Tensor], opts: HeadOptions) -> HeadOutput:
    """The head on backend="reference": the specification, which materialises everything, the
    sampled prototypes included."""
    head = registration.reference_op("arcface_head")
    return head(embeddings, _selected(prototypes, class_index), labels, ui_center, sample_weight=sample_weight,
                **opts._asdict())


def arcface_head(
    embeddings: torch.Tensor,
    prototypes: torch.Tensor,
    labels: torch.Tensor,
    ui_center: Optional[torch.Tensor] = None,
    *,
    sample_weight: Optional[torch.Tensor] = None,
    class_index: Optional[torch.Tensor] = None,
    differentiable_stats: bool = False,
    **options: Any,
) -> HeadOutput:
    """ArcFace loss over normalised prototypes, with the REE per-row statistics (docs/spec.md §2).

    Args:
        embeddings: [B, D] backbone embeddings, not normalised; float32, bfloat16, float16 or
            float64 (what the backend takes: `backends.DESCRIPTIONS`).
        prototypes: [C, D] class prototypes (the ArcFace weight), not normalised, same dtype.
        labels: [B] int64 class ids in [0, C), or `ignore_index`.
        ui_center: [D] centre of the unrecognizable instances (UITracker.center), or None.
        sample_weight: [B] row weights (no gradient), or None for 1.
        class_index: int64 [C'] distinct classes in [0, C) (PartialFC sampling,
            `ree.models.sample_classes`), or None for all C. The loss then runs over these C'
            classes only, reading their prototypes through the index: `labels` and the returned
            `neg_index` are positions in class_index, and the prototypes' gradient is exactly 0 on
            every row not in it. The same as `prototypes[class_index]` with those labels.
        differentiable_stats: make cos_pos, cos_neg, cos_ui and ri differentiable with respect
            to the embeddings, the prototypes (the rows y_i and neg_index_i) and ui_center, with
            the same values (an ablation of the paper's detached RI target). Off: they carry no
            gradient and cost nothing more.
        **options: the head's options, the keywords of `contract.HeadOptions` (scale, margin,
            margin_mode, ri_form, ignore_index, reduction, backend, chunk_size,
            grad_filter_eps), whose docstring says what each means and accepts.

    Returns:
        HeadOutput (see its docstring for every field). `loss` is differentiable with respect
        to embeddings and prototypes, once (create_graph=True raises on the kernel backends;
        the reference differentiates any number of times).

    Raises:
        TypeError: an argument of the wrong type or dtype, an unknown option, or a dtype the
            backend does not take.
        ValueError: bad shapes, devices or options, a scalar out of range, a label out of range
            (CPU tensors; on CUDA a device-side assertion, see validate_head_inputs), a
            chunk_size the named backend does not take, grad_filter_eps on a backend without it.
        RuntimeError: the backend cannot run here (not built, not installed, another device).
    """
    opts = _check(embeddings, prototypes, labels, ui_center, sample_weight, class_index, differentiable_stats,
                  options)
    run = _reference_head if opts.backend == "reference" else _kernel_head
    out = run(embeddings, prototypes, labels, ui_center, sample_weight, class_index, opts)
    if differentiable_stats:
        # An ablation: with a class index it differentiates through a gathered copy.
        out = attach_statistic_gradients(out, embeddings, _selected(prototypes, class_index), labels, ui_center,
                                         ignore_index=opts.ignore_index, ri_form=opts.ri_form)
    return out
