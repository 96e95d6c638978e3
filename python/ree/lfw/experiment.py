"""Training and evaluating methods on LFW-VLR with one budget: REE, the ArcFace baseline and
CR-FIQA, over seeds, and the ablations of REE's parts (docs/lfw.md).

`run(...)` trains every (method, seed) on the split's training people, scores the split's
evaluation people with `scoring`, and returns plain dicts (JSON-ready) that `report` turns into
tables. The test split is only ever scored with settings chosen on the validation split.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from ..config import TrainConfig
from ..data import lfw, lfw_splits
from ..evaluation.bootstrap import paired_difference
from ..evaluation.pipeline import erc_summary
from ..train import Trainer
from . import protocol, scoring

METHODS = {"REE": "ree", "ArcFace": "arcface", "CR-FIQA": "crfiqa"}
"""Report name -> TrainConfig.method."""


@dataclass(frozen=True)
class Budget:
    """What every method gets: the same backbone, data, steps, batch and optimiser (REE adds its
    UIs to each batch). The defaults fit `make demo`'s three trainings into its 12 minutes on two
    CPU cores (docs/lfw.md, "Training")."""

    steps: int = 400
    batch_size: int = 128
    lr: float = 0.1
    warmup_steps: int = 40
    input_size: int = 32
    arch: str = "small"
    min_resolution: int = 7
    min_images: int = lfw_splits.MIN_IMAGES
    erc_pairs: int = 20000

    def config(self, method: str, output_dir: Path, seed: int, split: str = "test", **overrides: Any) -> TrainConfig:
        """The TrainConfig of one run on `split`'s training people (its `data` names them, so that
        `ree train --resume` rebuilds the same set; `data` takes the people with
        `lfw_splits.MIN_IMAGES` images, so a run with another `min_images` is refused on resume by
        the class names its checkpoint stores)."""
        values = dict(data="lfw" if split == "test" else f"lfw-{split}", method=method, output_dir=str(output_dir),
                      arch=self.arch, input_size=self.input_size,
                      steps=self.steps, batch_size=self.batch_size, lr=self.lr, warmup_steps=self.warmup_steps,
                      min_resolution=self.min_resolution, seed=seed, save_every=self.steps,
                      log_every=max(self.steps // 40, 1), tensorboard=False)
        values.update(overrides)
        return TrainConfig(**values)


@dataclass
class Data:
    """One split's training set and evaluation set, from LFW crops at the model input size."""

    split: str
    source: lfw.LfwSource
    people: lfw_splits.People
    train: Any
    evalset: protocol.EvalSet
    images: np.ndarray  # uint8 crops of the evaluation rows
    uncertainty: scoring.Uncertainty  # the bootstrap resamples, one draw for every model and seed


def load(source: lfw.LfwSource, split: str, budget: Budget, cache_dir: Optional[str | Path] = None,
         progress: bool = False, seed: int = 0) -> Data:
    crops = lfw.load_crops(source, budget.input_size, cache_dir=cache_dir, progress=progress)
    people = lfw_splits.people(crops, source, split, budget.min_images)
    evalset = protocol.evaluation_set(crops, source, split, budget.input_size, erc_pairs=budget.erc_pairs, seed=seed)
    return Data(split, source, people, lfw_splits.training_set(crops, people), evalset, crops.images[evalset.rows],
                scoring.uncertainty(evalset))


@dataclass
class Run:
    """One trained model and how long it took."""

    name: str
    trainer: Trainer
    seconds: float


def train(name: str, data: Data, budget: Budget, seed: int, out: Path, say: Callable[[str], None] = print,
          **overrides: Any) -> Run:
    """Trains `name` (a key of METHODS, or any label with `method=` in overrides)."""
    method = overrides.pop("method", METHODS.get(name))
    config = budget.config(method, out, seed, data.split, **overrides)
    say(f"training {name} (seed {seed}): {config.steps} steps × {config.batch_size} images"
        + (f" + {config.uis_per_batch} UIs" if config.uis_per_batch else "")
        + f" on {data.people.train.__len__()} people")
    start = time.perf_counter()
    trainer = Trainer(config, dataset=data.train)
    trainer.fit()
    return Run(name, trainer, time.perf_counter() - start)


@dataclass
class Curves:
    """What the plots need of one seed: the recompute-mode ERCs {recognizer: {quality: ErcResult}}
    and the CMC curves {recognizer: {level: [rate at rank 1..20]}}."""

    erc: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    cmc: Dict[str, Dict[str, List[float]]] = field(default_factory=dict)


Replicates = Dict[str, Dict[str, Dict[str, Dict[str, np.ndarray]]]]
"""{model: {kind: {level: {metric: [B] bootstrap replicates}}}} of one seed."""
DIFFERENCES = (("REE", "ArcFace"), ("REE", "CR-FIQA"))
"""Paired differences reported when both models ran (`differences`)."""


def evaluate(runs: Mapping[str, Run], data: Data, seed: int = 0,
             say: Callable[[str], None] = print) -> tuple[Dict[str, Any], Curves, Replicates]:
    """Recognition of every run, and the ERCs of every quality score on each recognizer's pairs;
    -> (JSON-ready results, curves for the plots, the bootstrap replicates for `differences`).
    Each verification entry holds the pairs file's metrics and `scoring.extended_verification`'s.

    Qualities: ξ̂ of the REE run(s) (every run whose method is "ree"), CR-FIQA's head, every run's
    feature norm, the recognizer's SER-FIQ, ERS of the REE run, the true resolution and random."""
    views = {}
    for name, run in runs.items():
        say(f"scoring {name} on {len(data.images)} {data.split} images × {len(data.evalset.levels)} resolutions")
        views[name] = scoring.views(run.trainer.model, data.images, data.evalset.levels,
                                    run.trainer.criterion.tracker.center_or_none(), seed=seed,
                                    progress=f"scoring {name}")
    result: Dict[str, Any] = {"recognition": {}, "erc": {}, "spearman": {}, "seconds": {}}
    curves = Curves()
    replicates: Replicates = {}
    shared = {}
    for name, run in runs.items():
        method = run.trainer.config.method
        if method == "ree":
            shared[f"ξ̂ ({name})" if name != "REE" else "ξ̂"] = views[name].prm
            shared[f"ERS ({name})" if name != "REE" else "ERS"] = views[name].ers
        elif method == "crfiqa":
            shared["CR-FIQA"] = views[name].prm
        shared[f"norm ({name})"] = views[name].norm
    shared["resolution"] = scoring.resolution_map(data.evalset)
    for name, run in runs.items():
        curves.cmc[name] = scoring.cmc_curves(views[name], data.evalset)
        result["recognition"][name] = scoring.recognition(views[name], data.evalset, curves.cmc[name])
        fields, replicates[name] = scoring.extended_verification(views[name], data.evalset, data.uncertainty)
        for kind, levels in fields.items():
            for level, values in levels.items():
                result["recognition"][name][kind][level].update(values)
        qualities = {**shared, "SER-FIQ": views[name].serfiq}
        ercs = scoring.ercs(scoring.erc_scores(views[name], data.evalset), data.evalset, qualities, seed=seed)
        result["erc"][name] = {mode: erc_summary(r) for mode, r in ercs.items()}
        result["spearman"][name] = scoring.resolution_correlation(qualities, data.evalset)
        result["seconds"][name] = run.seconds
        curves.erc[name] = ercs["recompute"]
    return result, curves, replicates


def differences(per_seed: Sequence[Mapping[str, Any]], replicates: Sequence[Replicates],
                pairs: Sequence[tuple[str, str]] = DIFFERENCES, seed: int = scoring.BOOTSTRAP_SEED
                ) -> Dict[str, Any]:
    """{"A − B": {kind: {level: {metric: {"mean", "ci95"}}}}} for each (A, B) of `pairs` that both
    ran: A − B over the seeds and the shared bootstrap resamples (`bootstrap.paired_difference`),
    for every metric of `scoring.INTERVAL_METRICS`."""
    out: Dict[str, Any] = {}
    for a, b in pairs:
        if a not in replicates[0] or b not in replicates[0]:
            continue
        table: Dict[str, Any] = {}
        for kind, levels in replicates[0][a].items():
            for level in levels:
                for metric in scoring.INTERVAL_METRICS:
                    points = [[s["recognition"][m][kind][level][metric] for s in per_seed] for m in (a, b)]
                    reps = [np.stack([r[m][kind][level][metric] for r in replicates]) for m in (a, b)]
                    diff = paired_difference(points[0], points[1], reps[0], reps[1], seed=seed)
                    diff.pop("replicates")
                    table.setdefault(kind, {}).setdefault(level, {})[metric] = diff
        out[f"{a} − {b}"] = table
    return out


def run(source: lfw.LfwSource, *, split: str, seeds: Sequence[int], budget: Budget, out: Path,
        variants: Optional[Mapping[str, Dict[str, Any]]] = None, cache_dir: Optional[Path] = None,
        say: Callable[[str], None] = print) -> tuple[Dict[str, Any], Curves]:
    """Trains and evaluates `variants` ({name: TrainConfig overrides, with `method`}; default: the
    three METHODS) for every seed. Returns ({"per_seed": [evaluate() results], the budget, the
    split and its sizes, the extended set's sizes, the paired `differences`}, the first seed's
    curves)."""
    variants = variants or {name: {"method": m} for name, m in METHODS.items()}
    data = load(source, split, budget, cache_dir=cache_dir, progress=True)
    say(f"LFW-VLR {split}: {len(data.people.train)} training people ({len(data.train)} images), "
        f"{len(data.people.held_out)} evaluation people ({len(data.images)} images)")
    per_seed, first, replicates = [], None, []
    for seed in seeds:
        runs = {name: train(name, data, budget, seed, out / f"seed{seed}" / slug(name), say, **dict(v))
                for name, v in variants.items()}
        result, curves, reps = evaluate(runs, data, seed, say)
        per_seed.append(result)
        replicates.append(reps)
        first = first or curves
    summary = {"split": split, "seeds": list(seeds), "budget": asdict(budget),
               "variants": {k: dict(v) for k, v in variants.items()},
            "train_people": len(data.people.train), "train_images": len(data.train),
            "eval_people": len(data.people.held_out), "eval_images": len(data.images), "per_seed": per_seed,
               "extended": extended_counts(data.evalset), "differences": differences(per_seed, replicates)}
    return summary, first


def extended_counts(evalset: protocol.EvalSet) -> Dict[str, int]:
    """The size of the extended verification set."""
    ext = evalset.extended
    return {"people": ext.people(), "genuine_people": int(np.unique(ext.person_a[ext.same]).size),
            "genuine": ext.genuine, "impostors": ext.impostors}


def slug(name: str) -> str:
    """A file name for a variant or model name."""
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
