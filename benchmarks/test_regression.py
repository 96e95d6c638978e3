"""A small speed-regression suite over the benchmark providers, for pytest-benchmark (docs/spec.md §6).

Each provider's forward + backward on one small shape per kernel, timed by pytest-benchmark:
seconds in all, so it can run on every commit and be compared between commits. The figures
that describe the kernels come from `benchmarks/run.py` (large shapes, workspace memory,
ratios to the floor); these only catch a change in speed.

    pytest benchmarks --benchmark-only                         # run and print the table
    pytest benchmarks --benchmark-only --benchmark-autosave    # ... and save it in .benchmarks/
    pytest benchmarks --benchmark-only --benchmark-compare --benchmark-compare-fail=median:25%
                                                               # against the last saved run
    pytest benchmarks --benchmark-only -k "not compile"        # without the torch.compile warm-ups

A provider that cannot run here (not built, no GPU, a peer package not installed) is skipped
with the reason, as run.py skips it.
"""
from __future__ import annotations

import math

import pytest
import torch

from benchmarks.providers import KERNELS, PROVIDERS, Case, Unavailable, build, make_inputs
from benchmarks.report import device_name, shape_text

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = "bfloat16" if DEVICE == "cuda" else "float32"
SHAPES = {"head": (64, 4096, 128), "aux": (256, 0, 128)} if DEVICE == "cpu" else \
    {"head": (512, 65_536, 512), "aux": (1024, 0, 512)}
"""B, C, D per kernel: small enough for milliseconds a step on the CPU."""


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_forward_backward(benchmark, provider: str, kernel: str) -> None:
    case = Case(kernel, provider, *SHAPES[kernel], DTYPE, DEVICE)
    try:
        forward, backward = build(case, eager_limit_bytes=math.inf)
    except Unavailable as err:
        pytest.skip(f"{provider} ({kernel}): {err}")
    x = make_inputs(case, cos_pos=0.8, seed=0)

    def step() -> tuple:
        grads = backward(forward(x))
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return grads

    # The first call compiles, autotunes and initialises: not timed, but it must be sound.
    assert all(bool(torch.isfinite(g).all()) for g in step()), f"{provider} returned non-finite gradients"
    benchmark.group = f"{kernel} {shape_text(kernel, SHAPES[kernel])} {DTYPE} on {device_name(DEVICE)}"
    benchmark.extra_info.update(kernel=kernel, provider=provider, B=case.B, C=case.C, D=case.D, dtype=DTYPE,
                                torch=torch.__version__, threads=torch.get_num_threads())
    benchmark(step)
