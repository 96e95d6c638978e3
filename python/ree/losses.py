"""`REELoss`: the REE training objective (docs/spec.md §1) on the fused ops, and the ArcFace baseline."""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

import ree_kernels
from ree_kernels import UITracker, reference
from ree_kernels.modules import make_arcface_head

METHODS = ("ree", "arcface", "crfiqa")
DIVERSION_TARGETS = ("predicted", "true")
"""What L_ID is taken on: the PRM's ξ̂, or the head's RI made differentiable."""

CRFIQA_WEIGHT = 10.0
CRFIQA_BETA = 0.5
"""CR-FIQA's regression loss: smooth L1 with β = 0.5 weighted 10 × against the ArcFace loss
(Boutros et al., CVPR 2023, and its official training code)."""


class LossOutput(NamedTuple):
    """`total` (differentiable) and its parts, for logging: `cls` L_cls (recognizable rows),
    `l1` L_L1, `id` L_ID, `mse` L_MSE (unweighted), and per row the RI target `ri` and the
    head's `cos_pos`, `cos_neg` (detached). In the ArcFace baseline the three aux parts are 0;
    CR-FIQA has only `l1` (its certainty-ratio regression)."""

    total: torch.Tensor
    cls: torch.Tensor
    l1: torch.Tensor
    id: torch.Tensor
    mse: torch.Tensor
    ri: torch.Tensor
    cos_pos: torch.Tensor
    cos_neg: torch.Tensor


class REELoss(nn.Module):
    """L = L_cls + λ_L1·L_L1 + λ_ID·L_ID + λ_MSE·L_MSE (docs/spec.md §1.9), with the UI bookkeeping.

    Owns the ArcFace prototypes (`self.head`, from `ree_kernels.modules.make_arcface_head`) and the
    `UITracker` (ū, μ_UI).
    A batch holds recognizable rows and UIs (`is_ui`, docs/spec.md §1.10): UIs get sample weight 0 in
    L_cls and `recognizable=False` in L_ID and L_MSE; they feed ū, μ_UI and L_L1. A UI whose
    label is `ignore_index` (a non-face crop) has no RI target, so it feeds ū and μ_UI only.

    Per step: the tracker takes the batch's UIs first (so the very first batch already has a
    centre), then `arcface_head` gives L_cls and the RI target ξ (detached) with that centre,
    then `ree_aux_loss` gives the three aux losses. L_MSE is 0 until a UI has been seen.

    Defaults: ArcFace s = 64, m = 0.5; τ = 0.1 and weights 0.5, tuned once on the synthetic
    validation identities (docs/tuning.md).

    `method="arcface"` is plain ArcFace through the same path: the head's loss only (no tracker
    update, no aux losses; UIs, if any, still carry weight 0). `method="crfiqa"` is CR-FIQA on the
    same path: the head's RI form is its certainty ratio (`ri_form` is ignored), regressed by the
    PRM with smooth L1 (β = CRFIQA_BETA, weight CRFIQA_WEIGHT); no tracker, L_ID or L_MSE.

    `diversion_target="true"` applies L_ID to the head's RI itself, made differentiable through
    cos_pos, cos_neg and cos_ui (an ablation of docs/spec.md §1.6, which applies it to ξ̂).

    `head_options` are the head's keywords (`ree_kernels.modules.ArcFaceHead`: scale, margin,
    margin_mode, ri_form, ignore_index, backend, seed, sample_rate, ...), with its defaults. `seed`
    fixes the prototype init (None: the global RNG). With a `process_group` the loss runs on each
    rank's rows of the global batch: the head is a `ShardedArcFaceHead` over the group (this
    rank's classes; L_cls is the global batch's; the same prototypes as one process at the same
    seed) and the tracker sums the UI statistics over the ranks, so every rank keeps the same ū
    and μ_UI. The aux losses stay means over this rank's rows (DDP averages them). `sample_rate`
    < 1 is PartialFC's class sampling in the head: L_cls and the head's statistics (cos_neg, the
    RI) are then over each step's sampled classes.

    Raises:
        ValueError: a bad weight, tau, beta, method or diversion_target, diversion_target="true"
            with a process_group, or a bad head option (as the head's constructor).
        TypeError: a keyword that neither this loss nor the head takes.
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        *,
        tau: float = 0.1,
        beta: float = 0.75,
        weights: Sequence[float] = (0.5, 0.5, 0.5),
        momentum: float = 0.99,
        method: str = "ree",
        diversion_target: str = "predicted",
        process_group: Optional[dist.ProcessGroup] = None,
        **head_options: Any,
    ) -> None:
        super().__init__()
        if len(weights) != 3 or any(not isinstance(w, (int, float)) or w < 0 for w in weights):
            raise ValueError(f"weights must be three numbers >= 0 (λ_L1, λ_ID, λ_MSE), got {weights!r}")
        if not isinstance(tau, (int, float)) or not isinstance(beta, (int, float)) or beta <= 0:
            raise ValueError(f"tau must be a number and beta a positive number, got tau={tau!r}, beta={beta!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if diversion_target not in DIVERSION_TARGETS:
            raise ValueError(f"diversion_target must be 'predicted' or 'true', got {diversion_target!r}")
        if diversion_target == "true" and method == "ree" and process_group is not None:
            raise ValueError("diversion_target='true' needs the head statistics' gradients, which the class-sharded "
                             "head (process_group) does not give; use diversion_target='predicted' with several "
                             "processes")
        if method == "crfiqa":
            head_options["ri_form"], beta, weights = "crfiqa", CRFIQA_BETA, (CRFIQA_WEIGHT, 0.0, 0.0)
        self.head = make_arcface_head(embedding_size, num_classes, process_group=process_group, **head_options)
        self.process_group = process_group
        self.tracker = UITracker(embedding_size, momentum)
        self.tau, self.beta, self.weights = float(tau), float(beta), tuple(float(w) for w in weights)
        self.method, self.diversion_target = method, diversion_target

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ri_pred: Optional[torch.Tensor] = None,
        attn: Optional[torch.Tensor] = None,
        is_ui: Optional[torch.Tensor] = None,
    ) -> LossOutput:
        """embeddings [B, D] (v), labels [B] int64, ri_pred [B] (ξ̂, the PRM output), attn
        [B, D] (v^attn, the PAM output, or None for no L_MSE), is_ui [B] bool (None: no UIs).
        ri_pred may be None only for the ArcFace baseline."""
        batch = embeddings.shape[0] if isinstance(embeddings, torch.Tensor) else 0
        if is_ui is None:
            is_ui = torch.zeros(batch, dtype=torch.bool, device=embeddings.device)
        if not isinstance(is_ui, torch.Tensor) or is_ui.dtype != torch.bool or is_ui.shape != (batch,):
            raise ValueError(f"is_ui must be a bool tensor of shape [{batch}]")
        recognizable = ~is_ui
        if self.method != "arcface" and ri_pred is None:
            raise ValueError(f"ri_pred (the PRM output) is required for method={self.method!r}")
        if self.method == "ree":
            self.tracker.update(embeddings[is_ui].detach(), ri_pred[is_ui].detach(), process_group=self.process_group)
        center = self.tracker.center_or_none() if self.method == "ree" else None
        true_diversion = self.method == "ree" and self.diversion_target == "true"
        head = self.head(embeddings, labels, ui_center=center, sample_weight=recognizable.to(embeddings.dtype),
                         return_stats=True, differentiable_stats=true_diversion)
        zero = torch.zeros((), dtype=head.loss.dtype, device=head.loss.device)
        ri = head.ri.detach()
        if self.method == "arcface":
            return LossOutput(head.loss, head.loss.detach(), zero, zero, zero, ri, head.cos_pos, head.cos_neg)

        has_target = labels != self.head.ignore_index
        if not bool(has_target.any()):  # only unlabelled UIs: nothing has an RI target
            total = head.loss
            if self.process_group is not None:
                # Under DDP the same parameters must take part on every rank (or the ranks launch
                # their gradient all-reduces in different orders): the PRM and PAM, with weight 0.
                total = total + 0.0 * ri_pred.sum()
                if attn is not None and center is not None:
                    total = total + 0.0 * attn.sum()
            return LossOutput(total, head.loss.detach(), zero, zero, zero, ri, head.cos_pos, head.cos_neg)
        rows = slice(None) if bool(has_target.all()) else has_target
        use_attn = attn is not None and center is not None
        sdt = ri.dtype  # the aux losses run in the head's statistics dtype (float32 under autocast)
        weights = (self.weights[0], 0.0, self.weights[2]) if true_diversion else self.weights
        aux = ree_kernels.ree_aux_loss(
            ri_pred[rows].to(sdt), ri[rows], self.tracker.mu, tau=self.tau, beta=self.beta,
            attn=attn[rows].to(sdt) if use_attn else None,
            embeddings=embeddings[rows].detach().to(sdt) if use_attn else None,
            ui_center=center.to(sdt) if use_attn else None,
            recognizable=recognizable[rows], weights=weights, backend=self.head.backend,
        )
        total = head.loss + aux.total.to(head.loss.dtype)
        diversion = zero if self.method == "crfiqa" else aux.id.detach()  # CR-FIQA has no L_ID
        if true_diversion:
            keep = recognizable & has_target
            hinge = reference.index_diversion(head.ri[keep], self.tracker.mu.to(sdt), self.tau)
            diversion = hinge.sum() / keep.sum().clamp_min(1)
            total = total + self.weights[1] * diversion.to(head.loss.dtype)
            diversion = diversion.detach()
        return LossOutput(total, head.loss.detach(), aux.l1.detach(), diversion, aux.mse.detach(),
                          ri, head.cos_pos, head.cos_neg)
