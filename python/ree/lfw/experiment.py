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
import torch

from ..config import TrainConfig
from ..data import lfw, lfw_splits
from ..evaluation.bootstrap import paired_difference
from ..evaluation.pipeline import erc_summary
from ..models.ree_model import REEModel
from ..prefix_cache import PrefixCache, build_prefix_cache
from ..pretrained import load_pretrained
from ..train import Trainer
from . import protocol, scoring

METHODS = {"REE": "ree", "ArcFace": "arcface", "CR-FIQA": "crfiqa"}
"""Report name -> TrainConfig.method."""
OFF_THE_SHELF = "SFace"
"""The report name of the pretrained model as it comes (the pretrained suite)."""
PRETRAINED_NAMES = {"REE": "ree-ft", "ArcFace": "arcface-ft", "CR-FIQA": "crfiqa-ft",
                    OFF_THE_SHELF: "sface-off-the-shelf"}
"""The pretrained suite's report names -> summary.json's method names."""


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
    init: Optional[str] = None
    trainable: str = "all"
    cache_prefix: bool = False
    imprint: bool = False

    def config(self, method: str, output_dir: Path, seed: int, split: str = "test", **overrides: Any) -> TrainConfig:
        """The TrainConfig of one run on `split`'s training people (its `data` names them, so that
        `ree train --resume` rebuilds the same set; `data` takes the people with
        `lfw_splits.MIN_IMAGES` images, so a run with another `min_images` is refused on resume by
        the class names its checkpoint stores)."""
        values = dict(data="lfw" if split == "test" else f"lfw-{split}", method=method, output_dir=str(output_dir),
                      arch=self.arch, input_size=self.input_size,
                      steps=self.steps, batch_size=self.batch_size, lr=self.lr, warmup_steps=self.warmup_steps,
                      min_resolution=self.min_resolution, seed=seed, save_every=self.steps, init=self.init,
                      trainable=self.trainable, cache_prefix=self.cache_prefix, imprint=self.imprint,
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


PRETRAINED = Budget(arch="sface", input_size=112, init="sface", trainable="last-stage", cache_prefix=True,
                    imprint=True, steps=150, batch_size=128, lr=0.01, warmup_steps=15)
"""The pretrained suite: SFace's last stage, embedding layer and the new heads fine-tuned on
features of its frozen prefix (`ree.prefix_cache`), one cache shared by every method and seed.
Its size fits the suite's 3 methods × 3 seeds and the off-the-shelf model into an hour on two
CPU cores (docs/lfw.md, "Pretrained")."""


@dataclass
class Run:
    """One model to score: its TrainConfig.method ("none" for a model used as it comes), its UI
    centre (None: taken from synthesised UIs), and how long its training took."""

    name: str
    model: REEModel
    method: str
    ui_center: Optional[torch.Tensor]
    seconds: float


@dataclass
class Frozen:
    """What every model of a pretrained suite shares: the pretrained model itself, the training
    features of its frozen prefix and that prefix's output for the evaluation images."""

    model: REEModel
    train: PrefixCache
    evaluation: List[torch.Tensor]


def frozen(data: Data, budget: Budget, say: Callable[[str], None] = print) -> Frozen:
    """Loads `budget.init` and runs its frozen prefix over the training copies (drawn by seed 0,
    with UIs) and the evaluation images at every level, once for the whole suite."""
    config = budget.config("ree", Path("unused"), 0, data.split)
    model = REEModel(config.model_config())
    load_pretrained(model, config.init)
    start = time.perf_counter()
    cache = build_prefix_cache(model, data.train, seed=0, min_resolution=config.min_resolution, uis=True,
                               ui_min_resolution=config.ui_min_resolution, ui_max_resolution=config.ui_max_resolution)
    say(f"frozen prefix of {len(cache)} training copies and their UIs: {(time.perf_counter() - start) / 60:.1f} min")
    start = time.perf_counter()
    evaluation = scoring.level_prefixes(model, data.images, data.evalset.levels)
    say(f"frozen prefix of {len(data.images)} evaluation images × {len(evaluation)} resolutions: "
        f"{(time.perf_counter() - start) / 60:.1f} min")
    return Frozen(model, cache, evaluation)


def train(name: str, data: Data, budget: Budget, seed: int, out: Path, say: Callable[[str], None] = print,
          prefix_cache: Optional[PrefixCache] = None, **overrides: Any) -> Run:
    """Trains `name` (a key of METHODS, or any label with `method=` in overrides)."""
    method = overrides.pop("method", METHODS.get(name))
    config = budget.config(method, out, seed, data.split, **overrides)
    say(f"training {name} (seed {seed}): {config.steps} steps × {config.batch_size} images"
        + (f" + {config.uis_per_batch} UIs" if config.uis_per_batch else "")
        + f" on {data.people.train.__len__()} people")
    start = time.perf_counter()
    trainer = Trainer(config, dataset=data.train, prefix_cache=prefix_cache)
    trainer.fit()
    return Run(name, trainer.model, method, trainer.criterion.tracker.center_or_none(), time.perf_counter() - start)


@dataclass
class Curves:
    """What the plots need of one seed: the recompute-mode ERCs {recognizer: {quality: ErcResult}}
    and the CMC curves {recognizer: {level: [rate at rank 1..20]}}."""

    erc: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    cmc: Dict[str, Dict[str, List[float]]] = field(default_factory=dict)


Replicates = Dict[str, Dict[str, Dict[str, Dict[str, np.ndarray]]]]
"""{model: {kind: {level: {metric: [B] bootstrap replicates}}}} of one seed."""
DIFFERENCES = (("REE", "ArcFace"), ("REE", "CR-FIQA"), ("REE", OFF_THE_SHELF))
"""Paired differences reported when both models ran (`differences`)."""


def evaluate(runs: Mapping[str, Run], data: Data, seed: int = 0, say: Callable[[str], None] = print,
             prefixes: Optional[Sequence[torch.Tensor]] = None) -> tuple[Dict[str, Any], Curves, Replicates]:
    """Recognition of every run, and the ERCs of every quality score on each recognizer's pairs;
    -> (JSON-ready results, curves for the plots, the bootstrap replicates for `differences`).
    Each verification entry holds the pairs file's metrics and `scoring.extended_verification`'s.

    Qualities: ξ̂ of the REE run(s) (every run whose method is "ree"), CR-FIQA's head, every run's
    feature norm, the recognizer's SER-FIQ, ERS of the REE run, the true resolution and random.
    `prefixes`: the evaluation images' features of a frozen prefix all the runs share (`frozen`)."""
    views = {}
    for name, run in runs.items():
        say(f"scoring {name} on {len(data.images)} {data.split} images × {len(data.evalset.levels)} resolutions")
        views[name] = scoring.views(run.model, data.images, data.evalset.levels, run.ui_center, seed=seed,
                                    progress=f"scoring {name}", prefixes=prefixes)
    result: Dict[str, Any] = {"recognition": {}, "erc": {}, "spearman": {}, "seconds": {}}
    curves = Curves()
    replicates: Replicates = {}
    shared = {}
    for name, run in runs.items():
        method = run.method
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
    shared = frozen(data, budget, say) if budget.cache_prefix else None
    per_seed, first, replicates = [], None, []
    cache = shared.train if shared is not None else None
    for seed in seeds:
        runs = {name: train(name, data, budget, seed, out / f"seed{seed}" / slug(name), say, prefix_cache=cache,
                            **dict(v))
                for name, v in variants.items()}
        if shared is not None:
            runs[OFF_THE_SHELF] = Run(OFF_THE_SHELF, shared.model, "none", None, 0.0)
        result, curves, reps = evaluate(runs, data, seed, say,
                                        prefixes=shared.evaluation if shared is not None else None)
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
