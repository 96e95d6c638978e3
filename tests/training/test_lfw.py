"""The LFW reader and the LFW-VLR protocol: every layout users have, every bad input named, and
the real copy (REE_LFW_DIR) read and split identity-disjointly (docs/lfw.md)."""
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from ree.data import lfw, lfw_splits
from ree.lfw import protocol
from training_support import real_lfw

PEOPLE = {"Ann_Lee": 3, "Bo_Chan": 2, "Cy_Dee": 1, "Di_Eve": 2}


def face_image(size: int, seed: int) -> np.ndarray:
    """A smooth random picture whose content scales with the image (so crops at two sizes agree)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC))


def write_tree(root, size: int = 125, folder: str = "lfw-deepfunneled", pairs: bool = True):
    images = root / folder
    for k, (name, count) in enumerate(PEOPLE.items()):
        (images / name).mkdir(parents=True)
        for num in range(1, count + 1):
            Image.fromarray(face_image(size, 10 * k + num)).save(images / name / lfw.image_name(name, num), quality=95)
    if pairs:
        (root / "pairsDevTest.txt").write_text("2\nAnn_Lee\t1\t2\nBo_Chan\t1\t2\nAnn_Lee\t3\tCy_Dee\t1\n"
                                               "Di_Eve\t2\tBo_Chan\t1\n")
        (root / "pairsDevTrain.txt").write_text("1\nDi_Eve\t1\t2\nDi_Eve\t1\tCy_Dee\t1\n")
        (root / "pairs.txt").write_text("1\t1\nAnn_Lee\t1\t3\nBo_Chan\t2\tDi_Eve\t1\n")
    return images


def test_folder_layouts_and_search_order(tmp_path, monkeypatch):
    images = write_tree(tmp_path / "a")
    assert lfw.open_source(tmp_path / "a").images == images
    assert lfw.open_source(images).images == images  # the image folder itself
    assert lfw.open_source(tmp_path / "a").pairs_dir == tmp_path / "a"
    write_tree(tmp_path / "b", folder="lfw")
    monkeypatch.setenv(lfw.ENV_VAR, str(tmp_path / "b"))
    assert lfw.find_lfw().images == tmp_path / "b" / "lfw"
    assert lfw.find_lfw(tmp_path / "a").images == images  # an explicit path comes first
    monkeypatch.delenv(lfw.ENV_VAR)
    monkeypatch.setenv("SCIKIT_LEARN_DATA", str(tmp_path / "skl"))
    with pytest.raises(lfw.LfwNotFound, match=lfw.ENV_VAR):
        lfw.find_lfw()
    funneled = write_tree(tmp_path / "skl" / "lfw_home", folder="lfw_funneled")
    source = lfw.find_lfw()
    assert source.images == funneled and source.pairs_dir == tmp_path / "skl" / "lfw_home"
    monkeypatch.setenv(lfw.ENV_VAR, str(tmp_path / "nothing"))
    with pytest.raises(lfw.LfwNotFound, match="REE_LFW_DIR="):
        lfw.find_lfw()


def test_archive_read_in_place_equals_the_folder(tmp_path):
    images = write_tree(tmp_path / "x")
    with tarfile.open(tmp_path / "x" / "lfw-deepfunneled.tgz", "w:gz") as tar:
        tar.add(images, arcname="lfw-deepfunneled")
    folder = lfw.load_crops(lfw.open_source(images), 32)
    archive_source = lfw.open_source(tmp_path / "x" / "lfw-deepfunneled.tgz")
    assert archive_source.is_archive and archive_source.pairs_dir == tmp_path / "x"
    archive = lfw.load_crops(archive_source, 32)
    order = np.lexsort((archive.numbers, archive.people))
    np.testing.assert_array_equal(archive.images[order], folder.images)
    assert archive.people[order].tolist() == folder.people.tolist()
    assert folder.counts() == PEOPLE


def test_the_face_is_found_by_fractions_at_any_size(tmp_path):
    full = lfw.load_crops(lfw.open_source(write_tree(tmp_path / "full", size=250)), 32)
    half = lfw.load_crops(lfw.open_source(write_tree(tmp_path / "half", size=125)), 32)
    diff = np.abs(full.images.astype(int) - half.images.astype(int))
    assert diff.mean() < 4.0  # the same face square, decoded from JPEGs of two sizes
    box = lfw._crop_box(125, 125)
    assert box == (30, 26, 95, 91)


def test_crops_are_cached_atomically(tmp_path, monkeypatch):
    source = lfw.open_source(write_tree(tmp_path / "x"))
    first = lfw.load_crops(source, 16, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("lfw-*.npz"))) == 1
    monkeypatch.setattr(lfw, "_iter_folder", lambda root: (_ for _ in ()).throw(AssertionError("not cached")))
    again = lfw.load_crops(source, 16, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(first.images, again.images)


@pytest.mark.parametrize("text, match", [
    ("x\nA\t1\t2\nA\t1\tB\t2\n", r"pairsDevTest.txt:1: malformed header"),
    ("", r":1: empty pairs file"),
    ("2\nAnn_Lee\t1\t2\n", r"announces 1 fold\(s\) × 2 × 2 = 4 pairs, the file has 1 lines"),
    ("1\nAnn_Lee\t1\nAnn_Lee\t1\tBo_Chan\t1\n", r"pairsDevTest.txt:2: expected a same-person pair"),
    ("1\nAnn_Lee\t1\t2\nAnn_Lee\t1\t2\n", r"pairsDevTest.txt:3: expected a different-person pair"),
    ("1\nAnn_Lee\t1\tx\nAnn_Lee\t1\tBo_Chan\t1\n", r":2: image numbers must be integers"),
    ("1\nAnn_Lee\t1\t2\nAnn_Lee\t1\tAnn_Lee\t2\n", r":3: a different-person pair names Ann_Lee twice"),
])
def test_malformed_pairs_files_name_file_and_line(tmp_path, text, match):
    path = tmp_path / "pairsDevTest.txt"
    path.write_text(text)
    with pytest.raises(lfw.PairsError, match=match):
        lfw.read_pairs(path)


@pytest.mark.parametrize("line, match", [
    ("Zed_Nobody\t1\t2", r"pairsDevTest.txt:2: person Zed_Nobody is not in the LFW images"),
    ("Bo_Chan\t1\t7", r"pairsDevTest.txt:2: Bo_Chan_0007.jpg does not exist \(Bo_Chan has 2 image"),
])
def test_pairs_naming_missing_images(tmp_path, line, match):
    source = lfw.open_source(write_tree(tmp_path))
    (tmp_path / "pairsDevTest.txt").write_text(f"1\n{line}\nAnn_Lee\t1\tBo_Chan\t1\n")
    crops = lfw.load_crops(source, 16)
    folds, _ = lfw.read_pairs(source.pairs_path("pairsDevTest.txt"))
    with pytest.raises(lfw.PairsError, match=match):
        lfw.check_pairs(folds, crops, source.pairs_path("pairsDevTest.txt"))
    with pytest.raises(lfw.PairsError, match=match):
        protocol.evaluation_set(crops, source, "test", 32)


def test_bad_images_and_folders_are_named(tmp_path):
    images = write_tree(tmp_path)
    bad = images / "Ann_Lee" / "Ann_Lee_0002.jpg"
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])  # truncated
    with pytest.raises(ValueError, match="Ann_Lee_0002.jpg"):
        lfw.load_crops(lfw.open_source(images), 16)
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(ValueError, match="Ann_Lee_0002.jpg"):
        lfw.load_crops(lfw.open_source(images), 16)
    bad.unlink()
    for f in (images / "Bo_Chan").iterdir():
        f.unlink()
    with pytest.raises(ValueError, match=r"Bo_Chan: empty person folder"):
        lfw.load_crops(lfw.open_source(images), 16)
    (images / "Bo_Chan").rmdir()
    (images / "Di_Eve" / "photo.jpg").write_bytes((images / "Di_Eve" / "Di_Eve_0001.jpg").read_bytes())
    with pytest.raises(ValueError, match=r"photo.jpg: not an LFW image name"):
        lfw.load_crops(lfw.open_source(images), 16)
    with pytest.raises(lfw.LfwNotFound, match="holds no LFW copy"):
        lfw.open_source(images / "Ann_Lee")  # a person folder, not an LFW copy


def test_grayscale_images_are_converted(tmp_path):
    images = write_tree(tmp_path)
    grey = images / "Cy_Dee" / "Cy_Dee_0001.jpg"
    Image.open(grey).convert("L").save(grey)
    crops = lfw.load_crops(lfw.open_source(images), 16)
    face = crops.images[crops.index()[("Cy_Dee", 1)]].astype(int)
    assert face.shape == (16, 16, 3) and np.abs(face[..., 0] - face[..., 1]).max() <= 1


def test_protocol_on_a_small_tree(tmp_path):
    source = lfw.open_source(write_tree(tmp_path))
    crops = lfw.load_crops(source, 32)
    test = lfw_splits.people(crops, source, "test", min_images=1)
    assert set(test.held_out) == {"Ann_Lee", "Bo_Chan", "Cy_Dee", "Di_Eve"} and test.train == ()
    evalset = protocol.evaluation_set(crops, source, "test", 32, erc_pairs=6, seed=3)
    assert evalset.same.tolist() == [True, True, False, False]
    names = [evalset.names[evalset.labels[i]] for i in evalset.gallery]
    assert sorted(names) == ["Ann_Lee", "Bo_Chan", "Cy_Dee", "Di_Eve"]  # 3 enrolled + 1 distractor
    assert (evalset.gallery_labels == -100).sum() == 1
    assert len(evalset.probes) == 2 + 1 + 1
    assert set(evalset.erc_res_a) <= set(evalset.levels) and evalset.levels == (32, 24, 16, 12, 8)
    with pytest.raises(ValueError, match="must exceed the largest probe resolution"):
        protocol.evaluation_set(crops, source, "test", 24)


def test_view2_folds_train_on_everyone_else(tmp_path):
    source = lfw.open_source(write_tree(tmp_path))
    crops = lfw.load_crops(source, 32)
    with pytest.raises(lfw.PairsError, match="View 2 needs 10 folds, the file has 1"):
        lfw_splits.people(crops, source, "fold1")
    folds = ["Ann_Lee\t1\t2\nBo_Chan\t1\tCy_Dee\t1\n"] + ["Di_Eve\t1\t2\nDi_Eve\t1\tAnn_Lee\t3\n"] * 9
    (tmp_path / "pairs.txt").write_text("10\t1\n" + "".join(folds))
    first = lfw_splits.people(crops, source, "fold1")
    assert first.held_out == ("Ann_Lee", "Bo_Chan", "Cy_Dee") and first.train == ("Di_Eve",)
    assert lfw_splits.people(crops, source, "fold4").train == ("Bo_Chan", "Cy_Dee")
    evalset = protocol.evaluation_set(crops, source, "fold1", 32, erc_pairs=4)
    assert evalset.same.tolist() == [True, False]
    with pytest.raises(ValueError, match="split must be one of"):
        lfw_splits.people(crops, source, "fold11")


# ------------------------------------------------------------------------- the real copy

@pytest.fixture(scope="module")
def real():
    source = real_lfw("LFW", "run the real-data tests")
    cache = os.environ.get("REE_TEST_CACHE", os.path.join("runs", "cache"))
    return source, lfw.load_crops(source, 32, cache_dir=cache)


def test_real_lfw_is_complete(real):
    source, crops = real
    assert len(crops.images) == 13233 and len(crops.counts()) == 5749
    for name in lfw.PAIRS_FILES:
        folds, per_fold = lfw.read_pairs(source.pairs_path(name))
        lfw.check_pairs(folds, crops, name)
        assert (len(folds), per_fold) in ((10, 300), (1, 1100), (1, 500))


def test_real_splits_are_identity_disjoint(real):
    source, crops = real
    test, val = lfw_splits.people(crops, source, "test"), lfw_splits.people(crops, source, "val")
    assert not set(test.train) & set(test.held_out)
    assert not set(val.train) & (set(val.held_out) | set(test.held_out))
    assert set(val.train) < set(test.train)
    counts = crops.counts()
    assert min(counts[p] for p in test.train) >= lfw_splits.MIN_IMAGES
    evalset = protocol.evaluation_set(crops, source, "test", 32)
    assert len(evalset.same) == 1000 and evalset.same.sum() == 500
    assert len(evalset.gallery) == len(test.held_out)  # one image per enrolled person or distractor
    assert not set(evalset.rows) & set(np.flatnonzero(np.isin(crops.people, test.train)))


def test_the_from_scratch_lfw_demo_end_to_end(real, tmp_path, one_thread):
    """`ree demo --from-scratch` with LFW at its smoke-test size: REE, ArcFace and CR-FIQA
    trained, every table and plot of the report written, every goal computed from the numbers."""
    import json

    from ree.demo import run_demo

    source, _ = real
    report = run_demo(tmp_path / "demo", quick=True, lfw=source.images, from_scratch=True)
    assert "the same small iResNet at 32×32" in report
    for section in ("TAR@FAR=1e-2", "10-fold accuracy", "CMC against the HR gallery", "ERC AUC", "Goals"):
        assert section in report
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    seed = results["per_seed"][0]
    assert set(seed["recognition"]) == {"REE", "ArcFace", "CR-FIQA"}
    for rec in seed["recognition"].values():
        assert set(rec["vlr"]) == {"HR", "24", "16", "12", "8"} and set(rec["cross"]) == {"24", "16", "12", "8"}
        assert all(0.0 <= m["tar@0.01"] <= 1.0 and 0.0 <= m["acc"] <= 1.0 for m in rec["vlr"].values())
    qualities = set(seed["erc"]["REE"]["recompute"])
    assert {"ξ̂", "CR-FIQA", "SER-FIQ", "ERS", "norm (REE)", "norm (ArcFace)", "resolution", "random"} <= qualities
    assert seed["spearman"]["REE"]["resolution"] == 1.0
    for png in ("erc_ree.png", "erc_arcface.png", "cmc_8px.png"):
        assert (tmp_path / "demo" / png).stat().st_size > 1000


def test_data_lfw_names_the_training_people(real, monkeypatch, tmp_path):
    from ree.config import TrainConfig
    from ree.data.sources import build_dataset

    source, crops = real
    monkeypatch.setenv(lfw.ENV_VAR, str(source.images))
    cache = os.environ.get("REE_TEST_CACHE", os.path.join("runs", "cache"))
    train = build_dataset(TrainConfig(data="lfw-val", cache_dir=cache))
    assert train.class_names == list(lfw_splits.people(crops, source, "val").train)
    assert len(train) == int(np.isin(crops.people, train.class_names).sum())
    with pytest.raises(ValueError, match="'lfw-val'"):
        build_dataset(TrainConfig(data="lfw-test", cache_dir=cache))
    test_people = build_dataset(TrainConfig(data="lfw", cache_dir=cache))  # the test split's training people
    assert test_people.class_names == list(lfw_splits.people(crops, source, "test").train)
