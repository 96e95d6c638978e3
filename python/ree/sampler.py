"""The order of the training images: batches as a function of the global step, so that a
resumed run (at any number of processes) draws the very batches of a run that never stopped."""
from __future__ import annotations

from typing import Dict, Iterator, List

import torch

from .errors import ConfigError


class EpochBatchSampler:
    """Batches of indices as a function of the global step: epoch e is a permutation seeded by
    (seed, e), cut into `len // batch_size` batches (the remainder is dropped). The sampler's
    position is therefore the step, and a resumed run draws the very same batches.

    Raises:
        ConfigError (a ValueError): batch_size exceeds num_samples.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int) -> None:
        if num_samples < batch_size:
            raise ConfigError(f"batch_size={batch_size} exceeds the {num_samples} training images")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.steps_per_epoch = num_samples // batch_size
        self._epoch, self._perm = -1, None

    def position(self, step: int) -> Dict[str, int]:
        """Where step `step` is, as plain ints (stored in checkpoints and compared on resume)."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "offset": offset, "seed": self.seed, "num_samples": self.num_samples,
                "batch_size": self.batch_size}

    def indices(self, step: int) -> torch.Tensor:
        """int64 [batch_size]: the global batch of step `step`."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.num_samples, generator=generator)
        return self._perm[offset * self.batch_size:(offset + 1) * self.batch_size]

    def iterate(self, start: int, stop: int, rank: int = 0, world: int = 1) -> Iterator[List[int]]:
        """The batches of steps [start, stop); with `world` processes, rank's share: every
        world-th index from the rank-th."""
        for step in range(start, stop):
            yield self.indices(step)[rank::world].tolist()
