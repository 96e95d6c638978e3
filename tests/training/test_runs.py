"""Runs that cannot be lost: an existing run is not replaced silently, SIGINT/SIGTERM to `ree train`
(one process or --nproc 2) stop every process with a checkpoint that continues the run exactly and
no temporary files, and a run killed (SIGKILL) at any moment resumes exactly, cleaning up."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ree import runs
from ree.cli import main
from ree.config import TrainConfig
from ree.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]


def train_argv(folder, out, steps, save_every=1000):
    return ["train", "--data", str(folder), "--output-dir", str(out), "--steps", str(steps), "--batch-size", "8",
            "--warmup-steps", "1", "--embedding-size", "16", "--no-progress", "--no-tensorboard", "--log-every", "1",
            "--save-every", str(save_every), "--lr", "0.05"]


def start(argv, **env):
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **env,
                   "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "python"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "ree", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=environment)


def wait_for_rows(process, log, rows, timeout=240.0):
    """Waits until `log` (log.csv) has `rows` data rows; fails if the process ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.is_file() and len(log.read_text().splitlines()) > rows:
            return
        if process.poll() is not None:
            pytest.fail(f"the run ended before its log had {rows} rows: {process.communicate()[1]}")
        time.sleep(0.02)
    process.kill()
    pytest.fail("the run logged nothing in time")


def temporaries(folder):
    return sorted(p.name for p in Path(folder).rglob("*") if p.name.startswith(".") or ".tmp" in p.name)


def processes_naming(text):
    """Live processes whose command line holds `text` (the run's unique output folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def same_weights(a, b):
    return all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]) and \
        all(torch.equal(a["criterion"][k], b["criterion"][k]) for k in a["criterion"])


def test_an_existing_run_is_not_replaced(tmp_path, image_folder, capsys):
    out = tmp_path / "run"
    assert main(train_argv(image_folder, out, 2)) == 0
    before = (out / "last.pt").read_bytes()
    capsys.readouterr()
    assert main(train_argv(image_folder, out, 3)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ree train: error: --output-dir") and "already holds a run (last.pt, log.csv)" in err
    assert "--resume" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert (out / "last.pt").read_bytes() == before
    assert main(train_argv(image_folder, out, 3) + ["--overwrite"]) == 0
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 3
    assert len((out / "log.csv").read_text().splitlines()) == 1 + 3  # the old run's rows are gone
    with pytest.raises(SystemExit):
        main(train_argv(image_folder, out, 3) + ["--overwrite", "--resume"])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_run_with_an_exact_checkpoint(sig, tmp_path, image_folder):
    """--steps far below --save-every: without the interrupt's checkpoint nothing would be saved."""
    out = tmp_path / "run"
    process = start(train_argv(image_folder, out, 5000, save_every=10000))
    wait_for_rows(process, out / "log.csv", 3)
    process.send_signal(sig)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("ree train: stopped at step")
    state = torch.load(out / "last.pt", weights_only=True)
    assert 3 <= state["step"] < 5000
    assert temporaries(out) == []
    # the checkpoint is the state of a run that took exactly that many steps
    config = TrainConfig.load(out / "config.json")
    config.output_dir = str(tmp_path / "straight")
    Trainer(config).fit(stop_at=state["step"])
    assert same_weights(state, torch.load(tmp_path / "straight" / "last.pt", weights_only=True))


def test_sigterm_stops_every_process_of_nproc_2(tmp_path, image_folder):
    out = tmp_path / "ddp-run"
    (tmp_path / "tmp").mkdir()
    process = start(["train", "--nproc", "2"] + train_argv(image_folder, out, 5000, save_every=10000)[1:],
                    TMPDIR=str(tmp_path / "tmp"))
    wait_for_rows(process, out / "log.csv", 2, timeout=400)
    assert len(processes_naming(str(out))) >= 4  # ree, torchrun and its two processes
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=90)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "ree train: stopped at step" in err
    deadline = time.monotonic() + 30
    while processes_naming(str(out)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_naming(str(out)) == []
    assert torch.load(out / "last.pt", weights_only=True)["step"] >= 2
    assert temporaries(out) == [] and list((tmp_path / "tmp").iterdir()) == []  # torchrun's folder went too


def test_resume_after_sigkill_is_exact_and_cleans_up(tmp_path, image_folder, capsys):
    steps = 40
    out = tmp_path / "run"
    process = start(train_argv(image_folder, out, steps, save_every=1))  # a checkpoint write at every step
    wait_for_rows(process, out / "log.csv", 4)
    process.kill()
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run finished before it was killed: raise steps"
    # what a kill inside the atomic writes leaves: the checkpoint's temporary, and a cache file's of a dead process
    (out / ".last.pt.x1y2z3.tmp").write_bytes(b"partial")
    assert main(["train", "--resume", str(out / "last.pt")]) == 0, capsys.readouterr().err
    assert temporaries(out) == []
    resumed = torch.load(out / "last.pt", weights_only=True)
    assert resumed["step"] == steps
    steps_logged = [int(line.split(",")[0]) for line in (out / "log.csv").read_text().splitlines()[1:]]
    assert steps_logged == list(range(1, steps + 1))
    config = TrainConfig.load(out / "config.json")
    config.output_dir = str(tmp_path / "straight")
    Trainer(config).fit()
    assert same_weights(resumed, torch.load(tmp_path / "straight" / "last.pt", weights_only=True))


def test_stale_temporaries_of_dead_processes_only(tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache" / "synthetic"
    out.mkdir()
    cache.mkdir(parents=True)
    (out / ".last.pt.abc.tmp").write_bytes(b"x")
    (out / ".log.csv.123.tmp").write_bytes(b"x")
    (out / "last.pt").write_bytes(b"kept")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (cache / f"set.npz.tmp-{int(dead.stdout)}.npz").write_bytes(b"x")
    (cache / f"set.npz.tmp-{os.getpid()}.npz").write_bytes(b"x")  # a live process's write in progress
    removed = runs.remove_stale_temporaries(out, tmp_path / "cache")
    assert sorted(p.name for p in removed) == sorted([".last.pt.abc.tmp", ".log.csv.123.tmp",
                                                      f"set.npz.tmp-{int(dead.stdout)}.npz"])
    assert (out / "last.pt").exists() and (cache / f"set.npz.tmp-{os.getpid()}.npz").exists()
