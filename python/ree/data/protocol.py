"""Evaluation protocols over a labelled set: verification pairs and gallery / probe
identification with distractors (docs/spec.md §7). Negative labels mark unlabelled images."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .arrays import IGNORE_LABEL


def _labels(labels) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} of shape {labels.shape}")
    return labels.astype(np.int64)


def verification_pairs(labels, num_pairs: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Balanced verification pairs: num_pairs // 2 genuine (same label) and the rest impostor.

    Every pair joins two different images and appears once (in either order). Genuine pairs
    are drawn with each identity equally likely, then uniformly among its pairs; impostor pairs
    join two images of different identities, uniformly. Unlabelled images (label < 0) are left
    out. Returns (idx_a int64, idx_b int64, same bool), shuffled.
    """
    labels = _labels(labels)
    if not isinstance(num_pairs, (int, np.integer)) or num_pairs < 2:
        raise ValueError(f"num_pairs must be an int >= 2, got {num_pairs!r}")
    rng = np.random.default_rng(seed)
    num_genuine = num_pairs // 2
    num_impostor = num_pairs - num_genuine
    classes, counts = np.unique(labels[labels >= 0], return_counts=True)
    members = [np.flatnonzero(labels == c) for c in classes]

    # Genuine: every pair of every identity with two or more images, weighted so that
    # identities are equally likely.
    blocks, weights = [], []
    for idx in members:
        if len(idx) >= 2:
            a, b = np.triu_indices(len(idx), 1)
            blocks.append(np.stack([idx[a], idx[b]], 1))
            weights.append(np.full(len(a), 1.0 / len(a)))
    available = sum(len(b) for b in blocks)
    if num_genuine > available:
        raise ValueError(f"num_pairs={num_pairs} needs {num_genuine} genuine pairs, but the labels "
                         f"allow only {available}")
    genuine = np.concatenate(blocks)
    weights = np.concatenate(weights)
    genuine = genuine[rng.choice(len(genuine), num_genuine, replace=False, p=weights / weights.sum())]

    # Impostor: rejection sampling of image pairs with different labels; asking for at most half
    # of the possible pairs keeps it fast.
    total = counts.sum()
    possible = (total ** 2 - (counts ** 2).sum()) // 2
    if num_impostor > possible // 2:
        raise ValueError(f"num_pairs={num_pairs} needs {num_impostor} impostor pairs; at most "
                         f"{possible // 2} (half of those possible) can be drawn from these labels")
    labelled = np.flatnonzero(labels >= 0)
    found = np.zeros((0, 2), np.int64)
    while len(found) < num_impostor:
        draw = labelled[rng.integers(0, len(labelled), (2 * (num_impostor - len(found)) + 16, 2))]
        draw = draw[labels[draw[:, 0]] != labels[draw[:, 1]]]
        draw.sort(axis=1)
        merged = np.concatenate([found, draw])
        _, first = np.unique(merged, axis=0, return_index=True)
        found = merged[np.sort(first)][:num_impostor]
    pairs = np.concatenate([genuine, found])
    same = np.r_[np.ones(num_genuine, bool), np.zeros(num_impostor, bool)]
    order = rng.permutation(len(pairs))
    return pairs[order, 0].astype(np.int64), pairs[order, 1].astype(np.int64), same[order]


class IdentificationSplit(NamedTuple):
    """A gallery / probe split of a labelled set (`identification_protocol`)."""

    gallery_idx: np.ndarray  # int64 indices into the set
    gallery_labels: np.ndarray  # int64; IGNORE_LABEL (-100) for distractors
    probe_idx: np.ndarray
    probe_labels: np.ndarray


def identification_protocol(labels, seed: int = 0, gallery_per_id: int = 1,
                            distractor_fraction: float = 0.5) -> IdentificationSplit:
    """Open-set-style gallery / probe split scored as TinyFace is (CMC with distractors).

    A fraction `distractor_fraction` of the identities (rounded, at least one identity stays
    enrolled) become distractors: all their images join the gallery with label -100 and are
    never probed, as do unlabelled images (label < 0). Each other identity puts
    `gallery_per_id` random images in the gallery and the rest are its probes; an identity with
    no image left over is enrolled without probes. Indices come back sorted.
    """
    labels = _labels(labels)
    if not isinstance(gallery_per_id, (int, np.integer)) or gallery_per_id < 1:
        raise ValueError(f"gallery_per_id must be an int >= 1, got {gallery_per_id!r}")
    if not 0.0 <= float(distractor_fraction) < 1.0:
        raise ValueError(f"distractor_fraction must be in [0, 1), got {distractor_fraction!r}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels[labels >= 0])
    if len(classes) == 0:
        raise ValueError("labels hold no labelled image (all are negative)")
    num_distractors = min(int(round(distractor_fraction * len(classes))), len(classes) - 1)
    distractors = rng.choice(classes, num_distractors, replace=False)
    is_gallery = np.isin(labels, distractors) | (labels < 0)
    is_probe = np.zeros(len(labels), bool)
    for c in np.setdiff1d(classes, distractors):
        idx = rng.permutation(np.flatnonzero(labels == c))
        is_gallery[idx[:gallery_per_id]] = True
        is_probe[idx[gallery_per_id:]] = True
    if not is_probe.any():
        raise ValueError(f"no probe left: every enrolled identity has at most gallery_per_id="
                         f"{gallery_per_id} images")
    gallery_idx, probe_idx = np.flatnonzero(is_gallery), np.flatnonzero(is_probe)
    gallery_labels = labels[gallery_idx]
    gallery_labels = np.where((gallery_labels < 0) | np.isin(gallery_labels, distractors),
                              IGNORE_LABEL, gallery_labels)
    return IdentificationSplit(gallery_idx.astype(np.int64), gallery_labels.astype(np.int64),
                    probe_idx.astype(np.int64), labels[probe_idx].astype(np.int64))
