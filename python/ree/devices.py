"""Which device a run uses and whether it autocasts."""
from __future__ import annotations

from typing import Optional

import torch


def resolve_device(name: str) -> torch.device:
    """"auto": CUDA when available, else the CPU; CUDA means the current GPU (LOCAL_RANK's in a
    multi-process run); any other name is passed to torch.device.

    Raises:
        ValueError: "cuda" without a CUDA device.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but torch sees no CUDA device")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def autocast_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """bf16 autocast on CUDA by default ("auto"), off on the CPU unless amp="bf16"; None: off."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16
