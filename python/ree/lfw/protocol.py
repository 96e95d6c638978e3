"""The LFW-VLR protocol: who trains, who validates, who tests, and the very-low-resolution
evaluation sets built from LFW's own pairs files (docs/lfw.md gives every choice and why).

- Test people: those of `pairsDevTest.txt`. Validation people: those of `pairsDevTrain.txt`
  (disjoint from DevTest). Training people: everyone else with at least `min_images` images
  (`split="test"`: DevTrain people train too; `split="val"`: they are held out, for tuning).
  View 2 (`split="fold1"` … `"fold10"`): the people of that fold of `pairs.txt` are evaluated,
  everyone else trains.
- Probes are the face crops degraded to `RESOLUTIONS` px (`ree.data.degrade.downsample`:
  antialiased reduction, then bicubic back to the model input); the undegraded crop is the
  high-resolution (HR) reference, recorded with its side (the model input) as its resolution.
- Verification: the pairs file's pairs, both images at one resolution (VLR–VLR) or the first at
  HR and the second at a VLR resolution (cross-resolution).
- Identification (scored as TinyFace / SCface are): every person with two or more images enrols
  their first image, at HR; every one-image person is a distractor in the gallery; the other
  images are the probes, at each resolution.
- Quality (ERC): `erc_pairs` balanced genuine / impostor pairs of the split's images, each image
  of a pair at an independently drawn resolution (HR or one of `RESOLUTIONS`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

import numpy as np

from ..data import lfw
from ..data.protocol import verification_pairs

RESOLUTIONS = (24, 16, 12, 8)
"""Probe sides in pixels, from the mildest to the hardest."""
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
    from ..data.arrays import FaceArrays

    label_of = {name: k for k, name in enumerate(chosen.train)}
    rows = np.flatnonzero(np.isin(crops.people, chosen.train))
    labels = np.array([label_of[str(p)] for p in crops.people[rows]], np.int64)
    return FaceArrays(crops.images[rows], labels, np.full(len(rows), crops.size, np.int64), names=chosen.train)


@dataclass
class EvalSet:
    """One split's evaluation images and protocols; every index points into `rows` order.

    rows: indices into the crops; labels: person ids (0..); names: person names.
    pair_a / pair_b / same: the pairs file's pairs. gallery / gallery_labels / probes /
    probe_labels: identification (distractors labelled ree.evaluation.DISTRACTOR_LABEL).
    erc_a / erc_b / erc_same / erc_res_a / erc_res_b: the quality pairs and the resolution of
    each side (a value of `levels`)."""

    rows: np.ndarray
    labels: np.ndarray
    names: Tuple[str, ...]
    pair_a: np.ndarray
    pair_b: np.ndarray
    same: np.ndarray
    gallery: np.ndarray
    gallery_labels: np.ndarray
    probes: np.ndarray
    probe_labels: np.ndarray
    erc_a: np.ndarray
    erc_b: np.ndarray
    erc_same: np.ndarray
    erc_res_a: np.ndarray
    erc_res_b: np.ndarray
    levels: Tuple[int, ...]


def evaluation_set(crops: lfw.LfwCrops, source: lfw.LfwSource, split: str, hr_side: int, *,
                   erc_pairs: int = 20000, seed: int = 0) -> EvalSet:
    """The evaluation images and protocols of `split` (module docstring). `hr_side` is the model
    input side, the resolution recorded for the undegraded crop.

    Raises:
        ValueError: an unknown split, or hr_side not above the largest probe resolution.
    """
    from ..evaluation import DISTRACTOR_LABEL

    if hr_side <= max(RESOLUTIONS):
        raise ValueError(f"the model input ({hr_side} px) must exceed the largest probe resolution {max(RESOLUTIONS)}")
    _, folds = split_pairs(crops, source, split)
    names = tuple(lfw.pair_people(folds))
    rows = np.flatnonzero(np.isin(crops.people, names))
    rows = rows[np.lexsort((crops.numbers[rows], crops.people[rows]))]
    person = {n: k for k, n in enumerate(names)}
    labels = np.array([person[str(p)] for p in crops.people[rows]], np.int64)
    where = {(str(crops.people[r]), int(crops.numbers[r])): i for i, r in enumerate(rows)}
    pairs = [p for f in folds for p in f]
    pair_a = np.array([where[(p.name_a, p.num_a)] for p in pairs], np.int64)
    pair_b = np.array([where[(p.name_b, p.num_b)] for p in pairs], np.int64)
    same = np.array([p.same for p in pairs])

    counts = np.bincount(labels, minlength=len(names))
    first = np.r_[True, labels[1:] != labels[:-1]]  # rows are sorted by person, then image number
    enrolled = first & (counts[labels] >= 2)
    distractor = counts[labels] == 1
    gallery = np.flatnonzero(enrolled | distractor)
    gallery_labels = np.where(distractor[gallery], DISTRACTOR_LABEL, labels[gallery])
    probes = np.flatnonzero(~enrolled & ~distractor)

    levels = (hr_side,) + RESOLUTIONS
    rng = np.random.default_rng(seed + 1)
    erc_a, erc_b, erc_same = verification_pairs(labels, erc_pairs, seed)
    draw = lambda: np.asarray(levels)[rng.integers(0, len(levels), len(erc_a))]  # noqa: E731
    return EvalSet(rows, labels, names, pair_a, pair_b, same, gallery, gallery_labels, probes, labels[probes],
                   erc_a, erc_b, np.asarray(erc_same, bool), draw(), draw(), levels)
