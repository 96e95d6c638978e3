"""`ree` / `python -m ree`: help, argument errors, and train -> resume -> eval -> quality -> export
through the command line on a tiny ImageFolder the test writes."""
import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ree import checkpoint as ckpt
from ree.cli import main
from ree.config import TrainConfig
from ree.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def train_args(folder, out, steps=4):
    return ["train", "--data", str(folder), "--output-dir", str(out), "--steps", str(steps), "--batch-size", "8",
            "--warmup-steps", "1", "--embedding-size", "16", "--no-progress", "--no-tensorboard", "--log-every", "1",
            "--lr", "0.05"]


@pytest.mark.parametrize("command", [[], ["train"], ["eval"], ["quality"], ["export"], ["demo"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(command + ["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ree")
    if command == ["train"]:
        for flag in ("--batch-size", "--method", "--resume", "--tau", "--lambda-l1", "--optimizer", "--amp"):
            assert flag in out


def test_console_script_and_module_entry_points():
    script = Path(sys.executable).parent / "ree"
    assert script.exists(), "the `ree` console script is not installed (pip install -e .)"
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert 'ree = "ree.entry:main"' in pyproject  # sets OpenMP's environment, then ree.cli
    done = subprocess.run([sys.executable, "-m", "ree", "export", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("usage: ree export")


@pytest.mark.parametrize("argv, message", [
    (["train", "--batch-size", "x"], "invalid int value"),
    (["train", "--method", "sphereface"], "invalid choice"),
    (["train", "--lr", "-1"], "lr must be a finite positive number"),
    (["train", "--milestones", "0.9", "0.1"], "milestones"),
    (["train", "--synthetic", "noequals"], "KEY=VALUE"),
    (["train", "--frobnicate"], "unrecognized arguments"),
    (["quality", "--checkpoint", "x.pt"], "--images"),
    (["export"], "--checkpoint"),
    (["bogus"], "invalid choice"),
    ([], "required"),
])
def test_bad_arguments_are_argparse_errors(argv, message, capsys):
    try:
        code = main(argv)
    except SystemExit as exit_info:  # argparse's own errors (with the usage line)
        code = exit_info.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert message in err.strip().splitlines()[-1]


def test_train_resume_eval_quality_export(tmp_path, image_folder, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(train_args(image_folder, straight)) == 0
    assert (straight / "last.pt").is_file() and (straight / "config.json").is_file()
    assert TrainConfig.load(straight / "config.json").steps == 4

    # interrupt a run after 2 steps, then finish it from the command line: bitwise equal
    config = TrainConfig.load(straight / "config.json")
    config.output_dir = str(split)
    Trainer(config).fit(stop_at=2)
    assert main(["train", "--resume", str(split / "last.pt"), "--output-dir", str(split)]) == 0
    a = torch.load(straight / "last.pt", weights_only=False)
    b = torch.load(split / "last.pt", weights_only=False)
    assert b["step"] == 4
    for key in ("model", "criterion"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    # --resume without a path takes <output-dir>/last.pt; a different config is refused
    assert main(["train", "--resume", "--output-dir", str(split)] + train_args(image_folder, split)[1:]) == 0
    assert main(train_args(image_folder, split) + ["--resume", "--tau", "0.5"]) == 2
    assert "different run" in capsys.readouterr().err

    # eval needs a held-out set for a checkpoint trained on a folder
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["eval", "--checkpoint", str(straight / "last.pt")])
    assert "held-out" in capsys.readouterr().err
    # eval on the folder
    assert main(["eval", "--checkpoint", str(straight / "last.pt"), "--data", str(image_folder),
                 "--output", str(tmp_path / "eval")]) == 0
    assert "TAR@FAR" in capsys.readouterr().out
    assert (tmp_path / "eval" / "report.md").is_file() and (tmp_path / "eval" / "metrics.json").is_file()
    assert (tmp_path / "eval" / "erc.png").stat().st_size > 0

    # quality: one CSV row per image, equal to the model's ξ̂ and norm
    out_csv = tmp_path / "q.csv"
    assert main(["quality", "--checkpoint", str(straight / "last.pt"), "--images", str(image_folder),
                 "--output", str(out_csv), "--batch-size", "16"]) == 0
    with out_csv.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 40 and rows[0]["path"] == "id0/0.png"
    model = ckpt.load_model(straight / "last.pt").model
    image = torch.from_numpy(np.array(Image.open(image_folder / "id0" / "0.png"))).permute(2, 0, 1).float()
    with torch.no_grad():
        out = model(((image / 255 - 0.5) / 0.5)[None])
    assert list(rows[0]) == ["path", "xi_hat", "feature_norm", "ser_fiq", "ers"]
    assert abs(float(rows[0]["xi_hat"]) - float(out.quality)) < 1e-4
    assert abs(float(rows[0]["feature_norm"]) - float(out.embedding.norm())) < 1e-3
    assert all(0.0 < float(r["ser_fiq"]) <= 1.0 and 0.0 <= float(r["ers"]) <= 2.0 for r in rows)

    # any size, RGB or grayscale
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    rng = np.random.default_rng(0)
    for size, mode in ((8, "RGB"), (250, "L"), (37, "L"), (112, "RGB")):
        pixels = rng.integers(0, 256, (size, size, 3) if mode == "RGB" else (size, size), dtype=np.uint8)
        Image.fromarray(pixels, mode).save(mixed / f"{size}{mode}.png")
    assert main(["quality", "--checkpoint", str(straight / "last.pt"), "--images", str(mixed),
                 "--output", str(tmp_path / "m.csv")]) == 0
    with (tmp_path / "m.csv").open() as f:
        mixed_rows = list(csv.DictReader(f))
    assert len(mixed_rows) == 4 and all(np.isfinite(float(v)) for r in mixed_rows for k, v in r.items() if k != "path")

    # export: ONNX checked against PyTorch by the command itself
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(straight / "last.pt"), "--output", str(tmp_path / "m.onnx")]) == 0
    assert "max |onnx - torch|" in capsys.readouterr().out and (tmp_path / "m.onnx").stat().st_size > 0


def test_corrupt_checkpoint_exits_with_a_message(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 100)
    for argv in (["export", "--checkpoint", str(bad), "--output", str(tmp_path / "m.onnx")],
                 ["train", "--resume", str(bad)]):
        assert main(argv) == 2
        assert "corrupt" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()
