"""Which backend runs an op: one description per backend, and the `auto` rule (docs/spec.md §2).

Each backend is described once, in `DESCRIPTIONS` (in the spirit of xformers' operator
capabilities): the devices it runs on, the dtypes it takes, the ops it implements and what its
`chunk_size` means. The dtype lists, the backend names (`BACKENDS`, which the CLI offers), the
`auto` order and the errors are all derived from these descriptions.

What is built and importable is read once, at import, into plain constants, so that
torch.compile traces the choice as constant Python rather than breaking the graph on it: the C++
extension says what it was built with (`ree_kernels._C.build_info()`), and the Triton package is
imported by `loading.load_triton`, which records a failure here instead of raising it."""
from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Mapping, Optional, Tuple

import torch

BUILD_HINT = "build it with `pip install --no-build-isolation -e .` (or `make install`)"

OPS = ("head", "aux")
"""The public ops: "head" (`arcface_head`) and "aux" (`ree_aux_loss`)."""

KERNEL_OPS: Mapping[str, Tuple[str, ...]] = {"head": ("head_forward", "head_backward"), "aux": ("aux_forward",)}
"""The torch.ops.ree ops a kernel backend needs for each public op (Triton's carry a `triton_` prefix)."""


@dataclass(frozen=True)
class ChunkRule:
    """What a backend does with `chunk_size`: 0 always means "chosen from the sizes"; otherwise
    it must lie in [low, high] (high None: no bound) and, with `power_of_two`, be a power of two."""

    meaning: str
    low: int = 1
    high: Optional[int] = None
    power_of_two: bool = False

    def accepts(self, chunk_size: int) -> bool:
        if chunk_size == 0:
            return True
        if chunk_size < self.low or (self.high is not None and chunk_size > self.high):
            return False
        return not self.power_of_two or chunk_size & (chunk_size - 1) == 0

    def fit(self, chunk_size: int) -> int:
        """The accepted value nearest below `chunk_size` (clamped into the range): how
        backend="auto" passes on a chunk_size meant for another backend."""
        if self.accepts(chunk_size):
            return chunk_size
        value = max(self.low, chunk_size if self.high is None else min(chunk_size, self.high))
        if self.power_of_two:
            value = 1 << (value.bit_length() - 1)
        return value

    def describe(self) -> str:
        bound = f"[{self.low}, {self.high}]" if self.high is not None else f">= {self.low}"
        kind = "a power of two" if self.power_of_two else "an int"
        return f"0 (automatic) or {kind} {'in ' if self.high is not None else ''}{bound}"


@dataclass(frozen=True)
class Backend:
    """One backend's capabilities.

    Attributes:
        name: the `backend=` value.
        devices: device types of the tensors it runs on (empty: any device).
        auto_devices: device types where backend="auto" may choose it (empty: any device);
            among the candidates `auto` takes the first in `DESCRIPTIONS` that can run the op.
        dtypes: the input dtypes it takes.
        ops: the public ops it implements ("head", "aux").
        chunk_size: what `chunk_size` means to it, and which values it accepts.
        grad_in_forward: its head computes the gradients in the forward pass when the loss is
            reduced (`head_forward_with_grad`), which beats recomputing on that backend.
        grad_filter: it implements `grad_filter_eps > 0`.
    """

    name: str
    devices: Tuple[str, ...]
    auto_devices: Tuple[str, ...]
    dtypes: Tuple[torch.dtype, ...]
    ops: Tuple[str, ...]
    chunk_size: ChunkRule
    grad_in_forward: bool = False
    grad_filter: bool = False

    def runs_on(self, device: torch.device) -> bool:
        return not self.devices or device.type in self.devices

    def auto_candidate(self, device: torch.device, dtype: torch.dtype) -> bool:
        return (not self.auto_devices or device.type in self.auto_devices) and dtype in self.dtypes


CUDA_EMULATION_LIBRARY = os.environ.get("REE_CUDA_EMULATION_LIBRARY", "")
"""Tests only: the path of the CUDA backend's C++ glue and kernels built for the CPU over an
emulated CUDA runtime (tests/cuda_emulation; `make gpu-verify-cuda` sets it). Where set,
backend="cuda" takes CPU tensors and runs that build through its ops ree::cuda_emulated_*
(never chosen by `auto`); docs/design.md (## CUDA backend) says what this proves."""
CUDA_EMULATION_PREFIX = "cuda_emulated_"

TRITON_MAX_CLASS_TILE = 128
"""The largest `chunk_size` (class tile) of backend="triton" (ree_kernels/triton/tiling.py says why)."""

_ALL_FLOATS = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
_GPU_FLOATS = (torch.float32, torch.bfloat16, torch.float16)

DESCRIPTIONS: Tuple[Backend, ...] = (
    Backend("triton", devices=("cuda", "cpu"), auto_devices=("cuda",), dtypes=_GPU_FLOATS, ops=OPS,
            chunk_size=ChunkRule("the class tile BLOCK_C of every kernel (tl.dot needs at least 16 columns, "
                                 "tl.arange a power of two, wider ones spill registers)", low=16,
                                 high=TRITON_MAX_CLASS_TILE, power_of_two=True),
            grad_filter=True),
    Backend("cuda", devices=("cuda", "cpu") if CUDA_EMULATION_LIBRARY else ("cuda",), auto_devices=("cuda",),
            dtypes=_GPU_FLOATS, ops=OPS,
            chunk_size=ChunkRule("classes per cuBLAS product and fused epilogue (the B × chunk float32 "
                                 "workspace)")),
    Backend("cpu", devices=("cpu",), auto_devices=("cpu",), dtypes=_ALL_FLOATS, ops=OPS,
            chunk_size=ChunkRule("classes per chunk of the class loop; chunk_size >= C lets the gradient-in-"
                                 "forward pass take whole rows"),
            grad_in_forward=True),
    Backend("reference", devices=(), auto_devices=(), dtypes=_ALL_FLOATS, ops=OPS,
            chunk_size=ChunkRule("ignored: the eager reference materialises the B × C logits")),
)
"""Every backend, fastest first (the `auto` order within a device)."""

BY_NAME: Mapping[str, Backend] = {b.name: b for b in DESCRIPTIONS}
BACKENDS = ("auto",) + tuple(BY_NAME)
KERNEL_DTYPES: Mapping[str, Tuple[torch.dtype, ...]] = {b.name: b.dtypes for b in DESCRIPTIONS}
FLOAT_DTYPES: Tuple[torch.dtype, ...] = tuple(dict.fromkeys(d for b in DESCRIPTIONS for d in b.dtypes))
"""Every dtype some backend takes: what the ops accept before a backend is chosen."""


def _load_extension() -> Tuple[Optional[str], Dict[str, object]]:
    """Imports `ree_kernels._C`, which registers the torch.ops.ree.* C++ ops: (the import error,
    if any; its build_info())."""
    try:
        extension = importlib.import_module("ree_kernels._C")
    except ImportError as err:
        return str(err), {}
    if not hasattr(extension, "build_info"):  # a build from before build_info existed
        return f"ree_kernels._C is out of date (it has no build_info); {BUILD_HINT}", {}
    return None, extension.build_info()


EXTENSION_ERROR, BUILD_INFO = _load_extension()
"""The extension's import error (None once it is built), and what it reports it was built with:
with_cuda, cuda_runtime, torch, compiler, cpu_features, kernels ({"CPU": ops, "CUDA": ops})."""


def _cpp_kernels(info: Mapping[str, object]) -> FrozenSet[Tuple[str, str]]:
    kernels = info.get("kernels", {})
    return frozenset((op, key) for op, needed in KERNEL_OPS.items() for key, built in kernels.items()
                     if set(needed) <= set(built))


CPP_KERNELS = _cpp_kernels(BUILD_INFO)
"""(op, dispatch key) pairs the C++ extension implements; op is "head" or "aux", key "CPU" or "CUDA"."""


def _load_cuda_emulation(path: str) -> Optional[torch.library.Library]:
    """Loads the emulated CUDA build (`CUDA_EMULATION_LIBRARY`), which implements the ops
    ree::cuda_emulated_* for CPU tensors, and defines those ops with the schemas of the real ones."""
    if not path or EXTENSION_ERROR is not None:
        return None
    torch.ops.load_library(path)
    library = torch.library.Library("ree", "FRAGMENT")
    for names in KERNEL_OPS.values():
        for name in names:
            schema = str(getattr(torch.ops.ree, name).default._schema)  # "ree::name(...) -> ..."
            library.define(CUDA_EMULATION_PREFIX + schema.split("::", 1)[1])
    return library


_CUDA_EMULATION = _load_cuda_emulation(CUDA_EMULATION_LIBRARY)
CUDA_EMULATED = _CUDA_EMULATION is not None
"""Whether backend="cuda" runs the emulated CUDA build on CPU tensors (`CUDA_EMULATION_LIBRARY`)."""

TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
TRITON_USABLE = TRITON_INSTALLED and (TRITON_INTERPRET or torch.cuda.is_available())
"""Whether the Triton ops are registered: Triton is installed, can run here (CUDA, or its CPU
interpreter) and imported without error (`loading.load_triton`). An import inside a torch.compile trace
would break the graph, so the import happens once, when ree_kernels is imported."""
TRITON_ERROR: Optional[str] = None
"""Why importing the Triton backend failed (None: it did not, or was not attempted)."""


def record_triton_failure(error: str) -> None:
    """Marks the Triton backend unusable, with why (`loading.load_triton` calls it when importing
    the Triton package fails)."""
    global TRITON_USABLE, TRITON_ERROR
    TRITON_USABLE, TRITON_ERROR = False, error


def _why_unavailable(backend: Backend, op: str, device: torch.device) -> Optional[str]:
    """None when `backend` can run `op` on `device` here, else the reason and how to get it."""
    if not backend.runs_on(device):
        return (f"backend={backend.name!r} runs on {' or '.join(t.upper() for t in backend.devices)} tensors; "
                f"the inputs are on {device}")
    if op not in backend.ops:
        return f"backend={backend.name!r} does not implement the {op} op"
    if backend.name == "cuda" and CUDA_EMULATED:
        return None
    if backend.name in ("cpu", "cuda"):
        if EXTENSION_ERROR is not None:
            return f"the C++ extension ree_kernels._C is not built ({EXTENSION_ERROR}); {BUILD_HINT}"
        if (op, backend.name.upper()) not in CPP_KERNELS:
            if backend.name == "cuda":
                return ("ree_kernels._C was built without CUDA kernels; rebuild it where torch has CUDA "
                        f"and nvcc is on PATH, without REE_SKIP_CUDA=1: {BUILD_HINT}")
            return f"ree_kernels._C has no CPU kernel for {op}; rebuild it: {BUILD_HINT}"
    if backend.name == "triton":
        if not TRITON_INSTALLED:
            return "Triton is not installed: `pip install triton`"
        if TRITON_ERROR is not None:
            return (f"Triton is installed but importing the Triton backend failed ({TRITON_ERROR}); "
                    "the other backends still work")
        if device.type == "cpu" and not TRITON_INTERPRET:
            return ("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 in the environment "
                    "(set before ree_kernels and Triton are imported) to run the kernels on the CPU")
    return None


def _dtype_names(dtypes: Tuple[torch.dtype, ...]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def resolve_backend(backend: str, op: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend for `op` ("head" or "aux") on `device` and `dtype`.

    `auto` is the first backend of `DESCRIPTIONS` (fastest first) whose `auto_devices` holds the
    device type, that takes the dtype and that can run the op here; the reference runs anything.

    Raises:
        ValueError: `backend` is not one of BACKENDS.
        RuntimeError: the backend cannot run here (not built, not installed, another device),
            with what to do about it.
        TypeError: the backend does not take `dtype` (for `auto`: no backend does).
    """
    if backend == "auto":
        for candidate in DESCRIPTIONS:
            if candidate.auto_candidate(device, dtype) and _why_unavailable(candidate, op, device) is None:
                return candidate.name
        raise TypeError(f"no backend runs {op} on {device} in {str(dtype).replace('torch.', '')}; the backends "
                        f"take {_dtype_names(FLOAT_DTYPES)}")
    if backend not in BY_NAME:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    description = BY_NAME[backend]
    reason = _why_unavailable(description, op, device)
    if reason is not None:
        raise RuntimeError(reason)
    if dtype not in description.dtypes:
        raise TypeError(f"backend={backend!r} takes {_dtype_names(description.dtypes)} inputs, "
                        f"got {str(dtype).replace('torch.', '')}")
    return backend


def chunk_size_for(requested: str, chosen: str, chunk_size: int) -> int:
    """`chunk_size` as the chosen backend takes it. Under backend="auto" a value meant for another
    backend is fitted into the chosen one's range (a tuning hint must not make `auto` fail on
    another machine); a backend asked for by name gets it as given, or raises.

    Raises:
        ValueError: naming chunk_size and what the named backend accepts.
    """
    rule = BY_NAME[chosen].chunk_size
    if requested == "auto":
        return rule.fit(chunk_size)
    if not rule.accepts(chunk_size):
        raise ValueError(f"chunk_size for backend={chosen!r} is {rule.meaning}: {rule.describe()}, "
                         f"got {chunk_size}")
    return chunk_size


def kernel_op(backend: str, name: str) -> Callable:
    """`torch.ops.ree.<name>` for the C++ backends (the dispatcher picks the CPU or CUDA
    kernel), `torch.ops.ree.triton_<name>` for Triton (registered by `loading.load_triton`), and
    `torch.ops.ree.cuda_emulated_<name>` for CUDA where it is emulated (`CUDA_EMULATED`)."""
    if backend == "triton":
        name = f"triton_{name}"
    elif backend == "cuda" and CUDA_EMULATED:
        name = CUDA_EMULATION_PREFIX + name
    return getattr(torch.ops.ree, name)
