"""Per-resolution evaluation: split samples (or pairs, by the lower of their two resolutions, as
for quality) into pixel-size bins, then run any metric on each bin's mask."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ._arrays import int_vector


def resolution_bins(resolutions: object, edges: Sequence[int]) -> list[tuple[str, np.ndarray]]:
    """[(name, bool mask)] for the bins [edges[i], edges[i + 1]) in pixels, named "8-11 px"
    (or "8 px" for a one-pixel bin). Every resolution must fall in some bin (ValueError
    otherwise: a silently dropped sample would skew the per-bin numbers); a bin may be empty."""
    edges = int_vector(edges, "edges")
    if edges.size < 2:
        raise ValueError(f"edges must hold at least 2 pixel sizes, got {edges.tolist()}")
    if np.any(np.diff(edges) <= 0):
        raise ValueError(f"edges must be strictly increasing, got {edges.tolist()}")
    resolutions = int_vector(resolutions, "resolutions")
    outside = (resolutions < edges[0]) | (resolutions >= edges[-1])
    if outside.any():
        raise ValueError(
            f"resolutions has {int(outside.sum())} value(s) outside [{edges[0]}, {edges[-1]}), "
            f"e.g. {np.unique(resolutions[outside])[:5].tolist()}: widen edges"
        )
    bins = []
    for low, high in zip(edges[:-1], edges[1:]):
        name = f"{low} px" if high - low == 1 else f"{low}-{high - 1} px"
        bins.append((name, (resolutions >= low) & (resolutions < high)))
    return bins
