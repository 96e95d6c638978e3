"""ONNX export of a trained model: images -> (embedding, quality), checked with onnxruntime.

Uses torch.onnx.export's torch.export-based path (`dynamo=True`, the default since torch 2.9;
the legacy TorchScript exporter is deprecated), with a dynamic batch dimension."""
from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .models.ree_model import REEModel

INPUT_NAME = "images"
OUTPUT_NAMES = ("embedding", "quality")


class _InferenceGraph(nn.Module):
    """What the ONNX file computes: the (unnormalised) embedding v and the quality ξ̂."""

    def __init__(self, model: REEModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        out = self.model(images)
        return out.embedding, out.quality


def export_onnx(
    model: REEModel,
    path: str | Path,
    *,
    opset: Optional[int] = None,
    check: bool = True,
    check_batch: int = 4,
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> Dict[str, float]:
    """Writes a copy of `model` (in eval mode, on the CPU, float32) to `path` as ONNX with input
    `images` [N, 3, S, S] (N dynamic) and outputs `embedding` [N, D] and `quality` [N].

    With `check`, runs the file with onnxruntime on `check_batch` random images and raises
    RuntimeError if an output differs from PyTorch's beyond atol + rtol·|torch|; returns the
    max absolute difference per output ({} without check)."""
    if not isinstance(model, REEModel):
        raise TypeError(f"model must be a REEModel, got {type(model).__name__}")
    if not isinstance(check_batch, int) or check_batch <= 0:
        raise ValueError(f"check_batch must be a positive int, got {check_batch!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    graph = _InferenceGraph(copy.deepcopy(model)).to("cpu", torch.float32).eval()
    size = model.input_size
    example = torch.zeros(2, 3, size, size)
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)  # "torchvision is not installed" notices, irrelevant here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (FutureWarning, DeprecationWarning, UserWarning))
        try:
            torch.onnx.export(
                graph, (example,), str(path), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                dynamic_shapes={"images": {0: torch.export.Dim("batch")}}, opset_version=opset,
                dynamo=True, external_data=False, verbose=False,
            )
        finally:
            registry_log.setLevel(level)
    if not check:
        return {}
    return check_onnx(graph.model, path, batch=check_batch, atol=atol, rtol=rtol)


def check_onnx(model: REEModel, path: str | Path, *, batch: int = 4, atol: float = 1e-4, rtol: float = 1e-4,
               seed: int = 0) -> Dict[str, float]:
    """Compares the ONNX file's outputs with the model's on random images (see export_onnx)."""
    import onnxruntime as ort

    model = copy.deepcopy(model).to("cpu", torch.float32).eval()
    images = torch.randn(batch, 3, model.input_size, model.input_size,
                         generator=torch.Generator().manual_seed(seed)).clamp(-1, 1)
    with torch.no_grad():
        out = model(images)
    expected = {"embedding": out.embedding.numpy(), "quality": out.quality.numpy()}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = dict(zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), {INPUT_NAME: images.numpy()})))
    diffs = {}
    for name in OUTPUT_NAMES:
        if got[name].shape != expected[name].shape:
            raise RuntimeError(f"ONNX output {name} has shape {got[name].shape}, PyTorch {expected[name].shape}")
        diffs[name] = float(np.max(np.abs(got[name] - expected[name])))
        if not np.allclose(got[name], expected[name], atol=atol, rtol=rtol):
            raise RuntimeError(f"ONNX output {name} differs from PyTorch by up to {diffs[name]:.3g} "
                               f"(atol={atol}, rtol={rtol})")
    return diffs
