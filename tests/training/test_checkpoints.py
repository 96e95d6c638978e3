"""Checkpoints are data, not code: a planted pickle payload is refused by every entry point
without running; and a resumed run must see the classes it was trained on."""
import pickle
import shutil

import pytest
import torch

from ree import checkpoint as ckpt
from ree.cli import main
from ree.config import TrainConfig
from ree.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(data, out, **kwargs):
    values = dict(data=str(data), output_dir=str(out), steps=2, batch_size=8, warmup_steps=1, embedding_size=16,
                  progress=False, tensorboard=False, log_every=1)
    values.update(kwargs)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def trained(image_folder, tmp_path_factory):
    """A genuine checkpoint of 2 steps on the shared image folder."""
    out = tmp_path_factory.mktemp("trained")
    return Trainer(tiny_config(image_folder, out)).fit()


class Payload:
    """Unpickling it creates `marker`: what a crafted checkpoint could do with any code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def planted_files(trained, tmp_path, marker):
    """A genuine checkpoint with the payload inside its config, in torch's zip format and in its
    legacy format, and a bare pickle of it."""
    state = torch.load(trained, weights_only=False)
    state["config"]["synthetic"] = {"x": Payload(marker)}
    zipped, legacy, bare = tmp_path / "zipped.pt", tmp_path / "legacy.pt", tmp_path / "bare.pt"
    torch.save(state, zipped)
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    bare.write_bytes(pickle.dumps(state, protocol=2))
    # the payload is live: loading any of them the old way (weights_only=False) runs it
    for path in (zipped, legacy):
        torch.load(path, weights_only=False)
        assert marker.exists()
        marker.unlink()
    pickle.loads(bare.read_bytes())
    assert marker.exists()
    marker.unlink()
    return zipped, legacy, bare


def test_a_planted_payload_is_refused_by_every_entry_point(trained, image_folder, tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    zipped, legacy, bare = planted_files(trained, tmp_path, marker)
    for path in (zipped, legacy, bare):
        name = path.name
        refused = rf"{name} refused: it holds a Python object \(\S*open\)"
        with pytest.raises(ckpt.CheckpointError, match=refused):
            ckpt.load(path)
        with pytest.raises(ckpt.CheckpointError, match=refused):
            ckpt.load_model(path)
        with pytest.raises(ckpt.CheckpointError, match=refused):
            Trainer(tiny_config(image_folder, tmp_path / "resumed"), resume=path)
        for argv in (["train", "--resume", str(path), "--output-dir", str(tmp_path / "cli")],
                     ["eval", "--checkpoint", str(path), "--data", str(image_folder), "--output", str(tmp_path / "e")],
                     ["quality", "--checkpoint", str(path), "--images", str(image_folder), "--output",
                      str(tmp_path / "q.csv")],
                     ["export", "--checkpoint", str(path), "--output", str(tmp_path / "m.onnx")]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert f"ree {argv[0]}: error: checkpoint {path} refused" in err, err
        assert not marker.exists(), name
    assert not any((tmp_path / p).exists() for p in ("e", "q.csv", "m.onnx", "cli"))


def test_checkpoints_hold_only_tensors_and_plain_values(trained):
    state = torch.load(trained, weights_only=True)  # would raise on any other object
    assert state["version"] == ckpt.VERSION == 2
    assert state["num_classes"] == 5 and state["class_names"] == [f"id{k}" for k in range(5)]
    assert isinstance(state["rng"]["numpy"]["key"], torch.Tensor)


def test_resume_refuses_renamed_or_missing_class_folders(image_folder, tmp_path):
    data = tmp_path / "faces"
    shutil.copytree(image_folder, data)
    path = Trainer(tiny_config(data, tmp_path / "run")).fit()
    Trainer(tiny_config(data, tmp_path / "run"), resume=path)  # the same classes resume
    # id1 renamed: the sorted names shift and every label from 1 on would mean another person
    (data / "id1").rename(data / "zz")
    with pytest.raises(ckpt.CheckpointError, match=r"run/last.pt was trained on other classes .*"
                       r"label 1: 'id1' in the checkpoint, 'id2' now; .*label 4: 'id4' in the checkpoint, 'zz' now"):
        Trainer(tiny_config(data, tmp_path / "run"), resume=path)
    shutil.rmtree(data / "zz")
    with pytest.raises(ckpt.CheckpointError, match="trained on 5 classes; this training set has 4"):
        Trainer(tiny_config(data, tmp_path / "run"), resume=path)


def test_check_classes_lists_the_first_differences():
    state = {"num_classes": 8, "class_names": [f"c{k}" for k in range(8)]}
    ckpt.check_classes(state, 8, [f"c{k}" for k in range(8)], "x.pt")
    ckpt.check_classes(state, 8, None, "x.pt")  # a set without names: the count only
    with pytest.raises(ckpt.CheckpointError, match=r"x.pt .*label 1: 'c1' in the checkpoint, 'c0' now; "
                       r"label 2: .*label 5: 'c5' in the checkpoint, 'c4' now \(and 2 more\)$"):
        ckpt.check_classes(state, 8, ["c0"] + [f"c{k}" for k in range(7)], "x.pt", shown=5)
