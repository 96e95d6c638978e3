"""The LFW-VLR protocol: the very-low-resolution evaluation sets built from LFW's own pairs
files for the held-out people of a split (`ree.data.lfw_splits` says who trains and who is held
out; docs/lfw.md gives every choice and why).

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
- Extended verification (`extended_pairs`): every same-person pair of the split's images, at
  most `GENUINE_CAP` per person, and every pair of two of its people at least once (one image of
  each drawn), at least `IMPOSTOR_MIN` in all; drawn with a fixed seed, so TAR@FAR=1e-3 rests
  on hundreds of false accepts instead of the pairs file's 500 impostors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from ..data import lfw
from ..data.lfw_splits import split_pairs
from ..data.protocol import verification_pairs

RESOLUTIONS = (24, 16, 12, 8)
"""Probe sides in pixels, from the mildest to the hardest."""
GENUINE_CAP = 20
"""Same-person pairs per person in the extended set, drawn among all of that person's pairs when
there are more. Uncapped, two of the 963 DevTest people (121 and 109 images) would hold 56 % of
its 23,524 genuine pairs. 20 is the minimax cap on DevTest: the variance of a TAR estimate stays
within 22 % of the best cap's for any within-person correlation of the pairs from 0.02 to 0.3
(uncapped: up to 31 times; docs/lfw.md)."""
IMPOSTOR_MIN = 200_000
"""Different-person pairs at least, so that FAR 1e-3 is 200 false accepts or more."""
IMPOSTOR_MAX = 500_000
"""Different-person pairs at most: above it (the validation split's 2,132 people make 2.27
million couples) a uniform draw of couples, which keeps the scoring cost of DevTest's size."""
EXTENDED_SEED = 0
"""The one seed of the extended set's draws: the set is fixed, whatever the training seed."""


@dataclass
class EvalSet:
    """One split's evaluation images and protocols; every index points into `rows` order.

    rows: indices into the crops; labels: person ids (0..); names: person names.
    pair_a / pair_b / same: the pairs file's pairs. gallery / gallery_labels / probes /
    probe_labels: identification (distractors labelled ree.evaluation.DISTRACTOR_LABEL).
    erc_a / erc_b / erc_same / erc_res_a / erc_res_b: the quality pairs and the resolution of
    each side (a value of `levels`). extended: the extended verification pairs (`extended_pairs`)."""

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
    extended: Optional["ExtendedPairs"] = None


def evaluation_set(crops: lfw.LfwCrops, source: lfw.LfwSource, split: str, hr_side: int, *,
                   erc_pairs: int = 20000, seed: int = 0, extended: bool = True) -> EvalSet:
    """The evaluation images and protocols of `split` (module docstring). `hr_side` is the model
    input side, the resolution recorded for the undegraded crop. `extended`: also draw the
    extended verification pairs (with `EXTENDED_SEED`, whatever `seed` is).

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
                   erc_a, erc_b, np.asarray(erc_same, bool), draw(), draw(), levels,
                   extended_pairs(labels) if extended else None)


@dataclass(frozen=True)
class ExtendedPairs:
    """Verification pairs of one split's images, listed by first image then second.

    a, b [n]: image indices (into `EvalSet.rows`; the first is the gallery side of HR–VLR
    pairs); same [n]: one person; person_a, person_b [n]: their people (`EvalSet.labels`)."""

    a: np.ndarray
    b: np.ndarray
    same: np.ndarray
    person_a: np.ndarray
    person_b: np.ndarray

    @property
    def genuine(self) -> int:
        return int(self.same.sum())

    @property
    def impostors(self) -> int:
        return int((~self.same).sum())

    def people(self) -> int:
        """People that appear in a pair."""
        return int(np.unique(np.r_[self.person_a, self.person_b]).size)


def extended_pairs(labels: np.ndarray, *, cap: int = GENUINE_CAP, impostor_min: int = IMPOSTOR_MIN,
                   impostor_max: int = IMPOSTOR_MAX, seed: int = EXTENDED_SEED) -> ExtendedPairs:
    """The extended verification pairs of images whose people are `labels` [N] (sorted, 0..P-1,
    as `EvalSet.labels`):

    - genuine: every pair i < j of one person's images; for a person with more than `cap` such
      pairs, `cap` of them drawn without replacement;
    - impostors: every unordered pair of two different people, each side one of that person's
      images drawn uniformly, repeated (with fresh draws) until there are at least `impostor_min`;
      each person is in as many impostor pairs as every other. Above `impostor_max` pairs of
      people, `impostor_max` of them drawn without replacement, each once.

    Raises:
        ValueError: labels unsorted or not 0..P-1, fewer than two people, no person with two
            images, cap, impostor_min or impostor_max < 1, or impostor_max < impostor_min.
    """
    labels = np.asarray(labels)
    for name, value in (("cap", cap), ("impostor_min", impostor_min), ("impostor_max", impostor_max)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if impostor_max < impostor_min:
        raise ValueError(f"impostor_max ({impostor_max}) must be at least impostor_min ({impostor_min})")
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a non-empty 1-D integer array, got {labels.dtype} {labels.shape}")
    counts = np.bincount(labels) if labels.min() >= 0 else np.zeros(0, np.int64)
    if (np.diff(labels) < 0).any() or (counts == 0).any() or labels.min() < 0:
        raise ValueError("labels must be sorted and use every person id 0..P-1 (EvalSet.labels)")
    if counts.size < 2 or counts.max() < 2:
        raise ValueError(f"the extended set needs two people and a person with two images; "
                         f"got {counts.size} people, at most {counts.max()} image(s) each")
    rng = np.random.default_rng(seed)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    first, second = [], []
    for person in np.flatnonzero(counts >= 2):
        i, j = np.triu_indices(int(counts[person]), 1)
        if i.size > cap:
            keep = np.sort(rng.choice(i.size, cap, replace=False))
            i, j = i[keep], j[keep]
        first.append(starts[person] + i)
        second.append(starts[person] + j)
    g_a, g_b = np.concatenate(first), np.concatenate(second)
    p, q = np.triu_indices(counts.size, 1)
    if p.size > impostor_max:
        keep = np.sort(rng.choice(p.size, int(impostor_max), replace=False))
        p, q = p[keep], q[keep]
    repeats = -(-int(impostor_min) // p.size)
    p, q = np.tile(p, repeats), np.tile(q, repeats)
    i_a = starts[p] + rng.integers(0, counts[p])
    i_b = starts[q] + rng.integers(0, counts[q])
    a, b = np.r_[g_a, i_a].astype(np.int64), np.r_[g_b, i_b].astype(np.int64)
    order = np.lexsort((b, a))
    a, b = a[order], b[order]
    return ExtendedPairs(a, b, labels[a] == labels[b], labels[a].astype(np.int64), labels[b].astype(np.int64))
