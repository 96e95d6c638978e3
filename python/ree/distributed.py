"""Multi-process training: the launcher, the process group from torchrun's environment, and what
the trainer does across ranks (BatchNorm over all ranks, the global gradient norm, the checks
every rank must share). The layout of checkpoints across ranks is `ree.checkpoint_layout`.

`ree train --nproc N` re-runs the same command in N processes through torch.distributed.run
(`torchrun --standalone`); under torchrun (or any launcher that sets WORLD_SIZE, RANK and
LOCAL_RANK) each process joins the group: NCCL with one GPU per process (LOCAL_RANK) on CUDA,
gloo on the CPU. docs/scaling.md ("Multi-process training") gives the conventions.
"""
from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: rank, world size and the group (None: one process)."""

    rank: int = 0
    world: int = 1
    group: Optional[dist.ProcessGroup] = None

    @staticmethod
    def current() -> "Ranks":
        """The default group once torch.distributed is initialised with more than one process."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return Ranks(dist.get_rank(), dist.get_world_size(), dist.group.WORLD)
        return Ranks()

    @property
    def leader(self) -> bool:
        """Rank 0: the one that logs and writes files."""
        return self.rank == 0


# ------------------------------------------------------------------------------------ launching

def launched_world() -> Optional[int]:
    """WORLD_SIZE when a launcher (torchrun) started this process, else None."""
    world = os.environ.get("WORLD_SIZE")
    return None if world is None else int(world)


def launch(nproc: int, argv: Sequence[str], env: Optional[Dict[str, str]] = None) -> int:
    """Runs `python -m ree <argv>` in `nproc` processes on this machine through
    torch.distributed.run (torchrun --standalone) and waits for them; their exit status.
    Without OMP_NUM_THREADS, each process gets the machine's cores divided by nproc (torchrun
    would set 1); `env` is added to their environment.

    SIGINT and SIGTERM to this process are passed on to torchrun, which passes them on to the
    processes it started: they stop together after the step in progress and write the
    checkpoint (`ree.runs`); the status is then 130. torchrun runs in a session of its own, so that a Ctrl-C in the
    terminal reaches each process once, through this one, rather than all of them at once."""
    from .runs import forward_signals

    env = {**os.environ, **(env or {})}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # torchrun's own temporary folder (it leaves one per run otherwise) goes where it is removed
    log_dir = tempfile.mkdtemp(prefix="ree-torchrun-")
    command = [sys.executable, "-c", _TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", f"--log-dir={log_dir}",
               "-m", "ree", *argv]
    try:
        process = subprocess.Popen(command, env=env, start_new_session=True)
        try:
            with forward_signals(process) as received:
                status = process.wait()
        except BaseException:
            process.terminate()  # torchrun passes it on to the processes it started
            process.wait()
            raise
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
    # Stopped by a signal: the processes have said where their checkpoint is.
    return 130 if received else status


_TORCHRUN = """
import sys
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import main
try:
    main()
except SignalException:  # stopped by the signal ree passed on: the workers have written their checkpoint
    sys.exit(130)
"""
"""torchrun (`python -m torch.distributed.run`), without its traceback when a signal stops it."""


@contextmanager
def process_group_from_env(cuda: bool) -> Iterator[Ranks]:
    """Joins the group torchrun's environment describes (WORLD_SIZE > 1; one process otherwise)
    for the body, and leaves it after: NCCL with GPU LOCAL_RANK when `cuda`, else gloo."""
    world = launched_world() or 1
    if world > 1:
        if cuda:
            local_rank = int(os.environ["LOCAL_RANK"])
            if local_rank >= torch.cuda.device_count():
                raise ValueError(f"LOCAL_RANK={local_rank} but torch sees {torch.cuda.device_count()} GPU(s): "
                                 "start at most one process per GPU")
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group("gloo")
    try:
        yield Ranks.current()
    except BaseException as err:
        # The failed call's frames hold the trainer and its DDP model: free them before the
        # group goes (with torch 2.13 and gloo, destroying the group under a live DDP object
        # aborted the process at exit).
        traceback.clear_frames(err.__traceback__)
        raise
    finally:
        if world > 1:
            gc.collect()
            dist.destroy_process_group()


# ------------------------------------------------------------------------- BatchNorm over ranks

class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) with autograd: every rank's output is the sum of all the inputs, so an
    input's gradient is the sum over ranks of the output gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
        ctx.group = group
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with the batch statistics of all ranks' rows (`nn.SyncBatchNorm`) for CPU
    tensors: torch's needs GPUs (and DDP refuses it on the CPU). The statistics come from two
    all-reduces, the sums and counts and then the squared deviations from the global mean, with
    autograd through them (eager: it keeps a few copies of the activations)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Optional[dist.ProcessGroup] = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        group = self.process_group or dist.group.WORLD
        if not self.training or not dist.is_initialized() or dist.get_world_size(group) == 1:
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        x = input.to(torch.promote_types(input.dtype, torch.float32))
        count = x.new_full((1,), input.numel() // input.shape[1])
        sums = _SumOverRanks.apply(torch.cat([x.sum(dims), count]), group)
        n = sums[-1].detach()
        if float(n) <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {int(n)} over all ranks")
        mean = sums[:-1] / n
        centred = x - mean.view(shape)
        var = _SumOverRanks.apply(centred.square().sum(dims), group) / n
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None:
            out = out * self.weight.view(shape)
        if self.bias is not None:
            out = out + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_((var * n / (n - 1)).to(self.running_var.dtype), momentum)
        return out.to(input.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device,
                           process_group: Optional[dist.ProcessGroup] = None) -> nn.Module:
    """Every BatchNorm layer of `module` synchronised over `process_group`, sharing its
    parameters and buffers (the state dict keys stay the same): `nn.SyncBatchNorm` on CUDA,
    `CpuSyncBatchNorm` elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        synced = CpuSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                  module.track_running_stats, process_group)
        synced.weight, synced.bias = module.weight, module.bias
        synced.running_mean, synced.running_var = module.running_mean, module.running_var
        synced.num_batches_tracked = module.num_batches_tracked
        return synced.train(module.training)
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device, process_group))
    return module


# ------------------------------------------------------------------- what the ranks must share

def clip_grad_norm(replicated: Sequence[torch.Tensor], shards: Sequence[torch.Tensor], max_norm: float,
                   group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` where `replicated` parameters are the same on every rank
    (after DDP's all-reduce) and `shards` are this rank's rows of parameters split over the ranks
    (the prototypes): the norm counts every gradient of every rank once (one all-reduce of the
    shards' squared norms), so all ranks clip by the same factor. The total norm."""
    def norm(params: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])

    shard_square = norm(shards).square().reshape(1)
    dist.all_reduce(shard_square, group=group)
    total = (norm(replicated).square() + shard_square[0]).sqrt()
    torch.nn.utils.clip_grads_with_norm_([*replicated, *shards], max_norm, total)
    return total


def nonfinite_ranks(value: torch.Tensor, ranks: Ranks) -> List[int]:
    """The ranks whose `value` is not finite, known to every rank (one all-reduce), so that they
    all stop together instead of leaving the others waiting in the next collective."""
    flags = torch.zeros(ranks.world, device=value.device)
    flags[ranks.rank] = float(not bool(torch.isfinite(value.detach()).all()))
    if ranks.world > 1:
        dist.all_reduce(flags, group=ranks.group)
    return [rank for rank in range(ranks.world) if flags[rank] > 0]


def any_rank(flag: bool, ranks: Ranks, device: torch.device) -> bool:
    """Whether `flag` is true on any rank, known to every rank (one all-reduce with several),
    so that they all take the same branch before their next collective."""
    if ranks.world == 1:
        return bool(flag)
    total = torch.tensor([float(flag)], device=device)
    dist.all_reduce(total, group=ranks.group)
    return bool(total.item() > 0)


def mean_over_ranks(values: Sequence[float], ranks: Ranks, device: torch.device) -> List[float]:
    """The mean over ranks of each value (for the log)."""
    if ranks.world == 1:
        return list(values)
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total, group=ranks.group)
    return (total / ranks.world).tolist()


def gather_objects(obj: Any, ranks: Ranks) -> Optional[List[Any]]:
    """Every rank's `obj`, in rank order, on rank 0 (None on the others)."""
    if ranks.world == 1:
        return [obj]
    out: Optional[List[Any]] = [None] * ranks.world if ranks.leader else None
    dist.gather_object(obj, out, dst=0, group=ranks.group)
    return out


def write_on_leader(write: Callable[[], None], ranks: Ranks, what: str) -> None:
    """Runs `write` on rank 0 while the others wait; if it fails, every rank raises."""
    error: Optional[BaseException] = None
    if ranks.leader:
        try:
            write()
        except Exception as err:  # noqa: BLE001 - the other ranks must hear of it before it is raised
            error = err
    if ranks.world > 1:
        status = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(status, src=0, group=ranks.group)
        if error is None and status[0] is not None:
            raise OSError(f"rank 0 failed to write {what}: {status[0]}")
    if error is not None:
        raise error
