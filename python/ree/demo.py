"""`make demo` / `ree demo` / `python -m ree.demo`: REE against the ArcFace baseline, end to end.

From nothing: generate the synthetic VLR face set, train REE and the plain ArcFace baseline
with the same budget (same data, steps, batch and optimiser; REE also sees its UIs), evaluate
both on the held-out test identities (verification, identification with distractors, quality
ERCs in both threshold modes, everything per resolution bin), run the two real-data checks
(LFW faces vs non-faces from scikit-image; scikit-learn's 8×8 digits as a second, real VLR
recognition set), and write runs/demo/report.md with its plots. About 10 minutes on 2 CPU cores.

`python -m ree.demo --tune` is the one-off tuning run behind the defaults of τ and the loss
weights: a small grid scored on the synthetic *validation* identities (never the test split).
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .evaluation import pipeline as E
from . import evaluation as ev
from .config import TrainConfig
from .data.synthetic import SyntheticConfig, generate
from .train import Trainer

TUNING_TAUS = (0.1, 0.2, 0.4)
TUNING_SCALES = (0.5, 1.0, 2.0)
"""`run_tuning` tries each τ with the weights at 1, then each common factor on (λ_L1, λ_ID,
λ_MSE) with the best τ."""
TUNING_STEPS = 300


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


METHODS = {"REE": "ree", "ArcFace": "arcface"}


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


def say(message: str) -> None:
    print(f"[ree demo] {message}", flush=True)


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


def evaluate_pair(trainers: Dict[str, Tuple[Trainer, float]], test: Any, demo: DemoConfig, num_pairs: int) -> Dict[str, Any]:
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
    from .data.real import lfw_faces_vs_nonfaces

    images, is_face = lfw_faces_vs_nonfaces(image_size)
    scored = score_models(trainers, images, seed)
    return {name: {q: ev.roc_auc(v, is_face.numpy()) for q, v in s.qualities(name == "REE").items()}
            for name, s in scored.items()}


def erc_rows(ercs: Dict[str, Dict[str, Dict[str, ev.ErcResult]]], fmr: float) -> Tuple[List[str], List[List[Any]]]:
    headers = ["recognizer", "quality", "AUC recompute", "pAUC recompute", "AUC fixed", "pAUC fixed"]
    rows = []
    for recognizer, modes in ercs.items():
        for quality in modes["recompute"]:
            r, f = modes["recompute"][quality], modes["fixed"][quality]
            rows.append([recognizer, quality, r.auc[fmr], r.pauc[fmr], f.auc[fmr], f.pauc[fmr]])
    return headers, rows


def quality_resolution_rows(result: Dict[str, Any]) -> Tuple[List[str], List[List[Any]]]:
    edges = result["protocol"].edges
    bins = [name for name, _ in ev.resolution_bins(result["resolutions"], edges)]
    headers = ["model", "quality", "Spearman vs resolution"] + [f"mean {b}" for b in bins]
    rows = []
    for name, scored in result["scored"].items():
        table = E.quality_by_resolution(scored, result["resolutions"], edges)
        for quality, values in table.items():
            if quality == "REE ξ̂" and name != "REE":
                continue  # the baseline's PRM is untrained
            rows.append([name, quality, values["spearman"]] + [values["bins"][b] for b in bins])
    return headers, rows


def summary_table(synthetic: Dict[str, Any], digits: Dict[str, Any], lfw: Dict[str, Dict[str, float]],
                  times: Dict[str, float]) -> Tuple[List[str], List[List[Any]]]:
    fmr = E.ERC_FMRS[0]
    headers = ["model", "TAR@FAR=1e-2", "TAR@FAR=1e-3", "10-fold acc", "rank-1", "rank-5", "rank-20",
               "ERC AUC (ξ̂ or norm)", "LFW face AUC", "digits acc", "digits ERC AUC", "train min"]
    rows = []
    for name in METHODS:
        overall = synthetic["recognition"][name]["overall"]
        quality = "REE ξ̂" if name == "REE" else "feature norm"
        rows.append([
            name, overall["tar@0.01"], overall["tar@0.001"], overall["acc"], overall["rank-1"], overall["rank-5"],
            overall["rank-20"], synthetic["erc"][name]["recompute"][quality].auc[fmr], lfw[name][quality],
            digits["recognition"][name]["overall"]["acc"], digits["erc"][name]["recompute"][quality].auc[fmr],
            f"{times[name] / 60:.1f}"])
    return headers, rows


LOWER_IS_BETTER = ("ERC AUC (ξ̂ or norm)", "digits ERC AUC")


def verdict(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """One sentence per metric of the summary: which model is ahead, by how much."""
    ree, arc = (dict(zip(headers, row)) for row in rows)
    parts = []
    for key in headers[1:]:
        if key == "train min":
            continue
        a, b = ree[key], arc[key]
        if not (isinstance(a, float) and isinstance(b, float)) or math.isnan(a) or math.isnan(b):
            continue
        better = (a < b) if key in LOWER_IS_BETTER else (a > b)
        winner = "tie" if a == b else ("REE" if better else "ArcFace")
        parts.append(f"{key}: {winner} ({a:.4f} vs {b:.4f})")
    wins = sum(p.split(": ")[1].startswith("REE") for p in parts)
    return (f"REE is ahead on {wins} of {len(parts)} summary metrics, ArcFace on the rest. "
            + "; ".join(parts) + ".")


def best_quality_sentence(ercs: Dict[str, Dict[str, Dict[str, ev.ErcResult]]], fmr: float) -> str:
    """Which quality has the lowest ERC AUC, per recognizer and threshold mode."""
    parts = []
    for recognizer, modes in ercs.items():
        for mode, results in modes.items():
            ranked = sorted(results, key=lambda q: results[q].auc[fmr])
            parts.append(f"{recognizer}'s pairs, {mode}: " + " < ".join(
                f"{q} {results[q].auc[fmr]:.4f}" for q in ranked))
    return "Lowest ERC AUC first (FMR 1e-2): " + "; ".join(parts) + "."


def write_plots(out: Path, synthetic: Dict[str, Any], digits: Dict[str, Any]) -> List[Tuple[str, str]]:
    from .evaluation import plots

    images = []
    for name in METHODS:
        for mode in E.THRESHOLD_MODES:
            png = f"erc_{name.lower()}_{mode}.png"
            plots.plot_erc(synthetic["erc"][name][mode], None, out / png)
            images.append((png, f"ERC on {name}'s pairs, threshold {mode}"))
    plots.plot_cmc({n: r["cmc_curve"] for n, r in synthetic["recognition"].items()}, out / "cmc.png")
    images.append(("cmc.png", "CMC with distractors"))
    scored = synthetic["scored"]
    values = {"REE ξ̂": scored["REE"].quality, "REE feature norm": scored["REE"].norm,
              "ArcFace feature norm": scored["ArcFace"].norm, "REE ERS": scored["REE"].ers}
    plots.plot_ri_vs_resolution(synthetic["resolutions"], values, out / "quality_vs_resolution.png",
                                synthetic["protocol"].edges)
    images.append(("quality_vs_resolution.png", "quality scores against resolution"))
    plots.plot_erc(digits["erc"]["REE"]["recompute"], None, out / "erc_digits.png")
    images.append(("erc_digits.png", "ERC on the digits (REE's pairs)"))
    return images


def run_demo(output: str | Path = "runs/demo", quick: bool = False) -> str:
    """Runs the demo (module docstring); returns the summary table, also printed."""
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

    from .data.real import digits as load_digits

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
                      "erc": {n: {m: E.erc_summary(r) for m, r in modes.items()} for n, modes in synthetic["erc"].items()}},
        "digits": {"recognition": digits["recognition"],
                   "erc": {n: {m: E.erc_summary(r) for m, r in modes.items()} for n, modes in digits["erc"].items()}},
        "lfw_face_auc": lfw, "seconds": clock.phases})
    print(summary)
    print(verdict(headers, rows))
    say(f"report: {out / 'report.md'} ({clock.total / 60:.1f} min)")
    return summary


def build_report(demo: DemoConfig, trainers, synthetic, digits, lfw, summary_rows, out: Path) -> ev.Report:
    ree_config = trainers["REE"][0].config
    report = ev.Report("REE vs ArcFace: the ree demo")
    report.text(
        "Both models: the same small iResNet (`arch=small`, 32×32 input), the same synthetic training "
        f"identities ({demo.synthetic.num_train_ids} × {demo.synthetic.train_per_id} images), {demo.steps} SGD steps of "
        f"{demo.batch_size} images, ArcFace s={ree_config.scale:g}, m={ree_config.margin:g}. REE adds "
        f"{ree_config.uis_per_batch} synthesised UIs per batch and the auxiliary losses with τ={ree_config.tau:g}, "
        f"λ_L1={ree_config.lambda_l1:g}, λ_ID={ree_config.lambda_id:g}, λ_MSE={ree_config.lambda_mse:g} "
        "(chosen once by `python -m ree.demo --tune` on the validation identities, never the test ones: "
        "docs/tuning.md; the [R] parts of the method are reconstructions, see docs/spec.md §1). Test: "
        f"{demo.synthetic.num_test_ids} unseen identities × {demo.synthetic.test_per_id} images, "
        f"{demo.num_pairs} verification pairs, CMC with 20% of identities as gallery distractors.")
    report.heading("Summary")
    report.table(*summary_rows)
    report.text(verdict(*summary_rows))
    report.text("ERC AUC: FNMR at FMR 1e-2 integrated over reject fractions 0–0.95, threshold recomputed; "
                "REE's own quality is ξ̂, the baseline's the feature norm. LFW face AUC: that quality ranking "
                "100 real LFW faces above 100 non-faces. Lower ERC AUC is better; higher everything else.")
    report.heading("Recognition on the synthetic test identities")
    report.table(*E.recognition_rows(synthetic["recognition"]))
    report.heading("Per resolution bin", 3)
    report.text("Pairs are binned by the lower resolution of the two images, probes by their own.")
    report.table(*E.bin_rows(synthetic["recognition"]))
    report.heading("Quality: error-versus-reject (ERC)")
    report.text("For each recognizer's pairs, the qualities compared: REE's ξ̂ (the PRM output of the REE model, "
                "used for both recognizers), the recognizer's feature norm (MagFace/AdaFace style), ERS = 1 − cos to "
                "the UI centre, and random. FMR 1e-2; both threshold modes (docs/spec.md §7).")
    report.table(*erc_rows(synthetic["erc"], E.ERC_FMRS[0]))
    report.text(best_quality_sentence(synthetic["erc"], E.ERC_FMRS[0]))
    for name in METHODS:
        for mode in E.THRESHOLD_MODES:
            report.heading(f"{name}'s pairs, threshold {mode}", 3)
            report.text(ev.erc_table(synthetic["erc"][name][mode]))
    report.heading("Quality against resolution", 3)
    report.table(*quality_resolution_rows(synthetic))
    report.heading("Real data")
    report.heading("LFW faces vs non-faces (scikit-image lfw_subset)", 3)
    rows = [[name, q, auc] for name, aucs in lfw.items() for q, auc in aucs.items()]
    report.table(["model", "quality", "ROC AUC faces > non-faces"], rows)
    report.heading("Digits (scikit-learn load_digits, real 8×8 images) as a VLR recognition set", 3)
    report.text(f"Both models trained from scratch on the digits' train half ({demo.digits_steps} steps), "
                "evaluated on the other half: verification pairs and ERC.")
    report.table(*E.recognition_rows(digits["recognition"]))
    report.table(*erc_rows(digits["erc"], E.ERC_FMRS[0]))
    report.heading("Plots")
    for png, alt in write_plots(out, synthetic, digits):
        report.image(png, alt)
    return report


def run_tuning(output: str | Path = "runs/tune", steps: int = TUNING_STEPS) -> Dict[str, float]:
    """The one tuning run behind TrainConfig's τ and loss weights: a coordinate search, first
    τ in TUNING_TAUS with the weights at 1, then a common factor in TUNING_SCALES on (λ_L1,
    λ_ID, λ_MSE) with the best τ; `steps` steps each on the demo's data. Each REE model is
    scored on the synthetic *validation* identities by TAR@FAR=1e-2 − ERC AUC of ξ̂ (FMR 1e-2,
    threshold recomputed): recognition up, quality error down. Writes output/report.md and
    returns the best {tau, lambda_l1, lambda_id, lambda_mse}."""
    demo = replace(DemoConfig(), steps=steps, warmup_steps=max(steps // 10, 1))
    out = Path(output)
    splits = generate(demo.synthetic, cache_dir=out / "cache")
    images, labels, resolutions = E.set_tensors(splits.val)
    protocol = E.make_protocol(labels, resolutions, num_pairs=4000, seed=demo.seed)
    rows: List[List[Any]] = []
    scores: Dict[Tuple[float, float], float] = {}

    def trial(tau: float, scale: float) -> float:
        if (tau, scale) in scores:
            return scores[(tau, scale)]
        values = {"tau": tau, "lambda_l1": scale, "lambda_id": scale, "lambda_mse": scale}
        say(f"tuning {values}")
        trainer = Trainer(demo.train_config("ree", out / f"tau{tau:g}_x{scale:g}", **values), dataset=splits.train)
        trainer.fit()
        scored = E.score(trainer.model, images, trainer.criterion.tracker.center_or_none(), seed=demo.seed)
        overall = E.recognition(scored, labels, resolutions, protocol)["overall"]
        erc = E.quality_ercs(E.pair_scores(scored, protocol), protocol, scored.qualities(), seed=demo.seed)
        auc = erc["recompute"]["REE ξ̂"].auc[E.ERC_FMRS[0]]
        scores[(tau, scale)] = overall["tar@0.01"] - auc
        rows.append([tau, scale, overall["tar@0.01"], overall["acc"], auc,
                     erc["recompute"]["feature norm"].auc[E.ERC_FMRS[0]], scores[(tau, scale)]])
        return scores[(tau, scale)]

    best_tau = max(TUNING_TAUS, key=lambda tau: trial(tau, 1.0))
    best_scale = max(TUNING_SCALES, key=lambda scale: trial(best_tau, scale))
    best = {"tau": best_tau, "lambda_l1": best_scale, "lambda_id": best_scale, "lambda_mse": best_scale}
    report = ev.Report("REE tuning on the validation identities")
    report.text(f"{steps} steps each on the demo's training set. First τ with λ = 1, then λ (a common factor on "
                "λ_L1, λ_ID, λ_MSE) with the best τ. Objective on the validation split: TAR@FAR=1e-2 − ERC AUC "
                f"of ξ̂ (FMR 1e-2, threshold recomputed). Best: {best}.")
    report.table(["τ", "λ", "TAR@FAR=1e-2", "10-fold acc", "ERC AUC ξ̂", "ERC AUC norm", "objective"], rows)
    report.write(out / "report.md")
    say(f"best {best} -> {out / 'report.md'}")
    return best


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ree.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=None, help="default runs/demo (runs/tune with --tune)")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke-test run (numbers meaningless)")
    parser.add_argument("--tune", action="store_true", help="the validation-split tuning grid instead of the demo")
    args = parser.parse_args(argv)
    if args.tune:
        run_tuning(args.output or Path("runs/tune"))
    else:
        run_demo(args.output or Path("runs/demo"), quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
