"""Face image quality: error-versus-reject curves (ERC / EDC, docs/spec.md §7) and ranking AUC.

ERC conventions, all recorded in `ErcResult`:
- A pair's quality is the lower of its two images' qualities.
- Rejecting a fraction r of N pairs drops the floor(r * N) lowest-quality pairs (with a 1e-9
  allowance so that 0.15 * 20 counts as 3 despite floating point). Strictly lower quality is
  always dropped first. Ties in quality are broken by a fixed pseudo-random permutation
  (`tie_seed`), not by the pair order: pair lists are often sorted genuine first, and a stable
  sort would then drop genuine pairs first among equals and bend the curve. The result is
  deterministic for a given input and seed, and does not depend on the seed when no qualities
  tie.
- FNMR at each FMR (decision rule and "nearest achievable FMR": see `verification`), with
  `threshold_mode`:
  "recompute": the threshold is re-derived on the impostors kept at each step (as CR-FIQA and
  MagFace report), so the FMR stays at its target while the FNMR moves. Only multiples of
  1 / (impostors kept) are achievable: once fmr * (impostors kept) < 0.5 the nearest one is 0,
  the threshold sits just above the highest kept impostor, which drops as pairs are rejected,
  and even random rejection lowers the FNMR. Read such points against the random baseline
  and `fmr_actual`;
  "fixed": the threshold is set once on all pairs (ISO/IEC 29794-1 EDC), so the FMR of the kept
  pairs drifts too (recorded in `fmr_actual`).
- A kept set with no genuine pair has no FNMR, and in "recompute" mode one with no impostor
  pair has no threshold: those points are NaN, and so is every area that covers them. The
  full pair list must contain both kinds (ValueError otherwise).
- `auc`: trapezoid rule over the reject grid; `pauc`: the same from the first grid point up to
  `pauc_limit` (0.2, the EDC pAUC), interpolating linearly when the limit falls between grid
  points. Raw areas, not normalised by the range; lower is better.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ._arrays import bool_vector, fraction, real_array
from .verification import pair_inputs, threshold_at_fmr

DEFAULT_FMRS = (1e-2, 1e-3, 1e-4)
DEFAULT_REJECT = np.round(np.arange(0.0, 0.951, 0.05), 2)
THRESHOLD_MODES = ("recompute", "fixed")
EDC_PAUC_LIMIT = 0.2
# Absorbs floating-point error in reject * num_pairs (see the module docstring).
_COUNT_TOLERANCE = 1e-9


@dataclass(frozen=True, eq=False)
class ErcResult:
    """One ERC. Dicts are keyed by the target FMR; arrays run along `reject`."""

    reject: np.ndarray
    fnmr: dict[float, np.ndarray]
    fmr_actual: dict[float, np.ndarray]  # the FMR of the kept impostors at the threshold used
    threshold: dict[float, np.ndarray]
    auc: dict[float, float]
    pauc: dict[float, float]
    threshold_mode: str
    fmrs: tuple[float, ...]
    pauc_limit: float
    num_pairs: int
    tie_seed: int

    @property
    def reject_range(self) -> tuple[float, float]:
        return float(self.reject[0]), float(self.reject[-1])


def rejection_order(pair_quality: object, tie_seed: int = 0) -> np.ndarray:
    """Pair indices in the order they are rejected: lowest quality first, ties in a fixed
    pseudo-random order drawn from `tie_seed`."""
    quality = real_array(pair_quality, "pair_quality")
    shuffle = np.random.default_rng(tie_seed).permutation(quality.size)
    return shuffle[np.argsort(quality[shuffle], kind="stable")]


def num_rejected(reject: float, num_pairs: int) -> int:
    """How many of `num_pairs` pairs rejecting the fraction `reject` drops."""
    return int(np.floor(reject * num_pairs + _COUNT_TOLERANCE))


def area(x: np.ndarray, y: np.ndarray, upto: float | None = None) -> float:
    """Trapezoid area under the piecewise-linear curve (x, y), from x[0] to `upto` (or the end)."""
    if upto is not None:
        inside = x < upto
        x, y = np.r_[x[inside], upto], np.r_[y[inside], np.interp(upto, x, y)]
    return float(np.trapezoid(y, x))


def _check_grid(reject: object) -> np.ndarray:
    grid = real_array(reject, "reject")
    if grid[0] < 0 or grid[-1] >= 1:
        raise ValueError(f"reject fractions must lie in [0, 1), got {grid[0]} .. {grid[-1]}")
    if np.any(np.diff(grid) <= 0):
        raise ValueError("reject must be strictly increasing")
    return grid


def _check_fmrs(fmrs: Sequence[float]) -> tuple[float, ...]:
    checked = tuple(fraction(fmr, "fmrs", allow_zero=False) for fmr in fmrs)
    if not checked:
        raise ValueError("fmrs is empty")
    if len(set(checked)) != len(checked):
        raise ValueError(f"fmrs has duplicates: {checked}")
    return checked


def erc(
    scores: object,
    same: object,
    quality_a: object,
    quality_b: object,
    *,
    fmrs: Sequence[float] = DEFAULT_FMRS,
    threshold_mode: str = "recompute",
    reject: object = DEFAULT_REJECT,
    pauc_limit: float = EDC_PAUC_LIMIT,
    tie_seed: int = 0,
) -> ErcResult:
    """FNMR against the fraction of lowest-quality pairs rejected (module docstring)."""
    scores, same = pair_inputs(scores, same)
    quality_a = real_array(quality_a, "quality_a")
    quality_b = real_array(quality_b, "quality_b")
    for name, quality in (("quality_a", quality_a), ("quality_b", quality_b)):
        if quality.size != scores.size:
            raise ValueError(f"{name} has {quality.size} entries but there are {scores.size} scores")
    fmrs = _check_fmrs(fmrs)
    if threshold_mode not in THRESHOLD_MODES:
        raise ValueError(f"threshold_mode must be one of {THRESHOLD_MODES}, got {threshold_mode!r}")
    grid = _check_grid(reject)
    pauc_limit = fraction(pauc_limit, "pauc_limit")
    if not grid[0] <= pauc_limit <= grid[-1]:
        raise ValueError(f"pauc_limit {pauc_limit} is outside the reject grid [{grid[0]}, {grid[-1]}]")
    if isinstance(tie_seed, bool) or not isinstance(tie_seed, (int, np.integer)):
        raise TypeError(f"tie_seed must be an integer, got {type(tie_seed).__name__}")

    order = rejection_order(np.minimum(quality_a, quality_b), tie_seed)
    fixed = {fmr: threshold_at_fmr(scores[~same], fmr)[0] for fmr in fmrs}
    fnmr = {fmr: np.full(grid.size, np.nan) for fmr in fmrs}
    fmr_actual = {fmr: np.full(grid.size, np.nan) for fmr in fmrs}
    threshold = {fmr: np.full(grid.size, np.nan) for fmr in fmrs}
    for step, fraction_rejected in enumerate(grid):
        kept = order[num_rejected(fraction_rejected, scores.size):]
        genuine = scores[kept][same[kept]]
        impostor = scores[kept][~same[kept]]
        for fmr in fmrs:
            if threshold_mode == "fixed":
                threshold[fmr][step] = fixed[fmr]
            elif impostor.size:
                threshold[fmr][step] = threshold_at_fmr(impostor, fmr)[0]
            cut = threshold[fmr][step]
            if np.isnan(cut):
                continue
            if genuine.size:
                fnmr[fmr][step] = np.mean(genuine < cut)
            if impostor.size:
                fmr_actual[fmr][step] = np.mean(impostor >= cut)
    return ErcResult(
        reject=grid,
        fnmr=fnmr,
        fmr_actual=fmr_actual,
        threshold=threshold,
        auc={fmr: area(grid, fnmr[fmr]) for fmr in fmrs},
        pauc={fmr: area(grid, fnmr[fmr], upto=pauc_limit) for fmr in fmrs},
        threshold_mode=threshold_mode,
        fmrs=fmrs,
        pauc_limit=pauc_limit,
        num_pairs=int(scores.size),
        tie_seed=int(tie_seed),
    )


def roc_auc(scores: object, positives: object) -> float:
    """P(score of a random positive > score of a random negative) + P(tie) / 2: the
    Mann-Whitney U statistic with mid-ranks for ties (0.5 for constant scores)."""
    scores = real_array(scores, "scores")
    positives = bool_vector(positives, "positives", scores.size)
    num_pos = int(np.count_nonzero(positives))
    num_neg = scores.size - num_pos
    if num_pos == 0 or num_neg == 0:
        raise ValueError("positives must contain both True and False entries")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    mid_rank = np.cumsum(counts) - (counts - 1) / 2  # 1-based average rank of each tie group
    rank_sum = mid_rank[inverse][positives].sum()
    return float((rank_sum - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))
