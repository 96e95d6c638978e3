"""The learning-rate schedule of a training run (a factor of the base LR per optimiser step)."""
from __future__ import annotations

import math
from typing import Sequence


class WarmupSchedule:
    """LR factor at a step: linear warm-up from 0, then cosine to 0 or step decay by `gamma`
    at `milestones` (fractions of the steps after warm-up). A class, so LambdaLR saves it
    (its attributes are plain numbers, so the checkpoint holds no Python object).

    Args:
        steps: the run's optimiser steps; warmup: steps of linear warm-up (capped at `steps`);
        kind: "cosine" or "step"; milestones: increasing fractions in (0, 1) ("step" only);
        gamma: the decay factor at each milestone ("step" only).
    """

    def __init__(self, steps: int, warmup: int, kind: str, milestones: Sequence[float], gamma: float) -> None:
        self.steps, self.warmup, self.kind = steps, min(warmup, steps), kind
        self.milestones, self.gamma = tuple(milestones), gamma

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(self.steps - self.warmup, 1)
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return self.gamma ** sum(progress >= m for m in self.milestones)
