"""`make demo` / `ree demo`: the main job.

With LFW found (`--lfw DIR`, `$REE_LFW_DIR`, or scikit-learn's cache): the LFW-VLR benchmark with
one seed (REE, ArcFace and CR-FIQA trained with one budget, recognition per resolution and the
quality ERCs; docs/lfw.md), about 7 minutes on 2 CPU cores. Without LFW: the synthetic demo
(`ree.demo.synthetic`), which says where to put LFW.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .clock import say


def run_demo(output: str | Path = "runs/demo", quick: bool = False, lfw: Optional[str | Path] = None,
             synthetic: bool = False) -> str:
    """Runs the main job into `output` (report.md and its plots); returns the report's main table.
    `synthetic=True` runs the synthetic demo even where LFW is found; `quick` shrinks either to a
    smoke test whose numbers mean nothing."""
    from ..data.lfw import LfwNotFound, find_lfw

    if not synthetic:
        try:
            source = find_lfw(lfw)
        except LfwNotFound as err:
            say(f"{err}. Running the synthetic demo instead.")
        else:
            from .lfw import run_lfw_demo

            return run_lfw_demo(source, Path(output), quick=quick)
    from .synthetic import run_synthetic

    return run_synthetic(output, quick=quick)


__all__ = ["run_demo"]
