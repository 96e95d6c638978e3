"""The REE ops in eager PyTorch: the specification in code (docs/spec.md §1–§3), the oracle.

Every other backend is tested against this module, and the benchmarks use it as the
"eager" baseline: it is written the way a user would write it without fused kernels, and it
materialises the B × C cosine matrix. Its ops carry a `_reference` suffix (`arcface_head_reference`,
`ree_aux_loss_reference`): the public ops of the same names without it validate and choose a
backend, this one among them. The shared constants and types are in `contract`, the REE
statistics and the other [R] formulas that the training package shares in `statistics`. The kernels
implement the same formulas; the tests hold them to this file. Only the reference backend
(`arcface_head` and `ree_aux_loss` with backend="reference", the sharded head's local pass), the
tests and the benchmarks import it.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .contract import (
    MARGIN_MODES,
    SIN_EPS,
    AuxOutput,
    HeadOptions,
    HeadOutput,
    HeadRows,
    loss_coefficients,
    margin_constants,
    normalize,
    reduce_rows,
    stat_dtype,
)
from .statistics import head_output, index_diversion, pam_target

# --------------------------------------------------------------------------------------------
# ArcFace (docs/spec.md §3)
# --------------------------------------------------------------------------------------------

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


def arcface_logits(embeddings: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor,
                   **options: Any) -> ArcFaceLogits:
    """The ArcFace logits of docs/spec.md §3, differentiable with respect to both inputs. A row whose
    label is `ignore_index` or outside [0, C) has no target column: plain s·cos everywhere.
    `options`: the keywords of `contract.HeadOptions` (scale, margin, margin_mode, ignore_index count)."""
    opts = HeadOptions(**options)
    sdt = stat_dtype(embeddings.dtype)
    num_classes = prototypes.shape[0]
    # In the statistics dtype (float32 for half inputs), as the kernels compute: the gradient of
    # a cosine is s·(p − y) times the upstream gradient, which a loss scaler's 2^16 would take
    # past float16's range inside a float16 product's backward.
    cos = F.linear(normalize(embeddings.to(sdt)), normalize(prototypes.to(sdt))).clamp(-1.0, 1.0)
    has_target = (labels >= 0) & (labels < num_classes) & (labels != opts.ignore_index)
    # A comparison rather than F.one_hot, which reads the labels' range back to the host on the CPU.
    target = (labels[:, None] == torch.arange(num_classes, device=labels.device)) & has_target[:, None]

    cos_label = cos.masked_fill(~target, 0.0).sum(1)
    phi = margin_logit(cos_label, opts.margin_mode, opts.margin)
    logits = opts.scale * torch.where(target, phi[:, None], cos)
    return ArcFaceLogits(cos, target, has_target, cos_label, phi, logits)


def arcface_rows(embeddings: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor, **options: Any) -> HeadRows:
    """The per-row ArcFace pass, materialising the B × C cosines.

    A label outside [0, C) other than `ignore_index` poisons its row's loss with NaN, which is
    what the kernels do where validation cannot run (inside torch.compile). `options` as in
    `arcface_logits`."""
    opts = HeadOptions(**options)
    cos, target, has_target, cos_label, phi, logits = arcface_logits(embeddings, prototypes, labels, **options)
    ignored = labels == opts.ignore_index
    lse = torch.logsumexp(logits, dim=1)
    loss = torch.where(has_target, lse - opts.scale * phi, torch.where(ignored, 0.0, math.nan))

    negatives = cos.masked_fill(target, -math.inf)
    cos_neg, neg_index = negatives.max(dim=1)  # ties: the first (lowest) index
    no_negative = cos_neg == -math.inf  # C = 1 and the only class is the label
    cos_neg = torch.where(no_negative, -1.0, cos_neg)
    neg_index = torch.where(no_negative, -1, neg_index)
    cos_pos = torch.where(has_target, cos_label, math.nan).detach()
    return HeadRows(loss, cos_pos, cos_neg.detach(), neg_index, lse.detach())


def arcface_head_reference(embeddings: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor,
                           ui_center: Optional[torch.Tensor] = None, *, sample_weight: Optional[torch.Tensor] = None,
                           **options: Any) -> HeadOutput:
    """The ArcFace head with the REE statistics (docs/spec.md §2), eagerly: `ree_kernels.arcface_head`
    with backend="reference" validates and then calls this. `options`: the keywords of
    `contract.HeadOptions` (the kernel ones are ignored). No input validation."""
    opts = HeadOptions(**options)
    rows = arcface_rows(embeddings, prototypes, labels, **options)
    coef = loss_coefficients(labels, sample_weight, opts.ignore_index, opts.reduction, rows.loss.dtype)
    return head_output(reduce_rows(rows.loss, coef, opts.reduction), rows, embeddings, ui_center, opts.ri_form)


def head_forward_reference(embeddings, prototypes, labels, scale, margin, margin_mode, ignore_index,
                           chunk_size, grad_filter_eps, ui_center=None, ri_form="product",
                           class_index=None) -> HeadRows:
    """The kernel op `head_forward` (ree_kernels/head.py) in eager PyTorch, its per-row outputs
    (the class-sharded head's local pass on the reference backend)."""
    if class_index is not None:
        prototypes = prototypes.index_select(0, class_index)
    return arcface_rows(embeddings, prototypes, labels, scale=scale, margin=margin, margin_mode=margin_mode,
                        ignore_index=ignore_index)


def head_backward_reference(embeddings, prototypes, labels, lse, row_grad, scale, margin, margin_mode,
                            chunk_size, grad_filter_eps, class_index=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The kernel op `head_backward` in eager PyTorch, by autograd of the reference's logits.

    It exists beside `arcface_head_reference` because the kernel contract takes the softmax against a given
    lse, the global one over all shards, which autograd of this shard's own pass
    (`arcface_rows`) cannot give. Row i's loss against the global lse L_i is
    L_i − s·φ_i; on this shard its gradient is exp(ℓ_i − L_i)·∂ℓ_i − s·∂φ_i (the second term only
    where the label lives here), with ℓ_i the log-sum-exp of the shard's logits: the shard's
    share of the global softmax times the gradient of its own log-sum-exp."""
    if class_index is not None:
        prototypes = prototypes.index_select(0, class_index)
    with torch.enable_grad():
        emb = embeddings.detach().requires_grad_(True)
        protos = prototypes.detach().requires_grad_(True)
        # The label is in range or has no target: no ignore_index is needed here.
        out = arcface_logits(emb, protos, labels, scale=scale, margin=margin, margin_mode=margin_mode,
                             ignore_index=-1)
        local_lse = torch.logsumexp(out.logits, dim=1)
        share = torch.exp(local_lse.detach() - lse)
        target_logit = torch.where(out.has_target, scale * out.phi, 0.0)
        objective = (row_grad * (share * local_lse - target_logit)).sum()
        return torch.autograd.grad(objective, (emb, protos))


# --------------------------------------------------------------------------------------------
# Auxiliary losses (docs/spec.md §1.5–§1.7)
# --------------------------------------------------------------------------------------------

def smooth_l1(diff: torch.Tensor, beta: float) -> torch.Tensor:
    """Huber-style smooth L1 of the RI regression error, per element (docs/spec.md §1.5)."""
    return F.smooth_l1_loss(diff, torch.zeros_like(diff), beta=beta, reduction="none")


def ree_aux_loss_reference(ri_pred: torch.Tensor, ri_target: torch.Tensor, mu_ui: Union[float, torch.Tensor], *,
                           tau: float, beta: float, attn: Optional[torch.Tensor], embeddings: Optional[torch.Tensor],
                           ui_center: Optional[torch.Tensor], recognizable: Optional[torch.Tensor],
                           weights: Sequence[float]) -> AuxOutput:
    """L1 RI regression, index diversion and PAM MSE (docs/spec.md §2), eagerly: `ree_kernels.ree_aux_loss`
    with backend="reference" validates and then calls this. Every argument as there (which holds
    the defaults). No validation."""
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
