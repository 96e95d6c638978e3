"""The synthetic demo (`ree demo` without LFW): REE against the ArcFace baseline, end to end.

From nothing: generate the synthetic VLR face set, train REE and the plain ArcFace baseline
with the same budget (same data, steps, batch and optimiser; REE also sees its UIs), evaluate
both on the held-out test identities (verification, identification with distractors, quality
ERCs in both threshold modes, everything per resolution bin), run the two real-data checks
(LFW faces vs non-faces from scikit-image; scikit-learn's 8×8 digits as a second, real VLR
recognition set), and write runs/demo/report.md with its plots (about 6 minutes on 2 CPU cores).
"""
from __future__ import annotations

import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np
import torch

from .. import evaluation as ev
from ..data.synthetic import generate
from ..evaluation import pipeline as E
from ..train import Trainer
from .budget import DemoConfig
from .clock import Clock, say
from .report import build_report
from .tables import METHODS, summary_table, verdict


def train_pair(demo: DemoConfig, dataset: Any, root: Path, **overrides: Any) -> Dict[str, Tuple[Trainer, float]]:
    """REE and ArcFace on `dataset` with the same budget; {name: (trainer, seconds)}."""
    out = {}
    for name, method in METHODS.items():
        config = demo.train_config(method, root / method, **overrides)
        say(f"training {name}: {config.steps} steps x {config.batch_size} images"
            + (f" + {config.uis_per_batch} UIs" if config.uis_per_batch else ""))
        start = time.perf_counter()
        trainer = Trainer(config, dataset=dataset)
        trainer.fit()
        out[name] = (trainer, time.perf_counter() - start)
    return out


def score_models(trainers: Dict[str, Tuple[Trainer, float]], images: torch.Tensor, seed: int) -> Dict[str, E.Scored]:
    return {name: E.score(t.model, images, t.criterion.tracker.center_or_none(), seed=seed)
            for name, (t, _) in trainers.items()}


def quality_sources(scored: Dict[str, E.Scored], recognizer: str) -> Dict[str, np.ndarray]:
    """The qualities compared on one recognizer's pairs: REE's ξ̂ (whichever model recognises)
    and the recognizer's own feature norm and ERS."""
    return {"REE ξ̂": scored["REE"].quality, "feature norm": scored[recognizer].norm, "ERS": scored[recognizer].ers}


def evaluate_pair(trainers: Dict[str, Tuple[Trainer, float]], test: Any, demo: DemoConfig,
                  num_pairs: int) -> Dict[str, Any]:
    """Recognition and quality of both models on one labelled set."""
    images, labels, resolutions = E.set_tensors(test)
    protocol = E.make_protocol(labels, resolutions, num_pairs=num_pairs, seed=demo.seed)
    scored = score_models(trainers, images, demo.seed)
    recognition = {name: E.recognition(s, labels, resolutions, protocol) for name, s in scored.items()}
    ercs = {name: E.quality_ercs(E.pair_scores(scored[name], protocol), protocol, quality_sources(scored, name),
                                 seed=demo.seed) for name in scored}
    return {"scored": scored, "recognition": recognition, "erc": ercs, "protocol": protocol,
            "resolutions": resolutions, "labels": labels}


def lfw_check(trainers: Dict[str, Tuple[Trainer, float]], image_size: int, seed: int) -> Dict[str, Dict[str, float]]:
    """ROC AUC of each quality score at ranking the 100 LFW faces above the 100 non-faces."""
    from ..data.real import lfw_faces_vs_nonfaces

    images, is_face = lfw_faces_vs_nonfaces(image_size)
    scored = score_models(trainers, images, seed)
    return {name: {q: ev.roc_auc(v, is_face.numpy()) for q, v in s.qualities(name == "REE").items()}
            for name, s in scored.items()}


def run_synthetic(output: str | Path = "runs/demo", quick: bool = False) -> str:
    """Runs the synthetic demo (module docstring); returns the summary table, also printed."""
    demo = DemoConfig.quick() if quick else DemoConfig()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock()
    say(f"torch {torch.__version__}, {torch.get_num_threads()} threads; output {out}")

    since = clock.start
    say("generating the synthetic VLR face set")
    splits = generate(demo.synthetic, cache_dir=out / "cache")
    since = clock.phase("data", since)

    trainers = train_pair(demo, splits.train, out)
    since = clock.phase("train synthetic", since)
    say("evaluating on the test identities")
    synthetic = evaluate_pair(trainers, splits.test, demo, demo.num_pairs)
    lfw = lfw_check(trainers, trainers["REE"][0].model.input_size, demo.seed)
    since = clock.phase("evaluate synthetic + LFW", since)

    from ..data.real import digits as load_digits

    digits_train, digits_test = load_digits(trainers["REE"][0].model.input_size, demo.seed)
    say(f"digits: {len(digits_train)} train / {len(digits_test)} test images (real 8x8 scans)")
    digit_trainers = train_pair(replace(demo, steps=demo.digits_steps, batch_size=demo.digits_batch_size,
                                        warmup_steps=max(demo.digits_steps // 10, 1)),
                                digits_train, out / "digits")
    digits = evaluate_pair(digit_trainers, digits_test, demo, demo.digits_pairs)
    since = clock.phase("digits", since)

    times = {name: seconds for name, (_, seconds) in trainers.items()}
    headers, rows = summary_table(synthetic, digits, lfw, times)
    summary = ev.markdown_table(headers, rows)
    report = build_report(demo, trainers, synthetic, digits, lfw, (headers, rows), out)
    clock.phase("report", since)
    report.heading("Run")
    report.table(["phase", "seconds"], [[k, v] for k, v in clock.phases.items()] + [["total", clock.total]],
                 floatfmt=".0f")
    report.text(f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
                f"Python {platform.python_version()}.")
    report.write(out / "report.md")
    E.write_json(out / "metrics.json", {
        "summary": dict(zip(headers, zip(*rows))) if rows else {},
        "synthetic": {"recognition": synthetic["recognition"],
                      "erc": {n: {m: E.erc_summary(r) for m, r in modes.items()}
                              for n, modes in synthetic["erc"].items()}},
        "digits": {"recognition": digits["recognition"],
                   "erc": {n: {m: E.erc_summary(r) for m, r in modes.items()} for n, modes in digits["erc"].items()}},
        "lfw_face_auc": lfw, "seconds": clock.phases})
    print(summary)
    print(verdict(headers, rows))
    say(f"report: {out / 'report.md'} ({clock.total / 60:.1f} min)")
    return summary
