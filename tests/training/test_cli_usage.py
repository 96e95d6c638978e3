"""The `ree` command as users meet it: every user mistake ends in one line `ree <command>: error: …`
(exit status 2, no traceback; `--debug` shows it), every flag has help, the documented commands
(`ree train --data lfw`, `ree lfw --…`) work, a missing extra is named, and OpenMP's waiting
policy is set before torch loads it."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ree import errors
from ree.cli import build_parser, main
from ree.config import CHOICES, FIELD_HELP, TrainConfig
from ree.data import lfw
from ree.lfw.__main__ import build_parser as lfw_parser

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "python"), os.environ.get("PYTHONPATH", "")])}
TINY = ["--steps", "2", "--batch-size", "4", "--warmup-steps", "1", "--embedding-size", "16", "--no-progress",
        "--no-tensorboard", "--log-every", "1"]


def run_main(argv, capsys):
    """(exit status, stderr) of `ree <argv>`, whether it returns or exits."""
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err


def assert_one_line_error(code, err, command):
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith(f"ree {command}: error: "), err
    return lines[0]


# ------------------------------------------------------------------------------------- mistakes

def test_bad_train_values_are_one_line_errors(tmp_path, capsys):
    out = ["--output-dir", str(tmp_path / "run")]
    cases = [
        (["--margin", "2.0"], "margin must lie in [0, π/2)"),
        (["--synthetic", "faces=3"], "synthetic: unknown key(s) faces"),
        (["--synthetic", "num_train_ids=abc"], "SyntheticConfig.num_train_ids must be an int"),
        (["--synthetic", "min_res=1"], "min_res"),
        (["--tau", "50"], "tau must lie in [0, 10]"),
        (["--scale", "5000"], "scale must lie in (0, 1000]"),
    ]
    for flags, message in cases:
        line = assert_one_line_error(*run_main(["train", *flags, *out], capsys), "train")
        assert message in line
    assert not (tmp_path / "run").exists()


def test_config_file_problems_are_one_line_errors(tmp_path, capsys):
    bad_json, unknown, bad_value, wrong_type = (tmp_path / n for n in ("a.json", "b.json", "c.json", "d.json"))
    bad_json.write_text("{\"steps\": 10,")
    unknown.write_text(json.dumps({"steps": 10, "stepz": 3}))
    bad_value.write_text(json.dumps({"ri_form": "cube"}))
    wrong_type.write_text(json.dumps({"milestones": 0.5}))
    cases = [(tmp_path / "missing.json", "No such file"), (bad_json, "cannot read config"),
             (unknown, "unknown TrainConfig field(s): stepz"), (bad_value, "ri_form must be one of"),
             (wrong_type, "milestones")]
    for path, message in cases:
        line = assert_one_line_error(*run_main(["train", "--config", str(path)], capsys), "train")
        assert message in line and str(path) in line


@pytest.mark.parametrize("key, value", [("margin_mode", "sphere"), ("ri_form", "cube"), ("backend", "fpga"),
                                        ("margin", 2.0), ("data", "")])
def test_config_refuses_bad_values_where_it_is_built(key, value):
    with pytest.raises(errors.ConfigError, match=key):
        TrainConfig.from_dict({key: value})
    assert {"margin_mode", "ri_form", "backend"} <= set(CHOICES)


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(errors.ConfigError, match="margin"):
        main(["--debug", "train", "--margin", "2.0"])
    with pytest.raises(errors.ConfigError, match="margin"):
        main(["train", "--margin", "2.0", "--debug"])


def test_corrupt_training_image_is_a_one_line_error(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for person in ("a", "b"):
        (tmp_path / "data" / person).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "data" / person / "0.png")
    (tmp_path / "data" / "b" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    line = assert_one_line_error(*run_main(["train", "--data", str(tmp_path / "data"), "--output-dir",
                                            str(tmp_path / "run"), *TINY[:2], "--batch-size", "3", *TINY[4:]], capsys),
                                 "train")
    assert "1.png: not a readable image" in line
    line = assert_one_line_error(*run_main(["train", "--data", str(tmp_path / "data"), "--output-dir",
                                            str(tmp_path / "run2"), *TINY[:2], "--batch-size", "9"], capsys), "train")
    assert "batch_size=9 exceeds the 3 training images" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_machine_is_a_one_line_error(tmp_path, capsys):
    checkpoint = tmp_path / "x.pt"
    checkpoint.write_bytes(b"")
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / "a.png")
    for argv in (["train", "--device", "cuda"], ["eval", "--checkpoint", str(checkpoint), "--device", "cuda"],
                 ["quality", "--checkpoint", str(checkpoint), "--images", str(images), "--output",
                  str(tmp_path / "q.csv"), "--device", "cuda"]):
        line = assert_one_line_error(*run_main(argv + ["--output-dir", str(tmp_path / "r")] if argv[0] == "train"
                                               else argv, capsys), argv[0])
        assert "no CUDA device" in line
    line = assert_one_line_error(*run_main(["train", "--backend", "cuda", "--output-dir", str(tmp_path / "r")],
                                           capsys), "train")
    assert "backend 'cuda'" in line and "CUDA" in line


def test_checkpoint_folder_is_named_a_folder(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    for argv in (["train", "--resume", str(tmp_path / "run")],
                 ["export", "--checkpoint", str(tmp_path / "run"), "--output", str(tmp_path / "m.onnx")]):
        line = assert_one_line_error(*run_main(argv, capsys), argv[0])
        assert "is a folder" in line


def test_lfw_not_found_names_flags_the_command_has(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(lfw.ENV_VAR, raising=False)
    monkeypatch.setenv("SCIKIT_LEARN_DATA", str(tmp_path / "sklearn"))
    line = assert_one_line_error(*run_main(["train", "--data", "lfw", "--output-dir", str(tmp_path / "r")], capsys),
                                 "train")
    assert "LFW not found" in line
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    for flag in {word.strip(",;()") for word in line.split() if word.startswith("--")}:
        assert flag in train._option_string_actions, f"the message names {flag}, which ree train lacks"
    line = assert_one_line_error(*run_main(["train", "--data", "lfw", "--lfw", str(tmp_path / "none"),
                                            "--output-dir", str(tmp_path / "r")], capsys), "train")
    assert str(tmp_path / "none") in line


def test_missing_extra_is_named(tmp_path):
    """A base install (no Pillow): one line naming the extra, not a ModuleNotFoundError; tensorboard
    missing: training goes on without it, saying so."""
    code = ("import sys; sys.modules['PIL'] = None; from ree.entry import main; "
            f"sys.exit(main(['train', '--output-dir', {str(tmp_path / 'a')!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "ree train: error: this command needs Pillow, which is not installed: pip install 'ree-kernels[train]' "
        "(or pip install Pillow)")
    code = ("import sys; sys.modules['tensorboard'] = None; from ree.entry import main; "
            f"sys.exit(main(['train', '--output-dir', {str(tmp_path / 'b')!r}, '--synthetic', 'num_train_ids=4', "
            "'--synthetic', 'train_per_id=2', '--steps', '1', '--batch-size', '4', '--embedding-size', '8', "
            "'--no-progress']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "TensorBoard logging off: tensorboard is not installed" in done.stderr
    assert (tmp_path / "b" / "last.pt").is_file() and not (tmp_path / "b" / "tb").exists()


def test_errors_map_only_optional_modules():
    assert isinstance(errors.missing_extra(ModuleNotFoundError("x", name="onnxruntime")), errors.MissingExtra)
    assert "ree-kernels[export]" in str(errors.missing_extra(ModuleNotFoundError("x", name="onnxruntime.capi")))
    assert errors.missing_extra(ModuleNotFoundError("x", name="numpy")) is None  # a broken install: traceback

    def bug() -> int:
        raise ModuleNotFoundError("No module named 'numpy'", name="numpy")
    with pytest.raises(ModuleNotFoundError):
        errors.run_command("train", bug)


# ---------------------------------------------------------------------------------------- help

def all_parsers():
    parser = build_parser()
    yield "ree", parser
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        yield f"ree {name}", sub
    yield "ree lfw (python -m ree.lfw)", lfw_parser()


def test_every_flag_has_help():
    missing = []
    for name, parser in all_parsers():
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or not action.option_strings:
                continue
            text = (action.help or "").strip()
            if not text or text.startswith("(default"):
                missing.append(f"{name} {action.option_strings[0]}")
    assert not missing, "flags without help text: " + ", ".join(missing)
    assert set(FIELD_HELP) == {f for f in TrainConfig.__dataclass_fields__}


def test_data_help_lists_the_accepted_values(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")  # argparse wraps after hyphens
    for value in ("'synthetic'", "'lfw'", "'lfw-val'", "'lfw-fold1'", "ImageFolder", ".rec"):
        assert value in text.rsplit("--data DATA", 1)[1].split("--synthetic", 1)[0]


# ------------------------------------------------------------------------ the documented commands

def fake_lfw(root: Path) -> Path:
    """LFW's layout with six people: two evaluated on DevTest, four to train on."""
    rng = np.random.default_rng(0)
    names = ["Ann_Lee", "Bo_Chan", "Cy_Dee", "Di_Eve", "Ed_Fox", "Fay_Gu"]
    for name in names:
        (root / "lfw-deepfunneled" / name).mkdir(parents=True)
        for num in (1, 2):
            pixels = rng.integers(0, 256, (62, 62, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "lfw-deepfunneled" / name / lfw.image_name(name, num))
    (root / "pairsDevTest.txt").write_text("1\nAnn_Lee\t1\t2\nAnn_Lee\t1\tBo_Chan\t1\n")
    (root / "pairsDevTrain.txt").write_text("1\nCy_Dee\t1\t2\nCy_Dee\t1\tDi_Eve\t1\n")
    return root


def test_train_data_lfw_and_resume_of_a_demo_checkpoint(tmp_path, capsys, monkeypatch):
    from ree.lfw.experiment import Budget
    from ree.train import Trainer

    monkeypatch.delenv(lfw.ENV_VAR, raising=False)  # --lfw sets it for the process: restored after the test
    root = fake_lfw(tmp_path / "lfw")
    out = tmp_path / "run"
    cache = ["--cache-dir", str(tmp_path / "cache")]
    assert main(["train", "--data", "lfw", "--lfw", str(root), "--output-dir", str(out), *cache, *TINY]) == 0, \
        capsys.readouterr().err
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["config"]["data"] == "lfw" and state["class_names"] == ["Cy_Dee", "Di_Eve", "Ed_Fox", "Fay_Gu"]

    # a checkpoint as `make demo` / `ree lfw` write it (data="lfw"), stopped half-way, resumed by ree train
    config = Budget(steps=2, batch_size=4, warmup_steps=1).config("ree", tmp_path / "demo", seed=0)
    config.cache_dir, config.embedding_size, config.progress = str(tmp_path / "cache"), 16, False
    Trainer(config).fit(stop_at=1)  # LFW from the variable --lfw set above, as REE_LFW_DIR gives it to make demo
    assert main(["train", "--resume", str(tmp_path / "demo" / "last.pt")]) == 0, capsys.readouterr().err
    assert torch.load(tmp_path / "demo" / "last.pt", weights_only=True)["step"] == 2


def test_ree_lfw_takes_its_options(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["lfw", "--help"])
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("usage: ree lfw")
    code, err = run_main(["lfw", "--suite", "main", "--seeds", "0", "--lfw", str(tmp_path / "none")], capsys)
    assert code == 2 and "unrecognized arguments" not in err and str(tmp_path / "none") in err
    code, err = run_main(["lfw", "--suite", "bogus"], capsys)
    assert code == 2 and "invalid choice" in err
    code, err = run_main(["train", "--frobnicate"], capsys)
    assert code == 2 and "unrecognized arguments: --frobnicate" in err


# --------------------------------------------------------------------------------------- OpenMP

@pytest.mark.parametrize("user_value, spin", [(None, "'0'"), ("ACTIVE", None)])
def test_the_ree_command_sets_openmp_passive_before_torch(user_value, spin, tmp_path):
    """libgomp reads OMP_WAIT_POLICY once, when torch loads it: GOMP_SPINCOUNT 0 is PASSIVE in
    effect. A user's own value is kept."""
    env = {k: v for k, v in ENV.items() if k != "OMP_WAIT_POLICY"}
    env["OMP_DISPLAY_ENV"] = "VERBOSE"
    if user_value is not None:
        env["OMP_WAIT_POLICY"] = user_value
    done = subprocess.run([sys.executable, "-m", "ree", "eval", "--checkpoint", str(tmp_path / "none.pt")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2 and "does not exist" in done.stderr
    spins = [line.split("=", 1)[1].strip() for line in done.stderr.splitlines() if "GOMP_SPINCOUNT" in line]
    assert spins, "libgomp printed no environment (OMP_DISPLAY_ENV)"
    if spin is not None:
        assert spins[0] == spin
    else:
        assert spins[0] != "'0'" and "OMP_WAIT_POLICY = 'ACTIVE'" in done.stderr


def test_importing_ree_does_not_import_torch():
    done = subprocess.run([sys.executable, "-c", "import sys, ree, ree.entry; print('torch' in sys.modules); "
                           "print(ree.REELoss.__name__)"], capture_output=True, text=True, env=ENV, timeout=300)
    assert done.stdout.split() == ["False", "REELoss"], done.stderr
