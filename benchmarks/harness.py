"""Measuring one step (docs/spec.md §6): its time over repeats and its workspace memory (docs/spec.md §4).

A step is `prepare(i)` (untimed: picks input set i, or runs the forward when only the backward
is timed) followed by `timed(x)`. Time: warm-up first (compiles, autotunes, lazy
initialisation), then repeats sized to a time budget; on the CPU `time.perf_counter` with input
sets rotated when one set would stay in the last-level cache, on CUDA events around the step
with the L2 cache flushed before each repeat. Workspace: the peak memory of the step above what
was allocated before it, minus the gradients it returns; on CUDA from the caching allocator's
counters, on the CPU from the peak RSS (VmHWM) of a fresh process.
"""
from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, List, Sequence

import torch

MB = 2**20


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0 ≤ q ≤ 100), linear between the closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must lie in [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Stats:
    """A metric's p50, p20 and p80 (all three equal for a single measurement)."""

    p50: float
    p20: float
    p80: float

    @classmethod
    def of(cls, values: Sequence[float]) -> "Stats":
        return cls(percentile(values, 50), percentile(values, 20), percentile(values, 80))


@dataclass(frozen=True)
class Budget:
    """How long to measure: warm-up calls after the first until `warmup_s` has passed (at
    least one), then enough repeats to fill `measure_s`, within [min_reps, max_reps]."""

    warmup_s: float
    measure_s: float
    min_reps: int
    max_reps: int

    def repeats(self, seconds_per_call: float) -> int:
        wanted = math.ceil(self.measure_s / max(seconds_per_call, 1e-9))
        return max(self.min_reps, min(self.max_reps, wanted))


def tensor_bytes(tensors: Iterable[Any]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def workspace_bytes(peak: int, before: int, returned: int) -> int:
    """docs/spec.md §4: the peak during the step, minus what was allocated before it and the returned
    gradients. Clamped at 0: an RSS reading can fall below the gradients' size when they reuse
    pages the process already held."""
    return max(0, peak - before - returned)


def last_level_cache_bytes() -> int:
    """The CPU's largest cache (sysfs), or 32 MB when it cannot be read."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        unit = {"K": 2**10, "M": 2**20}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KM")) * unit)
    return max(sizes, default=32 * MB)


def rotation_sets(bytes_per_set: int, cache_bytes: int, limit: int = 16) -> int:
    """How many input sets to cycle through so that each repeat finds its inputs out of the
    cache, as in training: enough to cover twice the cache, one when a set alone does."""
    if bytes_per_set <= 0:
        return 1
    return max(1, min(limit, math.ceil(2 * cache_bytes / bytes_per_set)))


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_time(prepare: Callable[[int], Any], timed: Callable[[Any], Any], device: str,
                 budget: Budget) -> List[float]:
    """Milliseconds of `timed(prepare(i))` per repeat, after warm-up."""
    def once(i: int) -> float:
        x = prepare(i)
        _synchronize(device)
        start = time.perf_counter()
        result = timed(x)
        _synchronize(device)
        elapsed = time.perf_counter() - start
        del result, x  # freeing the outputs is not part of the step
        return elapsed

    once(0)  # compiles and initialises: not an estimate of anything
    warm, last, i = 0.0, 0.0, 1
    while i == 1 or warm < budget.warmup_s:
        last = once(i)
        warm += last
        i += 1
    reps = budget.repeats(last)
    if device != "cuda":
        return [1e3 * once(i + r) for r in range(reps)]

    flush = torch.empty(256 * MB, dtype=torch.int8, device="cuda")  # > any GPU's L2
    events = []
    for r in range(reps):
        x = prepare(i + r)
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = timed(x)
        end.record()
        events.append((start, end))
        del result, x
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def cuda_workspace(x: Any, step: Callable[[Any], Sequence[torch.Tensor]]) -> int:
    """Workspace bytes of `step(x)` (which returns the gradients), from the allocator's peak."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    grads = step(x)
    torch.cuda.synchronize()
    return workspace_bytes(torch.cuda.max_memory_allocated(), before, tensor_bytes(grads))


def _proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _release_free_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the fixed mmap threshold (WORKER_ENV) still returns large blocks


def rss_workspace(x: Any, step: Callable[[Any], Sequence[torch.Tensor]]) -> int:
    """Workspace bytes of `step(x)` from the peak resident set of THIS process; run it in a
    fresh process (`subprocess_workspace`) after one warm-up call, so that one-time
    initialisation and earlier peaks do not count. Writing 5 to clear_refs resets VmHWM."""
    _release_free_memory()
    Path("/proc/self/clear_refs").write_text("5")
    before = _proc_status_kb("VmHWM") * 1024
    grads = step(x)
    peak = _proc_status_kb("VmHWM") * 1024
    return workspace_bytes(peak, before, tensor_bytes(grads))


RSS_RESOLUTION_MB = (os.cpu_count() or 1) * 64 * 4096 / MB
"""About how far a VmHWM reading can be off: the kernel batches RSS counts per CPU (tens of
pages each). Workspaces below it are noise, and no ratio is taken against them."""
CUDA_RESOLUTION_MB = 0.01
"""The caching allocator's counters are exact; this only keeps ratios off a zero."""

WORKER_ENV = {
    # A fixed threshold turns off glibc's adaptive one, so large tensors stay mmap-backed and
    # go back to the kernel when freed: the warm-up's blocks are not reused invisibly.
    "MALLOC_MMAP_THRESHOLD_": str(128 * 1024),
}


def subprocess_workspace(argv: Sequence[str], timeout_s: float = 900) -> int:
    """Runs a worker (which calls `rss_workspace` and prints {"workspace_bytes": n} as its last
    line) in a fresh process and returns n."""
    env = dict(os.environ, **WORKER_ENV)
    done = subprocess.run(list(argv), capture_output=True, text=True, env=env, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"memory worker failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    lines = done.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"memory worker printed nothing; stderr: {done.stderr.strip()[-2000:]}")
    return int(json.loads(lines[-1])["workspace_bytes"])
