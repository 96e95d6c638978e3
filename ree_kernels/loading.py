"""Loading the kernel backends when `ree_kernels` is imported: the registration of the C++ ops
(and of the emulated CUDA build's), and the import of the Triton package where Triton can run.

An import inside a torch.compile trace would break the graph, so this happens once, at import;
`backends` then reads what was loaded as constants. A broken Triton (a failing import, a missing
driver or library) must not make `import ree_kernels` fail: the error is recorded
(`backends.record_triton_failure`), `backend="triton"` raises it, and `auto` skips Triton."""
from __future__ import annotations

import importlib
import sys

from . import backends
from .registration import register_aux_op, register_head_ops


def register_extension_ops() -> None:
    """Registers the fakes and autograd of the C++ ops (`ree::head_*`, `ree::aux_forward`) where the
    extension is built, and of the emulated CUDA build's (`backends.CUDA_EMULATED`)."""
    prefixes = (("",) if backends.EXTENSION_ERROR is None else ()) + (
        (backends.CUDA_EMULATION_PREFIX,) if backends.CUDA_EMULATED else ())
    for prefix in prefixes:
        register_head_ops(prefix)
        register_aux_op(prefix)


def load_triton() -> None:
    """Imports `ree_kernels.triton` (registering torch.ops.ree.triton_*) where Triton can run
    (`backends.TRITON_USABLE`); a failure is recorded, never raised."""
    if not backends.TRITON_USABLE or "ree_kernels.triton" in sys.modules:
        return
    try:
        importlib.import_module("ree_kernels.triton")
    except Exception as err:  # noqa: BLE001 - any failure inside Triton's import only disables Triton
        backends.record_triton_failure(f"{type(err).__name__}: {err}")
