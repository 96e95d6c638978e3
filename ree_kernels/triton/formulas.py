"""The `@triton.jit` formulas the Triton kernels share (head forward, head backward, aux): one
definition of each, named and ordered as their C++ twins in csrc/include/ree/formulas.h, and
each following the function of `contract`, `statistics` or `reference` it names."""
from __future__ import annotations

import math

import triton
import triton.language as tl

from .. import contract

NORM_EPS = tl.constexpr(contract.NORM_EPS)
SIN_EPS = tl.constexpr(contract.SIN_EPS)
RATIO_EPS = tl.constexpr(contract.RATIO_EPS)
LOG2E = tl.constexpr(math.log2(math.e))
NO_IGNORE_INDEX = tl.constexpr(-1)
"""An ignore_index that no label in [0, C) equals: the backward's (its ignored rows arrive with
row_grad 0, and a label outside [0, C) has no target term). csrc: kNoIgnoreIndex."""


@triton.jit
def inverse_norm(squared_norm):
    """1 / max(‖x‖, NORM_EPS) from ‖x‖²: contract.normalize's divisor (F.normalize)."""
    return 1.0 / tl.maximum(tl.sqrt(squared_norm), NORM_EPS)


@triton.jit
def norm_clamped(squared_norm):
    """Whether F.normalize's clamp_min(‖x‖, NORM_EPS) cuts the gradient through the norm (it
    passes where ‖x‖ ≥ NORM_EPS); the normalisation's backward is then a plain scaling. False
    for NaN, whose gradient then stays NaN."""
    return tl.sqrt(squared_norm) < NORM_EPS


@triton.jit
def clamp_cosine(x):
    """clamp(x, −1, 1) keeping NaN, as torch.clamp does (so non-finite inputs stay visible)."""
    return tl.clamp(x, -1.0, 1.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def row_targets(labels, C, ignore_index):
    """(has a target column, that column or −1): rows whose label is ignore_index or outside
    [0, C) have none (reference.arcface_logits). The backward passes NO_IGNORE_INDEX."""
    has_target = (labels >= 0) & (labels < C) & (labels != ignore_index)
    return has_target, tl.where(has_target, labels, -1)


@triton.jit
def margin_logit(cos, sin_squared, margin, cos_m, sin_m, threshold, fallback, MODE: tl.constexpr):
    """(φ(cos), dφ/dcos) of reference.margin_logit, as its autograd differentiates it.

    MODE follows contract.MARGIN_MODES: 0 arcface, 1 arcface_easy, 2 arcface_st, 3 cosface; the
    constants are contract.margin_constants. `sin_squared` is 1 − cos² (see `label_cosine`);
    sin θ = sqrt(max(1 − cos², SIN_EPS)), and the clamp passes the gradient where
    1 − cos² ≥ SIN_EPS (torch.clamp_min's rule)."""
    one_minus = sin_squared
    sin = tl.sqrt(tl.maximum(one_minus, SIN_EPS))
    shifted = cos * cos_m - sin * sin_m  # cos(θ + m)
    dshifted = cos_m + tl.where(one_minus >= SIN_EPS, cos / sin * sin_m, 0.0)
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
def recognizability_index(cos_pos, cos_neg, cos_ui, HAS_UI: tl.constexpr, FORM: tl.constexpr):
    """statistics.recognizability_index, the same operations in the same order. FORM follows
    contract.RI_FORMS: 0 product, 1 ratio, 2 sum, 3 crfiqa; without HAS_UI, d^UI = 1. NaN
    cosines (rows without a target) give NaN."""
    d_pos = 1.0 - cos_pos
    d_neg = 1.0 - cos_neg
    if HAS_UI:
        d_ui = 1.0 - cos_ui
    else:
        d_ui = tl.full(cos_pos.shape, 1.0, tl.float32)
    if FORM == 0:
        ri = d_ui * (d_neg - d_pos)
    elif FORM == 1:
        ri = d_ui * d_neg / tl.maximum(d_pos, RATIO_EPS, propagate_nan=tl.PropagateNan.ALL)
    elif FORM == 2:
        ri = d_ui + d_neg - d_pos
    else:  # crfiqa: CR-FIQA's certainty ratio, not an REE form
        ri = cos_pos / (cos_neg + 1.0 + RATIO_EPS)
    return ri


@triton.jit
def pam_residual(v, u, v_inv, u_inv, along):
    """statistics.pam_target before its last normalisation: v̂ − (v̂·û)·û, from the raw v and u,
    their inverse norms, and along = v̂·û."""
    return v * v_inv - along * (u * u_inv)


@triton.jit
def dot_operand(x, UPCAST: tl.constexpr):
    """The interpreter multiplies bfloat16 tiles as raw integers; float32 operands give the
    same products (bf16 × bf16 is exact in float32) and the same float32 accumulation."""
    if UPCAST:
        return x.to(tl.float32)
    return x


@triton.jit
def to_input_dtype(x, dtype: tl.constexpr):
    # Explicit round-to-nearest-even: the interpreter's default float32 → bfloat16 cast truncates.
    if dtype == tl.float32:
        return x
    return x.to(dtype, fp_downcast_rounding="rtne")


@triton.jit
def prototype_offsets(index_ptr, cols, col_ok, D, HAS_INDEX: tl.constexpr):
    """Where the prototype of each column starts (int64 element offsets): row index[col] with a
    class index (PartialFC sampling: the rows are read through it, never copied), else row col."""
    if HAS_INDEX:
        return tl.load(index_ptr + cols, mask=col_ok, other=0).to(tl.int64) * D
    return cols.to(tl.int64) * D


@triton.jit
def cosine_numerators(e_ptr, w_ptr, index_ptr, rows, row_ok, cols, col_ok, D,
                      PRECISION: tl.constexpr, UPCAST: tl.constexpr, HAS_INDEX: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """e_i · w_j for a [BLOCK_B, BLOCK_C] tile, inputs in their dtype, float32 accumulation.
    The forward and both backward kernels take their cosines from here, with the same BLOCK_K
    where they must agree bit for bit (tiling.py)."""
    acc = tl.zeros((BLOCK_B, BLOCK_C), tl.float32)
    e_rows = rows.to(tl.int64) * D
    w_rows = prototype_offsets(index_ptr, cols, col_ok, D, HAS_INDEX)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < D
        e = tl.load(e_ptr + e_rows[:, None] + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + w_rows[None, :] + kk[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(dot_operand(e, UPCAST), dot_operand(w, UPCAST), acc, input_precision=PRECISION)
    return acc


@triton.jit
def label_cosine(e_ptr, w_ptr, index_ptr, e_sq, w_sq_ptr, rows, row_ok, labels, has_target, D,
                 HAS_INDEX: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """(clamped cosine, 1 − cosine²) to the label's prototype, for rows with a target (0, 1
    elsewhere); e_sq are the rows' squared norms. φ has a square-root singularity at cos = ±1,
    where the planted peaky rows sit: 1 − cos² from a rounded cosine is off by ~1e-7 in float32
    (φ then by ~1e-2·s), so it is computed as ‖ê − ŵ‖²·‖ê + ŵ‖²/4, the same value in exact
    arithmetic for unit vectors, accurate near ±1. Rows or prototypes whose norm is clamped are
    not unit vectors: 1 − cos² there."""
    take = row_ok & has_target
    e_rows = rows.to(tl.int64) * D
    label_rows = tl.where(take, labels, 0)  # never an out-of-range address
    w_rows = prototype_offsets(index_ptr, label_rows, take, D, HAS_INDEX)
    w_sq = tl.load(w_sq_ptr + label_rows, mask=take, other=1.0)
    inv_e = inverse_norm(e_sq)
    inv_w = inverse_norm(w_sq)
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
    cos = clamp_cosine(dot * inv_e * inv_w)
    unit = (tl.sqrt(e_sq) >= NORM_EPS) & (tl.sqrt(w_sq) >= NORM_EPS)
    sin_squared = tl.where(unit, apart * together * 0.25, 1.0 - cos * cos)
    return cos, sin_squared
