"""The contract every backend shares (docs/spec.md §2): the constants, the head's options, the
output types, the statistics dtype, the margin's constants and the loss reduction.

The production path (`arcface_head`, `ree_aux_loss`, the kernels' launchers, the sharded head)
and the reference (`reference.py`, the oracle the tests trust) both build on this module; a
change here changes what every backend computes alike.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

NORM_EPS = 1e-12
"""Norms are clamped to at least this before dividing (F.normalize's epsilon)."""

SIN_EPS = 1e-12
"""sin θ = sqrt(max(1 − cos², SIN_EPS)): keeps dφ/dcos finite at cos = ±1, and makes φ insensitive to
the last bits of a cosine within 5e-13 of ±1, where the exact sin θ amplifies rounding without bound."""

RATIO_EPS = 1e-6
"""The `ratio` RI form divides by max(d^P, RATIO_EPS); `crfiqa` adds it to its denominator."""

IGNORE_INDEX = -100
"""The default label of rows that add no loss (`ignore_index`; torch's cross-entropy default)."""

MAX_SCALE = 1000.0
"""The largest logit scale s the ops accept (ArcFace uses s = 64): s·(1 + cos) stays far inside
float32's exponent range in the kernels' log-sum-exp, and the kernels keep forward and backward
consistent up to it (docs/design.md, "Large logit scales")."""

MARGIN_MODES = ("arcface", "arcface_easy", "arcface_st", "cosface")
RI_FORMS = ("product", "ratio", "sum", "crfiqa")
REDUCTIONS = ("mean", "sum", "none")


class HeadOutput(NamedTuple):
    """What `arcface_head` returns, per row i of the B rows. "stat" below is the statistics dtype:
    float32, or float64 for float64 inputs (`stat_dtype`), whatever the input dtype.

    Attributes:
        loss: the ArcFace loss, stat. Reduction "mean": a 0-d tensor, Σ_i c_i·loss_i with the
            sample weights normalised over the rows not ignored (0, with zero gradients, when
            their weight is 0); "sum": 0-d, the weighted sum; "none": [B], the weighted per-row
            losses, 0 on ignored rows. The only field with a gradient by default (with respect
            to embeddings and prototypes). A row whose label is outside [0, C) (possible only
            where validation cannot run, inside torch.compile) has a NaN loss; NaN inputs give
            a NaN loss.
        cos_pos: [B] stat, the cosine between the embedding and its label's prototype, clamped
            to [−1, 1]; NaN on rows without a label (ignore_index, or out of range).
        cos_neg: [B] stat, the largest cosine to any prototype other than the label's (over all
            C classes on rows without a label); −1 on a row that has no other class (C = 1).
        neg_index: [B] int64, the class of cos_neg, the lowest on ties; −1 where there is none.
        cos_ui: [B] stat, the cosine to ui_center, clamped; NaN when ui_center is None.
        ri: [B] stat, the [R] recognizability index ξ (`recognizability_index` with the head's
            ri_form) of cos_pos, cos_neg and cos_ui (d^UI = 1 without ui_center): the PRM's
            regression target. NaN where cos_pos is NaN.
        lse: [B] stat, the log-sum-exp over all C classes of the row's logits s·cos, with s·φ
            (the margin) at the label column; rows without a label have no margin anywhere.
            Unweighted and not reduced: loss_i = lse_i − s·φ(cos_pos_i).

    cos_pos, cos_neg, cos_ui and ri are differentiable with `arcface_head(...,
    differentiable_stats=True)`; neg_index and lse never are.
    """

    loss: torch.Tensor
    cos_pos: torch.Tensor
    cos_neg: torch.Tensor
    neg_index: torch.Tensor
    cos_ui: torch.Tensor
    ri: torch.Tensor
    lse: torch.Tensor


class AuxOutput(NamedTuple):
    """What `ree_aux_loss` returns: 0-d tensors in the statistics dtype (float32, or float64 for
    float64 ri_pred), each differentiable once with respect to ri_pred and attn.

    Attributes:
        total: λ_L1·l1 + λ_ID·id + λ_MSE·mse with the `weights` argument.
        l1: the RI regression loss (docs/spec.md §1.5): smooth-L1 with β of ξ̂_i − ξ_i, the mean
            over all B rows (a NaN target, such as an ignored row's RI, makes it NaN: pass
            `ri.nan_to_num(0.0)` or drop those rows).
        id: the [R] index diversion loss (docs/spec.md §1.6): max(0, μ_UI + τ − ξ̂_i), the mean
            over the recognizable rows; 0 when none is.
        mse: the PAM loss (docs/spec.md §1.7): ‖attn_i − pam_target_i‖² / D, the mean over the
            recognizable rows; 0 without attn or when no row is recognizable.
    """

    total: torch.Tensor
    l1: torch.Tensor
    id: torch.Tensor
    mse: torch.Tensor


class HeadRows(NamedTuple):
    """The per-row results of one pass over the prototypes: what every head kernel computes.

    `loss` is the unweighted per-row ArcFace loss (0 on ignored rows) and is differentiable;
    the rest are statistics. `lse` is the log-sum-exp of the row's logits, with the margin at
    the label column, or without any margin on a row that has no label (ignored rows)."""

    loss: torch.Tensor
    cos_pos: torch.Tensor
    cos_neg: torch.Tensor
    neg_index: torch.Tensor
    lse: torch.Tensor


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and losses are float32, or float64 when the inputs are float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1, eps=NORM_EPS)



class HeadOptions(NamedTuple):
    """The options of the ArcFace head (`arcface_head`, `sharded_arcface_head` and the reference's
    `arcface_head_reference`, `arcface_rows`, `arcface_logits` take them as keywords; each keeps
    only those it uses), with their defaults. Immutable: `_replace` makes a changed copy.

    Attributes:
        scale: s in (0, MAX_SCALE].
        margin: m in radians, in [0, π/2).
        margin_mode: φ, one of MARGIN_MODES (docs/spec.md §3).
        ri_form: the [R] recognizability index form "product" | "ratio" | "sum" (docs/spec.md
            §1.4), or "crfiqa", CR-FIQA's certainty ratio (`statistics.recognizability_index`).
        ignore_index: the label of rows that add no loss (their statistics are NaN, see HeadOutput).
        reduction: "mean" (weighted, over rows not ignored) | "sum" | "none" ([B], weighted).
        backend: "auto" | "reference" | "cpu" | "cuda" | "triton" (`backends.BACKENDS`).
        chunk_size: the kernels' tiling override, 0 for automatic; what it means and accepts
            depends on the backend (`backends.DESCRIPTIONS`). Under backend="auto" it is fitted
            into the chosen backend's range, so a value tuned for one backend never fails on
            another; a backend asked for by name raises on a value it does not take.
        grad_filter_eps: Triton only: skip backward tiles whose |softmax − one-hot| < eps
            everywhere (0, the default, is exact).
    """

    scale: float = 64.0
    margin: float = 0.5
    margin_mode: str = "arcface"
    ri_form: str = "product"
    ignore_index: int = IGNORE_INDEX
    reduction: str = "mean"
    backend: str = "auto"
    chunk_size: int = 0
    grad_filter_eps: float = 0.0


class MarginConstants(NamedTuple):
    """The numbers φ needs besides cos θ, computed once per call (the Triton launchers pass them to
    the kernels; csrc/common.h's make_margin is the C++ twin)."""

    cos_m: float  # cos m
    sin_m: float  # sin m
    threshold: float  # cos(π − m): below it θ + m > π, and arcface falls back to linear
    fallback: float  # m·sin m, the linear fallback's shift


def margin_constants(margin: float) -> MarginConstants:
    """cos m, sin m, cos(π − m) and m·sin m for the margin m (radians)."""
    return MarginConstants(math.cos(margin), math.sin(margin), math.cos(math.pi - margin), margin * math.sin(margin))



def loss_coefficients(
    labels: torch.Tensor,
    sample_weight: Optional[torch.Tensor],
    ignore_index: int,
    reduction: str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """c_i such that the reduced loss is Σ c_i·loss_i ("mean", "sum") or c_i·loss_i ("none").

    Ignored rows get 0; "mean" divides by the weight of the rows that count, and is 0 (with
    zero gradients) when that weight is 0."""
    counts = labels != ignore_index
    if sample_weight is None:
        coef = counts.to(dtype)
    else:
        coef = torch.where(counts, sample_weight.to(dtype), 0.0)
    if reduction == "mean":
        total = coef.sum()
        nonzero = total != 0
        coef = torch.where(nonzero, coef / torch.where(nonzero, total, 1.0), 0.0)
    return coef


def reduce_rows(loss_rows: torch.Tensor, coef: torch.Tensor, reduction: str) -> torch.Tensor:
    weighted = coef * loss_rows
    return weighted if reduction == "none" else weighted.sum()
