"""The synthetic demo's budget (`DemoConfig`): data, steps and batch shared by REE and ArcFace."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..data.synthetic import SyntheticConfig


@dataclass(frozen=True)
class DemoConfig:
    """The demo's budget. Both models get `steps` steps of `batch_size` images; `train`
    holds every other TrainConfig value they share (the REE-only ones come from TrainConfig's
    defaults, i.e. the tuned τ and weights)."""

    synthetic: SyntheticConfig = SyntheticConfig(num_train_ids=300, num_val_ids=50, num_test_ids=100,
                                                 train_per_id=30, val_per_id=20, test_per_id=20)
    steps: int = 500
    batch_size: int = 128
    lr: float = 0.1
    warmup_steps: int = 50
    digits_steps: int = 150
    digits_batch_size: int = 64
    num_pairs: int = 6000
    digits_pairs: int = 3000
    seed: int = 0

    @classmethod
    def quick(cls) -> "DemoConfig":
        """A smoke test of the whole pipeline in a minute or two (the numbers mean nothing)."""
        return cls(synthetic=SyntheticConfig(num_train_ids=20, num_val_ids=10, num_test_ids=20, train_per_id=10,
                                             val_per_id=8, test_per_id=8),
                   steps=12, batch_size=32, warmup_steps=2, digits_steps=6, digits_batch_size=32,
                   num_pairs=600, digits_pairs=600)

    def train_config(self, method: str, output_dir: Path, **overrides: Any) -> TrainConfig:
        return TrainConfig(method=method, output_dir=str(output_dir), steps=self.steps, batch_size=self.batch_size,
                           lr=self.lr, warmup_steps=self.warmup_steps, seed=self.seed, save_every=self.steps,
                           log_every=max(self.steps // 50, 1), tensorboard=True, **overrides)
