"""The extended LFW-VLR verification set and its intervals (docs/lfw.md, "The extended set"):
its pairs on synthetic labels, on a synthetic tree and on the real DevTest (REE_LFW_DIR), the
scoring of embeddings through it, the paired differences and the summary.json writer."""
import hashlib
import math

import numpy as np
import pytest

from ree import evaluation as ev
from ree.data import lfw, lfw_splits
from ree.evaluation import bootstrap as bs
from ree.lfw import experiment, protocol, report, scoring
from test_lfw import real, write_tree  # noqa: F401 (the real-copy fixture)


def test_extended_pairs_on_synthetic_labels():
    counts = [9, 1, 2, 5, 1, 3]  # 36, 0, 1, 10, 0, 3 same-person pairs
    labels = np.repeat(np.arange(len(counts)), counts)
    ext = protocol.extended_pairs(labels, cap=6, impostor_min=40)
    same_person = labels[ext.a] == labels[ext.b]
    np.testing.assert_array_equal(ext.same, same_person)
    np.testing.assert_array_equal(ext.person_a, labels[ext.a])
    assert ext.genuine == 6 + 1 + 6 + 3  # capped at 6 for the 9- and 5-image people
    per_person = np.bincount(ext.person_a[ext.same], minlength=len(counts))
    assert per_person.tolist() == [6, 0, 1, 6, 0, 3]
    g = np.c_[ext.a, ext.b][ext.same]
    assert (g[:, 0] < g[:, 1]).all() and len(np.unique(g, axis=0)) == len(g)  # distinct images, no repeats
    # 15 couples of people, repeated 3 times to reach 40: each couple 3 times, each person 15 times.
    assert ext.impostors == 45
    couples = np.sort(np.c_[ext.person_a, ext.person_b][~ext.same], axis=1)
    _, times = np.unique(couples, axis=0, return_counts=True)
    assert len(times) == 15 and (times == 3).all()
    assert (np.bincount(couples.ravel()) == 15).all()
    assert (np.diff(ext.a) >= 0).all()  # listed by first image
    again = protocol.extended_pairs(labels, cap=6, impostor_min=40)
    assert np.array_equal(again.a, ext.a) and np.array_equal(again.b, ext.b)
    other = protocol.extended_pairs(labels, cap=6, impostor_min=40, seed=1)
    assert not (np.array_equal(other.a, ext.a) and np.array_equal(other.b, ext.b))
    assert ext.people() == 6
    few = protocol.extended_pairs(labels, cap=6, impostor_min=4, impostor_max=10)
    couples = np.sort(np.c_[few.person_a, few.person_b][~few.same], axis=1)
    assert few.impostors == 10 and len(np.unique(couples, axis=0)) == 10  # 10 of the 15 couples, once each


@pytest.mark.parametrize("labels, options, match", [
    (np.array([1, 0, 0]), {}, "must be sorted"),
    (np.array([0, 0, 2]), {}, "every person id"),
    (np.array([0, 1, 2]), {}, "a person with two images"),
    (np.array([0, 0]), {}, "two people"),
    (np.array([0.0, 1.0]), {}, "integer"),
    (np.array([0, 0, 1]), {"cap": 0}, "cap must be an int >= 1"),
    (np.array([0, 0, 1]), {"impostor_min": 5, "impostor_max": 4}, "must be at least impostor_min"),
])
def test_extended_pairs_refuse_bad_input(labels, options, match):
    with pytest.raises(ValueError, match=match):
        protocol.extended_pairs(labels, **options)


def synthetic_views(evalset, rng, dim=16):
    """Embeddings that get worse with the level: a person centre plus growing noise."""
    centres = rng.normal(size=(len(evalset.names), dim))
    noise = np.linspace(0.3, 2.0, len(evalset.levels))
    emb = np.stack([centres[evalset.labels] + s * rng.normal(size=(len(evalset.rows), dim)) for s in noise])
    return scoring.Views(emb, *(np.ones((len(evalset.levels), len(evalset.rows))),) * 4)


def test_extended_verification_on_a_small_tree(tmp_path):
    source = lfw.open_source(write_tree(tmp_path))
    crops = lfw.load_crops(source, 32)
    evalset = protocol.evaluation_set(crops, source, "test", 32, erc_pairs=6)
    ext = evalset.extended
    assert set(np.r_[ext.person_a, ext.person_b]) == set(range(len(evalset.names)))  # the test people only
    assert ext.genuine == 3 + 1 + 1 and ext.impostors >= protocol.IMPOSTOR_MIN
    assert protocol.evaluation_set(crops, source, "test", 32, erc_pairs=6, extended=False).extended is None
    view = synthetic_views(evalset, np.random.default_rng(0))
    unc = scoring.uncertainty(evalset, replicates=50)
    fields, reps = scoring.extended_verification(view, evalset, unc)
    assert set(fields["vlr"]) == {"HR", "24", "16", "12", "8"} and set(fields["cross"]) == {"24", "16", "12", "8"}
    e = view.embeddings / np.linalg.norm(view.embeddings, axis=-1, keepdims=True)
    for kind, first, k in (("vlr", 2, 2), ("cross", 0, 4)):
        name = "HR" if k == 0 else str(evalset.levels[k])
        brute = np.einsum("ij,ij->i", e[first, ext.a], e[k, ext.b])
        assert fields[kind][name]["tar_far_1e-3_ext"] == ev.tar_at_far(brute, ext.same, 1e-3)
        assert set(reps[kind][name]) == set(scoring.INTERVAL_METRICS)
        for metric in scoring.INTERVAL_METRICS:
            low, high = fields[kind][name][f"{metric}_ci95"]
            assert low <= high and reps[kind][name][metric].shape == (50,)
    assert not set(fields["vlr"]["HR"]) & {"acc", "tar@0.01", "tar@0.001"}  # additions, never replacements
    with pytest.raises(ValueError, match="no extended pairs"):
        scoring.uncertainty(protocol.evaluation_set(crops, source, "test", 32, erc_pairs=6, extended=False))


def test_pair_cosines_are_the_gathered_ones():
    rng = np.random.default_rng(3)
    first, second = rng.normal(size=(50, 8)), rng.normal(size=(50, 8))
    a, b = np.sort(rng.integers(0, 50, 400)), rng.integers(0, 50, 400)
    np.testing.assert_allclose(scoring.pair_cosines(first, second, a, b, block=7),
                               np.einsum("ij,ij->i", first[a], second[b]), atol=1e-12)


def fake_seed(rng, models=("REE", "ArcFace")):
    rec = {}
    for name in models:
        rec[name] = {"vlr": {lv: {"acc": rng.random(), "tar@0.01": rng.random(), "tar_far_1e-3_ext": rng.random()}
                             for lv in report.LEVELS},
                     "cross": {lv: {"acc": rng.random(), "tar@0.01": rng.random(), "tar_far_1e-3_ext": rng.random()}
                               for lv in report.LEVELS[1:]}}
    scores = ["ξ̂", "CR-FIQA", "SER-FIQ", "ERS", "norm (REE)", "norm (ArcFace)", "resolution", "random"]
    erc = {name: {"recompute": {q: {"auc": {"0.01": rng.random(), "0.001": rng.random()}} for q in scores}}
           for name in models}
    spearman = {name: {q: rng.random() for q in scores if q != "random"} for name in models}
    return {"recognition": rec, "erc": erc, "spearman": spearman}


def test_summary_json_has_the_issue_shape():
    rng = np.random.default_rng(4)
    per_seed = [fake_seed(rng) for _ in range(3)]
    out = report.summary_json(per_seed, methods={"REE": "ree-ft", "ArcFace": "arcface-ft"}, judge="ArcFace")
    assert set(out) == {"verification", "quality"}
    assert set(out["verification"]) == {"ree-ft", "arcface-ft"}
    ree = out["verification"]["ree-ft"]
    assert set(ree) == {"vlr-vlr", "hr-vlr"}
    assert set(ree["vlr-vlr"]) == {"HR", "24", "16", "12", "8"} and set(ree["hr-vlr"]) == {"24", "16", "12", "8"}
    values = [s["recognition"]["REE"]["cross"]["12"]["acc"] for s in per_seed]
    assert ree["hr-vlr"]["12"]["acc10"] == pytest.approx([np.mean(values), np.std(values, ddof=1)])
    values = [s["recognition"]["REE"]["vlr"]["8"]["tar_far_1e-3_ext"] for s in per_seed]
    assert ree["vlr-vlr"]["8"]["tar_far_1e-3_ext"] == pytest.approx([np.mean(values), np.std(values, ddof=1)])
    assert set(out["quality"]) == {"xi_hat", "cr_fiqa", "ser_fiq", "ers", "norm(ree-ft)", "norm(arcface-ft)"}
    values = [s["erc"]["ArcFace"]["recompute"]["ξ̂"]["auc"]["0.01"] for s in per_seed]
    assert out["quality"]["xi_hat"]["erc_auc"] == pytest.approx([np.mean(values), np.std(values, ddof=1)])
    values = [s["spearman"]["ArcFace"]["norm (REE)"] for s in per_seed]
    assert out["quality"]["norm(ree-ft)"]["spearman_px"] == pytest.approx([np.mean(values), np.std(values, ddof=1)])
    one = report.summary_json(per_seed[:1])
    assert one["verification"]["REE"]["vlr-vlr"]["HR"]["acc10"][1] is None  # no std from one seed
    with pytest.raises(ValueError, match="asked for"):
        report.summary_json(per_seed, methods={"SFace": "sface-off-the-shelf"})
    with pytest.raises(ValueError, match="not among"):
        report.summary_json(per_seed, scores=["MagFace"])
    with pytest.raises(ValueError, match="per_seed is empty"):
        report.summary_json([])


def test_interval_table_cells():
    rng = np.random.default_rng(6)
    per_seed = [fake_seed(rng, models=("REE",)) for _ in range(2)]
    for seed, bounds in zip(per_seed, ([0.1, 0.3], [0.2, 0.5])):
        seed["recognition"]["REE"]["vlr"]["8"]["tar_far_1e-3_ext"] = 0.2 + bounds[0]
        seed["recognition"]["REE"]["vlr"]["8"]["tar_far_1e-3_ext_ci95"] = bounds
    headers, rows = report.interval_table({"per_seed": per_seed}, "tar_far_1e-3_ext")
    assert headers[-1] == "8 px" and rows[0][:2] == ["REE", "VLR–VLR"]
    assert rows[0][-1] == f"0.350 ± {np.std([0.3, 0.4], ddof=1):.3f} [0.150, 0.400]"
    assert "[" not in rows[0][2] and rows[1][2] == "—"  # no interval stored; HR–VLR has no HR


def test_differences_pair_the_replicates():
    rng = np.random.default_rng(5)
    per_seed = [fake_seed(rng) for _ in range(2)]
    for seed in per_seed:  # REE 0.05 above ArcFace in every seed: the seeds' redraw cannot move the difference
        seed["recognition"]["REE"]["vlr"]["8"]["tar_far_1e-3_ext"] = \
            seed["recognition"]["ArcFace"]["vlr"]["8"]["tar_far_1e-3_ext"] + 0.05
    replicates = []
    for seed in per_seed:
        reps = {}
        for name in ("REE", "ArcFace"):
            reps[name] = {kind: {lv: {m: np.full(20, v) + (0.1 if name == "REE" else 0.0) * np.arange(20)
                                      for m, v in metrics.items()}
                                 for lv, metrics in levels.items()}
                          for kind, levels in seed["recognition"][name].items()}
        replicates.append(reps)
    out = experiment.differences(per_seed, replicates)
    assert set(out) == {"REE − ArcFace"}  # CR-FIQA did not run
    d = out["REE − ArcFace"]["vlr"]["8"]["tar_far_1e-3_ext"]
    assert d["mean"] == pytest.approx(0.05)
    assert d["ci95"] == pytest.approx(bs.interval(0.05 + 0.1 * np.arange(20)))
    other = out["REE − ArcFace"]["cross"]["12"]["acc"]
    points = [[s["recognition"][m]["cross"]["12"]["acc"] for s in per_seed] for m in ("REE", "ArcFace")]
    assert other["mean"] == pytest.approx(np.mean(points[0]) - np.mean(points[1]))
    headers, rows = report.difference_table({"differences": out}, "tar_far_1e-3_ext")
    assert rows[0][:2] == ["REE − ArcFace", "VLR–VLR"] and rows[1][2] == "—"


# ------------------------------------------------------------------------- the real copy

def test_real_extended_devtest(real):  # noqa: F811
    source, crops = real
    evalset = protocol.evaluation_set(crops, source, "test", 32)
    ext = evalset.extended
    assert (ext.genuine, ext.impostors, ext.people()) == (2552, 463203, 963)
    assert np.unique(ext.person_a[ext.same]).size == 418  # the DevTest people with two images or more
    assert np.bincount(ext.person_a[ext.same]).max() == protocol.GENUINE_CAP
    # The draw is fixed: any change to it (seed, cap, order) changes this digest and fails here.
    digest = hashlib.sha256(np.r_[ext.a, ext.b].astype("<i8").tobytes()).hexdigest()
    assert digest == "3f51f3d1f9132ff0ff32603078fdadc4ede2c6c98559c458bed343d57ed6a4cd"
    names = np.asarray(evalset.names)
    used = set(names[np.r_[ext.person_a, ext.person_b]])
    test = lfw_splits.people(crops, source, "test")
    assert used == set(test.held_out) and not used & set(test.train)
    assert math.ceil(1e-3 * ext.impostors) >= 200  # FAR 1e-3 rests on 200 false accepts or more
