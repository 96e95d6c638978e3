"""The trainer end to end on a tiny in-memory set: training, bitwise resume, checkpoint errors,
the ArcFace baseline switch, logs."""
import csv

import numpy as np
import pytest
import torch

from ree import checkpoint as ckpt
from ree.config import TrainConfig
from ree.data.arrays import fetch_batch
from ree.logs import LOG_FIELDS, TrainLog
from ree.train import EpochBatchSampler, Trainer, WarmupSchedule
from training_support import TinyFaces, config


class ItemFaces(torch.utils.data.Dataset):
    """The same set seen only through __getitem__ (ImageFolder-like): (image, label, resolution)."""

    def __init__(self, arrays):
        self.arrays = arrays
        self.num_classes = arrays.num_classes

    def __len__(self):
        return len(self.arrays)

    def __getitem__(self, i):
        image = (torch.from_numpy(self.arrays.images[i]).permute(2, 0, 1).float() / 255.0 - 0.5) / 0.5
        return image, int(self.arrays.labels[i]), 32


def states_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(
        list(a.model.state_dict().values()) + list(a.criterion.state_dict().values()),
        list(b.model.state_dict().values()) + list(b.criterion.state_dict().values())))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def faces():
    return TinyFaces()


@pytest.mark.parametrize("extra", [{}, {"min_resolution": 7}], ids=["hr", "vlr-copies"])
def test_resume_is_bitwise(tmp_path, faces, extra):
    straight = Trainer(config(tmp_path, "straight", **extra), dataset=faces)
    straight.fit()
    first = Trainer(config(tmp_path, "split", **extra), dataset=faces)
    first.fit(stop_at=3)  # "interrupted" after 3 of 6 steps
    assert first.step == 3 and not states_equal(first, straight)
    resumed = Trainer(config(tmp_path, "split", **extra), dataset=faces, resume=tmp_path / "split" / "last.pt")
    assert resumed.step == 3
    resumed.fit()
    assert resumed.step == 6
    assert states_equal(straight, resumed)
    assert torch.equal(straight.criterion.tracker.center, resumed.criterion.tracker.center)
    assert straight.criterion.tracker.initialized
    states = (straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"])
    for a, b in zip(states[0].values(), states[1].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    # and a run that never stopped differs from one with another seed (the test can fail)
    other = Trainer(config(tmp_path, "other", seed=1, **extra), dataset=faces)
    other.fit()
    assert not states_equal(straight, other)


def test_resume_across_an_epoch_with_adamw_step_schedule_and_item_dataset(tmp_path, faces):
    items = ItemFaces(faces)
    kwargs = dict(steps=10, optimizer="adamw", lr=1e-3, schedule="step", milestones=(0.3, 0.6), save_every=4)
    straight = Trainer(config(tmp_path, "a", workers=1, **kwargs), dataset=items)  # a loader process
    straight.fit()
    part = Trainer(config(tmp_path, "b", **kwargs), dataset=items)
    part.fit(stop_at=9)  # 8 steps per epoch: resumes inside the second epoch
    resumed = Trainer(config(tmp_path, "b", **kwargs), dataset=items, resume=tmp_path / "b" / "last.pt")
    resumed.fit()
    assert states_equal(straight, resumed)


def test_log_csv_reads_as_one_run_after_resume(tmp_path, faces):
    part = Trainer(config(tmp_path, "r", save_every=2), dataset=faces)
    part.fit(stop_at=5)  # checkpoint at 4 and at the stop (5); log rows at 2, 4 and 5
    resumed = Trainer(config(tmp_path, "r", save_every=2), dataset=faces, resume=tmp_path / "r" / "last.pt")
    resumed.fit()
    with open(tmp_path / "r" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [2, 4, 5, 6]
    for r in rows:
        assert all(np.isfinite(float(r[k])) for k in ("loss", "cls", "l1", "id", "mse", "lr"))


def test_train_log_writes_every_sink(tmp_path):
    row = {key: float(k) for k, key in enumerate(LOG_FIELDS)}
    with TrainLog(tmp_path, 0, 4, log_csv=True, tensorboard=True, progress=True, desc="t") as sinks:
        for step in (1, 2, 3):
            sinks.advance()
            sinks.write({**row, "step": step})
    with open(tmp_path / "log.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert "train/step" not in events.Tags()["scalars"]
    with TrainLog(tmp_path, 2, 4, log_csv=True, tensorboard=False, progress=False):  # resumed at step 2
        pass
    with open(tmp_path / "log.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2]


def test_the_split_modules_keep_the_public_names_of_ree_train():
    import ree.train
    from ree import devices, logs, sampler, schedule
    from ree.data import sources

    assert ree.train.WarmupSchedule is schedule.WarmupSchedule
    assert ree.train.EpochBatchSampler is sampler.EpochBatchSampler
    assert ree.train.build_dataset is sources.build_dataset
    assert ree.train.resolve_device is devices.resolve_device and ree.train.autocast_dtype is devices.autocast_dtype
    assert ree.train.LOG_FIELDS is logs.LOG_FIELDS


def test_bf16_autocast_path_runs(tmp_path, faces):
    trainer = Trainer(config(tmp_path, "bf16", steps=2, amp="bf16"), dataset=faces)
    assert trainer.amp_dtype == torch.bfloat16
    trainer.fit()
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in trainer.model.parameters())


def test_baseline_trains_without_uis(tmp_path, faces):
    trainer = Trainer(config(tmp_path, "base", method="arcface"), dataset=faces)
    before = trainer.model.prm.fc.weight.detach().clone()
    trainer.fit()
    assert not trainer.criterion.tracker.initialized
    assert torch.equal(before, trainer.model.prm.fc.weight)  # the PRM gets no loss in the baseline
    images, labels, is_ui = trainer.prepare_batch(*fetch_batch(trainer.dataset, list(range(8))))
    assert images.shape[0] == 8 and not is_ui.any()


def test_ree_batches_append_uis_with_their_labels(tmp_path, faces):
    trainer = Trainer(config(tmp_path, "ui", ui_fraction=0.5), dataset=faces)
    raw, labels = fetch_batch(trainer.dataset, list(range(8)))
    images, out_labels, is_ui = trainer.prepare_batch(raw, labels)
    assert images.shape == (12, 3, 32, 32) and is_ui.tolist() == [False] * 8 + [True] * 4
    assert torch.equal(out_labels[8:], out_labels[:4])
    assert torch.equal(out_labels[:8], labels)
    # UIs are degraded: far less detail than the images they come from
    def detail(x):
        return (x[..., 1:] - x[..., :-1]).abs().mean()
    assert detail(images[8:]) < 0.5 * detail(images[:4])


def test_vlr_copies_and_ui_resolutions_follow_the_config(tmp_path, faces):
    raw, labels = fetch_batch(faces, list(range(8)))
    detail = lambda x: float((x[..., 1:] - x[..., :-1]).abs().mean())  # noqa: E731
    plain = Trainer(config(tmp_path, "hr", ui_fraction=0.5), dataset=faces).prepare_batch(raw, labels)[0]
    vlr_trainer = Trainer(config(tmp_path, "vlr", ui_fraction=0.5, min_resolution=4), dataset=faces)
    vlr = vlr_trainer.prepare_batch(raw, labels)[0]
    assert detail(vlr[:8]) < 0.8 * detail(plain[:8])  # sides drawn in [4, 32]: most images lose detail
    harsh = Trainer(config(tmp_path, "ui2", ui_fraction=0.5, ui_min_resolution=2, ui_max_resolution=2),
                    dataset=faces).prepare_batch(raw, labels)[0]
    assert detail(harsh[8:]) < detail(plain[8:])  # 2 px UIs are flatter than 4–6 px ones


def test_training_reduces_the_classification_loss(tmp_path, faces):
    trainer = Trainer(config(tmp_path, "learn", steps=40, log_every=40, lr=0.05), dataset=faces)
    images, labels = fetch_batch(trainer.dataset, list(range(len(faces))))

    def loss():
        trainer.model.eval()
        with torch.no_grad():
            return float(trainer.criterion.head(trainer.model(images).embedding, labels))

    before = loss()
    trainer.fit()
    after = loss()
    assert after < 0.7 * before


def test_corrupt_checkpoint_is_an_error(tmp_path, faces):
    trainer = Trainer(config(tmp_path, "c", steps=2), dataset=faces)
    path = trainer.fit()
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        Trainer(config(tmp_path, "c", steps=2), dataset=faces, resume=truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        Trainer(config(tmp_path, "c", steps=2), dataset=faces, resume=garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {}}, foreign)
    with pytest.raises(ckpt.CheckpointError, match="not a ree checkpoint"):
        Trainer(config(tmp_path, "c", steps=2), dataset=faces, resume=foreign)
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        Trainer(config(tmp_path, "c", steps=2), dataset=faces, resume=tmp_path / "missing.pt")


def test_mismatched_checkpoint_is_an_error(tmp_path, faces):
    path = Trainer(config(tmp_path, "m", steps=2), dataset=faces).fit()
    with pytest.raises(ckpt.CheckpointError, match="embedding_size"):
        Trainer(config(tmp_path, "m", steps=2, embedding_size=16), dataset=faces, resume=path)
    with pytest.raises(ckpt.CheckpointError, match="lr"):
        Trainer(config(tmp_path, "m", steps=2, lr=0.2), dataset=faces, resume=path)
    with pytest.raises(ckpt.CheckpointError, match="training set"):
        Trainer(config(tmp_path, "m", steps=2), dataset=TinyFaces(n=72), resume=path)
    # a checkpoint whose tensors do not fit the model it claims
    state = torch.load(path, weights_only=False)
    state["model"]["head.fc.weight"] = state["model"]["head.fc.weight"][:, :5]
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    with pytest.raises(ckpt.CheckpointError, match="does not fit this model"):
        Trainer(config(tmp_path, "m", steps=2), dataset=faces, resume=bad)
    # changing only logging/output settings is allowed
    Trainer(config(tmp_path, "m2", steps=2, log_every=1), dataset=faces, resume=path)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "x.pt"
    ckpt.save_atomic({"format": "ree-checkpoint", "n": 1}, path)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_atomic({"format": "ree-checkpoint", "n": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False)["n"] == 1  # the old file survives
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]  # no temporary left behind


def test_load_model_rebuilds_the_trained_model(tmp_path, faces):
    trainer = Trainer(config(tmp_path, "lm", steps=2), dataset=faces)
    path = trainer.fit()
    trained = ckpt.load_model(path)
    assert trained.step == 2 and trained.ui_center is not None and not trained.model.training
    x = torch.randn(3, 3, 32, 32)
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(trained.model(x).embedding, trainer.model(x).embedding)


def test_schedule_and_sampler():
    cosine = WarmupSchedule(10, 2, "cosine", (), 0.1)
    assert [cosine(s) for s in (0, 1)] == [0.5, 1.0]
    assert cosine(2) == 1.0 and abs(cosine(7) - 0.5 * (1 + np.cos(np.pi * 5 / 8))) < 1e-12
    step = WarmupSchedule(12, 2, "step", (0.5, 0.75), 0.1)
    assert [round(step(s), 6) for s in (2, 6, 7, 9, 11)] == [1.0, 1.0, 0.1, 0.1, 0.01]
    sampler = EpochBatchSampler(10, 3, seed=0)
    epoch0 = torch.cat([sampler.indices(s) for s in range(3)])
    assert len(set(epoch0.tolist())) == 9  # a permutation, the remainder dropped
    again = EpochBatchSampler(10, 3, seed=0)
    assert torch.equal(again.indices(4), sampler.indices(4))  # a function of the step
    with pytest.raises(ValueError, match="batch_size"):
        EpochBatchSampler(2, 3, seed=0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="sphereface"), "method"), (dict(steps=0), "steps"), (dict(lr=0.0), "lr"),
    (dict(ui_fraction=1.5), "ui_fraction"), (dict(milestones=(0.8, 0.2)), "milestones"),
    (dict(arch="vit"), "arch"), (dict(input_size=31), "input_size"), (dict(amp="fp8"), "amp"),
    (dict(min_resolution=1), "min_resolution"), (dict(min_resolution=33), "min_resolution"),
    (dict(ui_min_resolution=5, ui_max_resolution=4), "ui_min_resolution"), (dict(prm_input="raw"), "prm_input"),
    (dict(diversion_target="both"), "diversion_target"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_config_json_round_trip(tmp_path):
    cfg = TrainConfig(steps=7, synthetic={"num_train_ids": 3}, milestones=(0.2, 0.9))
    cfg.save(tmp_path / "c.json")
    assert TrainConfig.load(tmp_path / "c.json") == cfg
    (tmp_path / "bad.json").write_text('{"stepz": 3}')
    with pytest.raises(ValueError, match="stepz"):
        TrainConfig.load(tmp_path / "bad.json")
