"""Run bookkeeping of the demos: progress lines and wall time per phase."""
from __future__ import annotations

import time
from typing import Dict


def say(message: str) -> None:
    print(f"[ree demo] {message}", flush=True)


class Clock:
    """Wall time per phase, for the report."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.phases: Dict[str, float] = {}

    def phase(self, name: str, since: float) -> float:
        now = time.perf_counter()
        self.phases[name] = now - since
        return now

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start
