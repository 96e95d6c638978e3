"""`UITracker`: the running UI centre ū and the running mean predicted RI of UIs μ_UI (docs/spec.md §1.3, §1.6)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .contract import normalize


class UITracker(nn.Module):
    """Exponential moving averages over the unrecognizable instances seen in training.

    `center` is the EMA of the mean normalised UI embedding (used normalised by the ops),
    `mu` the EMA of the mean predicted RI over UIs. The first update sets them directly;
    later ones blend with `momentum` (the weight kept from the past). All three are buffers,
    so they travel with `state_dict()` into checkpoints.

    Raises:
        ValueError: dim is not a positive int, or momentum is not in [0, 1).
    """

    def __init__(self, dim: int, momentum: float = 0.99) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(dim))
        self.register_buffer("mu", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def update(
        self,
        ui_embeddings: torch.Tensor,
        ui_ri_pred: torch.Tensor,
        process_group: Optional[dist.ProcessGroup] = None,
    ) -> None:
        """Blends in one batch of UIs: [N, D] embeddings and their [N] predicted RIs.

        With `process_group` the batch statistics are summed over its ranks first, so every
        rank keeps the same state. A batch without UIs (on every rank) changes nothing. The
        update never reads a value back to the host (no synchronisation on CUDA), so it also
        compiles with torch.compile(fullgraph=True).

        Raises:
            ValueError: the shapes are not [N, D] and [N].
        """
        if ui_embeddings.dim() != 2 or ui_embeddings.shape[1] != self.center.shape[0]:
            raise ValueError(f"ui_embeddings must have shape [N, {self.center.shape[0]}], "
                             f"got {tuple(ui_embeddings.shape)}")
        if ui_ri_pred.shape != ui_embeddings.shape[:1]:
            raise ValueError(f"ui_ri_pred must have shape [{ui_embeddings.shape[0]}], got {tuple(ui_ri_pred.shape)}")
        stats = torch.cat([
            normalize(ui_embeddings.float()).sum(0),
            ui_ri_pred.float().sum().reshape(1),
            ui_embeddings.new_full((1,), ui_embeddings.shape[0], dtype=torch.float32),  # no host-to-device copy
        ]).to(self.center.device)
        if process_group is not None:
            dist.all_reduce(stats, group=process_group)
        count = stats[-1]
        seen = count > 0  # on the device: a branch on it would wait for the device
        batch_center, batch_mu = stats[:-2] / count.clamp_min(1), stats[-2] / count.clamp_min(1)
        # The weight of the past: momentum once initialised, 0 for the first batch, 1 (no change)
        # for a batch without UIs.
        keep = torch.where(seen, torch.where(self.initialized, self.momentum, 0.0), 1.0)
        self.center.copy_(keep * self.center + (1 - keep) * batch_center)
        self.mu.copy_(keep * self.mu + (1 - keep) * batch_mu)
        self.initialized.logical_or_(seen)

    def center_or_none(self) -> Optional[torch.Tensor]:
        """ū once a UI has been seen, else None (the ops then use d^UI = 1). It reads the
        `initialized` flag back to the host (one synchronisation on CUDA, a graph break under
        torch.compile): call it outside the compiled step, once per step."""
        return self.center if bool(self.initialized) else None

    def extra_repr(self) -> str:
        return f"dim={self.center.shape[0]}, momentum={self.momentum}"
