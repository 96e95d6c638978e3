"""ree.data: the synthetic set, protocols, degradations and the real sets that ship with packages."""
import dataclasses
import os

import numpy as np
import pytest
import torch
from PIL import Image

import ree.data as data
from ree.data import synthetic
from ree.data.arrays import FaceArrays, to_tensor
from ree.data.degrade import degrade

TINY = synthetic.SyntheticConfig(num_train_ids=4, num_val_ids=2, num_test_ids=3, train_per_id=3, val_per_id=2,
                                 test_per_id=4, image_size=16, min_res=6, max_res=16, render_size=32, seed=3)


@pytest.fixture(scope="module")
def tiny():
    return synthetic.generate(TINY)


# ---------------------------------------------------------------------------- synthetic set


def test_the_interface_train_and_eval_code_against():
    import ree.data.degrade
    import ree.data.folders
    import ree.data.protocol
    import ree.data.real

    assert callable(ree.data.degrade.degrade) and callable(ree.data.degrade.synthesize_uis)
    assert {"SyntheticConfig", "SyntheticSplits", "generate"} <= set(vars(synthetic))
    assert {"verification_pairs", "identification_protocol", "IdentificationSplit"} <= set(vars(ree.data.protocol))
    assert {"ImageFolderDataset", "RecordIODataset", "load_images"} <= set(vars(ree.data.folders))
    assert {"lfw_faces_vs_nonfaces", "digits"} <= set(vars(ree.data.real))
    assert data.FaceArrays is FaceArrays and data.IGNORE_LABEL == -100


def test_synthetic_shapes_labels_and_resolutions(tiny):
    for split, ids, per in ((tiny.train, 4, 3), (tiny.val, 2, 2), (tiny.test, 3, 4)):
        assert split.images.shape == (ids * per, 16, 16, 3) and split.images.dtype == np.uint8
        assert split.labels.dtype == np.int64 and split.resolutions.dtype == np.int64
        np.testing.assert_array_equal(split.labels, np.repeat(np.arange(ids), per))
        assert split.num_classes == ids and split.class_names == [f"id{k:04d}" for k in range(ids)]
        assert ((split.resolutions >= 6) & (split.resolutions <= 16)).all()
    everything = np.concatenate([s.resolutions for s in tiny])
    assert len(np.unique(everything)) > 3  # drawn, not constant
    image, label, resolution = tiny.train[4]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert -1.0 <= image.min() and image.max() <= 1.0 and image.std() > 0.05
    assert label == 1 and resolution == tiny.train.resolutions[4]
    torch.testing.assert_close(tiny.train.tensors()[4], image)


def test_synthetic_is_deterministic_and_seeded(tiny):
    again = synthetic.generate(TINY)
    for a, b in zip(tiny, again):
        assert a.images.tobytes() == b.images.tobytes()
        np.testing.assert_array_equal(a.resolutions, b.resolutions)
    other = synthetic.generate(dataclasses.replace(TINY, seed=4))
    assert other.train.images.tobytes() != tiny.train.images.tobytes()
    assert not np.array_equal(other.train.resolutions, tiny.train.resolutions)


def test_synthetic_identities_are_disjoint_and_independent_of_other_splits(tiny):
    params = [synthetic.identity_parameters(TINY, s) for s in ("train", "val", "test")]
    assert [len(p) for p in params] == [4, 2, 3]
    stacked = np.concatenate(params)
    distance = np.abs(stacked[:, None] - stacked[None]).max(-1) + np.eye(len(stacked))
    assert distance.min() > 0.05  # no identity appears twice, in one split or across splits
    # A split's identities and images do not depend on the other splits' sizes.
    bigger = synthetic.generate(dataclasses.replace(TINY, num_test_ids=5, num_val_ids=1))
    assert bigger.train.images.tobytes() == tiny.train.images.tobytes()
    np.testing.assert_array_equal(bigger.test.images[:12], tiny.test.images)


def _nearest_neighbour_accuracy(arrays: FaceArrays) -> float:
    """How often an image's nearest other image (pixels of the face, brightness normalised) has
    its identity."""
    x = arrays.images.astype(np.float32)[:, 6:26, 6:26]
    x = x - x.mean((1, 2), keepdims=True)
    x = (x / x.std((1, 2, 3), keepdims=True)).reshape(len(x), -1)
    d = ((x[:, None] - x[None]) ** 2).sum(-1) + np.eye(len(x)) * 1e12
    return float((arrays.labels[d.argmin(1)] == arrays.labels).mean())


def test_identities_are_visible_in_the_pixels_and_fade_at_low_resolution():
    config = dataclasses.replace(TINY, num_train_ids=12, train_per_id=6, min_res=32, max_res=32,
                                 image_size=32, num_val_ids=0, num_test_ids=1)
    sharp = _nearest_neighbour_accuracy(synthetic.generate(config).train)
    coarse = _nearest_neighbour_accuracy(synthetic.generate(dataclasses.replace(config, min_res=6, max_res=6)).train)
    assert sharp > 0.3  # chance: 5 / 71
    assert coarse < sharp


def test_resolution_changes_only_the_capture():
    sharp = synthetic.generate(dataclasses.replace(TINY, min_res=16, max_res=16)).test
    coarse = synthetic.generate(dataclasses.replace(TINY, min_res=6, max_res=6)).test
    assert (sharp.resolutions == 16).all() and (coarse.resolutions == 6).all()
    # Same faces: coarse images are close to a blur of the sharp ones, and carry less detail.
    detail = lambda im: np.abs(np.diff(im.astype(np.float32), axis=1)).mean()  # noqa: E731
    assert detail(coarse.images) < 0.6 * detail(sharp.images)
    assert np.abs(coarse.images.mean((1, 2)) - sharp.images.mean((1, 2))).mean() < 12


def test_cache_hit_returns_equal_arrays_without_generating(tmp_path, monkeypatch, tiny):
    first = synthetic.generate(TINY, cache_dir=tmp_path)
    files = os.listdir(tmp_path)
    assert files == [f"synthetic-{TINY.key()}.npz"]

    def fail(*args, **kwargs):
        raise AssertionError("generated although cached")

    monkeypatch.setattr(synthetic, "_generate_split", fail)
    second = synthetic.generate(TINY, cache_dir=tmp_path)
    for a, b, c in zip(first, second, tiny):
        assert a.images.tobytes() == b.images.tobytes() == c.images.tobytes()
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.resolutions, b.resolutions)
    monkeypatch.undo()
    assert TINY.key() != dataclasses.replace(TINY, seed=4).key()
    # A damaged cache is regenerated with a warning, never trusted.
    (tmp_path / files[0]).write_bytes(b"not a zip")
    with pytest.warns(UserWarning, match="regenerating"):
        third = synthetic.generate(TINY, cache_dir=tmp_path)
    assert third.test.images.tobytes() == tiny.test.images.tobytes()


@pytest.mark.parametrize("change, match", [
    (dict(min_res=20, max_res=16), "min_res"), (dict(max_res=64), "render_size"),
    (dict(train_per_id=0), "train_per_id"),
    (dict(num_test_ids=-1), "num_test_ids"), (dict(image_size=2), "image_size"), (dict(seed=1.5), "seed"),
])
def test_config_errors(change, match):
    with pytest.raises((ValueError, TypeError), match=match):
        dataclasses.replace(TINY, **change)
    with pytest.raises(TypeError, match="config"):
        synthetic.generate({"seed": 0})


def test_face_arrays_normalisation_save_load(tmp_path):
    images = np.zeros((2, 4, 4, 3), np.uint8)
    images[0, 0, 0] = [0, 255, 128]
    arrays = FaceArrays(images, [1, -100], [4, 2])
    x, label, res = arrays[0]
    assert x.shape == (3, 4, 4) and (label, res) == (1, 4)
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([-1.0, 1.0, 128 / 127.5 - 1]))
    assert arrays.num_classes == 2  # the ignored label does not count
    arrays.save(tmp_path / "a.npz")
    loaded = FaceArrays.load(tmp_path / "a.npz")
    assert loaded.images.tobytes() == images.tobytes() and loaded.labels.tolist() == [1, -100]
    assert len(arrays.subset(np.array([1]))) == 1
    with pytest.raises(ValueError, match="labels"):
        FaceArrays(images, [1, 2, 3], [4, 4])
    with pytest.raises(TypeError, match="uint8"):
        FaceArrays(images.astype(np.float32), [1, 2], [4, 4])
    with pytest.raises(TypeError, match="uint8"):
        to_tensor(np.zeros((4, 4, 3)))
    (tmp_path / "bad.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="bad.npz"):
        FaceArrays.load(tmp_path / "bad.npz")


# ---------------------------------------------------------------------------- protocols


def test_verification_pairs_are_balanced_distinct_and_correct():
    labels = np.repeat(np.arange(20), 5)
    labels[:3] = -100  # unlabelled images never enter a pair
    a, b, same = data.verification_pairs(labels, 301, seed=1)
    assert a.dtype == b.dtype == np.int64 and same.dtype == bool and len(a) == 301
    assert same.sum() == 150
    assert (a != b).all()
    np.testing.assert_array_equal(same, labels[a] == labels[b])
    assert (labels[a] >= 0).all() and (labels[b] >= 0).all()
    pairs = {tuple(sorted(p)) for p in zip(a.tolist(), b.tolist())}
    assert len(pairs) == 301
    assert 0 < same[:150].mean() < 1  # shuffled
    again = data.verification_pairs(labels, 301, seed=1)
    for x, y in zip((a, b, same), again):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(data.verification_pairs(labels, 301, seed=2)[0], a)
    # Every identity with two images contributes genuine pairs when enough are asked.
    a, b, same = data.verification_pairs(labels, 360, seed=0)
    assert len(np.unique(labels[a[same]])) == 20


def test_verification_pairs_errors():
    with pytest.raises(ValueError, match="genuine"):
        data.verification_pairs(np.arange(10), 4)  # no identity has two images
    with pytest.raises(ValueError, match="num_pairs"):
        data.verification_pairs(np.repeat(np.arange(3), 2), 40)
    with pytest.raises(ValueError, match="num_pairs"):
        data.verification_pairs(np.repeat(np.arange(3), 2), 1)
    with pytest.raises(ValueError, match="labels"):
        data.verification_pairs(np.zeros((2, 2), np.int64), 2)


def test_identification_protocol():
    labels = np.repeat(np.arange(10), 4)
    labels = np.r_[labels, [-100, -100]]
    p = data.identification_protocol(labels, seed=0, gallery_per_id=1, distractor_fraction=0.4)
    assert set(p.gallery_idx).isdisjoint(p.probe_idx)
    assert len(p.gallery_idx) + len(p.probe_idx) == len(labels)
    np.testing.assert_array_equal(p.probe_labels, labels[p.probe_idx])
    distractor = p.gallery_labels == -100
    assert len(np.unique(labels[p.gallery_idx[distractor & (labels[p.gallery_idx] >= 0)]])) == 4
    assert distractor.sum() == 4 * 4 + 2  # all images of 4 identities, plus the unlabelled ones
    probed = np.unique(p.probe_labels)
    assert len(probed) == 6 and set(probed) <= set(p.gallery_labels[~distractor])
    assert not np.isin(labels[p.gallery_idx[distractor]], probed).any()  # distractors never probed
    np.testing.assert_array_equal(np.sort(p.gallery_labels[~distractor]), probed)  # one each
    assert (np.diff(p.gallery_idx) > 0).all() and (np.diff(p.probe_idx) > 0).all()
    again = data.identification_protocol(labels, seed=0, gallery_per_id=1, distractor_fraction=0.4)
    np.testing.assert_array_equal(again.gallery_idx, p.gallery_idx)
    two = data.identification_protocol(labels, seed=0, gallery_per_id=2, distractor_fraction=0.0)
    assert len(two.gallery_idx) == 20 + 2 and (two.gallery_labels >= 0).sum() == 20
    with pytest.raises(ValueError, match="distractor_fraction"):
        data.identification_protocol(labels, distractor_fraction=1.0)
    with pytest.raises(ValueError, match="gallery_per_id"):
        data.identification_protocol(labels, gallery_per_id=4)  # nothing left to probe


# ---------------------------------------------------------------------------- degradations


def _high_frequency_energy(images: np.ndarray) -> float:
    """Mean power of the spectrum outside the lowest quarter of frequencies."""
    grey = images.astype(np.float64).mean(-1)
    spectrum = np.abs(np.fft.fft2(grey - grey.mean((-2, -1), keepdims=True))) ** 2
    f = np.abs(np.fft.fftfreq(grey.shape[-1]))
    high = (f[:, None] > 0.125) | (f[None, :] > 0.125)
    return float(spectrum[..., high].mean())


def test_degrade_shape_and_lost_detail():
    rng = np.random.default_rng(0)
    image = (rng.random((64, 64, 3)) * 255).astype(np.uint8)  # all frequencies
    out = degrade(image, 16, np.random.default_rng(1))
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert degrade(image, 16, np.random.default_rng(1), output_size=32).shape == (32, 32, 3)
    np.testing.assert_array_equal(out, degrade(image, 16, np.random.default_rng(1)))
    energy = {r: np.mean([_high_frequency_energy(degrade(image, r, np.random.default_rng(s)))
                          for s in range(4)]) for r in (8, 16, 32, 64)}
    assert energy[8] < energy[16] < energy[32] < energy[64]
    assert energy[8] < 0.05 * energy[64]
    assert degrade(image[:, :48], 12, rng).shape == (64, 48, 3)  # the shorter side gets 12 pixels
    with pytest.raises(ValueError, match="resolution"):
        degrade(image, 65, rng)
    with pytest.raises(ValueError, match="image"):
        degrade(image.astype(np.float32), 8, rng)


def test_synthesize_uis_are_deterministic_and_unrecognizable():
    images = to_tensor((np.random.default_rng(0).random((6, 32, 32, 3)) * 255).astype(np.uint8))
    uis = data.synthesize_uis(images, torch.Generator().manual_seed(5))
    assert uis.shape == images.shape and uis.dtype == images.dtype and uis.device == images.device
    assert uis.min() >= -1 and uis.max() <= 1
    torch.testing.assert_close(uis, data.synthesize_uis(images, torch.Generator().manual_seed(5)), rtol=0, atol=0)
    assert not torch.equal(uis, data.synthesize_uis(images, torch.Generator().manual_seed(6)))
    to_uint8 = lambda t: ((t.permute(0, 2, 3, 1).numpy() + 1) * 127.5).astype(np.uint8)  # noqa: E731
    assert _high_frequency_energy(to_uint8(uis)) < 0.02 * _high_frequency_energy(to_uint8(images))
    # Coarser than the coarsest synthetic capture: less detail than an 8-pixel degrade.
    eight = np.stack([degrade(im, 8, np.random.default_rng(0)) for im in to_uint8(images)])
    assert _high_frequency_energy(to_uint8(uis)) < _high_frequency_energy(eight)
    # The capture size is what it says: coarser captures keep less detail.
    detail = {r: _high_frequency_energy(to_uint8(data.synthesize_uis(
        images, torch.Generator().manual_seed(0), min_res=r, max_res=r, noise_std=0.0))) for r in (4, 6, 16)}
    assert detail[4] < detail[6] < detail[16]
    flat = torch.full((2, 3, 32, 32), 0.25)  # without noise, a constant image stays as it is
    torch.testing.assert_close(data.synthesize_uis(flat, noise_std=0.0), flat)
    half = data.synthesize_uis(images.double(), torch.Generator().manual_seed(5))
    assert half.dtype == torch.float64
    assert data.synthesize_uis(images[:0]).shape == (0, 3, 32, 32)
    with pytest.raises(ValueError, match="max_res"):
        data.synthesize_uis(images, max_res=40)
    with pytest.raises(ValueError, match="images"):
        data.synthesize_uis(images[0])


@pytest.mark.gpu
def test_synthesize_uis_on_cuda_with_a_cpu_generator():
    images = torch.rand(4, 3, 32, 32, device="cuda") * 2 - 1
    uis = data.synthesize_uis(images, torch.Generator().manual_seed(0))
    assert uis.device == images.device
    torch.testing.assert_close(uis.cpu(), data.synthesize_uis(images.cpu(), torch.Generator().manual_seed(0)),
                               atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- real data, files


def test_lfw_faces_vs_nonfaces():
    images, is_face = data.lfw_faces_vs_nonfaces(40)
    assert images.shape == (200, 3, 40, 40) and images.dtype == torch.float32
    assert is_face.dtype == torch.bool and is_face.sum() == 100 and is_face[:100].all()
    assert images.min() >= -1 and images.max() <= 1
    torch.testing.assert_close(images[:, 0], images[:, 2])  # grey


def test_digits_split_keeps_every_class():
    train, test = data.digits(16, seed=1)
    assert len(train) + len(test) == 1797
    assert set(train.labels) == set(test.labels) == set(range(10))
    assert train.images.shape[1:] == (16, 16, 3) and (train.resolutions == 8).all()
    assert abs(len(test) - 1797 / 2) < 10
    again, _ = data.digits(16, seed=1)
    assert again.images.tobytes() == train.images.tobytes()
    assert data.digits(16, seed=2)[0].images.tobytes() != train.images.tobytes()


def test_load_images(tmp_path):
    colours = [(255, 0, 0), (0, 0, 255)]
    paths = []
    for i, c in enumerate(colours):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (20, 10 + i), c).save(paths[-1])
    batch = data.load_images(paths, 8)
    assert batch.shape == (2, 3, 8, 8)
    torch.testing.assert_close(batch[0, :, 4, 4], torch.tensor([1.0, -1.0, -1.0]))
    torch.testing.assert_close(batch[1, :, 4, 4], torch.tensor([-1.0, -1.0, 1.0]))
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.jpg"):
        data.load_images([paths[0], tmp_path / "broken.jpg"], 8)
    with pytest.raises(ValueError, match="image_size"):
        data.load_images(paths, 0)


def test_downsample_is_an_antialiased_capture_shown_at_the_input_size():
    from ree.data.degrade import downsample

    checker = (torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2 * 2.0 - 1.0  # ±1, the finest detail
    images = checker.expand(3, 3, 32, 32).clone()
    assert torch.equal(downsample(images, 32), images)  # the input size itself: unchanged
    eight = downsample(images, 8)
    assert eight.shape == images.shape and float(eight.abs().max()) < 0.05  # antialiased: averages to grey
    aliased = torch.nn.functional.interpolate(images, size=(8, 8), mode="nearest")
    assert float(aliased.abs().min()) == 1.0  # what a reduction without the filter would keep
    mixed = downsample(images, torch.tensor([32, 8, 16]), size=48)
    assert mixed.shape == (3, 3, 48, 48)
    torch.testing.assert_close(mixed[1:2], downsample(images[1:2], 8, size=48))
    with pytest.raises(ValueError, match="resolution must lie in"):
        downsample(images, 33)
    with pytest.raises(ValueError, match="images must be"):
        downsample(images[0], 8)
