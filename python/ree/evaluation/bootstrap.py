"""Bootstrap intervals of verification metrics, vectorised over the replicates.

A replicate is a row of non-negative integer weights: how many times each pair is in the
resampled set. The metrics below, computed with weights, equal the plain metrics of
`ree.evaluation.verification` on the resampled set written out pair by pair (tested), so one
draw of weights serves every model and every resolution, and differences between models are
paired: both are scored on the same resampled sets.

Two resampling units:
- `pair_resamples`: pairs, with replacement, within strata (e.g. fold × genuine/impostor, so
  every replicate keeps the fold sizes and class counts of the pairs file).
- `people_resamples`: people (a cluster bootstrap). A same-person pair weighs its person's
  multiplicity; a two-person pair the product of both multiplicities, the "pigeonhole"
  bootstrap of crossed data (A. B. Owen, "The pigeonhole bootstrap", Ann. Appl. Stat. 1(2),
  2007), which keeps the dependence between pairs that share a person or an image.

Intervals are percentile intervals (`interval`). `paired_difference` resamples the training
seeds too: the difference of two methods' means over seeds, with both sources of noise.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

from ._arrays import bool_vector, fraction, int_vector, real_array
from .verification import _COUNT_TOLERANCE

REPLICATES = 1000
"""Replicates per interval: the 2.5 % and 97.5 % percentiles then rest on 25 replicates each."""
LEVEL = 0.95


def _counts(draws: np.ndarray, size: int) -> np.ndarray:
    """[B, size] int32 multiplicities from [B, k] drawn indices (one bincount for all rows)."""
    rows = draws.shape[0]
    flat = (draws + np.arange(rows, dtype=np.int64)[:, None] * size).ravel()
    return np.bincount(flat, minlength=rows * size).reshape(rows, size).astype(np.int32)


def _replicates(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"replicates must be an int >= 1, got {value!r}")
    return int(value)


def pair_resamples(strata: object, replicates: int = REPLICATES, seed: int = 0) -> np.ndarray:
    """[B, n] int32 weights: in each replicate, every stratum of `strata` ([n] integer labels)
    redrawn with replacement to its own size.

    Raises:
        TypeError / ValueError: strata is not a 1-D integer vector; replicates < 1.
    """
    strata = int_vector(strata, "strata")
    replicates = _replicates(replicates)
    rng = np.random.default_rng(seed)
    draws = []
    for label in np.unique(strata):
        members = np.flatnonzero(strata == label)
        draws.append(members[rng.integers(0, members.size, (replicates, members.size))])
    return _counts(np.concatenate(draws, axis=1), strata.size)


def people_resamples(num_people: int, replicates: int = REPLICATES, seed: int = 0) -> np.ndarray:
    """[B, P] int32 multiplicities of P people drawn P times with replacement, per replicate.

    Raises:
        ValueError: num_people or replicates < 1.
    """
    if isinstance(num_people, bool) or not isinstance(num_people, (int, np.integer)) or num_people < 1:
        raise ValueError(f"num_people must be an int >= 1, got {num_people!r}")
    replicates = _replicates(replicates)
    rng = np.random.default_rng(seed)
    return _counts(rng.integers(0, num_people, (replicates, num_people)), int(num_people))


def people_weights(multiplicity: np.ndarray, person_a: np.ndarray, person_b: np.ndarray) -> np.ndarray:
    """[B, n] float64 weights of pairs of people (person_a, person_b) ([n] indices into the
    columns of `multiplicity` [B, P]): m_a for a same-person pair, m_a·m_b otherwise."""
    first = multiplicity[:, person_a].astype(np.float64)
    return np.where(person_a == person_b, first, first * multiplicity[:, person_b])


def people_pair_total(multiplicity: np.ndarray, person_a: np.ndarray, person_b: np.ndarray) -> np.ndarray:
    """[B] Σ over the two-person pairs of m_a·m_b, without a [B, n] array: through the [P, P]
    table of how many pairs each couple of people has."""
    people = multiplicity.shape[1]
    table = np.bincount(person_a * people + person_b, minlength=people * people).reshape(people, people)
    m = multiplicity.astype(np.float64)
    return np.einsum("bp,bp->b", m @ table.astype(np.float64), m)


def _weight_matrix(weights: object, name: str, n: int) -> np.ndarray:
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 2 or weights.shape[1] != n:
        raise ValueError(f"{name} must have shape [replicates, {n}], got {weights.shape}")
    if not np.isfinite(weights).all() or (weights < 0).any():
        raise ValueError(f"{name} must hold finite non-negative weights")
    return weights


def tar_at_far_weighted(genuine: object, genuine_weights: object, impostors: object, impostor_weights: object,
                        far: float, impostor_total: Optional[np.ndarray] = None) -> np.ndarray:
    """[B] TAR at the FAR nearest to `far` (`verification.tar_at_far`'s rule) of each replicate.

    genuine [G] / impostors [I]: scores; *_weights [B, G] / [B, I]: the replicates' weights.
    `impostor_total` [B]: the total impostor weight when `impostors` holds only the highest
    impostor scores of a larger set; a replicate whose decision falls outside them gets NaN
    (`tar_at_far_people` then recomputes it on every impostor). A replicate without genuine or
    impostor weight gets NaN.
    """
    genuine = real_array(genuine, "genuine")
    impostors = real_array(impostors, "impostors")
    g_w = _weight_matrix(genuine_weights, "genuine_weights", genuine.size)
    i_w = _weight_matrix(impostor_weights, "impostor_weights", impostors.size)
    if g_w.shape[0] != i_w.shape[0]:
        raise ValueError(f"genuine_weights and impostor_weights have {g_w.shape[0]} and {i_w.shape[0]} replicates")
    far = fraction(far, "far")
    rows = g_w.shape[0]
    # Impostor scores grouped by distinct value, highest first: cut k accepts the first k groups.
    order = np.argsort(-impostors, kind="stable")
    ordered = impostors[order]
    starts = np.r_[0, np.flatnonzero(np.diff(ordered) != 0) + 1]
    values = ordered[starts]
    count = values.size
    groups = i_w[:, order]
    if count < impostors.size:
        groups = np.add.reduceat(groups, starts, axis=1)
    accepted = np.concatenate([np.zeros((rows, 1)), np.cumsum(groups, axis=1)], axis=1)
    complete = impostor_total is None
    total = accepted[:, -1] if complete else np.asarray(impostor_total, np.float64)
    target = far * total
    # Accepted weight rises with the cut: the nearest cut is the last at or below the target or
    # the next one; within the tolerance the lower FAR wins, as in threshold_at_fmr.
    every = np.arange(rows)
    low = (accepted <= target[:, None]).sum(axis=1) - 1
    high = np.minimum(low + 1, count)
    below_target, above_target = accepted[every, low], accepted[every, high]
    chosen = np.where(above_target - target < target - below_target - _COUNT_TOLERANCE, above_target, below_target)
    # The threshold sits just above the highest impostor value that the cut rejects and that the
    # replicate holds: the group after the last cut accepting `chosen` (count: none is left).
    rejected = (accepted <= chosen[:, None]).sum(axis=1) - 1
    floor = np.where(rejected < count, values[np.minimum(rejected, count - 1)], -np.inf)
    ok = total > 0
    if not complete:
        ok &= (accepted[:, -1] > target) & (rejected < count)
    g_order = np.argsort(genuine, kind="stable")
    g_sorted = genuine[g_order]
    g_cum = np.concatenate([np.zeros((rows, 1)), np.cumsum(g_w[:, g_order], axis=1)], axis=1)
    below = np.searchsorted(g_sorted, floor, side="right")  # genuine at or below the floor: rejected
    g_total = g_cum[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        tar = (g_total - g_cum[np.arange(rows), below]) / g_total
    return np.where(ok & (g_total > 0), tar, np.nan)


def tar_at_far_people(scores: object, same: object, person_a: np.ndarray, person_b: np.ndarray, far: float,
                      multiplicity: np.ndarray, *, impostor_total: Optional[np.ndarray] = None,
                      window: Optional[int] = None, chunk: int = 250) -> np.ndarray:
    """[B] TAR at FAR `far` over people resamples (`multiplicity` [B, P], `people_resamples`)
    of pairs of people (person_a, person_b) [n] (ids 0..P-1; `same` exactly where they agree).

    Only the `window` highest impostor scores (default: 20 times the false accepts at `far`,
    at least 1,000) are weighed per replicate, with the total impostor weight from
    `impostor_total` (`people_pair_total`, computed once per pair set); a replicate whose cut
    falls outside the window is recomputed on every impostor, so the result is exact.

    Raises:
        ValueError: `same` disagrees with the people, a person id without a column, a bad far.
    """
    scores = real_array(scores, "scores")
    same = bool_vector(same, "same", scores.size)
    person_a = int_vector(person_a, "person_a", scores.size)
    person_b = int_vector(person_b, "person_b", scores.size)
    if (same != (person_a == person_b)).any():
        raise ValueError("same must be True exactly for the pairs whose two people are one")
    far = fraction(far, "far")
    multiplicity = np.asarray(multiplicity)
    if multiplicity.ndim != 2 or min(person_a.min(), person_b.min()) < 0 \
            or max(person_a.max(), person_b.max()) >= multiplicity.shape[1]:
        raise ValueError(f"multiplicity must be [replicates, people] with a column for every person id, got shape "
                         f"{multiplicity.shape} for ids up to {max(person_a.max(), person_b.max())}")
    imp = np.flatnonzero(~same)
    gen = np.flatnonzero(same)
    if impostor_total is None:
        impostor_total = people_pair_total(multiplicity, person_a[imp], person_b[imp])
    if window is None:
        window = max(int(20 * far * imp.size), 1000)
    top = imp[np.argsort(-scores[imp], kind="stable")[: min(window, imp.size)]]
    out = np.empty(multiplicity.shape[0])
    for lo in range(0, multiplicity.shape[0], chunk):
        m = multiplicity[lo: lo + chunk]
        g_w = m[:, person_a[gen]]
        part = tar_at_far_weighted(scores[gen], g_w, scores[top], people_weights(m, person_a[top], person_b[top]),
                                   far, impostor_total[lo: lo + chunk])
        for k in np.flatnonzero(np.isnan(part) & (impostor_total[lo: lo + chunk] > 0) & (g_w.sum(axis=1) > 0)):
            row = m[k: k + 1]
            part[k] = tar_at_far_weighted(scores[gen], row[:, person_a[gen]], scores[imp],
                                          people_weights(row, person_a[imp], person_b[imp]), far)[0]
        out[lo: lo + chunk] = part
    return out


def kfold_accuracy_weighted(scores: object, same: object, folds: object, weights: object) -> np.ndarray:
    """[B] k-fold accuracy of each replicate (`verification.kfold_accuracy`'s rule: per fold,
    the accuracy at the threshold that maximises it on the other folds, the middle one of ties;
    the mean over folds) with the folds given per pair (`folds` [n] integers) and the pairs'
    weights [B, n]. A fold without weight in a replicate gives NaN."""
    scores = real_array(scores, "scores")
    same = bool_vector(same, "same", scores.size)
    folds = int_vector(folds, "folds", scores.size)
    weights = _weight_matrix(weights, "weights", scores.size)
    rows = weights.shape[0]
    order = np.argsort(scores, kind="stable")
    ordered = scores[order]
    starts = np.r_[0, np.flatnonzero(np.diff(ordered) != 0) + 1]
    values = ordered[starts]
    count = values.size
    sorted_weights, sorted_same, sorted_folds = weights[:, order], same[order], folds[order]
    index = np.arange(count)
    zero = np.zeros((rows, 1))
    accuracies = []
    for fold in np.unique(folds):
        train = sorted_weights * (sorted_folds != fold)
        genuine, impostor = train * sorted_same, train * ~sorted_same
        if count < scores.size:
            genuine, impostor = np.add.reduceat(genuine, starts, axis=1), np.add.reduceat(impostor, starts, axis=1)
        # Cut i accepts the groups i.. : right about the genuine pairs there and the impostors below.
        g_below = np.concatenate([zero, np.cumsum(genuine, axis=1)], axis=1)
        i_below = np.concatenate([zero, np.cumsum(impostor, axis=1)], axis=1)
        correct = g_below[:, -1:] - g_below + i_below
        # Only cuts at values the training pairs hold exist (besides accept-all and accept-none).
        present = (genuine + impostor) > 0
        lowest = np.argmax(present, axis=1)
        valid = np.ones((rows, count + 1), bool)
        valid[:, 1:count] = present[:, 1:] & (index[1:] > lowest[:, None])
        best = valid & (correct >= np.where(valid, correct, -1.0).max(axis=1, keepdims=True))
        middle = best.sum(axis=1) // 2
        cut = np.argmax(np.cumsum(best, axis=1) == (middle + 1)[:, None], axis=1)
        # The midpoint between the cut's value and the highest held value below it (the arithmetic
        # of best_accuracy_threshold, so unit weights give its thresholds bit for bit).
        below = np.where(present & (index < cut[:, None]), values, -np.inf).max(axis=1)
        inner = (cut > 0) & (cut < count)
        threshold = np.where(inner, (below + values[np.minimum(cut, count - 1)]) / 2,
                             np.where(cut == 0, -np.inf, np.inf))
        test = folds == fold
        right = (scores[test][None, :] >= threshold[:, None]) == same[test][None, :]
        w = weights[:, test]
        with np.errstate(invalid="ignore", divide="ignore"):
            accuracies.append((w * right).sum(axis=1) / w.sum(axis=1))
    return np.mean(accuracies, axis=0)


def interval(replicates: object, level: float = LEVEL) -> list:
    """[low, high]: the percentile interval of the replicates (NaN ignored; [NaN, NaN] when all are)."""
    values = np.asarray(replicates, np.float64).ravel()
    values = values[~np.isnan(values)]
    if values.size == 0:
        return [float("nan"), float("nan")]
    tail = (100 - 100 * fraction(level, "level")) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return [float(low), float(high)]


def paired_difference(a_points: Sequence[float], b_points: Sequence[float], a_replicates: object,
                      b_replicates: object, *, level: float = LEVEL, seed: int = 0) -> Dict[str, object]:
    """Method A − method B, both scored on the same resampled pairs, over training seeds.

    a_points / b_points [S]: each seed's metric on the full set; *_replicates [S, B]: each
    seed's metric on replicate b (the same resamples for both methods and every seed). Replicate
    b draws S seeds with replacement and takes the mean over them of A − B on resample b, so the
    interval holds the test-set noise and the seed-to-seed noise (with 3 seeds the latter is
    coarse: 10 distinct draws). -> {"mean": mean over seeds of A − B, "ci95" (or the level's
    name): [low, high], "replicates": [B] array}.

    Raises:
        ValueError: shapes that disagree.
    """
    a_points, b_points = np.asarray(a_points, np.float64), np.asarray(b_points, np.float64)
    a_rep, b_rep = np.asarray(a_replicates, np.float64), np.asarray(b_replicates, np.float64)
    if a_rep.ndim != 2 or a_rep.shape != b_rep.shape or a_points.shape != b_points.shape \
            or a_points.shape != (a_rep.shape[0],):
        raise ValueError(f"points must be [S] and replicates [S, B] for both methods, got {a_points.shape}, "
                         f"{b_points.shape}, {a_rep.shape}, {b_rep.shape}")
    seeds, replicates = a_rep.shape
    draw = np.random.default_rng(seed).integers(0, seeds, (replicates, seeds))
    diff = a_rep - b_rep
    boot = diff[draw, np.arange(replicates)[:, None]].mean(axis=1)
    return {"mean": float(np.mean(a_points - b_points)), ci_name(level): interval(boot, level), "replicates": boot}


def ci_name(level: float = LEVEL) -> str:
    """The key of an interval at `level` in result dicts: "ci95" for 0.95."""
    return f"ci{round(level * 100):d}"
