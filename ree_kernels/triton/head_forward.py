"""The head's forward kernels (launched by head.py, in this order):

- `norms_kernel`: ‖x‖² per row of the embeddings and of the prototypes (float32); for the
  embeddings with a UI centre, also each row's cosine to it (statistics.cosine_to_ui).
- `forward_tiles_kernel`: per (row block, class split), over the split's class tiles: the
  cosines (tl.dot, float32 accumulation), an online log-sum-exp and the nearest candidate over
  the columns that are not the row's label. Writes per-row partials for its split.
- `forward_finish_kernel`: combines the splits in order, adds the label column with its
  margin, and writes the seven per-row outputs, the RI last.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .formulas import (
    LOG2E,
    clamp_cosine,
    cosine_numerators,
    inverse_norm,
    label_cosine,
    margin_logit,
    prototype_offsets,
    recognizability_index,
    row_targets,
)


@triton.jit
def norms_kernel(x_ptr, index_ptr, sq_ptr, n_rows, D, ui_ptr, cos_ui_ptr,
                 HAS_UI: tl.constexpr, HAS_INDEX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """‖x_r‖² (float32) and, with HAS_UI, cos_ui_r = clamp((x_r·ū)·inverse_norm(‖x_r‖²)·
    inverse_norm(‖ū‖²)): the normalisation pre-pass, one sweep over the rows."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    base = prototype_offsets(index_ptr, rows, row_ok, D, HAS_INDEX)
    squares = tl.zeros((BLOCK_R,), tl.float32)
    along = tl.zeros((BLOCK_R,), tl.float32)
    ui_squares = tl.zeros((BLOCK_K,), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + base[:, None] + kk[None, :], mask=row_ok[:, None] & (kk < D)[None, :],
                    other=0.0).to(tl.float32)
        squares += tl.sum(x * x, axis=1)
        if HAS_UI:
            u = tl.load(ui_ptr + kk, mask=kk < D, other=0.0)
            along += tl.sum(x * u[None, :], axis=1)
            ui_squares += u * u
    tl.store(sq_ptr + rows, squares, mask=row_ok)
    if HAS_UI:
        cos_ui = clamp_cosine(along * inverse_norm(squares) * inverse_norm(tl.sum(ui_squares, axis=0)))
        tl.store(cos_ui_ptr + rows, cos_ui, mask=row_ok)


@triton.jit
def forward_tiles_kernel(e_ptr, w_ptr, index_ptr, labels_ptr, e_sq_ptr, w_sq_ptr,
                         part_max_ptr, part_sum_ptr, part_best_ptr, part_index_ptr,
                         B, C, D, ignore_index, split_size, scale,
                         PRECISION: tl.constexpr, UPCAST: tl.constexpr, HAS_INDEX: tl.constexpr,
                         BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per row and split: the largest logit m, Σ exp(logit − m) and the nearest candidate
    (cosine, lowest index), all over the split's columns except the row's label. A logit is s·cos
    rounded once, as the backward rounds it (head_backward.tile_gradient): the lse and the
    backward's softmax then come from the same numbers, as in the reference's autograd."""
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    _, target = row_targets(labels, C, ignore_index)
    inv_e = inverse_norm(tl.load(e_sq_ptr + rows, mask=row_ok, other=1.0))

    run_max = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_B,), tl.float32)
    best = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    best_index = tl.full((BLOCK_B,), -1, tl.int64)
    c_begin = split * split_size
    c_end = tl.minimum(c_begin + split_size, C)
    for c0 in range(c_begin, c_end, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < c_end
        raw = cosine_numerators(e_ptr, w_ptr, index_ptr, rows, row_ok, cols, col_ok, D,
                                PRECISION, UPCAST, HAS_INDEX, BLOCK_B, BLOCK_C, BLOCK_K)
        inv_w = inverse_norm(tl.load(w_sq_ptr + cols, mask=col_ok, other=1.0))
        cos = clamp_cosine(raw * inv_e[:, None] * inv_w[None, :])
        excluded = (cols[None, :] == target[:, None]) | ~col_ok[None, :]
        logits = tl.where(excluded, float("-inf"), scale * cos)
        # NaN stays in `logits` (the sum below turns it into a NaN loss) but not in the ranking,
        # whose index must stay a real column. Columns rise across tiles, so a strict > keeps the
        # lowest index on ties.
        ranked = tl.where(excluded | (cos != cos), float("-inf"), cos)
        tile_best, tile_arg = tl.max(ranked, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_best > best
        best = tl.where(better, tile_best, best)
        best_index = tl.where(better, (c0 + tile_arg).to(tl.int64), best_index)
        new_max = tl.maximum(run_max, scale * tile_best)  # rounding is monotone: the largest logit
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # no candidate yet: nothing to rescale
        run_sum = run_sum * tl.exp2((run_max - shift) * LOG2E) + tl.sum(
            tl.exp2((logits - shift[:, None]) * LOG2E), axis=1)
        run_max = new_max

    out = split.to(tl.int64) * B + rows
    tl.store(part_max_ptr + out, run_max, mask=row_ok)
    tl.store(part_sum_ptr + out, run_sum, mask=row_ok)
    tl.store(part_best_ptr + out, best, mask=row_ok)
    tl.store(part_index_ptr + out, best_index, mask=row_ok)


@triton.jit
def forward_finish_kernel(e_ptr, w_ptr, index_ptr, labels_ptr, e_sq_ptr, w_sq_ptr,
                          part_max_ptr, part_sum_ptr, part_best_ptr, part_index_ptr, num_splits,
                          loss_ptr, cos_pos_ptr, cos_neg_ptr, neg_index_ptr, lse_ptr, cos_ui_ptr, ri_ptr,
                          B, C, D, ignore_index, scale, margin, cos_m, sin_m, threshold, fallback,
                          MODE: tl.constexpr, HAS_UI: tl.constexpr, RI_FORM: tl.constexpr, HAS_INDEX: tl.constexpr,
                          BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """Combines the splits (in split order), adds the label column with its margin, and
    completes the row with the RI (cos_ui comes from `norms_kernel`, or is NaN without HAS_UI).
    The partials hold logits (forward_tiles_kernel)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    has_target, _ = row_targets(labels, C, ignore_index)

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
        run_sum += tl.load(part_sum_ptr + at, mask=row_ok, other=0.0) * tl.exp(part_max - shift)
        part_best = tl.load(part_best_ptr + at, mask=row_ok, other=0.0)
        better = part_best > best  # splits in class order: ties keep the lowest index
        best = tl.where(better, part_best, best)
        best_index = tl.where(better, tl.load(part_index_ptr + at, mask=row_ok, other=-1), best_index)
        at += B
    negatives_lse = shift + tl.log(run_sum)  # −inf when the label is the only class

    e_sq = tl.load(e_sq_ptr + rows, mask=row_ok, other=1.0)
    cos_label, sin_squared = label_cosine(e_ptr, w_ptr, index_ptr, e_sq, w_sq_ptr, rows, row_ok, labels, has_target,
                                          D, HAS_INDEX, BLOCK_B, BLOCK_K)
    phi, _ = margin_logit(cos_label, sin_squared, margin, cos_m, sin_m, threshold, fallback, MODE)
    target_logit = scale * phi
    top = tl.maximum(negatives_lse, target_logit, propagate_nan=tl.PropagateNan.ALL)
    with_target = top + tl.log(tl.exp(negatives_lse - top) + tl.exp(target_logit - top))
    lse = tl.where(has_target, with_target, negatives_lse)

    nan = float("nan")
    loss = tl.where(has_target, lse - target_logit, tl.where(labels == ignore_index, 0.0, nan))
    no_negative = best == float("-inf")
    cos_neg = tl.where(no_negative, -1.0, best)
    cos_neg = tl.where(lse != lse, nan, cos_neg)  # a NaN cosine never wins a comparison: flag the row
    cos_pos = tl.where(has_target, cos_label, nan)
    if HAS_UI:
        cos_ui = tl.load(cos_ui_ptr + rows, mask=row_ok, other=0.0)
    else:
        cos_ui = tl.full((BLOCK_B,), nan, tl.float32)
        tl.store(cos_ui_ptr + rows, cos_ui, mask=row_ok)
    tl.store(loss_ptr + rows, loss, mask=row_ok)
    tl.store(cos_pos_ptr + rows, cos_pos, mask=row_ok)
    tl.store(cos_neg_ptr + rows, cos_neg, mask=row_ok)
    tl.store(neg_index_ptr + rows, tl.where(no_negative, -1, best_index), mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(ri_ptr + rows, recognizability_index(cos_pos, cos_neg, cos_ui, HAS_UI, RI_FORM), mask=row_ok)
