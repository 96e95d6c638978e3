"""Which backend runs an op: availability, dtype support and the `auto` rule (docs/spec.md §2).

Availability is read once, at import, into plain constants, so that torch.compile traces the
choice as constant Python rather than breaking the graph on it."""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Callable, Optional

import torch

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")

_ALL_FLOATS = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
_GPU_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
KERNEL_DTYPES = {"reference": _ALL_FLOATS, "cpu": _ALL_FLOATS, "cuda": _GPU_FLOATS, "triton": _GPU_FLOATS}

BUILD_HINT = "build it with `pip install --no-build-isolation -e .` (or `make install`)"


def _load_extension() -> Optional[str]:
    """Imports `ree_kernels._C`, which registers the torch.ops.ree.* C++ ops; the error, if any."""
    try:
        importlib.import_module("ree_kernels._C")
    except ImportError as err:
        return str(err)
    return None


EXTENSION_ERROR = _load_extension()
# (op, dispatch key) pairs the C++ extension implements; op is "head" or "aux".
_CPP_OPS = {"head": "ree::head_forward", "aux": "ree::aux_forward"}
CPP_KERNELS = frozenset(
    (op, key)
    for op, qualname in _CPP_OPS.items()
    for key in ("CPU", "CUDA")
    if EXTENSION_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key)
)
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
TRITON_USABLE = TRITON_INSTALLED and (TRITON_INTERPRET or torch.cuda.is_available())
"""Where the Triton ops are registered at import: an import inside a torch.compile trace breaks the graph."""


def _why_unavailable(backend: str, op: str, device: torch.device) -> Optional[str]:
    """None when `backend` can run `op` on `device`, else the reason and how to get it."""
    if backend == "reference":
        return None
    if backend in ("cpu", "cuda"):
        if device.type != backend:
            return f"backend={backend!r} runs on {backend.upper()} tensors; the inputs are on {device}"
        if EXTENSION_ERROR is not None:
            return f"the C++ extension ree_kernels._C is not built ({EXTENSION_ERROR}); {BUILD_HINT}"
        if (op, backend.upper()) not in CPP_KERNELS:
            if backend == "cuda":
                return ("ree_kernels._C was built without CUDA kernels; rebuild it where torch has CUDA "
                        f"and nvcc is on PATH, without REE_SKIP_CUDA=1: {BUILD_HINT}")
            return f"ree_kernels._C has no CPU kernel for {op}; rebuild it: {BUILD_HINT}"
        return None
    if backend == "triton":
        if not TRITON_INSTALLED:
            return "Triton is not installed: `pip install triton`"
        if device.type == "cpu" and not TRITON_INTERPRET:
            return ("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 in the environment "
                    "(set before ree_kernels and Triton are imported) to run the kernels on the CPU")
        if device.type not in ("cpu", "cuda"):
            return f"backend='triton' runs on CUDA tensors; the inputs are on {device}"
        return None
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve_backend(backend: str, op: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend for `op` ("head" or "aux") on `device` and `dtype`.

    `auto` is the fastest that implements the op there: on CUDA Triton, else the CUDA
    extension; on the CPU the C++ extension when built; the reference otherwise."""
    if backend == "auto":
        order = ("triton", "cuda", "reference") if device.type == "cuda" else ("cpu", "reference")
        for candidate in order:
            if dtype in KERNEL_DTYPES[candidate] and _why_unavailable(candidate, op, device) is None:
                return candidate
    reason = _why_unavailable(backend, op, device)
    if reason is not None:
        raise RuntimeError(reason)
    if dtype not in KERNEL_DTYPES[backend]:
        names = ", ".join(str(d).replace("torch.", "") for d in KERNEL_DTYPES[backend])
        raise TypeError(f"backend={backend!r} takes {names} inputs, got {str(dtype).replace('torch.', '')}")
    return backend


def kernel_op(backend: str, name: str) -> Callable:
    """`torch.ops.ree.<name>` for the C++ backends (the dispatcher picks the CPU or CUDA
    kernel), `torch.ops.ree.triton_<name>` for Triton (registered when ree_kernels is imported
    where Triton can run: see TRITON_USABLE)."""
    if backend == "triton":
        name = f"triton_{name}"
    return getattr(torch.ops.ree, name)
