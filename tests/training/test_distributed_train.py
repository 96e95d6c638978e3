"""Multi-process training (ree.train under torch.distributed): spawned gloo groups on the CPU
(a file store in tmp_path, a timeout on every collective, so that a rank left waiting fails the
test instead of hanging it), and the `ree train --nproc` launcher end to end.

The equality runs are float64 (the default dtype of the processes that train, and float64
images): DDP's gradient average, the sharded head's combine and the synchronised BatchNorm sum
in another order than one process does, which float64 keeps near 1e-15 relative."""
from __future__ import annotations

import copy
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from ree import checkpoint as ckpt
from ree.cli import main
from ree.config import TrainConfig
from ree.distributed import CpuSyncBatchNorm
from ree.train import Trainer
from spawned import spawn


def float64_default() -> None:
    torch.set_default_dtype(torch.float64)


# --------------------------------------------------------------------------------------------
# A tiny float64 training set and run
# --------------------------------------------------------------------------------------------

class TinyFaces(torch.utils.data.Dataset):
    """6 identities x 8 images of 16x16: a per-identity pattern plus noise, float64 items."""

    num_classes = 6

    def __init__(self):
        rng = np.random.default_rng(0)
        self.labels = np.arange(48) % self.num_classes
        base = rng.uniform(-1, 1, (self.num_classes, 3, 16, 16))
        self.images = torch.from_numpy(np.clip(base[self.labels] + rng.normal(0, 0.2, (48, 3, 16, 16)), -1, 1))

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def config(out: Path, **kwargs) -> TrainConfig:
    """12 images + 6 UIs a step (divisible by 1, 2 and 3 processes), BN over all ranks, no
    dropout (its masks come from each rank's own stream). grad_clip 5 clips every step here
    (the norms are in the hundreds), so the global norm is exercised."""
    values = dict(output_dir=str(out), steps=4, batch_size=12, ui_fraction=0.5, input_size=16, embedding_size=16,
                  warmup_steps=1, lr=0.05, log_every=1, save_every=100, progress=False, tensorboard=False,
                  dropout=0.0, prm_dropout=0.0, sync_bn=True, grad_clip=5.0)
    values.update(kwargs)
    return TrainConfig(**values)


# The default kind of run: BN per rank, dropout (each rank's own stream); AdamW's state to re-shard.
DROPOUT = dict(sync_bn=False, dropout=0.1, prm_dropout=0.2, optimizer="adamw", lr=1e-3, schedule="step")


def flat_state(path: Path) -> Dict[str, torch.Tensor]:
    """Every tensor a checkpoint holds for the numbers: model, whole head, tracker, optimiser."""
    state = torch.load(path, weights_only=False)
    out = {f"model.{k}": v for k, v in state["model"].items()}
    out.update({f"criterion.{k}": v for k, v in state["criterion"].items()})
    for index, param_state in state["optimizer"]["state"].items():
        out.update({f"optimizer.{index}.{k}": v for k, v in param_state.items() if isinstance(v, torch.Tensor)})
    out["step"] = torch.tensor(state["step"])
    return out


def max_difference(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((x.double() - y.double()).abs().max()) if x.numel() else 0.0
               for x, y in zip(a.values(), b.values()))


def assert_like_one_process(state: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor], what: str) -> None:
    """Tolerances: the UI tracker sums its statistics in float32 (ree_kernels.tracker), in
    another order with several ranks, so ū and μ_UI differ by float32 rounding (~3e-7 relative
    measured); through the RI targets that moves the float64 weights and momenta by ~1e-10 at
    most (measured: 3.5e-11 beyond rtol 1e-7). One step moves weights by 1e-5 to 1e-2, so a
    wrong gradient factor, a lost rank's rows or a different clipping factor cannot pass."""
    assert state.keys() == ref.keys(), what
    for key in ref:
        rtol, atol = (1e-6, 1e-7) if key.startswith("criterion.tracker.") else (1e-7, 1e-9)
        torch.testing.assert_close(state[key], ref[key], rtol=rtol, atol=atol,
                                   msg=lambda m, k=key: f"{what} {k}: {m}")


def assert_bitwise(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{what}: {len(different)} tensors differ, e.g. {different[:4]}"


@pytest.fixture()
def float64():
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(default)


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------
# World 2 = world 1; checkpoints resume bitwise at the same world size and at any other
# --------------------------------------------------------------------------------------------

def world_two_runs(rank: int, world: int, out: str) -> None:
    out = Path(out)
    data = TinyFaces()
    Trainer(config(out / "w2"), dataset=data).fit()
    Trainer(config(out / "w2-split"), dataset=data).fit(stop_at=2)
    if rank == 0:
        shutil.copy(out / "w2-split" / "last.pt", out / "w2-at-step2.pt")
    dist.barrier()
    Trainer(config(out / "w2-split"), dataset=data, resume=out / "w2-split" / "last.pt").fit()
    Trainer(config(out / "w2-per-rank-bn", sync_bn=False), dataset=data).fit()
    # per-rank BN and dropout (every rank's own stream): resumes bitwise too
    Trainer(config(out / "d2", **DROPOUT), dataset=data).fit()
    Trainer(config(out / "d2-split", **DROPOUT), dataset=data).fit(stop_at=2)
    Trainer(config(out / "d2-split", **DROPOUT), dataset=data, resume=out / "d2-split" / "last.pt").fit()
    # the ArcFace baseline: the PRM and PAM take no part (DDP's unused parameters)
    Trainer(config(out / "b2", method="arcface", steps=3), dataset=data).fit()
    assert len(os.listdir(out / "w2")) == 2 and (out / "w2" / "log.csv").is_file()  # rank 0 alone writes


def world_three_resume(rank: int, world: int, out: str) -> None:
    Trainer(config(Path(out) / "w3-from-w2"), dataset=TinyFaces(), resume=Path(out) / "w2-at-step2.pt").fit()


def test_two_processes_train_like_one_and_checkpoints_resume_at_any_world_size(tmp_path, float64):
    data = TinyFaces()
    Trainer(config(tmp_path / "w1"), dataset=data).fit()
    Trainer(config(tmp_path / "b1", method="arcface", steps=3), dataset=data).fit()
    spawn(world_two_runs, 2, tmp_path, str(tmp_path), setup=float64_default)
    spawn(world_three_resume, 3, tmp_path, str(tmp_path), setup=float64_default)
    Trainer(config(tmp_path / "w1-from-w2"), dataset=data, resume=tmp_path / "w2-at-step2.pt").fit()

    ref = flat_state(tmp_path / "w1" / "last.pt")
    at_step2 = flat_state(tmp_path / "w2-at-step2.pt")
    assert at_step2.pop("step") == 2
    assert max_difference(at_step2, {k: v for k, v in ref.items() if k != "step"}) > 1e-3  # training moves them
    for run in ("w2", "w3-from-w2", "w1-from-w2"):
        assert_like_one_process(flat_state(tmp_path / run / "last.pt"), ref, f"{run} vs one process:")
    assert_like_one_process(flat_state(tmp_path / "b2" / "last.pt"), flat_state(tmp_path / "b1" / "last.pt"),
                            "baseline, w2 vs one process:")
    # the comparison can fail: BatchNorm statistics per rank are not one process's
    assert max_difference(flat_state(tmp_path / "w2-per-rank-bn" / "last.pt"), ref) > 1e-3
    assert_bitwise(flat_state(tmp_path / "w2-split" / "last.pt"), flat_state(tmp_path / "w2" / "last.pt"),
                   "resumed at the same world size")
    assert_bitwise(flat_state(tmp_path / "d2-split" / "last.pt"), flat_state(tmp_path / "d2" / "last.pt"),
                   "resumed at the same world size, with dropout")
    saved = torch.load(tmp_path / "w2" / "last.pt", weights_only=False)
    assert saved["world_size"] == 2 and len(saved["rank_rng"]) == 2
    assert saved["criterion"]["head.weight"].shape == (TinyFaces.num_classes, 16)  # the whole head
    assert ckpt.load_model(tmp_path / "w2" / "last.pt").step == 4  # eval/export read it as any checkpoint


# --------------------------------------------------------------------------------------------
# Errors: raised on every rank, never a hang
# --------------------------------------------------------------------------------------------

def error_runs(rank: int, world: int, out: str) -> None:
    out, data = Path(out), TinyFaces()
    # a loss that is not finite on rank 1 alone stops every rank
    trainer = Trainer(config(out / "nan", steps=2), dataset=data)
    if rank == 1:
        forward = trainer.criterion.forward
        trainer.criterion.forward = lambda *args: (lambda o: o._replace(total=o.total * math.nan))(forward(*args))
    with pytest.raises(FloatingPointError, match=r"not finite at step 1 on rank\(s\) \[1\]"):
        trainer.fit()
    # rank 0 failing to write a checkpoint fails every rank
    save_atomic = ckpt.save_atomic

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    ckpt.save_atomic = disk_full if rank == 0 else save_atomic
    try:
        expected = "^disk full" if rank == 0 else "rank 0 failed to write checkpoint .*disk full"
        with pytest.raises(OSError, match=expected):
            Trainer(config(out / "disk", steps=1), dataset=data).fit()
    finally:
        ckpt.save_atomic = save_atomic
    # a checkpoint of another run, a batch the ranks cannot share: the same error everywhere
    path = Trainer(config(out / "ok", steps=1), dataset=data).fit()
    with pytest.raises(ckpt.CheckpointError, match="different run"):
        Trainer(config(out / "ok", steps=1, lr=0.2), dataset=data, resume=path)
    with pytest.raises(ValueError, match="divisible by the 2 processes"):
        Trainer(config(out / "odd", batch_size=10), dataset=data)  # 5 UIs
    check_cpu_sync_batchnorm(rank, world)


def check_cpu_sync_batchnorm(rank: int, world: int) -> None:
    """CpuSyncBatchNorm on each rank's rows = BatchNorm on the global batch: outputs, input and
    parameter gradients (summed over ranks, as DDP's average of world x them would be), running
    statistics."""
    from ree.distributed import convert_sync_batchnorm

    for shape in ((8, 3, 4, 5), (10, 6)):
        torch.manual_seed(1)  # the same global batch and layer on every rank
        x, upstream = torch.randn(shape), torch.randn(shape)
        bn = nn.BatchNorm2d(shape[1]) if len(shape) == 4 else nn.BatchNorm1d(shape[1])
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        synced = convert_sync_batchnorm(nn.Sequential(copy.deepcopy(bn)), torch.device("cpu"))[0]
        assert isinstance(synced, CpuSyncBatchNorm)
        full = x.clone().requires_grad_(True)
        (bn(full) * upstream).sum().backward()
        mine = x[rank::world].clone().requires_grad_(True)
        out = synced(mine)
        (out * upstream[rank::world]).sum().backward()
        with torch.no_grad():
            reference_out = nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
        torch.testing.assert_close(out, reference_out[rank::world], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mine.grad, full.grad[rank::world], rtol=1e-12, atol=1e-12)
        for name in ("weight", "bias"):
            grad = getattr(synced, name).grad.clone()
            dist.all_reduce(grad)
            torch.testing.assert_close(grad, getattr(bn, name).grad, rtol=1e-12, atol=1e-12)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(synced, name), getattr(bn, name), rtol=1e-12, atol=1e-12)


def test_errors_stop_every_rank_and_sync_batchnorm(tmp_path):
    spawn(error_runs, 2, tmp_path, str(tmp_path), setup=float64_default)


# --------------------------------------------------------------------------------------------
# The launcher: ree train --nproc N
# --------------------------------------------------------------------------------------------

def train_args(folder: Path, out: Path) -> list:
    return ["train", "--data", str(folder), "--output-dir", str(out), "--steps", "3", "--batch-size", "8",
            "--warmup-steps", "1", "--embedding-size", "16", "--no-progress", "--no-tensorboard", "--log-every", "1",
            "--lr", "0.05"]


def test_nproc_launches_processes_that_train_or_fail_cleanly(tmp_path, image_folder):
    out = tmp_path / "run"
    python = [sys.executable, "-m", "ree"]
    # no checkpoint to resume: refused in one line before any process starts, not a hang
    failed = subprocess.run(python + train_args(image_folder, out) + ["--nproc", "2", "--resume"],
                            capture_output=True, text=True, timeout=300)
    assert failed.returncode == 2 and failed.stderr.count("does not exist") == 1, failed.stderr[-3000:]
    assert failed.stderr.strip().splitlines()[-1].startswith("ree train: error: checkpoint")
    done = subprocess.run(python + ["train", "--nproc=2"] + train_args(image_folder, out)[1:],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained 3 steps") == 1  # rank 0 alone prints and writes
    with open(out / "log.csv") as f:
        assert [line.split(",")[0] for line in f.read().split()[1:]] == ["1", "2", "3"]
    state = torch.load(out / "last.pt", weights_only=False)
    assert state["world_size"] == 2 and state["step"] == 3 and state["criterion"]["head.weight"].shape == (5, 16)
    assert TrainConfig.load(out / "config.json").batch_size == 8


@pytest.mark.parametrize("argv, env, message", [
    (["--nproc", "0"], {}, "argument --nproc: must be at least 1, got 0"),
    (["--nproc", "two"], {}, "expected a number of processes"),
    (["--nproc", "3"], {}, r"batch_size=8 \(the global batch\) and its 2 UIs .* divisible by the 3 processes"),
    (["--nproc", "2", "--ui-fraction", "0.125"], {}, "its 1 UIs .* divisible by the 2 processes"),
    (["--nproc", "64", "--batch-size", "64", "--ui-fraction", "0", "--device", "cuda"], {},
     "no CUDA device|a GPU per process"),
    (["--nproc", "3"], {"WORLD_SIZE": "2"}, "--nproc 3 in a run whose launcher started 2 processes"),
    ([], {"WORLD_SIZE": "3"}, r"divisible by the 3 processes"),
])
def test_bad_launch_arguments_are_argparse_errors(argv, env, message, tmp_path, image_folder, capsys, monkeypatch):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    try:
        code = main(train_args(image_folder, tmp_path / "x") + argv)
    except SystemExit as exit_info:  # argparse's own errors
        code = exit_info.code
    assert code == 2
    err = capsys.readouterr().err
    assert re.search(message, err.strip().splitlines()[-1]) and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_nproc_one_trains_in_this_process_and_the_flag_is_stripped(tmp_path, image_folder):
    from ree.cli import _without_nproc

    assert main(train_args(image_folder, tmp_path / "one") + ["--nproc", "1"]) == 0
    assert "world_size" not in torch.load(tmp_path / "one" / "last.pt", weights_only=False)
    assert _without_nproc(["train", "--nproc", "2", "--lr", "1", "--nproc=3", "--npro", "4", "--no-progress"]) == [
        "train", "--lr", "1", "--no-progress"]
