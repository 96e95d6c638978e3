"""The REE statistics in eager PyTorch (docs/spec.md §1): the UI cosine, the [R] recognizability
index and PAM target (public ops), the completion of a head pass with them, and the [R] index
diversion hinge (which `ree.losses` applies too).

Every backend computes these alike from its per-row results: the kernels in their own code (the
tests hold them to these functions), the reference and the class-sharded head by calling them.
The [R] formulas are reconstructions of the paper's prose; each lives in one small function
here so that a user holding the paper can change it in one place.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F

from .contract import RATIO_EPS, RI_FORMS, HeadOutput, HeadRows, normalize, stat_dtype


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


def index_diversion(ri_pred: torch.Tensor, mu_ui: torch.Tensor, tau: float) -> torch.Tensor:
    """[R] The index diversion hinge, per row: max(0, μ_UI + τ − ξ̂).

    Reconstructed: the paper pushes the predicted RI of recognizable faces away from that of
    the UIs by at least a margin, costing most for the hardest faces. The hinge on the
    difference to the UI mean μ_UI (an EMA, detached) is the simplest loss with that shape."""
    return F.relu(mu_ui.detach() + tau - ri_pred)
