"""Spawned gloo process groups on the CPU for the multi-process tests: a file store in the test's
tmp_path and a timeout on every collective, so that a rank left waiting fails the test instead
of hanging it."""
from __future__ import annotations

import datetime
import gc
import multiprocessing
import sys
import traceback
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

COLLECTIVE_TIMEOUT_S = 60


def _entry(rank: int, world: int, run_dir: str, setup: Optional[Callable[[], None]], fn: Callable,
           args: tuple) -> None:
    torch.set_num_threads(1)
    if setup is not None:
        setup()
    dist.init_process_group("gloo", init_method=f"file://{run_dir}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        fn(rank, world, *args)
        dist.barrier()  # no rank tears its connections down while a peer still reads from them
    except BaseException:
        with open(f"{run_dir}/rank{rank}.err", "w") as f:
            f.write(traceback.format_exc())
        traceback.clear_frames(sys.exc_info()[2])  # frees what the frames hold (DDP models) first
        raise
    finally:
        gc.collect()  # DDP objects must be gone before the group (torch 2.13 + gloo aborts otherwise)
        dist.destroy_process_group()


def spawn(fn: Callable, world: int, tmp_path: Path, *args, setup: Optional[Callable[[], None]] = None) -> None:
    """Runs fn(rank, world, *args) in `world` fresh processes joined in a gloo group, after
    `setup()` in each (both module-level functions of the calling test module); a failure fails
    the caller with the traceback of every rank that failed (a rank whose peer died reports only
    the lost connection, so the first failure may not be the cause)."""
    run_dir = tmp_path / f"{fn.__name__}-{world}"
    run_dir.mkdir()
    # A fork server that has imported torch and the caller once starts the ranks in a fraction
    # of a second, where a fresh interpreter per rank spends seconds importing torch.
    multiprocessing.set_forkserver_preload(["torch", "torch.distributed", fn.__module__])
    try:
        mp.start_processes(_entry, args=(world, str(run_dir), setup, fn, args), nprocs=world,
                           start_method="forkserver")
    except ProcessException:
        reports = [f"--- rank {r} ---\n{(run_dir / f'rank{r}.err').read_text()}"
                   for r in range(world) if (run_dir / f"rank{r}.err").exists()]
        pytest.fail("\n".join(reports) or "a rank died without a Python traceback", pytrace=False)
