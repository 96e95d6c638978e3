"""Which device a run uses and whether it autocasts."""
from __future__ import annotations

from typing import Optional

import torch

from .errors import DeviceError


def resolve_device(name: str) -> torch.device:
    """"auto": CUDA when available, else the CPU; CUDA means the current GPU (LOCAL_RANK's in a
    multi-process run); any other name is passed to torch.device.

    Raises:
        DeviceError (a ValueError): "cuda" without a CUDA device.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("device 'cuda' asked for, but torch sees no CUDA device here "
                              f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use cpu or auto")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def check_backend(backend: str, device: torch.device) -> None:
    """That kernel backend `backend` runs the ops on `device` here.

    Raises:
        DeviceError: it does not (not built, not installed, another device), saying why and how
            to get it (ree_kernels.backends' reason)."""
    from ree_kernels import backends

    for op in ("head", "aux"):
        try:
            backends.resolve_backend(backend, op, device, torch.float32)
        except (RuntimeError, TypeError) as err:
            raise DeviceError(f"backend {backend!r} cannot run on this run's device ({device}): {err}") from err


def autocast_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """bf16 autocast on CUDA by default ("auto"), off on the CPU unless amp="bf16"; None: off."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16
