"""Closed-set identification: CMC with gallery distractors, as TinyFace is scored.

Embeddings are compared by cosine. A probe's rank is the position, in its similarity ranking of
the gallery, of the first gallery entry of its own identity (its "mate"); distractors (gallery
label -100, identities never probed) can only push it down. Ties are scored pessimistically: a
non-mate exactly as similar as the best mate ranks above it. That makes the rank independent of
the gallery order and never flatters a collapsed model (identical embeddings rank every probe
last). Every probe must have a mate in the gallery.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..data.arrays import IGNORE_LABEL
from ._arrays import int_vector, real_array

DISTRACTOR_LABEL = IGNORE_LABEL  # the label ree.data.protocol gives gallery distractors
# Probes scored per block: bounds the similarity block to this many rows of gallery size.
_PROBE_BLOCK = 1024


def _unit_rows(embeddings: object, name: str) -> np.ndarray:
    rows = real_array(embeddings, name, ndim=2)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def probe_ranks(
    probe_emb: object, probe_labels: object, gallery_emb: object, gallery_labels: object
) -> np.ndarray:
    """The 1-based rank of each probe's best mate in the gallery (module docstring), int64 [P]."""
    probes = _unit_rows(probe_emb, "probe_emb")
    gallery = _unit_rows(gallery_emb, "gallery_emb")
    if probes.shape[1] != gallery.shape[1]:
        raise ValueError(f"probe_emb has dimension {probes.shape[1]} but gallery_emb has {gallery.shape[1]}")
    probe_labels = int_vector(probe_labels, "probe_labels", probes.shape[0])
    gallery_labels = int_vector(gallery_labels, "gallery_labels", gallery.shape[0])
    if np.any(probe_labels == DISTRACTOR_LABEL):
        raise ValueError(f"probe_labels contains the distractor label {DISTRACTOR_LABEL}")
    unmatched = np.setdiff1d(probe_labels, gallery_labels)
    if unmatched.size:
        raise ValueError(
            f"probe_labels has {unmatched.size} identities with no gallery entry (e.g. {unmatched[:5].tolist()}):"
            " closed-set CMC needs a mate for every probe"
        )
    ranks = np.empty(probes.shape[0], dtype=np.int64)
    for start in range(0, probes.shape[0], _PROBE_BLOCK):
        block = slice(start, start + _PROBE_BLOCK)
        similarity = probes[block] @ gallery.T
        mate = probe_labels[block, None] == gallery_labels[None, :]
        best_mate = np.where(mate, similarity, -np.inf).max(axis=1, keepdims=True)
        ranks[block] = 1 + np.count_nonzero((similarity >= best_mate) & ~mate, axis=1)
    return ranks


def _check_ranks(ranks: Sequence[int]) -> list[int]:
    checked = list(ranks)
    if not checked:
        raise ValueError("ranks is empty")
    for rank in checked:
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
            raise ValueError(f"ranks must be positive integers, got {rank!r}")
    return [int(rank) for rank in checked]


def cmc(
    probe_emb: object,
    probe_labels: object,
    gallery_emb: object,
    gallery_labels: object,
    ranks: Sequence[int] = (1, 5, 20),
) -> dict[int, float]:
    """{rank r: fraction of probes whose mate is within the top r}."""
    wanted = _check_ranks(ranks)
    found = probe_ranks(probe_emb, probe_labels, gallery_emb, gallery_labels)
    return {rank: float(np.mean(found <= rank)) for rank in wanted}


def cmc_curve(
    probe_emb: object, probe_labels: object, gallery_emb: object, gallery_labels: object, max_rank: int = 20
) -> np.ndarray:
    """The whole CMC up to `max_rank`: element r - 1 is the identification rate at rank r."""
    (max_rank,) = _check_ranks([max_rank])
    found = probe_ranks(probe_emb, probe_labels, gallery_emb, gallery_labels)
    return np.array([np.mean(found <= rank) for rank in range(1, max_rank + 1)])
