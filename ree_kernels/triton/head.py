"""`ree::triton_head_forward` and `ree::triton_head_backward`: the ArcFace head in Triton.

The contract is the one of every head backend (ree_kernels/head.py); the semantics are those
of `reference.arcface_rows`, completed with `statistics.cosine_to_ui` and
`statistics.recognizability_index`. Nothing of size B × C is ever stored: the forward streams
tiles of prototypes past a block of rows (flash-attention style) and keeps per-row running
values, the backward recomputes the tiles. docs/design.md (`## Triton backend`) explains the
choices. This module launches the kernels and registers the ops; the kernels are in
head_forward.py and head_backward.py, their shared formulas in formulas.py, the tiling in
tiling.py. No atomics anywhere: every result is bitwise deterministic for a given device and
shape.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import triton

from ..backends import BY_NAME
from ..contract import MARGIN_MODES, RI_FORMS, margin_constants
from ..registration import register_head_ops
from . import tiling
from .head_backward import backward_rows_kernel, grad_embeddings_kernel, grad_prototypes_kernel
from .head_forward import forward_finish_kernel, forward_tiles_kernel, norms_kernel

MARGIN_MODE_IDS = {mode: k for k, mode in enumerate(MARGIN_MODES)}
"""margin_mode → the MODE constexpr of the kernels (the order of contract.MARGIN_MODES)."""
RI_FORM_IDS = {form: k for k, form in enumerate(RI_FORMS)}
"""ri_form → the RI_FORM constexpr of the kernels (the order of contract.RI_FORMS)."""

SUPPORTED_DTYPES = BY_NAME["triton"].dtypes

# The head's kernels turn cosines into logits s·cos and subtract a maximum or the lse: they are
# compiled without FMA contraction, which would fuse the product into the subtraction and round
# the logits differently in the forward and the backward (docs/design.md, "Large logit
# scales"). The interpreter ignores the option.
_NO_FUSION = dict(enable_fp_fusion=False)
# The norms pass keeps FMA contraction, as every launch had it so far: Triton up to 3.9 fuses by
# default (3.10 will not), and its results feed both passes alike. Passed explicitly, so a new
# Triton cannot change the numbers silently.
_FUSION = dict(enable_fp_fusion=True)


def _check_inputs(embeddings: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor) -> None:
    """What the op needs beyond `validate_head_inputs` (which callers of the op may skip)."""
    if embeddings.dtype not in SUPPORTED_DTYPES or prototypes.dtype != embeddings.dtype:
        names = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
        raise TypeError(f"embeddings and prototypes must share one dtype among {names}; "
                        f"got {embeddings.dtype} and {prototypes.dtype}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be int64, got {labels.dtype}")
    if embeddings.dim() != 2 or prototypes.dim() != 2 or embeddings.shape[1] != prototypes.shape[1]:
        raise ValueError(f"embeddings [B, D] and prototypes [C, D] must share D; got {tuple(embeddings.shape)} "
                         f"and {tuple(prototypes.shape)}")
    if embeddings.shape[0] == 0 or prototypes.shape[0] == 0 or embeddings.shape[1] == 0:
        raise ValueError("embeddings and prototypes must be non-empty")
    if labels.shape != embeddings.shape[:1]:
        raise ValueError(f"labels has shape {tuple(labels.shape)}, expected ({embeddings.shape[0]},)")


def _ui_direction(ui_center: Optional[torch.Tensor], embeddings: torch.Tensor) -> Optional[torch.Tensor]:
    """ui_center as the norms kernel reads it: [D] float32 (statistics.cosine_to_ui's ū)."""
    if ui_center is None:
        return None
    if not ui_center.is_floating_point() or ui_center.shape != embeddings.shape[1:]:
        raise ValueError(f"ui_center must be a floating [D] tensor with D = {embeddings.shape[1]}, got "
                         f"{ui_center.dtype} of shape {tuple(ui_center.shape)}")
    if ui_center.device != embeddings.device:
        raise ValueError(f"ui_center is on {ui_center.device} but embeddings is on {embeddings.device}")
    return ui_center.to(torch.float32).contiguous()


def _class_index(class_index: Optional[torch.Tensor], prototypes: torch.Tensor) -> Optional[torch.Tensor]:
    """The class index as the kernels read it (int64, contiguous), checked as far as the op can
    without reading the data (`validation.validate_class_index` checks the values)."""
    if class_index is None:
        return None
    if class_index.dtype != torch.int64 or class_index.dim() != 1 or class_index.shape[0] == 0:
        raise ValueError(f"class_index must be a non-empty int64 [C'], got {class_index.dtype} of shape "
                         f"{tuple(class_index.shape)}")
    if class_index.device != prototypes.device:
        raise ValueError(f"class_index is on {class_index.device} but prototypes is on {prototypes.device}")
    return class_index.contiguous()


def _squared_norms(x: torch.Tensor, ui: Optional[torch.Tensor] = None,
                   cos_ui: Optional[torch.Tensor] = None, index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """‖x_r‖² in float32 (of rows index[r] with an index); with `ui`, also the rows' cosines to
    it, written into `cos_ui`."""
    rows = x.shape[0] if index is None else index.shape[0]
    out = torch.empty(rows, dtype=torch.float32, device=x.device)
    block_k = min(triton.next_power_of_2(x.shape[1]), 128)
    has_ui = ui is not None
    norms_kernel[(triton.cdiv(rows, 64),)](
        x, out if index is None else index, out, rows, x.shape[1], ui if has_ui else out, cos_ui if has_ui else out,
        HAS_UI=has_ui, HAS_INDEX=index is not None, BLOCK_R=64, BLOCK_K=block_k, **_FUSION)
    return out


def _float16_headroom(row_grad: torch.Tensor, scale: float) -> torch.Tensor:
    """A power of two (a float32 device scalar, at least 1: no host read) that brings the row
    factors row_grad·s of the float16 dot operands G = row_grad·s·(p − y) down to at most 2^10.
    A loss scaler's 2^16 would otherwise overflow G (float16's maximum is 65504) although the
    gradients themselves fit; dividing by it and multiplying the float32 results back is exact."""
    _, exponent = torch.frexp(row_grad.abs().amax() * scale)
    return torch.ldexp(torch.ones((), device=row_grad.device), (exponent - 10).clamp_min(0))


def margin_args(margin: float, margin_mode: str) -> Dict[str, float]:
    """The margin's kernel arguments: contract.margin_constants and the MODE constexpr."""
    if margin_mode not in MARGIN_MODE_IDS:
        raise ValueError(f"margin_mode must be one of {MARGIN_MODES}, got {margin_mode!r}")
    return dict(margin=margin, **margin_constants(margin)._asdict(), MODE=MARGIN_MODE_IDS[margin_mode])


def forward_rows(embeddings: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor, scale: float,
                 margin: float, margin_mode: str, ignore_index: int, chunk_size: int = 0,
                 num_splits: Optional[int] = None, ui_center: Optional[torch.Tensor] = None,
                 ri_form: str = "product", class_index: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, ...]:
    """The forward of the op: (loss_rows, cos_pos, cos_neg, neg_index, lse, cos_ui, ri).
    `num_splits` overrides how many class splits run side by side (None: from the
    multiprocessor count)."""
    _check_inputs(embeddings, prototypes, labels)
    index = _class_index(class_index, prototypes)
    class_tile = tiling.class_tile_override(chunk_size)
    margin_kw = margin_args(float(margin), margin_mode)
    if ri_form not in RI_FORM_IDS:
        raise ValueError(f"ri_form must be one of {RI_FORMS}, got {ri_form!r}")
    ui = _ui_direction(ui_center, embeddings)
    e, w, labels = embeddings.contiguous(), prototypes.contiguous(), labels.contiguous()
    (batch, dim), classes = e.shape, w.shape[0] if index is None else index.shape[0]
    device = e.device
    loss, cos_pos, cos_neg, lse, cos_ui, ri = (torch.empty(batch, dtype=torch.float32, device=device)
                                               for _ in range(6))
    neg_index = torch.empty(batch, dtype=torch.int64, device=device)
    e_sq, w_sq = _squared_norms(e, ui, cos_ui), _squared_norms(w, index=index)
    index_arg = dict(index_ptr=w_sq if index is None else index, HAS_INDEX=index is not None)

    configs = tiling.forward_configs(dim, class_tile, e.dtype)
    align = max(c["BLOCK_C"] for c in configs)
    smallest_rows = min(c["BLOCK_B"] for c in configs)
    splits, split_size = tiling.class_splits(classes, triton.cdiv(batch, smallest_rows), align, device, num_splits)
    part_max, part_sum, part_best = (torch.empty(splits, batch, dtype=torch.float32, device=device) for _ in range(3))
    part_index = torch.empty(splits, batch, dtype=torch.int64, device=device)
    tiling.launch(forward_tiles_kernel, lambda meta: (triton.cdiv(batch, meta["BLOCK_B"]), splits), configs,
                  e_ptr=e, w_ptr=w, labels_ptr=labels, e_sq_ptr=e_sq, w_sq_ptr=w_sq, **index_arg,
                  part_max_ptr=part_max, part_sum_ptr=part_sum, part_best_ptr=part_best, part_index_ptr=part_index,
                  B=batch, C=classes, D=dim, ignore_index=ignore_index, split_size=split_size, scale=scale,
                  PRECISION=tiling.precision(e.dtype), UPCAST=tiling.upcast(e.dtype), **_NO_FUSION)

    forward_finish_kernel[(triton.cdiv(batch, tiling.ROW_BLOCK),)](
        e, w, index_arg["index_ptr"], labels, e_sq, w_sq, part_max, part_sum, part_best, part_index, splits,
        loss, cos_pos, cos_neg, neg_index, lse, cos_ui, ri, batch, classes, dim, ignore_index, scale,
        HAS_UI=ui is not None, RI_FORM=RI_FORM_IDS[ri_form], HAS_INDEX=index is not None, BLOCK_B=tiling.ROW_BLOCK,
        BLOCK_K=min(triton.next_power_of_2(dim), tiling.ROW_BLOCK_K), **margin_kw, **_NO_FUSION)
    return loss, cos_pos, cos_neg, neg_index, lse, cos_ui, ri


def backward_grads(embeddings: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                   row_grad: torch.Tensor, scale: float, margin: float, margin_mode: str, chunk_size: int = 0,
                   grad_filter_eps: float = 0.0, num_splits: Optional[int] = None,
                   tiles_needed: Optional[List[torch.Tensor]] = None,
                   class_index: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The backward of the op. `num_splits` as in `forward_rows`; with the filter on, the
    per-tile keep/skip flags are appended to `tiles_needed` when a list is given (tests). With
    `class_index`, grad_prototypes is [C', D] (the op's contract)."""
    _check_inputs(embeddings, prototypes, labels)
    index = _class_index(class_index, prototypes)
    class_tile = tiling.class_tile_override(chunk_size)
    if not 0.0 <= grad_filter_eps < 1.0:
        raise ValueError(f"grad_filter_eps must be in [0, 1), got {grad_filter_eps}")
    margin_kw = margin_args(float(margin), margin_mode)
    e, w, labels = embeddings.contiguous(), prototypes.contiguous(), labels.contiguous()
    lse = lse.to(torch.float32).contiguous()
    row_grad = row_grad.to(torch.float32)
    headroom = e.dtype == torch.float16
    if headroom:
        shift = _float16_headroom(row_grad, scale)
        row_grad = row_grad / shift
    row_grad = row_grad.contiguous()
    (batch, dim), classes = e.shape, w.shape[0] if index is None else index.shape[0]
    device = e.device
    e_sq, w_sq = _squared_norms(e), _squared_norms(w, index=index)
    index_arg = dict(index_ptr=w_sq if index is None else index, HAS_INDEX=index is not None)

    label_grad = torch.empty(batch, dtype=torch.float32, device=device)
    row_mass = torch.empty(batch, dtype=torch.float32, device=device)
    backward_rows_kernel[(triton.cdiv(batch, tiling.ROW_BLOCK),)](
        e, w, index_arg["index_ptr"], labels, e_sq, w_sq, lse, row_grad, label_grad, row_mass, batch, classes, dim,
        scale, HAS_INDEX=index is not None, BLOCK_B=tiling.ROW_BLOCK,
        BLOCK_K=min(triton.next_power_of_2(dim), tiling.ROW_BLOCK_K), **margin_kw, **_NO_FUSION)

    filtered = grad_filter_eps > 0.0
    # The filter skips a tile only if all its rows are certain there: grouping the rows by their
    # off-label mass puts the certain rows together, so one uncertain row does not keep a whole
    # block of certain ones (a stable sort: deterministic).
    order = torch.argsort(row_mass, stable=True) if filtered else torch.arange(batch, device=device)
    configs = tiling.backward_configs(dim, class_tile, filtered, e.dtype)
    align = max(c["BLOCK_C"] for c in configs)
    row_programs = triton.cdiv(batch, min(c["BLOCK_B"] for c in configs))
    d_programs = triton.cdiv(dim, max(c["BLOCK_DO"] for c in configs))
    splits, split_size = tiling.class_splits(classes, row_programs * d_programs, align, device, num_splits)
    if filtered:
        block_b, block_c = configs[0]["BLOCK_B"], configs[0]["BLOCK_C"]
        num_col_tiles = splits * (split_size // block_c)
        needed = torch.empty(triton.cdiv(batch, block_b), num_col_tiles, dtype=torch.int8, device=device)
    else:
        num_col_tiles = 0
        needed = torch.empty(1, dtype=torch.int8, device=device)
    common = dict(e_ptr=e, w_ptr=w, **index_arg, labels_ptr=labels, e_sq_ptr=e_sq, w_sq_ptr=w_sq, lse_ptr=lse,
                  row_grad_ptr=row_grad, label_grad_ptr=label_grad, row_mass_ptr=row_mass, order_ptr=order,
                  needed_ptr=needed, B=batch, C=classes, D=dim, num_col_tiles=num_col_tiles, scale=scale,
                  # head_backward.dot_operands: where 1/‖x‖ goes.
                  FILTER=filtered, NORMALIZE_OPERAND=e.dtype == torch.float16,
                  PRECISION=tiling.precision(e.dtype), UPCAST=tiling.upcast(e.dtype), **_NO_FUSION)

    partial = torch.empty(splits, batch, dim, dtype=torch.float32, device=device)
    tiling.launch(grad_embeddings_kernel,
                  lambda meta: (triton.cdiv(batch, meta["BLOCK_B"]), triton.cdiv(dim, meta["BLOCK_DO"]), splits),
                  configs, partial_ptr=partial, split_size=split_size, filter_eps=grad_filter_eps, **common)
    grad_w = torch.empty(classes, dim, dtype=w.dtype, device=device)  # by column: [C', D] with an index
    tiling.launch(grad_prototypes_kernel,
                  lambda meta: (triton.cdiv(classes, meta["BLOCK_C"]), triton.cdiv(dim, meta["BLOCK_DO"])),
                  configs, grad_w_ptr=grad_w, **common)
    if tiles_needed is not None and filtered:
        tiles_needed.append(needed[:, :triton.cdiv(classes, block_c)])
    grad_e = partial[0] if splits == 1 else partial.sum(0)  # a fixed order: deterministic
    if headroom:  # the power of two back, in float32, before the one rounding to float16
        grad_e, grad_w = grad_e * shift, (grad_w.float() * shift).to(grad_w.dtype)
    return grad_e.to(e.dtype), grad_w


# --------------------------------------------------------------------------------------------
# The ops
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("ree::triton_head_forward", mutates_args=())
def head_forward(embeddings: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor, scale: float,
                 margin: float, margin_mode: str, ignore_index: int, chunk_size: int, grad_filter_eps: float,
                 ui_center: Optional[torch.Tensor] = None, ri_form: str = "product",
                 class_index: Optional[torch.Tensor] = None,
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                            torch.Tensor]:
    """(loss_rows, cos_pos, cos_neg, neg_index, lse, cos_ui, ri); `grad_filter_eps` acts in the backward."""
    return forward_rows(embeddings, prototypes, labels, scale, margin, margin_mode, ignore_index, chunk_size,
                        ui_center=ui_center, ri_form=ri_form, class_index=class_index)


@torch.library.custom_op("ree::triton_head_backward", mutates_args=())
def head_backward(embeddings: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                  row_grad: torch.Tensor, scale: float, margin: float, margin_mode: str, chunk_size: int,
                  grad_filter_eps: float, class_index: Optional[torch.Tensor] = None,
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(∂/∂embeddings, ∂/∂prototypes) of Σ row_grad_i·loss_i, given the saved lse."""
    return backward_grads(embeddings, prototypes, labels, lse, row_grad, scale, margin, margin_mode,
                          chunk_size, grad_filter_eps, class_index=class_index)


register_head_ops("triton_")
