"""`ArcFaceHead`: the class prototypes and the fused ArcFace loss, as one module."""
from __future__ import annotations

from typing import Callable, List, Optional

import torch
from torch import nn

import ree_kernels
from ree_kernels import HeadOutput
from ree_kernels.contract import IGNORE_INDEX
from ree_kernels.distributed import init_prototypes
from ree_kernels.sampling import keep_unsampled_rows, num_sampled, sample_classes
from ree_kernels.validation import validate_head_inputs


class ArcFaceHead(nn.Module):
    """ArcFace (or CosFace) classification loss over `num_classes` learned prototypes, computed
    by `ree_kernels.arcface_head` without materialising the B × C logits.

    A drop-in for insightface arcface_torch's `PartialFC_V2(CombinedMarginLoss(...))` in a
    single-process or DDP data-parallel loop (every rank holds all prototypes), with PartialFC's
    class sampling at `sample_rate` < 1::

        # insightface
        margin_loss = CombinedMarginLoss(64, 1.0, 0.5, 0.0)
        module_partial_fc = PartialFC_V2(margin_loss, 512, num_classes, 0.1, False)
        # ree
        from ree.models import ArcFaceHead
        module_partial_fc = ArcFaceHead(512, num_classes, scale=64.0, margin=0.5, margin_mode="arcface_st",
                                        sample_rate=0.1)

        opt = torch.optim.SGD([{"params": backbone.parameters()},
                               {"params": module_partial_fc.parameters()}], lr=0.1, momentum=0.9)
        loss = module_partial_fc(backbone(images), labels)  # the same call, a scalar
        loss.backward()

    Class sampling (`sample_rate` r < 1, in training mode; eval mode uses every class): each
    forward runs the loss over `ree_kernels.sample_classes` of the batch's labels (every labelled
    class plus uniformly drawn others, ⌈r·C⌉ in all), reading those prototypes through the index;
    the others get an exactly zero gradient. The optimiser would still move them (weight decay,
    momentum): arcface_torch's PartialFC_V2 lets it, since it trains the whole weight with a
    plain SGD. `keep_unsampled_rows(optimizer)` instead leaves them (and their optimiser state)
    exactly as they were, as the original PartialFC's sparse update did: `ree train` does that.
    The last step's classes are in `sampled_classes` (None without sampling).

    `forward(..., return_stats=True)` returns the whole `HeadOutput` (loss, cos_pos, cos_neg,
    neg_index, cos_ui, ri, lse) instead. The prototypes are cast to the embeddings' dtype, so
    the module works under autocast like PartialFC (it keeps float32 master weights).

    Args:
        embedding_size, num_classes: the prototypes are [num_classes, embedding_size],
            initialised N(0, 0.01) as in insightface.
        seed: None draws the init from the global RNG (as insightface); an int takes it from
            `ree_kernels.distributed.init_prototypes(..., seed=seed)`, the rows a
            `ShardedArcFaceHead` of that seed starts from at any world size.
        scale, margin, margin_mode: s, m and φ (docs/spec.md §3); insightface's CombinedMarginLoss
            (s, 1.0, m, 0.0) is `margin_mode="arcface_st"`, (s, 1.0, 0.0, m) is "cosface";
            the default "arcface" is the classic insightface form with its fallback.
        ignore_index: labels with this value add no loss (e.g. unlabelled crops).
        backend: passed to the op ("auto": the fastest built kernel for the device).
        sample_rate: PartialFC's r in (0, 1]; 1 uses every class. Needs a negative ignore_index.
        generator: the random source of the class draw (on the weight's device), or None for
            torch's default one.
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        *,
        scale: float = 64.0,
        margin: float = 0.5,
        margin_mode: str = "arcface",
        ri_form: str = "product",
        ignore_index: int = IGNORE_INDEX,
        backend: str = "auto",
        seed: Optional[int] = None,
        sample_rate: float = 1.0,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__()
        for name, value in (("embedding_size", embedding_size), ("num_classes", num_classes)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if backend not in ree_kernels.BACKENDS:
            raise ValueError(f"backend must be one of {ree_kernels.BACKENDS}, got {backend!r}")
        if seed is None:
            self.weight = nn.Parameter(torch.normal(0.0, 0.01, (num_classes, embedding_size)))
        else:
            self.weight = nn.Parameter(init_prototypes(num_classes, embedding_size, seed=seed))
        self.scale, self.margin, self.margin_mode = scale, margin, margin_mode
        self.ri_form, self.ignore_index, self.backend = ri_form, ignore_index, backend
        num_sampled(num_classes, sample_rate)  # checks the rate
        if sample_rate < 1.0 and ignore_index >= 0:
            raise ValueError(f"sample_rate < 1 needs a negative ignore_index, got {ignore_index}")
        self.sample_rate, self.generator = float(sample_rate), generator
        self.sampled_classes: Optional[torch.Tensor] = None

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        *,
        ui_center: Optional[torch.Tensor] = None,
        sample_weight: Optional[torch.Tensor] = None,
        reduction: str = "mean",
        return_stats: bool = False,
        differentiable_stats: bool = False,
    ) -> torch.Tensor | HeadOutput:
        """The loss of [B, D] embeddings (any scale) with [B] int64 labels; see the class doc and
        `ree_kernels.arcface_head` for `differentiable_stats`."""
        if isinstance(embeddings, torch.Tensor) and embeddings.is_floating_point():
            prototypes = self.weight.to(embeddings.dtype)
        else:
            prototypes = self.weight  # the op names the bad argument
        if isinstance(labels, torch.Tensor) and labels.dtype in (torch.int32, torch.int16, torch.uint8):
            labels = labels.long()
        options = dict(scale=self.scale, margin=self.margin, margin_mode=self.margin_mode, ri_form=self.ri_form,
                       ignore_index=self.ignore_index, reduction=reduction)
        class_index = None
        if self.training and self.sample_rate < 1.0:
            # The labels are checked against all C classes before they are mapped into the set.
            validate_head_inputs(embeddings, prototypes, labels, ui_center, sample_weight, **options)
            class_index, labels = sample_classes(labels, self.num_classes, self.sample_rate,
                                                 ignore_index=self.ignore_index, generator=self.generator)
        self.sampled_classes = class_index
        out = ree_kernels.arcface_head(
            embeddings, prototypes, labels, ui_center, sample_weight=sample_weight, backend=self.backend,
            differentiable_stats=differentiable_stats, class_index=class_index, **options,
        )
        if class_index is not None:  # the nearest negative as a class id
            out = out._replace(neg_index=torch.where(out.neg_index >= 0, class_index[out.neg_index.clamp_min(0)], -1))
        return out if return_stats else out.loss

    def keep_unsampled_rows(self, optimizer: torch.optim.Optimizer) -> List[Callable[[], None]]:
        """Makes `optimizer.step()` leave the prototypes that the last forward did not sample,
        and their optimiser state, exactly as they were (`ree_kernels.sampling.keep_unsampled_rows`).

        Returns:
            The hooks' `remove` callables.
        """
        return keep_unsampled_rows(self, optimizer, lambda: self.sampled_classes)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def extra_repr(self) -> str:
        return (f"embedding_size={self.weight.shape[1]}, num_classes={self.weight.shape[0]}, scale={self.scale}, "
                f"margin={self.margin}, margin_mode={self.margin_mode!r}, backend={self.backend!r}, "
                f"sample_rate={self.sample_rate}")
