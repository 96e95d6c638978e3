"""The LFW-VLR splits: who trains, who validates, who tests (docs/lfw.md, "The protocol").

- Test people: those of `pairsDevTest.txt`. Validation people: those of `pairsDevTrain.txt`
  (disjoint from DevTest). Training people: everyone else with at least `min_images` images
  (`split="test"`: DevTrain people train too; `split="val"`: they are held out, for tuning).
- View 2 (`split="fold1"` … `"fold10"`): the people of that fold of `pairs.txt` are evaluated,
  everyone else trains.

What the held-out people are scored on (degraded probes, pairs, galleries) is the benchmark's
part, `ree.lfw.protocol`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

import numpy as np

from . import lfw
from .arrays import FaceArrays

VIEW2_FOLDS = tuple(f"fold{k}" for k in range(1, 11))
SPLITS = ("val", "test") + VIEW2_FOLDS
SPLIT_PAIRS = {"val": "pairsDevTrain.txt", "test": "pairsDevTest.txt", **{f: "pairs.txt" for f in VIEW2_FOLDS}}

MIN_IMAGES = 1
"""Images a training person needs. One: on the validation split, keeping the one-image people
(2,654 classes instead of 317) raised ArcFace's TAR@FAR=1e-2 at HR from 0.345 to 0.416 and its
rank-1 from 0.075 to 0.105 (docs/lfw.md, "The protocol")."""


@dataclass(frozen=True)
class People:
    """The identity-disjoint people of one run: `train` (sorted; label = position), `held_out`
    (the split's evaluation people)."""

    train: Tuple[str, ...]
    held_out: Tuple[str, ...]


def people(crops: lfw.LfwCrops, source: lfw.LfwSource, split: str, min_images: int = MIN_IMAGES) -> People:
    """Training and evaluation people of `split` ("val" or "test").

    Raises:
        ValueError: an unknown split or min_images < 1.
        lfw.PairsError / lfw.LfwNotFound: a pairs file is malformed or missing.
    """
    if not isinstance(min_images, int) or min_images < 1:
        raise ValueError(f"min_images must be an int >= 1, got {min_images!r}")
    held_out = set(lfw.pair_people(split_pairs(crops, source, split)[1]))
    excluded = held_out | (set(lfw.pair_people(split_pairs(crops, source, "test")[1])) if split == "val" else set())
    counts = crops.counts()
    train = tuple(sorted(p for p, n in counts.items() if p not in excluded and n >= min_images))
    return People(train, tuple(sorted(held_out)))


def split_pairs(crops: lfw.LfwCrops, source: lfw.LfwSource, split: str) -> Tuple[Path, List[List[lfw.Pair]]]:
    """(pairs file, its folds that `split` evaluates), every image they name checked.

    Raises:
        ValueError: an unknown split.
        lfw.PairsError / lfw.LfwNotFound: a pairs file is malformed, names a missing image, or is missing.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = source.pairs_path(SPLIT_PAIRS[split])
    folds, _ = lfw.read_pairs(path)
    if split in VIEW2_FOLDS:
        if len(folds) != len(VIEW2_FOLDS):
            raise lfw.PairsError(f"{path}: View 2 needs {len(VIEW2_FOLDS)} folds, the file has {len(folds)}")
        folds = [folds[VIEW2_FOLDS.index(split)]]
    lfw.check_pairs(folds, crops, path)
    return path, folds


def training_set(crops: lfw.LfwCrops, chosen: People):
    """The training people's crops as a `FaceArrays` (labels 0..len(train)-1, resolution = the
    crop side), with `class_names` the people."""
    label_of = {name: k for k, name in enumerate(chosen.train)}
    rows = np.flatnonzero(np.isin(crops.people, chosen.train))
    labels = np.array([label_of[str(p)] for p in crops.people[rows]], np.int64)
    return FaceArrays(crops.images[rows], labels, np.full(len(rows), crops.size, np.int64), names=chosen.train)
