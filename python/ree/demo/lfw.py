"""The LFW demo: the LFW-VLR main suite with one seed (`ree.lfw`), written to the demo's folder."""
from __future__ import annotations

from pathlib import Path

from ..data.lfw import LfwSource
from ..lfw.__main__ import run_suite
from ..lfw.experiment import Budget

QUICK = Budget(steps=8, warmup_steps=1, batch_size=64, erc_pairs=4000)
"""A smoke test of the pipeline (numbers meaningless)."""


def run_lfw_demo(source: LfwSource, out: Path, quick: bool = False, seed: int = 0) -> str:
    """REE, ArcFace and CR-FIQA on LFW-VLR's test split (DevTest people), one seed; returns the report."""
    budget = QUICK if quick else Budget()
    return run_suite("main", source, split="test", seeds=[seed], budget=budget, out=out,
                     cache_dir=out.parent / "cache")
