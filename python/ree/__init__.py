"""REE training package: backbone, PAM and PRM, the REE loss on the fused `ree_kernels` ops,
data (LFW, synthetic VLR faces, ImageFolder, RecordIO), training, evaluation (the LFW-VLR
benchmark among it) and quality estimation.

The names below are imported on first use, not with the package: the `ree` command
(`ree.entry`) sets OpenMP's environment before anything imports torch."""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"__version__": "ree_kernels", "REELoss": "ree.losses", "ArcFaceHead": "ree.models",
            "ModelConfig": "ree.models", "REEModel": "ree.models", "embed": "ree.models"}

__all__ = ["ArcFaceHead", "ModelConfig", "REELoss", "REEModel", "__version__", "embed"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ree' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(__all__))
