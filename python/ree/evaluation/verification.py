"""Face verification metrics on pair scores (cosine similarities; higher means more alike).

One decision rule everywhere in `ree.evaluation`: a pair is accepted as genuine when
`score >= threshold`. A threshold of +inf accepts nothing and -inf accepts everything.

- `roc`: one point per distinct score, like sklearn's `roc_curve(drop_intermediate=False)`;
  pairs with equal scores cross the threshold together.
- `threshold_at_fmr` / `tar_at_far`: only the FMRs that some threshold achieves on the sample
  exist (multiples of 1 / number of impostors, fewer with tied impostor scores). We take the
  achievable FMR nearest to the requested one (the lower FMR when two are equally near), and,
  among the thresholds giving that FMR, the lowest one, which accepts every genuine pair scoring
  above the next impostor down: the upper ROC point at that FPR.
- `kfold_accuracy`: the LFW protocol. Folds are contiguous blocks of the pair list (LFW lists
  its pairs fold by fold; shuffle first if your order means something). Flip fusion belongs to
  the embedding extractor, not here.
"""
from __future__ import annotations

import numpy as np

from ._arrays import bool_vector, both_classes, fraction, real_array

# Two candidate FMRs closer than this (in impostor counts) to the target are a tie. Counts are
# integers, so this only absorbs the rounding of `fmr * num_impostors`.
_COUNT_TOLERANCE = 1e-9


def pair_inputs(scores: object, same: object) -> tuple[np.ndarray, np.ndarray]:
    """Checked (scores float64, same bool) holding at least one genuine and one impostor pair."""
    scores = real_array(scores, "scores")
    same = bool_vector(same, "same", scores.size)
    both_classes(same, "same")
    return scores, same


def roc(scores: object, same: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve as (fpr, tpr, thresholds), thresholds decreasing from +inf (the point (0, 0)),
    then each distinct score, so the last point is (1, 1)."""
    scores, same = pair_inputs(scores, same)
    order = np.argsort(-scores, kind="stable")
    ordered, genuine = scores[order], same[order]
    # Only the last pair of each run of equal scores marks a point: tied pairs enter together.
    group_ends = np.r_[np.flatnonzero(np.diff(ordered) != 0), ordered.size - 1]
    true_accepts = np.cumsum(genuine)[group_ends]
    false_accepts = np.cumsum(~genuine)[group_ends]
    tpr = np.r_[0.0, true_accepts / true_accepts[-1]]
    fpr = np.r_[0.0, false_accepts / false_accepts[-1]]
    thresholds = np.r_[np.inf, ordered[group_ends]]
    return fpr, tpr, thresholds


def threshold_at_fmr(impostor_scores: np.ndarray, fmr: float) -> tuple[float, float]:
    """(threshold, achieved FMR) for the achievable FMR nearest to `fmr` (module docstring).

    `impostor_scores` is a non-empty float64 vector (callers validate it)."""
    count = impostor_scores.size
    values, counts = np.unique(impostor_scores, return_counts=True)
    # Cut j accepts the impostors strictly above `cut_below[j]`: first -inf (all of them), then
    # each distinct value in increasing order (the last cut accepts none).
    cut_below = np.r_[-np.inf, values]
    accepted = np.r_[count, count - np.cumsum(counts)]
    distance = np.abs(accepted - fmr * count)
    nearest = np.flatnonzero(distance <= distance.min() + _COUNT_TOLERANCE)
    cut = nearest[-1]  # accepted counts fall along the cuts: the last is the lowest FMR
    # The smallest float above the impostor value: a genuine score equal to it is rejected.
    threshold = -np.inf if cut == 0 else float(np.nextafter(cut_below[cut], np.inf))
    return threshold, float(accepted[cut] / count)


def tar_at_far(scores: object, same: object, far: float) -> float:
    """True accept rate at the threshold whose false accept rate is nearest to `far`."""
    scores, same = pair_inputs(scores, same)
    threshold, _ = threshold_at_fmr(scores[~same], fraction(far, "far"))
    return float(np.mean(scores[same] >= threshold))


def best_accuracy_threshold(scores: np.ndarray, same: np.ndarray) -> float:
    """The threshold maximising accuracy on (scores, same): a midpoint between consecutive
    distinct scores, or -inf / +inf (accept all / none). When several thresholds reach the best
    accuracy, the middle one of them (the upper middle for an even count)."""
    values, inverse = np.unique(scores, return_inverse=True)
    genuine_per_value = np.bincount(inverse, weights=same, minlength=values.size)
    impostor_per_value = np.bincount(inverse, weights=~same, minlength=values.size)
    # Cut i accepts values[i:]: it is right about the genuine pairs at or above values[i] and the
    # impostor pairs below it.
    right_genuine = np.r_[genuine_per_value.sum(), genuine_per_value.sum() - np.cumsum(genuine_per_value)]
    right_impostor = np.r_[0.0, np.cumsum(impostor_per_value)]
    correct = right_genuine + right_impostor
    best = np.flatnonzero(correct == correct.max())
    cuts = np.r_[-np.inf, (values[:-1] + values[1:]) / 2, np.inf]
    return float(cuts[best[best.size // 2]])


def kfold_accuracy(scores: object, same: object, folds: int = 10) -> tuple[float, float]:
    """(mean, std) over folds of the accuracy on each fold at the threshold that maximises the
    accuracy on the other folds. std is the population std (ddof=0), as insightface and most
    LFW tables report it."""
    scores, same = pair_inputs(scores, same)
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)):
        raise TypeError(f"folds must be an integer, got {type(folds).__name__}")
    if not 2 <= folds <= scores.size:
        raise ValueError(f"folds must be between 2 and the number of pairs ({scores.size}), got {folds}")
    accuracies = []
    for test in np.array_split(np.arange(scores.size), folds):
        train = np.ones(scores.size, dtype=bool)
        train[test] = False
        threshold = best_accuracy_threshold(scores[train], same[train])
        accuracies.append(np.mean((scores[test] >= threshold) == same[test]))
    return float(np.mean(accuracies)), float(np.std(accuracies))
