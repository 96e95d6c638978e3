"""The REE ops in eager PyTorch: the specification in code (docs/spec.md §1–§3).

Every other backend is tested against this module, and the benchmarks use it as the
"eager" baseline: it is written the way a user would write it without fused kernels, and it
materialises the B × C cosine matrix. The functions marked [R] are reconstructions of the
paper's prose (its equations were not available as text); each lives in one small function
here so that a user holding the paper can change it in one place. The kernels implement the
same formulas; the tests hold them to this file.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

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


# --------------------------------------------------------------------------------------------
# ArcFace (docs/spec.md §3)
# --------------------------------------------------------------------------------------------

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


def margin_logit(cos: torch.Tensor, mode: str, margin: float) -> torch.Tensor:
    """φ(cos θ): the target-class cosine after the additive margin (docs/spec.md §3).

    Raises:
        ValueError: `mode` is not one of MARGIN_MODES.
    """
    if mode == "cosface":
        return cos - margin
    k = margin_constants(margin)
    sin = torch.sqrt((1.0 - cos * cos).clamp_min(SIN_EPS))
    shifted = cos * k.cos_m - sin * k.sin_m  # cos(θ + m)
    if mode == "arcface":
        # Past θ + m > π, cos(θ + m) would rise again; insightface's linear fallback keeps φ monotone.
        return torch.where(cos > k.threshold, shifted, cos - k.fallback)
    if mode == "arcface_easy":
        return torch.where(cos > 0, shifted, cos)
    if mode == "arcface_st":
        # Straight-through: the forward of cos(θ + m), the gradient of the identity.
        return cos + (shifted - cos).detach()
    raise ValueError(f"margin_mode must be one of {MARGIN_MODES}, got {mode!r}")


class ArcFaceLogits(NamedTuple):
    """The B × C quantities of one ArcFace pass (docs/spec.md §3), as the reference materialises them."""

    cos: torch.Tensor  # [B, C] clamped cosines, in the statistics dtype
    target: torch.Tensor  # [B, C] bool: the label column of the rows that have one
    has_target: torch.Tensor  # [B] bool: the label lies in [0, C) and is not ignore_index
    cos_label: torch.Tensor  # [B] cos at the label column, 0 where has_target is False
    phi: torch.Tensor  # [B] φ(cos_label)
    logits: torch.Tensor  # [B, C] s·φ at the label column, s·cos elsewhere


def arcface_logits(
    embeddings: torch.Tensor,
    prototypes: torch.Tensor,
    labels: torch.Tensor,
    *,
    scale: float = 64.0,
    margin: float = 0.5,
    margin_mode: str = "arcface",
    ignore_index: int = IGNORE_INDEX,
) -> ArcFaceLogits:
    """The ArcFace logits of docs/spec.md §3, differentiable with respect to both inputs. A row whose
    label is `ignore_index` or outside [0, C) has no target column: plain s·cos everywhere."""
    sdt = stat_dtype(embeddings.dtype)
    num_classes = prototypes.shape[0]
    # In the statistics dtype (float32 for half inputs), as the kernels compute: the gradient of
    # a cosine is s·(p − y) times the upstream gradient, which a loss scaler's 2^16 would take
    # past float16's range inside a float16 product's backward.
    cos = F.linear(normalize(embeddings.to(sdt)), normalize(prototypes.to(sdt))).clamp(-1.0, 1.0)
    has_target = (labels >= 0) & (labels < num_classes) & (labels != ignore_index)
    # A comparison rather than F.one_hot, which reads the labels' range back to the host on the CPU.
    target = (labels[:, None] == torch.arange(num_classes, device=labels.device)) & has_target[:, None]

    cos_label = cos.masked_fill(~target, 0.0).sum(1)
    phi = margin_logit(cos_label, margin_mode, margin)
    logits = scale * torch.where(target, phi[:, None], cos)
    return ArcFaceLogits(cos, target, has_target, cos_label, phi, logits)


def arcface_rows(
    embeddings: torch.Tensor,
    prototypes: torch.Tensor,
    labels: torch.Tensor,
    *,
    scale: float = 64.0,
    margin: float = 0.5,
    margin_mode: str = "arcface",
    ignore_index: int = IGNORE_INDEX,
) -> HeadRows:
    """The per-row ArcFace pass, materialising the B × C cosines.

    A label outside [0, C) other than `ignore_index` poisons its row's loss with NaN, which is
    what the kernels do where validation cannot run (inside torch.compile)."""
    cos, target, has_target, cos_label, phi, logits = arcface_logits(
        embeddings, prototypes, labels,
        scale=scale, margin=margin, margin_mode=margin_mode, ignore_index=ignore_index,
    )
    ignored = labels == ignore_index
    lse = torch.logsumexp(logits, dim=1)
    loss = torch.where(has_target, lse - scale * phi, torch.where(ignored, 0.0, math.nan))

    negatives = cos.masked_fill(target, -math.inf)
    cos_neg, neg_index = negatives.max(dim=1)  # ties: the first (lowest) index
    no_negative = cos_neg == -math.inf  # C = 1 and the only class is the label
    cos_neg = torch.where(no_negative, -1.0, cos_neg)
    neg_index = torch.where(no_negative, -1, neg_index)
    cos_pos = torch.where(has_target, cos_label, math.nan).detach()
    return HeadRows(loss, cos_pos, cos_neg.detach(), neg_index, lse.detach())


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


# --------------------------------------------------------------------------------------------
# REE statistics (docs/spec.md §1)
# --------------------------------------------------------------------------------------------

def cosine_to_ui(embeddings: torch.Tensor, ui_center: Optional[torch.Tensor]) -> torch.Tensor:
    """cos between each embedding and the UI centre (docs/spec.md §1.3); NaN without a centre."""
    sdt = stat_dtype(embeddings.dtype)
    if ui_center is None:
        return torch.full(embeddings.shape[:1], math.nan, dtype=sdt, device=embeddings.device)
    cos = normalize(embeddings.to(sdt)) @ normalize(ui_center.to(sdt))
    return cos.clamp(-1.0, 1.0)


def recognizability_index(
    cos_pos: torch.Tensor,
    cos_neg: torch.Tensor,
    cos_ui: Optional[torch.Tensor] = None,
    form: str = "product",
    *,
    detach: bool = True,
) -> torch.Tensor:
    """[R] The recognizability index ξ from the three distances of docs/spec.md §1.1–§1.3.

    Reconstructed: the paper describes ξ as rising with the distance to the UI centre (d^UI)
    and to the nearest negative prototype (d^N), and falling with the distance to the own
    prototype (d^P), but its equation was not available. `product` (default) is
    d^UI·(d^N − d^P): the prototype margin, amplified for faces far from the UI cluster;
    `ratio` is d^UI·d^N / max(d^P, 1e-6); `sum` is d^UI + d^N − d^P. Without a UI centre
    (`cos_ui` None) d^UI = 1. `crfiqa` is not REE's: it is CR-FIQA's certainty ratio
    cos_pos / (cos_neg + 1 + 1e-6) (Boutros et al., CVPR 2023), which ignores the UI centre, so
    that the same fused head trains that baseline. The result is a target: no gradient flows
    through it, unless `detach=False` (the differentiable statistics of
    `arcface_head(differentiable_stats=True)`).

    Raises:
        ValueError: `form` is not one of RI_FORMS.
    """
    if detach:
        cos_pos, cos_neg = cos_pos.detach(), cos_neg.detach()
        cos_ui = None if cos_ui is None else cos_ui.detach()
    d_pos = 1.0 - cos_pos
    d_neg = 1.0 - cos_neg
    d_ui = torch.ones_like(d_pos) if cos_ui is None else 1.0 - cos_ui
    if form == "product":
        return d_ui * (d_neg - d_pos)
    if form == "ratio":
        return d_ui * d_neg / d_pos.clamp_min(RATIO_EPS)
    if form == "sum":
        return d_ui + d_neg - d_pos
    if form == "crfiqa":
        return cos_pos / (cos_neg + 1.0 + RATIO_EPS)
    raise ValueError(f"ri_form must be one of {RI_FORMS}, got {form!r}")


def head_output(
    loss: torch.Tensor,
    rows: HeadRows,
    embeddings: torch.Tensor,
    ui_center: Optional[torch.Tensor],
    ri_form: str,
) -> HeadOutput:
    """Completes a pass that returns only `HeadRows` with the UI cosine and the RI (no gradients):
    the reference's own, and the class-sharded head's, whose RI needs the statistics of every
    shard. The kernel ops compute both themselves (ree_kernels/head.py)."""
    cos_ui = cosine_to_ui(embeddings.detach(), None if ui_center is None else ui_center.detach())
    ri = recognizability_index(rows.cos_pos, rows.cos_neg, None if ui_center is None else cos_ui, ri_form)
    return HeadOutput(loss, rows.cos_pos, rows.cos_neg, rows.neg_index, cos_ui, ri, rows.lse)


def attach_statistic_gradients(
    out: HeadOutput,
    embeddings: torch.Tensor,
    prototypes: torch.Tensor,
    labels: torch.Tensor,
    ui_center: Optional[torch.Tensor],
    *,
    ignore_index: int,
    ri_form: str,
) -> HeadOutput:
    """`out` with cos_pos, cos_neg, cos_ui and ri differentiable, their values unchanged.

    The gradients are those of the statistics computed without detaching: cos_pos from the
    label's prototype, cos_neg from the prototype at neg_index (where the maximum's gradient
    goes), cos_ui from ui_center, and the RI through `recognizability_index(detach=False)`. Only
    the O(B·D) rows W[y_i], W[neg_index_i] and ū are gathered, so this works unchanged on the
    output of any backend: each statistic becomes value + (g − g.detach()) where g recomputes
    it, which adds exactly zero to the value and g's gradient to it. Rows without a statistic
    (an ignored row's NaN cos_pos and RI, C = 1's cos_neg = −1 at index −1, no ui_center) get no
    gradient: g is masked there, so their NaN values leak into no other row's gradient."""
    sdt = out.cos_pos.dtype
    v = normalize(embeddings.to(sdt))
    has_target = (labels >= 0) & (labels < prototypes.shape[0]) & (labels != ignore_index)
    has_negative = out.neg_index >= 0

    # One gather for both prototype rows of every row: its backward scatters into one C × D buffer.
    w_pos, w_neg = normalize(prototypes[torch.cat([torch.where(has_target, labels, 0),
                                                   torch.where(has_negative, out.neg_index, 0)])].to(sdt)).chunk(2)

    def cosine(w: torch.Tensor, rows: torch.Tensor, elsewhere: Union[float, torch.Tensor]) -> torch.Tensor:
        return torch.where(rows, (v * w).sum(1).clamp(-1.0, 1.0), elsewhere)

    def attach(value: torch.Tensor, graph: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return value.detach() + torch.where(rows, graph - graph.detach(), 0.0)

    # Finite stand-ins where a row has no statistic: a NaN in the RI's graph would turn the zero
    # gradient of a masked row into NaN (0·NaN) on its way to the shared ui_center.
    cos_pos = cosine(w_pos, has_target, 0.0)  # the RI of such a row is masked as well
    cos_neg = cosine(w_neg, has_negative, out.cos_neg.detach())  # C = 1: the constant −1
    cos_ui = None if ui_center is None else cosine_to_ui(embeddings, ui_center)
    ri = recognizability_index(cos_pos, cos_neg, cos_ui, ri_form, detach=False)
    every_row = torch.ones_like(has_target)
    return out._replace(
        cos_pos=attach(out.cos_pos, cos_pos, has_target),
        cos_neg=attach(out.cos_neg, cos_neg, has_negative),
        cos_ui=out.cos_ui if cos_ui is None else attach(out.cos_ui, cos_ui, every_row),
        ri=attach(out.ri, ri, has_target),
    )


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
) -> HeadOutput:
    """The ArcFace head with the REE statistics (docs/spec.md §2), eagerly. No input validation:
    `ree_kernels.arcface_head` validates and then calls this or a kernel."""
    rows = arcface_rows(
        embeddings, prototypes, labels,
        scale=scale, margin=margin, margin_mode=margin_mode, ignore_index=ignore_index,
    )
    coef = loss_coefficients(labels, sample_weight, ignore_index, reduction, rows.loss.dtype)
    return head_output(reduce_rows(rows.loss, coef, reduction), rows, embeddings, ui_center, ri_form)


# --------------------------------------------------------------------------------------------
# Auxiliary losses (docs/spec.md §1.5–§1.7)
# --------------------------------------------------------------------------------------------

def smooth_l1(diff: torch.Tensor, beta: float) -> torch.Tensor:
    """Huber-style smooth L1 of the RI regression error, per element (docs/spec.md §1.5)."""
    return F.smooth_l1_loss(diff, torch.zeros_like(diff), beta=beta, reduction="none")


def index_diversion(ri_pred: torch.Tensor, mu_ui: torch.Tensor, tau: float) -> torch.Tensor:
    """[R] The index diversion hinge, per row: max(0, μ_UI + τ − ξ̂).

    Reconstructed: the paper pushes the predicted RI of recognizable faces away from that of
    the UIs by at least a margin, costing most for the hardest faces. The hinge on the
    difference to the UI mean μ_UI (an EMA, detached) is the simplest loss with that shape."""
    return F.relu(mu_ui.detach() + tau - ri_pred)


def pam_target(embeddings: torch.Tensor, ui_center: torch.Tensor) -> torch.Tensor:
    """[R] The PAM regression target v̇: the normalised embedding with its component along
    the (normalised) UI centre removed, normalised again.

    Reconstructed: the paper trains the attention branch to produce an embedding that is
    'diverted' from the UI cluster; removing the UI direction is the smallest change to v̂
    that is orthogonal to ū. Detached.

    Raises:
        RuntimeError: (torch's) ui_center's length is not embeddings' D.
    """
    v = normalize(embeddings.detach())
    u = normalize(ui_center.detach().to(v.dtype))
    return normalize(v - (v @ u)[:, None] * u)


def ree_aux_loss(
    ri_pred: torch.Tensor,
    ri_target: torch.Tensor,
    mu_ui: Union[float, torch.Tensor],
    *,
    tau: float = 0.2,
    beta: float = 0.75,
    attn: Optional[torch.Tensor] = None,
    embeddings: Optional[torch.Tensor] = None,
    ui_center: Optional[torch.Tensor] = None,
    recognizable: Optional[torch.Tensor] = None,
    weights: Sequence[float] = (1.0, 1.0, 1.0),
) -> AuxOutput:
    """L1 RI regression, index diversion and PAM MSE (docs/spec.md §2), eagerly. No validation."""
    sdt = stat_dtype(ri_pred.dtype)
    pred = ri_pred.to(sdt)
    mu = torch.as_tensor(mu_ui, dtype=sdt, device=pred.device)
    l1 = smooth_l1(pred - ri_target.detach().to(sdt), beta).mean()

    keep = torch.ones_like(pred, dtype=torch.bool) if recognizable is None else recognizable
    count = keep.sum()
    denom = count.clamp_min(1).to(sdt)
    idl = torch.where(keep, index_diversion(pred, mu, tau), 0.0).sum() / denom
    if attn is None:
        mse = torch.zeros((), dtype=sdt, device=pred.device)
    else:
        err = (attn.to(sdt) - pam_target(embeddings.to(sdt), ui_center)).square().sum(1)
        mse = torch.where(keep, err, 0.0).sum() / (denom * attn.shape[1])
    total = weights[0] * l1 + weights[1] * idl + weights[2] * mse
    return AuxOutput(total, l1, idl, mse)
