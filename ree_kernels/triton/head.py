"""`ree::triton_head_forward` and `ree::triton_head_backward`: the ArcFace head in Triton.

The contract is the one of every head backend (ree_kernels/head.py); the semantics are those
of `reference.arcface_rows`. Nothing of size B × C is ever stored: the forward streams tiles
of prototypes past a block of rows (flash-attention style) and keeps per-row running values,
the backward recomputes the tiles. docs/design.md (`## Triton backend`) explains the choices.

Kernels, in the order they run:
- `_norms_kernel`: ‖x‖ per row of the embeddings and of the prototypes (float32).
- `_forward_tiles_kernel`: per (row block, class split), over the split's class tiles: the
  cosines (tl.dot, float32 accumulation), an online log-sum-exp and the nearest candidate over
  the columns that are not the row's label. Writes per-row partials for its split.
- `_forward_finish_kernel`: combines the splits in order, adds the label column with its
  margin and writes the five per-row outputs.
- `_backward_rows_kernel`: the label column's gradient per row (needs the margin's φ′).
- `_grad_embeddings_kernel`: per (row block, D block, class split): Σ_j G_ij ŵ_j, with the
  normalisation's backward; the splits are summed afterwards in a fixed order.
- `_grad_prototypes_kernel`: per (class block, D block), over every row block: Σ_i G_ij ê_i.
No atomics anywhere: every result is bitwise deterministic for a given device and shape.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .. import reference
from ..backends import TRITON_INTERPRET
from ..head import register_head_ops

_NORM_EPS = tl.constexpr(reference.NORM_EPS)
_SIN_EPS = tl.constexpr(reference.SIN_EPS)
_LOG2E = math.log2(math.e)

MARGIN_MODE_IDS = {mode: k for k, mode in enumerate(reference.MARGIN_MODES)}
"""margin_mode → the MODE constexpr of the kernels (the order of reference.MARGIN_MODES)."""

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MIN_TILE, MAX_TILE = 16, 1024
"""Bounds of the class tile that `chunk_size` may set (tl.dot needs at least 16)."""


# --------------------------------------------------------------------------------------------
# Formulas shared by the kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _inverse_norm(norm):
    """1 / max(‖x‖, NORM_EPS): the divisor of reference.normalize (F.normalize)."""
    return 1.0 / tl.maximum(norm, _NORM_EPS)


@triton.jit
def _clamp_cosine(x):
    """clamp(x, −1, 1) keeping NaN, as torch.clamp does (so non-finite inputs stay visible)."""
    return tl.clamp(x, -1.0, 1.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _margin(cos, sin_squared, margin, cos_m, sin_m, threshold, fallback, MODE: tl.constexpr):
    """(φ(cos), dφ/dcos) of reference.margin_logit, as its autograd differentiates it.

    MODE follows reference.MARGIN_MODES: 0 arcface, 1 arcface_easy, 2 arcface_st, 3 cosface.
    `sin_squared` is 1 − cos² (see `_label_cosine`); sin θ = sqrt(max(1 − cos², SIN_EPS)), and
    the clamp passes the gradient where 1 − cos² ≥ SIN_EPS (torch.clamp_min's rule)."""
    one_minus = sin_squared
    sin = tl.sqrt(tl.maximum(one_minus, _SIN_EPS))
    shifted = cos * cos_m - sin * sin_m  # cos(θ + m)
    dshifted = cos_m + tl.where(one_minus >= _SIN_EPS, cos / sin * sin_m, 0.0)
    one = tl.full(cos.shape, 1.0, tl.float32)
    if MODE == 0:  # arcface: insightface's linear fallback once θ + m > π
        phi = tl.where(cos > threshold, shifted, cos - fallback)
        dphi = tl.where(cos > threshold, dshifted, one)
    elif MODE == 1:  # arcface_easy
        phi = tl.where(cos > 0.0, shifted, cos)
        dphi = tl.where(cos > 0.0, dshifted, one)
    elif MODE == 2:  # arcface_st: forward of cos(θ + m), gradient of the identity
        phi = shifted
        dphi = one
    else:  # cosface
        phi = cos - margin
        dphi = one
    return phi, dphi


@triton.jit
def _dot_operand(x, UPCAST: tl.constexpr):
    """The interpreter multiplies bfloat16 tiles as raw integers; float32 operands give the
    same products (bf16 × bf16 is exact in float32) and the same float32 accumulation."""
    if UPCAST:
        return x.to(tl.float32)
    return x


@triton.jit
def _to_input_dtype(x, dtype: tl.constexpr):
    # Explicit round-to-nearest-even: the interpreter's default float32 → bfloat16 cast truncates.
    if dtype == tl.float32:
        return x
    return x.to(dtype, fp_downcast_rounding="rtne")


@triton.jit
def _cosine_numerators(e_ptr, w_ptr, rows, row_ok, cols, col_ok, D,
                       PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """e_i · w_j for a [BLOCK_B, BLOCK_C] tile, inputs in their dtype, float32 accumulation."""
    acc = tl.zeros((BLOCK_B, BLOCK_C), tl.float32)
    e_rows = rows.to(tl.int64) * D
    w_rows = cols.to(tl.int64) * D
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < D
        e = tl.load(e_ptr + e_rows[:, None] + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + w_rows[None, :] + kk[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(_dot_operand(e, UPCAST), _dot_operand(w, UPCAST), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _label_cosine(e_ptr, w_ptr, e_norm, w_norm_ptr, rows, row_ok, labels, has_target, D,
                  BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """(clamped cosine, 1 − cosine²) to the label's prototype, for rows with a target (0, 1
    elsewhere). φ has a square-root singularity at cos = ±1, where the planted peaky rows sit:
    1 − cos² from a rounded cosine is off by ~1e-7 in float32 (φ then by ~1e-2·s), so it is
    computed as ‖ê − ŵ‖²·‖ê + ŵ‖²/4, the same value in exact arithmetic for unit vectors,
    accurate near ±1. Rows or prototypes below NORM_EPS are not unit vectors: 1 − cos² there."""
    take = row_ok & has_target
    e_rows = rows.to(tl.int64) * D
    label_rows = tl.where(take, labels, 0)  # never an out-of-range address
    w_rows = label_rows.to(tl.int64) * D
    w_norm = tl.load(w_norm_ptr + label_rows, mask=take, other=1.0)
    inv_e = _inverse_norm(e_norm)
    inv_w = _inverse_norm(w_norm)
    dot = tl.zeros((BLOCK_B,), tl.float32)
    apart = tl.zeros((BLOCK_B,), tl.float32)
    together = tl.zeros((BLOCK_B,), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        mask = take[:, None] & (kk < D)[None, :]
        e = tl.load(e_ptr + e_rows[:, None] + kk[None, :], mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + w_rows[:, None] + kk[None, :], mask=mask, other=0.0).to(tl.float32)
        dot += tl.sum(e * w, axis=1)
        e_hat = e * inv_e[:, None]
        w_hat = w * inv_w[:, None]
        apart += tl.sum((e_hat - w_hat) * (e_hat - w_hat), axis=1)
        together += tl.sum((e_hat + w_hat) * (e_hat + w_hat), axis=1)
    cos = _clamp_cosine(dot * inv_e * inv_w)
    unit = (e_norm >= _NORM_EPS) & (w_norm >= _NORM_EPS)
    sin_squared = tl.where(unit, apart * together * 0.25, 1.0 - cos * cos)
    return cos, sin_squared


@triton.jit
def _row_targets(labels, C, ignore_index):
    """(has a target column, that column or −1): rows whose label is ignore_index or outside
    [0, C) have none (reference.arcface_rows)."""
    has_target = (labels >= 0) & (labels < C) & (labels != ignore_index)
    return has_target, tl.where(has_target, labels, -1)


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------

@triton.jit
def _norms_kernel(x_ptr, out_ptr, n_rows, D, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    base = rows.to(tl.int64) * D
    squares = tl.zeros((BLOCK_R,), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + base[:, None] + kk[None, :], mask=row_ok[:, None] & (kk < D)[None, :],
                    other=0.0).to(tl.float32)
        squares += tl.sum(x * x, axis=1)
    tl.store(out_ptr + rows, tl.sqrt(squares), mask=row_ok)


@triton.jit
def _forward_tiles_kernel(e_ptr, w_ptr, labels_ptr, e_norm_ptr, w_norm_ptr,
                          part_max_ptr, part_sum_ptr, part_best_ptr, part_index_ptr,
                          B, C, D, ignore_index, split_size, scale_log2e,
                          PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                          BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per row and split: max cosine m, Σ exp(s·(cos − m)) and the nearest candidate (value,
    lowest index), all over the split's columns except the row's label."""
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    _, target = _row_targets(labels, C, ignore_index)
    inv_e = _inverse_norm(tl.load(e_norm_ptr + rows, mask=row_ok, other=1.0))

    run_max = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_B,), tl.float32)
    best = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    best_index = tl.full((BLOCK_B,), -1, tl.int64)
    c_begin = split * split_size
    c_end = tl.minimum(c_begin + split_size, C)
    for c0 in range(c_begin, c_end, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < c_end
        raw = _cosine_numerators(e_ptr, w_ptr, rows, row_ok, cols, col_ok, D,
                                 PRECISION, UPCAST, BLOCK_B, BLOCK_C, BLOCK_K)
        inv_w = _inverse_norm(tl.load(w_norm_ptr + cols, mask=col_ok, other=1.0))
        cos = _clamp_cosine(raw * inv_e[:, None] * inv_w[None, :])
        excluded = (cols[None, :] == target[:, None]) | ~col_ok[None, :]
        candidates = tl.where(excluded, float("-inf"), cos)
        # NaN stays in `candidates` (the sum below turns it into a NaN loss) but not in the
        # ranking, whose index must stay a real column. Columns rise across tiles, so a strict >
        # keeps the lowest index on ties.
        ranked = tl.where(cos == cos, candidates, float("-inf"))
        tile_best, tile_arg = tl.max(ranked, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_best > best
        best = tl.where(better, tile_best, best)
        best_index = tl.where(better, (c0 + tile_arg).to(tl.int64), best_index)
        new_max = tl.maximum(run_max, tile_best)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # no candidate yet: nothing to rescale
        run_sum = run_sum * tl.exp2((run_max - shift) * scale_log2e) + tl.sum(
            tl.exp2((candidates - shift[:, None]) * scale_log2e), axis=1)
        run_max = new_max

    out = split.to(tl.int64) * B + rows
    tl.store(part_max_ptr + out, run_max, mask=row_ok)
    tl.store(part_sum_ptr + out, run_sum, mask=row_ok)
    tl.store(part_best_ptr + out, best, mask=row_ok)
    tl.store(part_index_ptr + out, best_index, mask=row_ok)


@triton.jit
def _forward_finish_kernel(e_ptr, w_ptr, labels_ptr, e_norm_ptr, w_norm_ptr,
                           part_max_ptr, part_sum_ptr, part_best_ptr, part_index_ptr, num_splits,
                           loss_ptr, cos_pos_ptr, cos_neg_ptr, neg_index_ptr, lse_ptr,
                           B, C, D, ignore_index, scale, margin, cos_m, sin_m, threshold, fallback,
                           MODE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """Combines the splits (in split order) and adds the label column with its margin."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    has_target, _ = _row_targets(labels, C, ignore_index)

    # Partials are [num_splits, B]: `at` walks down one column, in split order.
    run_max = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    at = rows.to(tl.int64)
    for _ in range(0, num_splits):
        run_max = tl.maximum(run_max, tl.load(part_max_ptr + at, mask=row_ok, other=0.0),
                             propagate_nan=tl.PropagateNan.ALL)
        at += B
    shift = tl.where(run_max == float("-inf"), 0.0, run_max)
    run_sum = tl.zeros((BLOCK_B,), tl.float32)
    best = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    best_index = tl.full((BLOCK_B,), -1, tl.int64)
    at = rows.to(tl.int64)
    for _ in range(0, num_splits):
        part_max = tl.load(part_max_ptr + at, mask=row_ok, other=0.0)
        run_sum += tl.load(part_sum_ptr + at, mask=row_ok, other=0.0) * tl.exp(scale * (part_max - shift))
        part_best = tl.load(part_best_ptr + at, mask=row_ok, other=0.0)
        better = part_best > best  # splits in class order: ties keep the lowest index
        best = tl.where(better, part_best, best)
        best_index = tl.where(better, tl.load(part_index_ptr + at, mask=row_ok, other=-1), best_index)
        at += B
    negatives_lse = scale * shift + tl.log(run_sum)  # −inf when the label is the only class

    e_norm = tl.load(e_norm_ptr + rows, mask=row_ok, other=1.0)
    cos_label, sin_squared = _label_cosine(e_ptr, w_ptr, e_norm, w_norm_ptr, rows, row_ok, labels, has_target, D,
                                           BLOCK_B, BLOCK_K)
    phi, _ = _margin(cos_label, sin_squared, margin, cos_m, sin_m, threshold, fallback, MODE)
    target_logit = scale * phi
    top = tl.maximum(negatives_lse, target_logit, propagate_nan=tl.PropagateNan.ALL)
    with_target = top + tl.log(tl.exp(negatives_lse - top) + tl.exp(target_logit - top))
    lse = tl.where(has_target, with_target, negatives_lse)

    nan = float("nan")
    loss = tl.where(has_target, lse - target_logit, tl.where(labels == ignore_index, 0.0, nan))
    no_negative = best == float("-inf")
    cos_neg = tl.where(no_negative, -1.0, best)
    cos_neg = tl.where(lse != lse, nan, cos_neg)  # a NaN cosine never wins a comparison: flag the row
    tl.store(loss_ptr + rows, loss, mask=row_ok)
    tl.store(cos_pos_ptr + rows, tl.where(has_target, cos_label, nan), mask=row_ok)
    tl.store(cos_neg_ptr + rows, cos_neg, mask=row_ok)
    tl.store(neg_index_ptr + rows, tl.where(no_negative, -1, best_index), mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)


# --------------------------------------------------------------------------------------------
# Backward. G_ij = ∂(Σ_i g_i·loss_i)/∂cos_ij given the saved lse (p_ij = exp(logit_ij − lse_i)):
# g_i·s·p_ij off the label, g_i·s·φ′(cos_iy)·(p_iy − 1) at it; 0 where torch.clamp cut the cosine.
# --------------------------------------------------------------------------------------------

@triton.jit
def _backward_rows_kernel(e_ptr, w_ptr, labels_ptr, e_norm_ptr, w_norm_ptr, lse_ptr, row_grad_ptr,
                          label_grad_ptr, row_mass_ptr,
                          B, C, D, scale, margin, cos_m, sin_m, threshold, fallback,
                          MODE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """The label column of G per row: g·s·φ′(c_y)·(p_y − 1), p_y = exp(s·φ(c_y) − lse). A label
    outside [0, C) has no target term. For the gradient filter, the row's off-label mass
    |p_y − 1| = Σ_{j≠y} p_j, which bounds every |softmax − one-hot| of the row (1 for a row
    without target, 0 for a row without gradient)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    has_target = (labels >= 0) & (labels < C)
    e_norm = tl.load(e_norm_ptr + rows, mask=row_ok, other=1.0)
    cos_label, sin_squared = _label_cosine(e_ptr, w_ptr, e_norm, w_norm_ptr, rows, row_ok, labels, has_target, D,
                                           BLOCK_B, BLOCK_K)
    phi, dphi = _margin(cos_label, sin_squared, margin, cos_m, sin_m, threshold, fallback, MODE)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    row_grad = tl.load(row_grad_ptr + rows, mask=row_ok, other=0.0)
    gap = tl.exp(scale * phi - lse) - 1.0
    tl.store(label_grad_ptr + rows, tl.where(has_target, row_grad * scale * dphi * gap, 0.0), mask=row_ok)
    row_mass = tl.where(row_grad == 0.0, 0.0, tl.where(has_target, tl.abs(gap), 1.0))
    tl.store(row_mass_ptr + rows, row_mass, mask=row_ok)


@triton.jit
def _tile_gradient(raw, inv_e, inv_w, cols, col_ok, target, lse_log2, row_grad_scaled, label_grad,
                   row_mass, scale_log2e):
    """(G with torch.clamp's gradient mask, the unclamped cosine, |softmax − one-hot|) of a tile."""
    cos_raw = raw * inv_e[:, None] * inv_w[None, :]
    prob = tl.exp2(_clamp_cosine(cos_raw) * scale_log2e - lse_log2[:, None])
    is_label = cols[None, :] == target[:, None]
    grad = tl.where(is_label, label_grad[:, None], row_grad_scaled[:, None] * prob)
    inside = (cos_raw >= -1.0) & (cos_raw <= 1.0) & col_ok[None, :]
    grad = tl.where(inside, grad, 0.0)
    error = tl.where(is_label, row_mass[:, None], prob)
    error = tl.where(inside & (row_grad_scaled != 0.0)[:, None], error, 0.0)
    return grad, cos_raw, error


@triton.jit
def _tile_is_needed(error, filter_eps):
    # NaN counts as needed, so the filter never hides a non-finite gradient.
    return tl.max(tl.where(error < filter_eps, 0, 1)) > 0


@triton.jit
def _grad_embeddings_kernel(e_ptr, w_ptr, labels_ptr, e_norm_ptr, w_norm_ptr, lse_ptr, row_grad_ptr,
                            label_grad_ptr, row_mass_ptr, order_ptr, partial_ptr, needed_ptr,
                            B, C, D, split_size, num_col_tiles, scale, scale_log2e, filter_eps,
                            FILTER: tl.constexpr, NORMALIZE_OPERAND: tl.constexpr, PRECISION: tl.constexpr,
                            UPCAST: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                            BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr):
    """Per (row block, D block, split): the split's share of ∂L/∂e (float32), with the
    normalisation's backward: inv_e·(Σ_j G_ij ŵ_j − ê_i·Σ_j G_ij cos_ij), or inv_e·Σ_j G_ij ŵ_j
    where ‖e_i‖ < NORM_EPS (F.normalize's clamp). Records which tiles the filter keeps."""
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    split = tl.program_id(2)
    dtype = e_ptr.dtype.element_ty
    slots = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = slots < B
    rows = tl.load(order_ptr + slots, mask=row_ok, other=0)
    d_out = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    d_ok = d_out < D
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    target = tl.where((labels >= 0) & (labels < C), labels, -1)
    e_norm = tl.load(e_norm_ptr + rows, mask=row_ok, other=1.0)
    inv_e = _inverse_norm(e_norm)
    lse_log2 = tl.load(lse_ptr + rows, mask=row_ok, other=0.0) * 1.4426950408889634
    row_grad_scaled = tl.load(row_grad_ptr + rows, mask=row_ok, other=0.0) * scale
    label_grad = tl.load(label_grad_ptr + rows, mask=row_ok, other=0.0)
    row_mass = tl.load(row_mass_ptr + rows, mask=row_ok, other=0.0)

    acc = tl.zeros((BLOCK_B, BLOCK_DO), tl.float32)
    along = tl.zeros((BLOCK_B,), tl.float32)
    c_begin = split * split_size
    c_end = tl.minimum(c_begin + split_size, C)
    for c0 in range(c_begin, c_end, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < c_end
        raw = _cosine_numerators(e_ptr, w_ptr, rows, row_ok, cols, col_ok, D,
                                 PRECISION, UPCAST, BLOCK_B, BLOCK_C, BLOCK_K)
        inv_w = _inverse_norm(tl.load(w_norm_ptr + cols, mask=col_ok, other=1.0))
        grad, cos_raw, error = _tile_gradient(raw, inv_e, inv_w, cols, col_ok, target, lse_log2,
                                              row_grad_scaled, label_grad, row_mass, scale_log2e)
        if FILTER:
            needed = _tile_is_needed(error, filter_eps)
            tl.store(needed_ptr + pid_b.to(tl.int64) * num_col_tiles + c0 // BLOCK_C, needed.to(tl.int8),
                     mask=pid_d == 0)
        else:
            needed = True
        if needed:
            along += tl.sum(grad * cos_raw, axis=1)
            w = tl.load(w_ptr + cols.to(tl.int64)[:, None] * D + d_out[None, :],
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            if NORMALIZE_OPERAND:
                w = _to_input_dtype(w.to(tl.float32) * inv_w[:, None], dtype)
                grad_in = _to_input_dtype(grad, dtype)
            else:
                grad_in = _to_input_dtype(grad * inv_w[None, :], dtype)
            acc = tl.dot(_dot_operand(grad_in, UPCAST), _dot_operand(w, UPCAST), acc, input_precision=PRECISION)

    e = tl.load(e_ptr + rows.to(tl.int64)[:, None] * D + d_out[None, :], mask=row_ok[:, None] & d_ok[None, :],
                other=0.0).to(tl.float32)
    projected = acc - (e * inv_e[:, None]) * along[:, None]
    grad_e = inv_e[:, None] * tl.where((e_norm < _NORM_EPS)[:, None], acc, projected)
    out = (split.to(tl.int64) * B + rows)[:, None] * D + d_out[None, :]
    tl.store(partial_ptr + out, grad_e, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _grad_prototypes_kernel(e_ptr, w_ptr, labels_ptr, e_norm_ptr, w_norm_ptr, lse_ptr, row_grad_ptr,
                            label_grad_ptr, row_mass_ptr, order_ptr, grad_w_ptr, needed_ptr,
                            B, C, D, num_col_tiles, scale, scale_log2e,
                            FILTER: tl.constexpr, NORMALIZE_OPERAND: tl.constexpr, PRECISION: tl.constexpr,
                            UPCAST: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                            BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr):
    """Per (class block, D block), over all row blocks in order: ∂L/∂w in the input dtype,
    inv_w·(Σ_i G_ij ê_i − ŵ_j·Σ_i G_ij cos_ij) (plain scaling where ‖w_j‖ < NORM_EPS). With the
    filter, the tiles that `_grad_embeddings_kernel` found negligible are skipped whole."""
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    dtype = w_ptr.dtype.element_ty
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    d_out = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    d_ok = d_out < D
    w_norm = tl.load(w_norm_ptr + cols, mask=col_ok, other=1.0)
    inv_w = _inverse_norm(w_norm)

    acc = tl.zeros((BLOCK_C, BLOCK_DO), tl.float32)
    along = tl.zeros((BLOCK_C,), tl.float32)
    needed_at = needed_ptr + pid_c  # the flags are [row blocks, class tiles]: walk down a column
    for b0 in range(0, B, BLOCK_B):
        if FILTER:
            needed = tl.load(needed_at) != 0
            needed_at += num_col_tiles
        else:
            needed = True
        if needed:
            slots = b0 + tl.arange(0, BLOCK_B)
            row_ok = slots < B
            rows = tl.load(order_ptr + slots, mask=row_ok, other=0)
            labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
            target = tl.where((labels >= 0) & (labels < C), labels, -1)
            inv_e = _inverse_norm(tl.load(e_norm_ptr + rows, mask=row_ok, other=1.0))
            lse_log2 = tl.load(lse_ptr + rows, mask=row_ok, other=0.0) * 1.4426950408889634
            row_grad_scaled = tl.load(row_grad_ptr + rows, mask=row_ok, other=0.0) * scale
            label_grad = tl.load(label_grad_ptr + rows, mask=row_ok, other=0.0)
            row_mass = tl.load(row_mass_ptr + rows, mask=row_ok, other=0.0)
            raw = _cosine_numerators(e_ptr, w_ptr, rows, row_ok, cols, col_ok, D,
                                     PRECISION, UPCAST, BLOCK_B, BLOCK_C, BLOCK_K)
            grad, cos_raw, _ = _tile_gradient(raw, inv_e, inv_w, cols, col_ok, target, lse_log2,
                                              row_grad_scaled, label_grad, row_mass, scale_log2e)
            along += tl.sum(grad * cos_raw, axis=0)
            e = tl.load(e_ptr + rows.to(tl.int64)[:, None] * D + d_out[None, :],
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            if NORMALIZE_OPERAND:
                e = _to_input_dtype(e.to(tl.float32) * inv_e[:, None], dtype)
                grad_in = _to_input_dtype(grad, dtype)
            else:
                grad_in = _to_input_dtype(grad * inv_e[:, None], dtype)
            acc = tl.dot(_dot_operand(tl.trans(grad_in), UPCAST), _dot_operand(e, UPCAST), acc,
                         input_precision=PRECISION)

    w = tl.load(w_ptr + cols.to(tl.int64)[:, None] * D + d_out[None, :], mask=col_ok[:, None] & d_ok[None, :],
                other=0.0).to(tl.float32)
    projected = acc - (w * inv_w[:, None]) * along[:, None]
    grad_w = inv_w[:, None] * tl.where((w_norm < _NORM_EPS)[:, None], acc, projected)
    tl.store(grad_w_ptr + cols.to(tl.int64)[:, None] * D + d_out[None, :], _to_input_dtype(grad_w, dtype),
             mask=col_ok[:, None] & d_ok[None, :])


# --------------------------------------------------------------------------------------------
# Tiles and launch
# --------------------------------------------------------------------------------------------

# Interpreter tiles: small, so that the test shapes (tests/support.py) cross several row and
# class tiles and split the classes; D is cut in two (both the D loop of the cosines and the D
# blocks of the backward run twice), at least 16 for tl.dot.
INTERPRETER_TILES = {"BLOCK_B": 16, "BLOCK_C": 32}


def _interpreter_tiles(dim: int, class_tile: Optional[int]) -> Dict[str, int]:
    half = max(16, triton.next_power_of_2(dim) // 2)
    return dict(INTERPRETER_TILES, BLOCK_C=class_tile or INTERPRETER_TILES["BLOCK_C"], BLOCK_K=half, BLOCK_DO=half)

INTERPRETER_SMS = 4
"""Stand-in for the multiprocessor count under the interpreter: small B then splits C."""

# GPU autotune candidates (BLOCK_B, BLOCK_C, BLOCK_K, num_warps, num_stages). First guesses for
# Hopper: measure on the card (docs/design.md lists what the first GPU run checks).
FORWARD_CONFIGS = (
    (128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
    (128, 256, 64, 8, 3), (64, 64, 64, 4, 3), (128, 128, 32, 8, 4),
)
# Backward: (BLOCK_B, BLOCK_C, BLOCK_K, BLOCK_DO or 0 for all of D up to 512, num_warps, num_stages).
# A BLOCK_DO below D recomputes the cosines once per D block.
BACKWARD_CONFIGS = (
    (64, 64, 64, 0, 8, 2), (64, 128, 64, 0, 8, 2), (64, 64, 64, 256, 4, 3), (128, 64, 64, 128, 8, 3),
)
FILTER_TILE = (64, 64)
"""(BLOCK_B, BLOCK_C) of both backward kernels when the gradient filter is on: the prototype
kernel skips exactly the tiles the embedding kernel marked, so they must share the tiling."""
MAX_BLOCK_DO = 512


def _class_tile_override(chunk_size: int) -> Optional[int]:
    """`chunk_size` sets the class tile (BLOCK_C); 0 leaves it to the tuning."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
    if chunk_size == 0:
        return None
    if not MIN_TILE <= chunk_size <= MAX_TILE or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size for backend='triton' is the class tile: 0 (automatic) or a power of two "
                         f"in [{MIN_TILE}, {MAX_TILE}], got {chunk_size}")
    return chunk_size


def _check_inputs(embeddings: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor) -> None:
    """What the op needs beyond `validate_head_inputs` (which callers of the op may skip)."""
    if embeddings.dtype not in SUPPORTED_DTYPES or prototypes.dtype != embeddings.dtype:
        raise TypeError(f"embeddings and prototypes must share one dtype among float32, bfloat16, float16; "
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


def _precision(dtype: torch.dtype) -> str:
    # tl.dot would take float32 operands as TF32 on the GPU: 10 mantissa bits, not float32.
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    return TRITON_INTERPRET and dtype == torch.bfloat16


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _programs_wanted(device: torch.device) -> int:
    """Enough programs for two waves over the multiprocessors."""
    if device.type != "cuda":
        return 2 * INTERPRETER_SMS
    return 2 * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


def _class_splits(num_classes: int, other_programs: int, align: int, device: torch.device,
                  num_splits: Optional[int]) -> Tuple[int, int]:
    """(splits, classes per split): C is split when the other grid axes leave multiprocessors
    idle. Splits start on a multiple of every class tile (`align`) and none is empty."""
    tiles = triton.cdiv(num_classes, align)
    if num_splits is None:
        num_splits = triton.cdiv(_programs_wanted(device), other_programs)
    num_splits = max(1, min(num_splits, tiles))
    split_size = triton.cdiv(tiles, num_splits) * align
    return triton.cdiv(num_classes, split_size), split_size


def _forward_configs(dim: int, class_tile: Optional[int]) -> List[Dict[str, int]]:
    if TRITON_INTERPRET:
        tiles = _interpreter_tiles(dim, class_tile)
        del tiles["BLOCK_DO"]
        return [tiles]
    configs = []
    for bb, bc, bk, warps, stages in FORWARD_CONFIGS:
        config = dict(BLOCK_B=bb, BLOCK_C=class_tile or bc, BLOCK_K=bk, num_warps=warps, num_stages=stages)
        if config not in configs:
            configs.append(config)
    return configs


def _backward_configs(dim: int, class_tile: Optional[int], filtered: bool) -> List[Dict[str, int]]:
    if TRITON_INTERPRET:
        return [_interpreter_tiles(dim, class_tile)]
    full = min(triton.next_power_of_2(dim), MAX_BLOCK_DO)
    configs = []
    for bb, bc, bk, bdo, warps, stages in BACKWARD_CONFIGS:
        if filtered:
            bb, bc = FILTER_TILE
        config = dict(BLOCK_B=bb, BLOCK_C=class_tile or bc, BLOCK_K=bk, BLOCK_DO=min(bdo or full, full),
                      num_warps=warps, num_stages=stages)
        if config not in configs:
            configs.append(config)
    return configs


_LAUNCH_KEYS = ("num_warps", "num_stages")


@functools.lru_cache(maxsize=None)
def _autotuned(kernel: Callable, configs: Tuple[Tuple[Tuple[str, int], ...], ...]) -> Callable:
    return triton.autotune(
        configs=[triton.Config({k: v for k, v in c if k not in _LAUNCH_KEYS},
                               **{k: v for k, v in c if k in _LAUNCH_KEYS}) for c in configs],
        key=["B", "C", "D"],
    )(kernel)


def _launch(kernel, grid: Callable[[Dict[str, int]], tuple], configs: Sequence[Dict[str, int]], **args) -> None:
    """Runs `kernel` with the one config given, or autotuned over several (GPU)."""
    if len(configs) == 1:
        config = configs[0]
        kernel[grid(config)](**args, **config)
    else:
        _autotuned(kernel, tuple(tuple(sorted(c.items())) for c in configs))[grid](**args)


def _norms(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    block_k = min(triton.next_power_of_2(x.shape[1]), 128)
    _norms_kernel[(triton.cdiv(x.shape[0], 64),)](x, out, x.shape[0], x.shape[1], BLOCK_R=64, BLOCK_K=block_k)
    return out


def _margin_args(margin: float, margin_mode: str) -> Dict[str, float]:
    if margin_mode not in MARGIN_MODE_IDS:
        raise ValueError(f"margin_mode must be one of {reference.MARGIN_MODES}, got {margin_mode!r}")
    return dict(margin=margin, cos_m=math.cos(margin), sin_m=math.sin(margin),
                threshold=math.cos(math.pi - margin), fallback=margin * math.sin(margin),
                MODE=MARGIN_MODE_IDS[margin_mode])


_ROW_BLOCK = 32
"""Rows per program of the per-row kernels (finish, backward rows)."""


def forward_rows(embeddings: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor, scale: float,
                 margin: float, margin_mode: str, ignore_index: int, chunk_size: int = 0,
                 num_splits: Optional[int] = None) -> Tuple[torch.Tensor, ...]:
    """The forward of the op; `num_splits` overrides how many class splits run side by side
    (None: from the multiprocessor count)."""
    _check_inputs(embeddings, prototypes, labels)
    class_tile = _class_tile_override(chunk_size)
    margin_args = _margin_args(float(margin), margin_mode)
    e, w, labels = embeddings.contiguous(), prototypes.contiguous(), labels.contiguous()
    (batch, dim), classes = e.shape, w.shape[0]
    device = e.device
    e_norm, w_norm = _norms(e), _norms(w)

    configs = _forward_configs(dim, class_tile)
    align = max(c["BLOCK_C"] for c in configs)
    smallest_rows = min(c["BLOCK_B"] for c in configs)
    splits, split_size = _class_splits(classes, triton.cdiv(batch, smallest_rows), align, device, num_splits)
    part_max, part_sum, part_best = (torch.empty(splits, batch, dtype=torch.float32, device=device) for _ in range(3))
    part_index = torch.empty(splits, batch, dtype=torch.int64, device=device)
    _launch(_forward_tiles_kernel, lambda meta: (triton.cdiv(batch, meta["BLOCK_B"]), splits), configs,
            e_ptr=e, w_ptr=w, labels_ptr=labels, e_norm_ptr=e_norm, w_norm_ptr=w_norm,
            part_max_ptr=part_max, part_sum_ptr=part_sum, part_best_ptr=part_best, part_index_ptr=part_index,
            B=batch, C=classes, D=dim, ignore_index=ignore_index, split_size=split_size,
            scale_log2e=scale * _LOG2E, PRECISION=_precision(e.dtype), UPCAST=_upcast(e.dtype))

    loss, cos_pos, cos_neg, lse = (torch.empty(batch, dtype=torch.float32, device=device) for _ in range(4))
    neg_index = torch.empty(batch, dtype=torch.int64, device=device)
    _forward_finish_kernel[(triton.cdiv(batch, _ROW_BLOCK),)](
        e, w, labels, e_norm, w_norm, part_max, part_sum, part_best, part_index, splits,
        loss, cos_pos, cos_neg, neg_index, lse, batch, classes, dim, ignore_index, scale,
        BLOCK_B=_ROW_BLOCK, BLOCK_K=min(triton.next_power_of_2(dim), 128), **margin_args)
    return loss, cos_pos, cos_neg, neg_index, lse


def backward_grads(embeddings: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                   row_grad: torch.Tensor, scale: float, margin: float, margin_mode: str, chunk_size: int = 0,
                   grad_filter_eps: float = 0.0, num_splits: Optional[int] = None,
                   tiles_needed: Optional[List[torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The backward of the op. `num_splits` as in `forward_rows`; with the filter on, the
    per-tile keep/skip flags are appended to `tiles_needed` when a list is given (tests)."""
    _check_inputs(embeddings, prototypes, labels)
    class_tile = _class_tile_override(chunk_size)
    if not 0.0 <= grad_filter_eps < 1.0:
        raise ValueError(f"grad_filter_eps must be in [0, 1), got {grad_filter_eps}")
    margin_args = _margin_args(float(margin), margin_mode)
    e, w, labels = embeddings.contiguous(), prototypes.contiguous(), labels.contiguous()
    lse = lse.to(torch.float32).contiguous()
    row_grad = row_grad.to(torch.float32).contiguous()
    (batch, dim), classes = e.shape, w.shape[0]
    device = e.device
    e_norm, w_norm = _norms(e), _norms(w)

    label_grad = torch.empty(batch, dtype=torch.float32, device=device)
    row_mass = torch.empty(batch, dtype=torch.float32, device=device)
    _backward_rows_kernel[(triton.cdiv(batch, _ROW_BLOCK),)](
        e, w, labels, e_norm, w_norm, lse, row_grad, label_grad, row_mass, batch, classes, dim, scale,
        BLOCK_B=_ROW_BLOCK, BLOCK_K=min(triton.next_power_of_2(dim), 128), **margin_args)

    filtered = grad_filter_eps > 0.0
    # The filter skips a tile only if all its rows are certain there: grouping the rows by their
    # off-label mass puts the certain rows together, so one uncertain row does not keep a whole
    # block of certain ones (a stable sort: deterministic).
    order = torch.argsort(row_mass, stable=True) if filtered else torch.arange(batch, device=device)
    configs = _backward_configs(dim, class_tile, filtered)
    align = max(c["BLOCK_C"] for c in configs)
    row_programs = triton.cdiv(batch, min(c["BLOCK_B"] for c in configs))
    d_programs = triton.cdiv(dim, max(c["BLOCK_DO"] for c in configs))
    splits, split_size = _class_splits(classes, row_programs * d_programs, align, device, num_splits)
    if filtered:
        block_b, block_c = configs[0]["BLOCK_B"], configs[0]["BLOCK_C"]
        num_col_tiles = splits * (split_size // block_c)
        needed = torch.empty(triton.cdiv(batch, block_b), num_col_tiles, dtype=torch.int8, device=device)
    else:
        num_col_tiles = 0
        needed = torch.empty(1, dtype=torch.int8, device=device)
    common = dict(e_ptr=e, w_ptr=w, labels_ptr=labels, e_norm_ptr=e_norm, w_norm_ptr=w_norm, lse_ptr=lse,
                  row_grad_ptr=row_grad, label_grad_ptr=label_grad, row_mass_ptr=row_mass, order_ptr=order,
                  needed_ptr=needed,
                  B=batch, C=classes, D=dim, num_col_tiles=num_col_tiles, scale=scale,
                  # G·(1/‖x‖) is folded into G for one multiply per tile element; float16 cannot hold it
                  # for norms near NORM_EPS (1/NORM_EPS = 1e12), so there the operand tile is normalised.
                  scale_log2e=scale * _LOG2E, FILTER=filtered, NORMALIZE_OPERAND=e.dtype == torch.float16,
                  PRECISION=_precision(e.dtype), UPCAST=_upcast(e.dtype))

    partial = torch.empty(splits, batch, dim, dtype=torch.float32, device=device)
    _launch(_grad_embeddings_kernel,
            lambda meta: (triton.cdiv(batch, meta["BLOCK_B"]), triton.cdiv(dim, meta["BLOCK_DO"]), splits),
            configs, partial_ptr=partial, split_size=split_size, filter_eps=grad_filter_eps, **common)
    grad_w = torch.empty_like(w)
    _launch(_grad_prototypes_kernel,
            lambda meta: (triton.cdiv(classes, meta["BLOCK_C"]), triton.cdiv(dim, meta["BLOCK_DO"])),
            configs, grad_w_ptr=grad_w, **common)
    if tiles_needed is not None and filtered:
        tiles_needed.append(needed[:, :triton.cdiv(classes, block_c)])
    grad_e = partial[0] if splits == 1 else partial.sum(0)  # a fixed order: deterministic
    return grad_e.to(e.dtype), grad_w


# --------------------------------------------------------------------------------------------
# The ops
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("ree::triton_head_forward", mutates_args=())
def head_forward(embeddings: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor, scale: float,
                 margin: float, margin_mode: str, ignore_index: int, chunk_size: int,
                 grad_filter_eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss_rows, cos_pos, cos_neg, neg_index, lse); `grad_filter_eps` acts in the backward."""
    return forward_rows(embeddings, prototypes, labels, scale, margin, margin_mode, ignore_index, chunk_size)


@torch.library.custom_op("ree::triton_head_backward", mutates_args=())
def head_backward(embeddings: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                  row_grad: torch.Tensor, scale: float, margin: float, margin_mode: str, chunk_size: int,
                  grad_filter_eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(∂/∂embeddings, ∂/∂prototypes) of Σ row_grad_i·loss_i, given the saved lse."""
    return backward_grads(embeddings, prototypes, labels, lse, row_grad, scale, margin, margin_mode,
                          chunk_size, grad_filter_eps)


register_head_ops("triton_")
