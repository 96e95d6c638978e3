"""The head's backward kernels (launched by head.py, after `norms_kernel`, in this order):

- `backward_rows_kernel`: the label column's gradient per row (needs the margin's φ′).
- `grad_embeddings_kernel`: per (row block, D block, class split): Σ_j G_ij ŵ_j, with the
  normalisation's backward; the splits are summed afterwards in a fixed order.
- `grad_prototypes_kernel`: per (class block, D block), over every row block: Σ_i G_ij ê_i.

G_ij = ∂(Σ_i g_i·loss_i)/∂cos_ij given the saved lse (p_ij = exp(logit_ij − lse_i)):
g_i·s·p_ij off the label, g_i·s·φ′(cos_iy)·(p_iy − 1) at it; 0 where torch.clamp cut the cosine.
The cosines come from `formulas.cosine_numerators` as in the forward, and each logit s·cos is
rounded as the forward rounded it, so p sums to one against the forward's lse at any scale.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .formulas import (
    LOG2E,
    NO_IGNORE_INDEX,
    clamp_cosine,
    cosine_numerators,
    dot_operand,
    inverse_norm,
    label_cosine,
    margin_logit,
    norm_clamped,
    prototype_offsets,
    row_targets,
    to_input_dtype,
)


@triton.jit
def backward_rows_kernel(e_ptr, w_ptr, index_ptr, labels_ptr, e_sq_ptr, w_sq_ptr, lse_ptr, row_grad_ptr,
                         label_grad_ptr, row_mass_ptr,
                         B, C, D, scale, margin, cos_m, sin_m, threshold, fallback,
                         MODE: tl.constexpr, HAS_INDEX: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """The label column of G per row: g·s·φ′(c_y)·(p_y − 1), p_y = exp(s·φ(c_y) − lse). A label
    outside [0, C) has no target term. For the gradient filter, the row's off-label mass
    |p_y − 1| = Σ_{j≠y} p_j, which bounds every |softmax − one-hot| of the row (1 for a row
    without target, 0 for a row without gradient)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    has_target, _ = row_targets(labels, C, NO_IGNORE_INDEX)
    e_sq = tl.load(e_sq_ptr + rows, mask=row_ok, other=1.0)
    cos_label, sin_squared = label_cosine(e_ptr, w_ptr, index_ptr, e_sq, w_sq_ptr, rows, row_ok, labels, has_target,
                                          D, HAS_INDEX, BLOCK_B, BLOCK_K)
    phi, dphi = margin_logit(cos_label, sin_squared, margin, cos_m, sin_m, threshold, fallback, MODE)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    row_grad = tl.load(row_grad_ptr + rows, mask=row_ok, other=0.0)
    gap = tl.exp(scale * phi - lse) - 1.0
    tl.store(label_grad_ptr + rows, tl.where(has_target, row_grad * scale * dphi * gap, 0.0), mask=row_ok)
    row_mass = tl.where(row_grad == 0.0, 0.0, tl.where(has_target, tl.abs(gap), 1.0))
    tl.store(row_mass_ptr + rows, row_mass, mask=row_ok)


@triton.jit
def tile_gradient(raw, inv_e, inv_w, cols, col_ok, target, lse, row_grad_scaled, label_grad, row_mass, scale):
    """(G with torch.clamp's gradient mask, the unclamped cosine, |softmax − one-hot|) of a tile."""
    cos_raw = raw * inv_e[:, None] * inv_w[None, :]
    is_label = cols[None, :] == target[:, None]
    # The label's logit s·φ is not s·cos (its exp could overflow): its column takes label_grad.
    logit = tl.where(is_label, lse[:, None], scale * clamp_cosine(cos_raw))
    prob = tl.exp2((logit - lse[:, None]) * LOG2E)
    grad = tl.where(is_label, label_grad[:, None], row_grad_scaled[:, None] * prob)
    inside = (cos_raw >= -1.0) & (cos_raw <= 1.0) & col_ok[None, :]
    grad = tl.where(inside, grad, 0.0)
    error = tl.where(is_label, row_mass[:, None], prob)
    error = tl.where(inside & (row_grad_scaled != 0.0)[:, None], error, 0.0)
    return grad, cos_raw, error


@triton.jit
def tile_is_needed(error, filter_eps):
    # NaN counts as needed, so the filter never hides a non-finite gradient.
    return tl.max(tl.where(error < filter_eps, 0, 1)) > 0


@triton.jit
def gradient_rows(labels_ptr, e_sq_ptr, lse_ptr, row_grad_ptr, label_grad_ptr, row_mass_ptr, rows, row_ok, C,
                  scale):
    """What `tile_gradient` needs of a block of rows: (label column, ‖e‖², lse, g·s, the label
    column's gradient, the off-label mass); masked rows read as rows without gradient."""
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    _, target = row_targets(labels, C, NO_IGNORE_INDEX)
    e_sq = tl.load(e_sq_ptr + rows, mask=row_ok, other=1.0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    row_grad_scaled = tl.load(row_grad_ptr + rows, mask=row_ok, other=0.0) * scale
    label_grad = tl.load(label_grad_ptr + rows, mask=row_ok, other=0.0)
    row_mass = tl.load(row_mass_ptr + rows, mask=row_ok, other=0.0)
    return target, e_sq, lse, row_grad_scaled, label_grad, row_mass


@triton.jit
def dot_operands(grad, x, x_scale, grad_scale, dtype: tl.constexpr, NORMALIZE_OPERAND: tl.constexpr):
    """(G, x) in the input dtype for tl.dot, with 1/‖x‖ applied once: folded into G (`grad_scale`,
    one multiply per tile element), or, with NORMALIZE_OPERAND, to the operand x (`x_scale`):
    float16 cannot hold G/‖x‖ for norms near NORM_EPS (1/NORM_EPS = 1e12)."""
    if NORMALIZE_OPERAND:
        x = to_input_dtype(x.to(tl.float32) * x_scale, dtype)
        grad = to_input_dtype(grad, dtype)
    else:
        grad = to_input_dtype(grad * grad_scale, dtype)
    return grad, x


@triton.jit
def grad_embeddings_kernel(e_ptr, w_ptr, index_ptr, labels_ptr, e_sq_ptr, w_sq_ptr, lse_ptr, row_grad_ptr,
                           label_grad_ptr, row_mass_ptr, order_ptr, partial_ptr, needed_ptr,
                           B, C, D, split_size, num_col_tiles, scale, filter_eps,
                           FILTER: tl.constexpr, NORMALIZE_OPERAND: tl.constexpr, PRECISION: tl.constexpr,
                           UPCAST: tl.constexpr, HAS_INDEX: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                           BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr):
    """Per (row block, D block, split): the split's share of ∂L/∂e (float32), with the
    normalisation's backward: inv_e·(Σ_j G_ij ŵ_j − ê_i·Σ_j G_ij cos_ij), or inv_e·Σ_j G_ij ŵ_j
    where the norm of e_i is clamped (F.normalize). Records which tiles the filter keeps."""
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    split = tl.program_id(2)
    dtype = e_ptr.dtype.element_ty
    slots = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = slots < B
    rows = tl.load(order_ptr + slots, mask=row_ok, other=0)
    d_out = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    d_ok = d_out < D
    target, e_sq, lse, row_grad_scaled, label_grad, row_mass = gradient_rows(
        labels_ptr, e_sq_ptr, lse_ptr, row_grad_ptr, label_grad_ptr, row_mass_ptr, rows, row_ok, C, scale)
    inv_e = inverse_norm(e_sq)

    acc = tl.zeros((BLOCK_B, BLOCK_DO), tl.float32)
    along = tl.zeros((BLOCK_B,), tl.float32)
    c_begin = split * split_size
    c_end = tl.minimum(c_begin + split_size, C)
    for c0 in range(c_begin, c_end, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < c_end
        raw = cosine_numerators(e_ptr, w_ptr, index_ptr, rows, row_ok, cols, col_ok, D,
                                PRECISION, UPCAST, HAS_INDEX, BLOCK_B, BLOCK_C, BLOCK_K)
        inv_w = inverse_norm(tl.load(w_sq_ptr + cols, mask=col_ok, other=1.0))
        grad, cos_raw, error = tile_gradient(raw, inv_e, inv_w, cols, col_ok, target, lse,
                                             row_grad_scaled, label_grad, row_mass, scale)
        if FILTER:
            needed = tile_is_needed(error, filter_eps)
            tl.store(needed_ptr + pid_b.to(tl.int64) * num_col_tiles + c0 // BLOCK_C, needed.to(tl.int8),
                     mask=pid_d == 0)
        else:
            needed = True
        if needed:
            along += tl.sum(grad * cos_raw, axis=1)
            w_rows = prototype_offsets(index_ptr, cols, col_ok, D, HAS_INDEX)
            w = tl.load(w_ptr + w_rows[:, None] + d_out[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            grad_in, w = dot_operands(grad, w, inv_w[:, None], inv_w[None, :], dtype, NORMALIZE_OPERAND)
            acc = tl.dot(dot_operand(grad_in, UPCAST), dot_operand(w, UPCAST), acc, input_precision=PRECISION)

    e = tl.load(e_ptr + rows.to(tl.int64)[:, None] * D + d_out[None, :], mask=row_ok[:, None] & d_ok[None, :],
                other=0.0).to(tl.float32)
    projected = acc - (e * inv_e[:, None]) * along[:, None]
    grad_e = inv_e[:, None] * tl.where(norm_clamped(e_sq)[:, None], acc, projected)
    out = (split.to(tl.int64) * B + rows)[:, None] * D + d_out[None, :]
    tl.store(partial_ptr + out, grad_e, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def grad_prototypes_kernel(e_ptr, w_ptr, index_ptr, labels_ptr, e_sq_ptr, w_sq_ptr, lse_ptr, row_grad_ptr,
                           label_grad_ptr, row_mass_ptr, order_ptr, grad_w_ptr, needed_ptr,
                           B, C, D, num_col_tiles, scale,
                           FILTER: tl.constexpr, NORMALIZE_OPERAND: tl.constexpr, PRECISION: tl.constexpr,
                           UPCAST: tl.constexpr, HAS_INDEX: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                           BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr):
    """Per (class block, D block), over all row blocks in order: ∂L/∂w in the input dtype,
    inv_w·(Σ_i G_ij ê_i − ŵ_j·Σ_i G_ij cos_ij) (plain scaling where the norm of w_j is clamped).
    With the filter, the tiles that `grad_embeddings_kernel` found negligible are skipped whole."""
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    dtype = w_ptr.dtype.element_ty
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    d_out = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    d_ok = d_out < D
    w_sq = tl.load(w_sq_ptr + cols, mask=col_ok, other=1.0)
    inv_w = inverse_norm(w_sq)

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
            target, e_sq, lse, row_grad_scaled, label_grad, row_mass = gradient_rows(
                labels_ptr, e_sq_ptr, lse_ptr, row_grad_ptr, label_grad_ptr, row_mass_ptr, rows, row_ok, C, scale)
            inv_e = inverse_norm(e_sq)
            raw = cosine_numerators(e_ptr, w_ptr, index_ptr, rows, row_ok, cols, col_ok, D,
                                    PRECISION, UPCAST, HAS_INDEX, BLOCK_B, BLOCK_C, BLOCK_K)
            grad, cos_raw, _ = tile_gradient(raw, inv_e, inv_w, cols, col_ok, target, lse,
                                             row_grad_scaled, label_grad, row_mass, scale)
            along += tl.sum(grad * cos_raw, axis=0)
            e = tl.load(e_ptr + rows.to(tl.int64)[:, None] * D + d_out[None, :],
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            grad_in, e = dot_operands(grad, e, inv_e[:, None], inv_e[:, None], dtype, NORMALIZE_OPERAND)
            acc = tl.dot(dot_operand(tl.trans(grad_in), UPCAST), dot_operand(e, UPCAST), acc,
                         input_precision=PRECISION)

    w_rows = prototype_offsets(index_ptr, cols, col_ok, D, HAS_INDEX)
    w = tl.load(w_ptr + w_rows[:, None] + d_out[None, :], mask=col_ok[:, None] & d_ok[None, :],
                other=0.0).to(tl.float32)
    projected = acc - (w * inv_w[:, None]) * along[:, None]
    grad_w = inv_w[:, None] * tl.where(norm_clamped(w_sq)[:, None], acc, projected)
    tl.store(grad_w_ptr + cols.to(tl.int64)[:, None] * D + d_out[None, :], to_input_dtype(grad_w, dtype),
             mask=col_ok[:, None] & d_ok[None, :])
