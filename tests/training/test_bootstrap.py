"""Bootstrap intervals (ree.evaluation.bootstrap): weighted metrics equal the plain ones on the
resampled set written out, intervals cover the truth at about the nominal rate on simulated
scores, resampling people (not pairs) is what keeps that rate when pairs share a person, and the
paired difference of two methods."""
import math
from statistics import NormalDist

import numpy as np
import pytest

from ree.evaluation import bootstrap as bs
from ree.evaluation import verification as V


def tied_scores(rng, n, same):
    return np.round(rng.normal(size=n) + 1.5 * same, 1)  # rounded: many ties


def test_weighted_kfold_accuracy_is_the_resampled_sets():
    rng = np.random.default_rng(1)
    n = 200
    same = rng.random(n) < 0.5
    scores = tied_scores(rng, n, same)
    folds = np.arange(n) % 10
    weights = bs.pair_resamples(folds * 2 + same, 40, seed=3)
    got = bs.kfold_accuracy_weighted(scores, same, folds, weights)
    for b in range(40):
        rows = np.repeat(np.arange(n), weights[b])
        accuracies = []
        for fold in range(10):
            train, test = rows[folds[rows] != fold], rows[folds[rows] == fold]
            threshold = V.best_accuracy_threshold(scores[train], same[train])
            accuracies.append(np.mean((scores[test] >= threshold) == same[test]))
        assert got[b] == pytest.approx(np.mean(accuracies), abs=1e-12)
    # Unit weights: the 10-fold accuracy of the pairs file, folds k mod 10 as the LFW-VLR scoring puts them.
    order = np.argsort(folds, kind="stable")
    assert bs.kfold_accuracy_weighted(scores, same, folds, np.ones((1, n)))[0] == pytest.approx(
        V.kfold_accuracy(scores[order], same[order], 10)[0], abs=1e-15)


@pytest.mark.parametrize("far", [1e-2, 0.05, 0.3])
def test_weighted_tar_is_the_resampled_sets(far):
    rng = np.random.default_rng(2)
    n = 300
    same = rng.random(n) < 0.4
    scores = tied_scores(rng, n, same)
    weights = bs.pair_resamples(same.astype(int), 50, seed=4)
    got = bs.tar_at_far_weighted(scores[same], weights[:, same], scores[~same], weights[:, ~same], far)
    want = [V.tar_at_far(np.repeat(scores, weights[b]), np.repeat(same, weights[b]), far) for b in range(50)]
    np.testing.assert_array_equal(got, want)
    ones = lambda m: np.ones((1, int(m.sum())))  # noqa: E731
    assert bs.tar_at_far_weighted(scores[same], ones(same), scores[~same], ones(~same), far)[0] == \
        V.tar_at_far(scores, same, far)


def test_weighted_tar_breaks_a_tie_towards_the_lower_far():
    """20 impostors at FAR 0.025: 0 and 1 false accepts are equally near 0.5; the lower FAR wins."""
    impostors, genuine = np.arange(20.0), np.array([18.5, 19.5, 20.5])
    got = bs.tar_at_far_weighted(genuine, np.ones((1, 3)), impostors, np.ones((1, 20)), 0.025)[0]
    assert got == V.tar_at_far(np.r_[genuine, impostors], np.arange(23) < 3, 0.025) == 2 / 3


def people_pairs(rng, people, genuine, impostors):
    person = rng.integers(0, people, genuine)
    p, q = rng.integers(0, people, (2, impostors))
    keep = p != q
    a, b = np.r_[person, p[keep]], np.r_[person, q[keep]]
    return a, b


@pytest.mark.parametrize("window", [None, 20])  # 20: most replicates fall outside it and are recomputed
def test_people_resampled_tar_is_the_resampled_sets(window):
    rng = np.random.default_rng(5)
    a, b = people_pairs(rng, 40, 500, 3000)
    same = a == b
    scores = np.round(rng.normal(size=a.size) + 2 * same, 2)
    m = bs.people_resamples(40, 30, seed=6)
    for far in (1e-3, 1e-2, 0.1):
        got = bs.tar_at_far_people(scores, same, a, b, far, m, window=window, chunk=7)
        weights = bs.people_weights(m, a, b).astype(int)
        want = [V.tar_at_far(np.repeat(scores, weights[k]), np.repeat(same, weights[k]), far) for k in range(30)]
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="same must be True exactly"):
        bs.tar_at_far_people(scores, ~same, a, b, 0.01, m)
    with pytest.raises(ValueError, match="a column for every person id"):
        bs.tar_at_far_people(scores, same, a, b, 0.01, m[:, :30])
    with pytest.raises(ValueError, match="far must be in"):
        bs.tar_at_far_people(scores, same, a, b, 2.0, m)


def test_resamples_keep_strata_and_are_reproducible():
    strata = np.r_[np.zeros(30, int), np.ones(70, int)]
    w = bs.pair_resamples(strata, 25, seed=1)
    assert w.shape == (25, 100) and (w[:, :30].sum(axis=1) == 30).all() and (w[:, 30:].sum(axis=1) == 70).all()
    np.testing.assert_array_equal(w, bs.pair_resamples(strata, 25, seed=1))
    assert not np.array_equal(w, bs.pair_resamples(strata, 25, seed=2))
    m = bs.people_resamples(12, 25, seed=1)
    assert (m.sum(axis=1) == 12).all()
    a, b = np.array([0, 1, 2, 3]), np.array([0, 5, 7, 3])
    np.testing.assert_array_equal(bs.people_weights(m, a, b), np.c_[m[:, 0], m[:, 1] * m[:, 5], m[:, 2] * m[:, 7],
                                                                   m[:, 3]])
    impostor = a != b
    np.testing.assert_allclose(bs.people_pair_total(m, a[impostor], b[impostor]),
                               bs.people_weights(m, a, b)[:, impostor].sum(axis=1))
    with pytest.raises(ValueError, match="replicates must be an int >= 1"):
        bs.pair_resamples(strata, 0)
    with pytest.raises(ValueError, match="num_people must be an int >= 1"):
        bs.people_resamples(0)
    with pytest.raises(ValueError, match=r"genuine_weights must have shape \[replicates, 2\]"):
        bs.tar_at_far_weighted([1.0, 2.0], np.ones((3, 4)), [0.0], np.ones((3, 1)), 0.1)


def test_interval():
    assert bs.interval(np.arange(101.0)) == [2.5, 97.5]
    assert bs.interval([np.nan, 1.0, np.nan]) == [1.0, 1.0]
    assert all(math.isnan(v) for v in bs.interval([np.nan]))
    assert bs.ci_name(0.95) == "ci95" and bs.ci_name(0.9) == "ci90"


# ------------------------------------------------------------------------------ coverage

FAR = 0.05
MU, PERSON_SD, IMPOSTOR_PERSON_SD = 2.0, 0.8, 0.5


def truth_tar() -> float:
    """TAR at FAR of the population below: impostor scores N(0, 2·0.5² + 1), genuine N(2, 0.8² + 1)."""
    normal = NormalDist()
    threshold = math.sqrt(2 * IMPOSTOR_PERSON_SD ** 2 + 1) * normal.inv_cdf(1 - FAR)
    return 1 - normal.cdf((threshold - MU) / math.sqrt(PERSON_SD ** 2 + 1))


def simulated_set(rng, people=60, per_person=6):
    """Every person with `per_person` genuine pairs sharing the person's effect, every pair of
    people once as an impostor pair with both people's effects: pairs are not independent."""
    u, v = rng.normal(0, PERSON_SD, people), rng.normal(0, IMPOSTOR_PERSON_SD, people)
    person = np.repeat(np.arange(people), per_person)
    p, q = np.triu_indices(people, 1)
    a, b = np.r_[person, p], np.r_[person, q]
    same = a == b
    scores = np.where(same, MU + u[a], v[a] + v[b]) + rng.normal(size=a.size)
    return scores, same, a, b


def test_people_intervals_cover_at_about_the_nominal_rate_and_pairs_intervals_do_not():
    """150 simulated test sets of 60 people: the people-resampled 95 % interval of TAR@FAR=0.05
    holds the population value about 95 % of the time; resampling pairs as if they were
    independent gives intervals that are too narrow here (the reason the extended LFW set
    resamples people)."""
    truth = truth_tar()
    rng = np.random.default_rng(0)
    hits_people = hits_pairs = 0
    sims = 150
    for k in range(sims):
        scores, same, a, b = simulated_set(rng)
        m = bs.people_resamples(60, 200, seed=k)
        low, high = bs.interval(bs.tar_at_far_people(scores, same, a, b, FAR, m))
        hits_people += low <= truth <= high
        w = bs.pair_resamples(same.astype(int), 200, seed=k)
        low, high = bs.interval(bs.tar_at_far_weighted(scores[same], w[:, same], scores[~same], w[:, ~same], FAR))
        hits_pairs += low <= truth <= high
    assert 0.89 <= hits_people / sims <= 0.99, hits_people / sims
    assert hits_pairs / sims < 0.85, hits_pairs / sims


def test_pair_intervals_cover_independent_pairs():
    """With independent pairs (the official pairs' case), the fold × kind pair resampling of the
    10-fold accuracy covers the accuracy of the best threshold, Φ(μ/2) for N(μ, 1) against N(0, 1)."""
    mu = 1.5
    truth = NormalDist().cdf(mu / 2)
    rng = np.random.default_rng(1)
    hits, sims, n = 0, 100, 400
    folds = np.arange(n) % 10
    same = (np.arange(n) // 10) % 2 == 0
    for k in range(sims):
        scores = rng.normal(size=n) + mu * same
        w = bs.pair_resamples(folds * 2 + same, 200, seed=k)
        low, high = bs.interval(bs.kfold_accuracy_weighted(scores, same, folds, w))
        hits += low <= truth <= high
    assert hits / sims >= 0.88, hits / sims


def test_paired_difference():
    """Two methods on one test set: B's scores plus a gain that varies by person (A is better for
    some people than for others); each of three seeds adds its own pair-level noise. The paired
    interval covers the true difference at least at the nominal rate (the people resampling errs
    wide on pair-level noise: docs/lfw.md), and is narrower than the two methods' intervals side
    by side; identical methods differ by exactly 0."""
    normal = NormalDist()
    gain, gain_sd, seed_sd, seeds = 0.3, 0.3, 0.3, 3
    threshold = math.sqrt(2 * IMPOSTOR_PERSON_SD ** 2 + 1 + seed_sd ** 2) * normal.inv_cdf(1 - FAR)
    tar = lambda mean, var: 1 - normal.cdf((threshold - mean) / math.sqrt(var))  # noqa: E731
    base = PERSON_SD ** 2 + 1 + seed_sd ** 2
    truth = tar(MU + gain, base + gain_sd ** 2) - tar(MU, base)
    rng = np.random.default_rng(2)
    hits = narrower = 0
    sims = 60
    for k in range(sims):
        scores, same, a, b = simulated_set(rng)
        shift = np.where(same, gain + rng.normal(0, gain_sd, 60)[a], 0.0)
        m = bs.people_resamples(60, 200, seed=k)
        points, reps = {}, {}
        for method, plus in (("A", shift), ("B", 0.0)):
            runs = [scores + plus + seed_sd * rng.normal(size=scores.size) for _ in range(seeds)]
            points[method] = [V.tar_at_far(s, same, FAR) for s in runs]
            reps[method] = np.stack([bs.tar_at_far_people(s, same, a, b, FAR, m) for s in runs])
        diff = bs.paired_difference(points["A"], points["B"], reps["A"], reps["B"], seed=k)
        hits += diff["ci95"][0] <= truth <= diff["ci95"][1]
        side_by_side = [np.subtract(*bs.interval(reps[x].mean(axis=0))[::-1]) for x in ("A", "B")]
        narrower += diff["ci95"][1] - diff["ci95"][0] < math.hypot(*side_by_side)
    assert hits / sims >= 0.9, hits / sims
    assert narrower / sims > 0.9, narrower / sims
    same_method = bs.paired_difference([0.5, 0.6], [0.5, 0.6], np.ones((2, 9)), np.ones((2, 9)))
    assert same_method["mean"] == 0.0 and same_method["ci95"] == [0.0, 0.0]
    with pytest.raises(ValueError, match=r"points must be \[S\] and replicates \[S, B\]"):
        bs.paired_difference([0.5], [0.5, 0.6], np.ones((2, 9)), np.ones((2, 9)))
