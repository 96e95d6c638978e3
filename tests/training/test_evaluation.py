"""ree.evaluation against hand-computed cases (each value below is worked out in a comment)."""
import math

import numpy as np
import pytest

from ree.evaluation import (
    Report,
    cmc,
    cmc_curve,
    cmc_table,
    erc,
    erc_table,
    identification,
    kfold_accuracy,
    markdown_table,
    probe_ranks,
    rejection_order,
    resolution_bins,
    roc,
    roc_auc,
    tar_at_far,
    threshold_at_fmr,
)
from ree.evaluation.quality import DEFAULT_REJECT, num_rejected
from ree.evaluation.verification import best_accuracy_threshold

# Verification case: genuine 0.9 0.8 0.6 0.4, impostor 0.7 0.5 0.3 0.2 0.1 (interleaved order).
V_SCORES = np.array([0.7, 0.9, 0.5, 0.8, 0.3, 0.6, 0.2, 0.4, 0.1])
V_SAME = np.array([0, 1, 0, 1, 0, 1, 0, 1, 0], dtype=bool)


# ----------------------------------------------------------------------------- verification


def test_roc_points_by_hand():
    fpr, tpr, thresholds = roc(V_SCORES, V_SAME)
    # Lowering the threshold through 0.9 0.8 | 0.7 | 0.6 | 0.5 | 0.4 | 0.3 0.2 0.1.
    np.testing.assert_allclose(fpr, [0, 0, 0, 0.2, 0.2, 0.4, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(tpr, [0, 0.25, 0.5, 0.5, 0.75, 0.75, 1, 1, 1, 1])
    np.testing.assert_allclose(thresholds, [np.inf, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])


def test_roc_tied_scores_move_together():
    # A genuine and an impostor pair both at 0.5: one point, moving up and right at once.
    fpr, tpr, thresholds = roc([0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])
    np.testing.assert_allclose(thresholds, [np.inf, 0.9, 0.5, 0.1])


@pytest.mark.parametrize(
    "far, tar",
    [
        (0.0, 0.5),  # FPR 0: the lowest threshold keeping it accepts 0.9 and 0.8
        (0.1, 0.5),  # FPR 0 and 0.2 are equally near: the lower FPR
        (0.2, 0.75),  # FPR 0.2: the upper point (threshold 0.6), not (0.2, 0.5)
        (0.25, 0.75),
        (0.35, 1.0),  # nearest FPR 0.4
        (1.0, 1.0),
    ],
)
def test_tar_at_far_by_hand(far, tar):
    assert tar_at_far(V_SCORES, V_SAME, far) == pytest.approx(tar)


def test_tar_at_far_is_the_upper_roc_point_at_the_nearest_fpr():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 30, 400) / 30.0  # many ties
    same = rng.random(400) < 0.4
    fpr, tpr, _ = roc(scores, same)
    for far in (1e-3, 0.01, 0.05, 0.1, 0.33, 0.5):
        distance = np.abs(fpr - far)
        nearest = fpr[distance <= distance.min() + 1e-12].min()
        assert tar_at_far(scores, same, far) == pytest.approx(tpr[fpr == nearest].max())


def test_threshold_at_fmr_with_tied_impostors():
    impostors = np.array([0.1, 0.5, 0.5, 0.5, 0.9])
    # Achievable FMRs: 0 (above 0.9), 0.2 (above 0.5), 0.8 (above 0.1), 1 (everything).
    assert threshold_at_fmr(impostors, 0.45) == (pytest.approx(0.5), 0.2)
    threshold, achieved = threshold_at_fmr(impostors, 0.6)
    assert achieved == 0.8 and 0.1 < threshold <= np.nextafter(0.1, 1)
    assert threshold_at_fmr(impostors, 1.0) == (-np.inf, 1.0)
    threshold, achieved = threshold_at_fmr(impostors, 1e-4)
    assert achieved == 0.0 and threshold > 0.9  # a genuine score of exactly 0.9 is rejected


def test_verification_rejects_bad_input():
    with pytest.raises(ValueError, match="same"):
        roc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="same"):
        roc([0.1, 0.2, 0.3], [1, 0])
    with pytest.raises(ValueError, match="scores"):
        roc([0.1, np.nan], [1, 0])
    with pytest.raises(TypeError, match="same"):
        roc([0.1, 0.2], [0.5, 1.0])
    with pytest.raises(ValueError, match="far"):
        tar_at_far(V_SCORES, V_SAME, 1.5)
    with pytest.raises(ValueError, match="folds"):
        kfold_accuracy(V_SCORES, V_SAME, folds=1)
    with pytest.raises(ValueError, match="folds"):
        kfold_accuracy(V_SCORES, V_SAME, folds=10)


def test_kfold_accuracy_separable_is_one():
    rng = np.random.default_rng(0)
    same = rng.random(300) < 0.5
    scores = np.where(same, rng.uniform(0.4, 1.0, 300), rng.uniform(-1.0, 0.3, 300))
    assert kfold_accuracy(scores, same) == (1.0, 0.0)


def test_kfold_accuracy_threshold_comes_from_the_other_folds():
    # Fold A (first half): genuine 0.6 0.8, impostor 0.2 0.3. Fold B: genuine 0.4 0.9, impostor
    # 0.1 0.5. Trained on A the threshold is 0.45 (4/4 right); on B it scores 0.1 right, 0.4
    # wrong, 0.5 wrong, 0.9 right: 0.5. Trained on B the best thresholds are 0.25 and 0.7 (3/4);
    # either gets 3 of A's 4 pairs right: 0.75. Mean 0.625, population std 0.125.
    scores = [0.6, 0.8, 0.2, 0.3, 0.4, 0.9, 0.1, 0.5]
    same = [1, 1, 0, 0, 1, 1, 0, 0]
    mean, std = kfold_accuracy(scores, same, folds=2)
    assert mean == pytest.approx(0.625) and std == pytest.approx(0.125)


def test_best_accuracy_threshold_takes_the_middle_of_equal_bests():
    # 0.1 I, 0.4 G, 0.5 I, 0.9 G: cuts 0.25 and 0.7 both get 3 of 4 right: the upper middle.
    scores, same = np.array([0.4, 0.9, 0.1, 0.5]), np.array([1, 1, 0, 0], dtype=bool)
    assert best_accuracy_threshold(scores, same) == pytest.approx(0.7)
    # 0.2 G, 0.4 I, 0.6 G, 0.8 I: -inf (accept all), 0.5 and +inf (accept none) get 2 of 4,
    # 0.3 and 0.7 only 1: the middle of the three is 0.5.
    scores, same = np.array([0.2, 0.6, 0.4, 0.8]), np.array([1, 1, 0, 0], dtype=bool)
    assert best_accuracy_threshold(scores, same) == pytest.approx(0.5)


def test_kfold_accuracy_ten_folds_with_outliers():
    # 10 folds of 10 pairs: genuine at 0.9, impostor at 0.1, and in folds 2, 5 and 7 one genuine
    # pair at 0.05. Every training split picks a threshold between 0.1 and 0.9, so those three
    # folds score 0.9 and the others 1: mean 0.97, std sqrt((3 * 0.07^2 + 7 * 0.03^2) / 10).
    same = np.tile([1, 0], 50).astype(bool)
    scores = np.where(same, 0.9, 0.1)
    scores[[20, 50, 70]] = 0.05
    mean, std = kfold_accuracy(scores, same)
    assert mean == pytest.approx(0.97)
    assert std == pytest.approx(math.sqrt((3 * 0.07**2 + 7 * 0.03**2) / 10))


# ----------------------------------------------------------------------------- identification


def _at(degrees):
    radians = np.deg2rad(np.asarray(degrees, dtype=float))
    return np.stack([np.cos(radians), np.sin(radians)], axis=1)


# Gallery on the unit circle: identity 0 at 0°, 1 at 90°, 2 at 180°, distractors at 10°, 20°, 95°.
GALLERY = _at([0, 90, 180, 10, 20, 95]) * np.array([[1], [2], [3], [1], [1], [5]])  # norms don't matter
GALLERY_LABELS = np.array([0, 1, 2, -100, -100, -100])
# Probes: label 0 at 14° (closer: 10°, 20° -> rank 3), label 1 at 90° (rank 1), label 2 at 180°
# (rank 1), label 1 at 40° (closer than 90°'s 50°: 20°, 10°, 0° -> rank 4).
PROBES = _at([14, 90, 180, 40])
PROBE_LABELS = np.array([0, 1, 2, 1])


def test_cmc_with_distractors_by_hand():
    np.testing.assert_array_equal(probe_ranks(PROBES, PROBE_LABELS, GALLERY, GALLERY_LABELS), [3, 1, 1, 4])
    assert cmc(PROBES, PROBE_LABELS, GALLERY, GALLERY_LABELS, ranks=(1, 3, 5)) == {1: 0.5, 3: 0.75, 5: 1.0}
    np.testing.assert_allclose(cmc_curve(PROBES, PROBE_LABELS, GALLERY, GALLERY_LABELS, max_rank=5),
                               [0.5, 0.5, 0.75, 1.0, 1.0])
    # Without the distractors only the identity at 0° outranks probe 4: ranks 1 1 1 2.
    real = GALLERY_LABELS != -100
    assert cmc(PROBES, PROBE_LABELS, GALLERY[real], GALLERY_LABELS[real], ranks=(1, 5)) == {1: 0.75, 5: 1.0}


def test_cmc_best_mate_counts_and_ties_are_pessimistic():
    # Two gallery entries of identity 0 (at 80° and 5°): the nearer one decides, rank 1.
    assert probe_ranks(_at([0]), [0], _at([80, 5, 30]), [0, 0, -100]).tolist() == [1]
    # A distractor exactly as similar as the mate ranks above it, in either gallery order.
    probe = np.array([[1.0, 0.0]])
    for gallery, labels in (([[1, 1], [1, -1]], [0, -100]), ([[1, -1], [1, 1]], [-100, 0])):
        assert probe_ranks(probe, [0], np.array(gallery, float), labels).tolist() == [2]
    # A collapsed model (identical embeddings) ranks every probe last.
    flat = np.ones((3, 4))
    assert probe_ranks(flat, [0, 1, 2], flat, [0, 1, 2]).tolist() == [3, 3, 3]


def test_cmc_in_blocks_matches_one_block(monkeypatch):
    rng = np.random.default_rng(3)
    gallery, gallery_labels = rng.normal(size=(40, 8)), np.r_[np.arange(30), np.full(10, -100)]
    probe_labels = rng.integers(0, 30, 50)
    probes = gallery[probe_labels] + rng.normal(scale=1.0, size=(50, 8))
    whole = probe_ranks(probes, probe_labels, gallery, gallery_labels)
    monkeypatch.setattr(identification, "_PROBE_BLOCK", 7)
    np.testing.assert_array_equal(probe_ranks(probes, probe_labels, gallery, gallery_labels), whole)
    assert whole.min() >= 1 and whole.max() > 1


def test_cmc_rejects_bad_input():
    with pytest.raises(ValueError, match="probe_labels"):
        cmc(PROBES, [0, 1, 2, 7], GALLERY, GALLERY_LABELS)  # identity 7 has no mate
    with pytest.raises(ValueError, match="probe_labels"):
        cmc(PROBES, [0, 1, 2, -100], GALLERY, GALLERY_LABELS)
    with pytest.raises(ValueError, match="dimension"):
        cmc(PROBES, PROBE_LABELS, np.ones((6, 3)), GALLERY_LABELS)
    with pytest.raises(TypeError, match="gallery_labels"):
        cmc(PROBES, PROBE_LABELS, GALLERY, GALLERY_LABELS.astype(float))
    with pytest.raises(ValueError, match="ranks"):
        cmc(PROBES, PROBE_LABELS, GALLERY, GALLERY_LABELS, ranks=(0, 1))
    with pytest.raises(ValueError, match="gallery_emb"):
        cmc(PROBES, PROBE_LABELS, np.full((6, 2), np.inf), GALLERY_LABELS)


# ----------------------------------------------------------------------------- quality: ERC

# Ten pairs. Impostors 0.1 0.2 0.3 0.4 0.9, genuine 0.35 0.5 0.6 0.7 0.8. Rejection order
# (quality): impostor 0.9, genuine 0.35, impostors 0.1, 0.2, 0.3, 0.4, then the other genuine.
E_SCORES = np.array([0.1, 0.2, 0.3, 0.4, 0.9, 0.35, 0.5, 0.6, 0.7, 0.8])
E_SAME = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1], dtype=bool)
E_QUALITY = np.array([0.5, 0.6, 0.7, 0.8, 0.0, 0.1, 0.9, 0.95, 0.96, 0.97])
E_GRID = [0, 0.1, 0.2, 0.3, 0.5]


def _erc(mode, grid=E_GRID, **kwargs):
    # quality_b is higher everywhere, so the pair quality is quality_a: the min of the two.
    return erc(E_SCORES, E_SAME, E_QUALITY, E_QUALITY + 1, fmrs=(0.01, 0.2), threshold_mode=mode,
               reject=grid, **kwargs)


def test_erc_fixed_threshold_by_hand():
    result = _erc("fixed")
    # FMR 0.01 of 5 impostors: nearest achievable 0, threshold above 0.9: every genuine fails.
    np.testing.assert_allclose(result.fnmr[0.01], [1, 1, 1, 1, 1])
    # FMR 0.2: threshold just above 0.4; only genuine 0.35 fails, until it is rejected (2nd).
    np.testing.assert_allclose(result.fnmr[0.2], [0.2, 0.2, 0, 0, 0])
    assert result.auc[0.01] == pytest.approx(0.5) and result.pauc[0.01] == pytest.approx(0.2)
    # 0.1 * (0.2 + 0.2) / 2 + 0.1 * (0.2 + 0) / 2 = 0.03, all of it before 0.2.
    assert result.auc[0.2] == pytest.approx(0.03) and result.pauc[0.2] == pytest.approx(0.03)
    # The fixed threshold lets the kept set's FMR drift: impostor 0.9 leaves at the first step.
    np.testing.assert_allclose(result.fmr_actual[0.2], [0.2, 0, 0, 0, 0])
    assert np.all(result.threshold[0.2] == result.threshold[0.2][0])


def test_erc_recomputed_threshold_by_hand():
    # The same pair qualities, half of them coming from each image: the pair takes the lower
    # (the higher one, 2 - quality, would reverse the order).
    quality_a, quality_b = 2 - E_QUALITY, 2 - E_QUALITY
    quality_a[::2], quality_b[1::2] = E_QUALITY[::2], E_QUALITY[1::2]
    result = erc(E_SCORES, E_SAME, quality_a, quality_b, fmrs=(0.01, 0.2), reject=E_GRID)
    assert result.threshold_mode == "recompute"
    # FMR 0.01: the threshold follows the highest kept impostor: 0.9, then 0.4 once 0.9 is
    # rejected (genuine 0.35 fails: 1/5), then nothing fails once 0.35 is rejected too.
    np.testing.assert_allclose(result.fnmr[0.01], [1, 0.2, 0, 0, 0])
    # 0.1 * (1 + 0.2) / 2 + 0.1 * (0.2 + 0) / 2 = 0.07
    assert result.auc[0.01] == pytest.approx(0.07) and result.pauc[0.01] == pytest.approx(0.07)
    # FMR 0.2: all 5 impostors: above 0.4 (FNMR 0.2); 4 left: nearest count 0.8 -> 1, above 0.3
    # (FMR 0.25, FNMR 0); 3 left (0.2 0.3 0.4): above 0.3 (1/3); 1 left (0.4): above 0.4 (0).
    np.testing.assert_allclose(result.fnmr[0.2], [0.2, 0, 0, 0, 0])
    np.testing.assert_allclose(result.fmr_actual[0.2], [0.2, 0.25, 0.25, 1 / 3, 0])
    assert result.auc[0.2] == pytest.approx(0.01)


def test_erc_pauc_interpolates_between_grid_points():
    # Grid 0 0.1 0.3 0.5, fixed at FMR 0.2: FNMR 0.2 0.2 0 0. Up to 0.2 the curve goes from 0.2
    # (at 0.1) to 0.1 (at 0.2, halfway to 0): 0.1 * 0.2 + 0.1 * (0.2 + 0.1) / 2 = 0.035.
    # Whole curve: 0.1 * 0.2 + 0.2 * (0.2 + 0) / 2 + 0 = 0.04.
    result = _erc("fixed", grid=[0, 0.1, 0.3, 0.5])
    assert result.pauc[0.2] == pytest.approx(0.035) and result.auc[0.2] == pytest.approx(0.04)


def test_erc_records_its_settings():
    result = erc(E_SCORES, E_SAME, E_QUALITY, E_QUALITY, threshold_mode="fixed")
    assert result.threshold_mode == "fixed" and result.fmrs == (1e-2, 1e-3, 1e-4)
    assert result.reject_range == (0.0, 0.95) and result.reject.size == 20 and result.pauc_limit == 0.2
    assert result.num_pairs == 10 and set(result.fnmr) == set(result.auc) == set(result.pauc) == set(result.fmrs)
    np.testing.assert_allclose(np.diff(result.reject), 0.05)


def test_default_grid_rejects_whole_multiples():
    for num_pairs in (20, 40, 90, 100, 180, 300, 1000):  # 0.7 * 90 is 62.99999999999999
        counts = [num_rejected(r, num_pairs) for r in DEFAULT_REJECT]
        assert counts == [k * num_pairs // 20 for k in range(20)]  # exact: floor(k / 20 * N)
    assert num_rejected(0.15, 10) == 1  # floor(1.5)


def test_erc_perfectly_informative_quality():
    # 20 pairs: 10 impostors in 0..0.45, genuine 0.6..0.95 except two at 0.05 and 0.1, which have
    # the lowest quality. FMR 0.01 of 10 impostors -> 0, threshold above 0.45 in both modes
    # (impostors outrank every genuine pair in quality, so up to reject 0.45 none is rejected).
    # Two fail of 10, one of 9, then none.
    impostor = np.arange(10) * 0.05
    genuine = np.r_[0.05, 0.1, 0.6 + np.arange(8) * 0.05]
    scores, same = np.r_[impostor, genuine], np.r_[np.zeros(10, bool), np.ones(10, bool)]
    quality = np.r_[np.full(10, 0.9), 0.1, 0.2, np.full(8, 0.8)]
    grid = np.round(np.arange(0, 0.451, 0.05), 2)
    for mode in ("fixed", "recompute"):
        result = erc(scores, same, quality, quality, fmrs=(0.01,), threshold_mode=mode, reject=grid)
        expected = np.r_[0.2, 1 / 9, np.zeros(8)]
        np.testing.assert_allclose(result.fnmr[0.01], expected)
        assert result.auc[0.01] == pytest.approx(0.05 * (0.2 + 1 / 9) / 2 + 0.05 * (1 / 9) / 2)


@pytest.mark.parametrize("mode", ["fixed", "recompute"])
def test_erc_random_quality_is_flat_but_informative_quality_drops(mode):
    rng = np.random.default_rng(0)
    n = 500
    scores = np.r_[rng.normal(0.5, 0.2, n), rng.normal(0.0, 0.2, n)]
    same = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    grid = np.round(np.arange(0, 0.81, 0.05), 2)
    curves = []
    for _ in range(100):
        quality = rng.random(2 * n)
        curves.append(erc(scores, same, quality, quality, fmrs=(0.1,), threshold_mode=mode, reject=grid).fnmr[0.1])
    mean = np.mean(curves, axis=0)
    assert mean[0] > 0.05
    np.testing.assert_allclose(mean, mean[0], atol=0.02)  # flat in expectation
    # An oracle quality: the genuine score, impostors above every genuine pair. The pairs that
    # fail (about 4% of all) go first, the impostors stay until half the pairs are gone, so
    # from reject 0.05 to 0.45 nothing fails in either mode.
    oracle = np.where(same, scores, 10.0)
    informed = erc(scores, same, oracle, oracle, fmrs=(0.1,), threshold_mode=mode, reject=grid).fnmr[0.1]
    assert informed[0] == pytest.approx(mean[0])
    np.testing.assert_array_equal(informed[(grid >= 0.05) & (grid <= 0.45)], 0)


def test_rejection_order_ties():
    quality = np.r_[np.full(50, 1.0), np.full(50, 0.0), np.full(50, 2.0)]
    order = rejection_order(quality)
    # Strictly lower quality always leaves first...
    np.testing.assert_array_equal(quality[order], np.sort(quality))
    # ...ties leave in a fixed shuffled order, not the pair order (which may be genuine first)...
    assert not np.array_equal(order[:50], np.arange(50, 100))
    np.testing.assert_array_equal(rejection_order(quality), order)  # ...deterministically
    assert not np.array_equal(rejection_order(quality, tie_seed=1), order)
    # Without ties the seed does not matter.
    distinct = np.random.default_rng(0).permutation(150).astype(float)
    np.testing.assert_array_equal(rejection_order(distinct, tie_seed=5), np.argsort(distinct))


def test_erc_ties_do_not_follow_pair_order():
    # All qualities equal, pairs listed genuine first. A stable sort would reject the 50 genuine
    # pairs at reject 0.5 and leave no FNMR; the shuffled tie order keeps both kinds.
    scores = np.r_[np.linspace(0.3, 1, 50), np.linspace(-1, 0.5, 50)]
    same = np.r_[np.ones(50, bool), np.zeros(50, bool)]
    quality = np.ones(100)
    result = erc(scores, same, quality, quality, fmrs=(0.1,), threshold_mode="fixed", reject=[0, 0.5, 0.9])
    assert np.all(np.isfinite(result.fnmr[0.1]))
    again = erc(scores, same, quality, quality, fmrs=(0.1,), threshold_mode="fixed", reject=[0, 0.5, 0.9])
    np.testing.assert_array_equal(again.fnmr[0.1], result.fnmr[0.1])


def test_erc_kept_set_without_impostors_or_genuine_is_nan():
    # The 5 impostors have the lowest quality: from reject 0.5 on, only genuine pairs are kept.
    quality = np.r_[np.arange(5) * 0.1, 1 + np.arange(5) * 0.1]
    grid = [0, 0.2, 0.5, 0.6]
    recompute = erc(E_SCORES, E_SAME, quality, quality, fmrs=(0.2,), reject=grid)
    assert np.all(np.isfinite(recompute.fnmr[0.2][:2])) and np.all(np.isnan(recompute.fnmr[0.2][2:]))
    assert math.isnan(recompute.auc[0.2]) and not math.isnan(recompute.pauc[0.2])
    fixed = erc(E_SCORES, E_SAME, quality, quality, fmrs=(0.2,), threshold_mode="fixed", reject=grid)
    # Fixed threshold just above 0.4: genuine 0.35 fails (1/5), then 0.35 goes first at 0.6.
    np.testing.assert_allclose(fixed.fnmr[0.2], [0.2, 0.2, 0.2, 0])
    assert np.isnan(fixed.fmr_actual[0.2][2])
    # Genuine pairs lowest: no genuine kept from 0.5 on, NaN in both modes.
    for mode in ("fixed", "recompute"):
        nan_fnmr = erc(E_SCORES, ~E_SAME, quality, quality, fmrs=(0.2,), threshold_mode=mode, reject=grid)
        assert np.all(np.isnan(nan_fnmr.fnmr[0.2][2:])) and math.isnan(nan_fnmr.auc[0.2])


def test_erc_rejects_bad_input():
    def call(**kwargs):
        arguments = dict(scores=E_SCORES, same=E_SAME, quality_a=E_QUALITY, quality_b=E_QUALITY)
        arguments.update(kwargs)
        return erc(**arguments)

    for kwargs, match in [
        (dict(same=np.ones(10, bool)), "same"),
        (dict(threshold_mode="median"), "threshold_mode"),
        (dict(reject=[0, 0.2, 0.1]), "reject"),
        (dict(reject=[0, 1.0]), "reject"),
        (dict(reject=[0.3, 0.5]), "pauc_limit"),
        (dict(pauc_limit=0.99), "pauc_limit"),
        (dict(fmrs=(0.0,)), "fmrs"),
        (dict(fmrs=()), "fmrs"),
        (dict(quality_a=E_QUALITY[:9]), "quality_a"),
        (dict(quality_b=np.r_[E_QUALITY[:9], np.nan]), "quality_b"),
    ]:
        with pytest.raises(ValueError, match=match):
            call(**kwargs)
    with pytest.raises(TypeError, match="tie_seed"):
        call(tie_seed=0.5)


# ----------------------------------------------------------------------------- quality: ranking AUC


def test_roc_auc_by_hand():
    assert roc_auc(np.full(7, 3.0), [1, 0, 1, 0, 1, 0, 0]) == 0.5
    assert roc_auc([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0]) == 1.0
    assert roc_auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    # Positives 1 2 2, negatives 2 0: pairs (1,2) 0, (1,0) 1, (2,2) 1/2 twice, (2,0) 1 twice: 4/6.
    assert roc_auc([1, 2, 2, 2, 0], [1, 1, 1, 0, 0]) == pytest.approx(4 / 6)


def test_roc_auc_matches_pair_counting():
    rng = np.random.default_rng(2)
    scores = rng.integers(0, 5, 60).astype(float)
    positives = rng.random(60) < 0.3
    pos, neg = scores[positives][:, None], scores[~positives][None, :]
    expected = np.mean((pos > neg) + 0.5 * (pos == neg))
    assert roc_auc(scores, positives) == pytest.approx(expected)
    with pytest.raises(ValueError, match="positives"):
        roc_auc(scores, np.zeros(60, bool))


# ----------------------------------------------------------------------------- bins


def test_resolution_bins():
    bins = resolution_bins(np.array([8, 11, 12, 15, 16, 32]), [8, 12, 16, 17, 33])
    assert [name for name, _ in bins] == ["8-11 px", "12-15 px", "16 px", "17-32 px"]
    masks = np.array([mask for _, mask in bins])
    np.testing.assert_array_equal(masks.astype(int), [[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0],
                                                      [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1]])
    with pytest.raises(ValueError, match="resolutions"):
        resolution_bins([7, 8], [8, 12])
    with pytest.raises(ValueError, match="edges"):
        resolution_bins([8], [8, 8, 12])
    with pytest.raises(TypeError, match="resolutions"):
        resolution_bins([8.5], [8, 12])


# ----------------------------------------------------------------------------- plots and report


def _is_png(path):
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_write_pngs(tmp_path):
    from ree.evaluation import plots

    rng = np.random.default_rng(0)
    scores = np.r_[rng.normal(0.5, 0.2, 100), rng.normal(0, 0.2, 100)]
    same = np.r_[np.ones(100, bool), np.zeros(100, bool)]
    results = {name: erc(scores, same, q, q) for name, q in (("xi", scores * same), ("random", rng.random(200)))}
    assert _is_png(plots.plot_erc(results, None, tmp_path / "sub" / "erc_all.png"))  # one panel per FMR
    with pytest.raises(ValueError, match="fmr"):
        plots.plot_erc(results, 0.3, tmp_path / "bad.png")
    curves = {"REE": {1: 0.5, 5: 0.8, 20: 0.95}, "ArcFace": np.linspace(0.4, 0.9, 20)}
    assert _is_png(plots.plot_cmc(curves, tmp_path / "cmc.png"))
    resolutions = rng.integers(8, 33, 200)
    values = {"xi": resolutions / 32 + rng.normal(0, 0.1, 200), "norm": rng.random(200)}
    assert _is_png(plots.plot_ri_vs_resolution(resolutions, values, tmp_path / "ri.png", edges=[8, 12, 16, 24, 33]))
    assert _is_png(plots.plot_ri_vs_resolution(resolutions // 8, {"xi": values["xi"]}, tmp_path / "ri_each.png"))
    with pytest.raises(ValueError, match="values"):
        plots.plot_ri_vs_resolution(resolutions, {"xi": values["xi"][:10]}, tmp_path / "bad.png")


def test_markdown_table():
    table = markdown_table(["model", "acc", "note"], [["REE", 0.91234, "a|b"], ["ArcFace", float("nan"), None]])
    assert table == (
        "| model | acc | note |\n"
        "|:---|---:|:---|\n"
        "| REE | 0.9123 | a\\|b |\n"
        "| ArcFace | n/a | n/a |"
    )
    with pytest.raises(ValueError, match="rows"):
        markdown_table(["a", "b"], [[1]])


def test_erc_and_cmc_tables_and_report(tmp_path):
    results = {"xi": _erc("fixed"), "random": _erc("recompute")}
    table = erc_table(results)
    assert "0-0.5 (5 points, 10 pairs)" in table and "pAUC (up to 0.2)" in table
    assert "| xi | fixed | 0.5000 | 0.0300 | 0.2000 | 0.0300 |" in table
    assert "| random | recompute | 0.0700 | 0.0100 | 0.0700 | 0.0100 |" in table
    with pytest.raises(ValueError, match="grid"):
        erc_table({"a": _erc("fixed"), "b": _erc("fixed", grid=[0, 0.1, 0.3, 0.5])})
    expected = "| model | rank-1 | rank-5 |\n|:---|---:|---:|\n| REE | 0.5000 | 0.7500 |"
    assert cmc_table({"REE": {1: 0.5, 5: 0.75}}) == expected

    report = Report("demo")
    report.heading("Quality")
    report.text(table)
    report.image("erc.png", "ERC")
    path = report.write(tmp_path / "run" / "report.md")
    text = path.read_text()
    assert text.startswith("# demo\n\n## Quality\n\nERC over") and text.endswith("![ERC](erc.png)\n")
    assert [p.name for p in path.parent.iterdir()] == ["report.md"]  # no temporary file left
