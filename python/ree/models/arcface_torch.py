"""insightface arcface_torch checkpoints (`backbone.pth` of iresnet18/34/50/100) in `REEModel`.

arcface_torch's iResNet (recognition/arcface_torch/backbones/iresnet.py) and ours
(`ree.models.iresnet` + `EmbeddingHead`) are the same network under other module names:
its stem `conv1, bn1, prelu`, stages `layer1..4` of `IBasicBlock`s (`bn1, conv1, bn2, prelu,
conv2, bn3`, and `downsample.0/1` in each stage's first block) and output layer
`bn2, dropout, fc, features` are our `backbone.stem.0..2`, `backbone.stages.0..3` (`body.0..5`,
`shortcut.0/1`) and `head.norm, head.fc, head.features`, tensor for tensor (same shapes, same
BatchNorm epsilon 1e-5, same flatten order before the FC). So a user's checkpoint loads as it
is: `arcface_torch_layout` reads its depth and embedding size, `read_arcface_torch` renames its
keys to ours, checking every key and shape both ways.
"""
from __future__ import annotations

import os
import re
from typing import Dict, Mapping, Tuple

import torch

from ..errors import DataError
from .iresnet import BACKBONES

ARCFACE_TORCH_ARCHS = ("r18", "r34", "r50", "r100")
"""Our names of the arcface_torch networks (its `iresnet18` … `iresnet100`, configs' "r18" …)."""

_STEM = {"conv1": "stem.0", "bn1": "stem.1", "prelu": "stem.2"}
_BLOCK = {"bn1": "body.0", "conv1": "body.1", "bn2": "body.2", "prelu": "body.3", "conv2": "body.4",
          "bn3": "body.5", "downsample.0": "shortcut.0", "downsample.1": "shortcut.1"}
_HEAD = {"bn2": "norm", "fc": "fc", "features": "features"}
_LAYER_KEY = re.compile(r"layer(\d+)\.(\d+)\.(.+)\.([a-z_]+)$")


class ArcFaceTorchError(DataError):
    """A file that is not an arcface_torch iResNet state dict (the message names the file and key)."""


def ree_key(key: str) -> str | None:
    """Our `REEModel` key of arcface_torch state-dict key `key`, or None if it has none."""
    module, _, tensor = key.rpartition(".")
    if module in _STEM:
        return f"backbone.{_STEM[module]}.{tensor}"
    if module in _HEAD:
        return f"head.{_HEAD[module]}.{tensor}"
    match = _LAYER_KEY.match(key)
    if match and match.group(3) in _BLOCK:
        stage, block, part, tensor = match.groups()
        if int(stage) >= 1:
            return f"backbone.stages.{int(stage) - 1}.{int(block)}.{_BLOCK[part]}.{tensor}"
    return None


def load_state_dict(path: str | os.PathLike) -> Dict[str, torch.Tensor]:
    """The tensors of an arcface_torch checkpoint file: a plain state dict (`backbone.pth`), or
    the `state_dict_backbone` of its resumable `checkpoint_gpu_<rank>.pt`; a `module.` prefix
    (a DDP wrapper's) is dropped. Read with `weights_only=True` (no code runs).

    Raises:
        ArcFaceTorchError: unreadable, or not a mapping of names to tensors.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and OS errors alike
        raise ArcFaceTorchError(f"{path}: cannot read it as a torch state dict ({err})") from err
    if isinstance(state, Mapping) and "state_dict_backbone" in state:
        state = state["state_dict_backbone"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ArcFaceTorchError(f"{path}: not a state dict (a mapping of names to tensors)")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def arcface_torch_layout(state: Mapping[str, torch.Tensor], path: str | os.PathLike) -> Tuple[str, int]:
    """(our arch name, embedding size) of arcface_torch state dict `state` (read from `path`):
    the blocks per stage and `fc.weight`'s rows.

    Raises:
        ArcFaceTorchError: no `fc.weight` or `layer<k>.<i>.` keys, or a depth that is none of
            iresnet18/34/50/100.
    """
    depths: Dict[int, int] = {}
    for key in state:
        match = _LAYER_KEY.match(key)
        if match:
            stage, block = int(match.group(1)), int(match.group(2))
            depths[stage] = max(depths.get(stage, 0), block + 1)
    if "fc.weight" not in state or not depths:
        missing = "fc.weight" if "fc.weight" not in state else "layer1.0.conv1.weight"
        raise ArcFaceTorchError(f"{path}: not an arcface_torch iResNet state dict (no key {missing!r}; "
                                f"first key {next(iter(state), None)!r})")
    layers = tuple(depths.get(stage, 0) for stage in range(1, max(depths) + 1))
    for arch in ARCFACE_TORCH_ARCHS:
        if BACKBONES[arch].layers == layers:
            return arch, int(state["fc.weight"].shape[0])
    raise ArcFaceTorchError(f"{path}: an iResNet with {layers} blocks per stage, none of arcface_torch's "
                            f"{', '.join(f'{a} {BACKBONES[a].layers}' for a in ARCFACE_TORCH_ARCHS)}")


def read_arcface_torch(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                       path: str | os.PathLike) -> Dict[str, torch.Tensor]:
    """arcface_torch state dict `state` (from `path`) under our keys: exactly the `backbone.*`
    and `head.*` tensors of `expected` (a `REEModel` state dict), each of the same shape.

    Raises:
        ArcFaceTorchError: naming `path` and the first key that has no counterpart in our
            model, that our model needs and the file lacks, or whose shape differs.
    """
    ours: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        target = ree_key(key)
        if target is None or target not in expected:
            raise ArcFaceTorchError(f"{path}: key {key!r} has no place in the model; is it an arcface_torch "
                                    f"iResNet backbone.pth of this depth?")
        if tuple(value.shape) != tuple(expected[target].shape):
            raise ArcFaceTorchError(f"{path}: key {key!r} has shape {tuple(value.shape)}, the model's "
                                    f"{target} has {tuple(expected[target].shape)}")
        ours[target] = value
    for target in expected:
        if target.startswith(("backbone.", "head.")) and target not in ours:
            raise ArcFaceTorchError(f"{path}: lacks the model's {target} (no arcface_torch key maps to it)")
    return ours

