"""Input checks shared by every backend (docs/spec.md §2): one function per op, errors that name the argument."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .reference import MARGIN_MODES, REDUCTIONS, RI_FORMS

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _tensor(name: str, x: object, ndim: int, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {names}; got {str(x.dtype).replace('torch.', '')}")
    return x


def _same_device(reference_name: str, reference: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    for name, x in others.items():
        if x is not None and x.device != reference.device:
            raise ValueError(f"{name} is on {x.device} but {reference_name} is on {reference.device}")


def _length(name: str, x: Optional[torch.Tensor], n: int, what: str) -> None:
    if x is not None and x.shape[0] != n:
        raise ValueError(f"{name} has {x.shape[0]} entries but {what} is {n}")


def _finite_scalar(name: str, value: object, positive: bool = False) -> None:
    if isinstance(value, torch.Tensor) or not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be a finite{' positive' if positive else ''} number, got {value}")


def _choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def validate_head_inputs(
    embeddings: torch.Tensor,
    prototypes: torch.Tensor,
    labels: torch.Tensor,
    ui_center: Optional[torch.Tensor],
    sample_weight: Optional[torch.Tensor],
    *,
    scale: float,
    margin: float,
    margin_mode: str,
    ri_form: str,
    ignore_index: int,
    reduction: str,
    num_classes: Optional[int] = None,
) -> None:
    """Raises TypeError/ValueError naming the argument for anything `arcface_head` cannot take.

    The label range is a data-dependent check: it runs eagerly, and is skipped while
    torch.compile traces (no host sync in a graph); the kernels then turn an out-of-range
    label into a NaN loss for its row rather than reading out of bounds. Labels must lie in
    [0, num_classes), by default the number of prototypes (a class shard passes the total)."""
    _tensor("embeddings", embeddings, 2)
    _tensor("prototypes", prototypes, 2)
    _tensor("labels", labels, 1, (torch.int64,))
    if ui_center is not None:
        _tensor("ui_center", ui_center, 1)
    if sample_weight is not None:
        _tensor("sample_weight", sample_weight, 1)
    _same_device("embeddings", embeddings, prototypes=prototypes, labels=labels,
                 ui_center=ui_center, sample_weight=sample_weight)
    if prototypes.dtype != embeddings.dtype:
        raise TypeError(f"prototypes has dtype {prototypes.dtype} but embeddings has {embeddings.dtype}; "
                        "they must match")
    batch, dim = embeddings.shape
    if batch == 0:
        raise ValueError("embeddings has no rows (B = 0)")
    if prototypes.shape[0] == 0:
        raise ValueError("prototypes has no rows (C = 0)")
    if dim == 0:
        raise ValueError("embeddings has no columns (D = 0)")
    if prototypes.shape[1] != dim:
        raise ValueError(f"prototypes has D = {prototypes.shape[1]} but embeddings has D = {dim}")
    if ui_center is not None and ui_center.shape[0] != dim:
        raise ValueError(f"ui_center has D = {ui_center.shape[0]} but embeddings has D = {dim}")
    _length("labels", labels, batch, "the batch size B")
    _length("sample_weight", sample_weight, batch, "the batch size B")
    _finite_scalar("scale", scale, positive=True)
    _finite_scalar("margin", margin)
    _choice("margin_mode", margin_mode, MARGIN_MODES)
    _choice("ri_form", ri_form, RI_FORMS)
    _choice("reduction", reduction, REDUCTIONS)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not torch.compiler.is_compiling():
        num_classes = prototypes.shape[0] if num_classes is None else num_classes
        bad = ((labels < 0) | (labels >= num_classes)) & (labels != ignore_index)
        if bool(bad.any()):
            value = int(labels[bad][0])
            raise ValueError(f"labels must lie in [0, {num_classes}) or equal ignore_index={ignore_index}; "
                             f"found {value}")


def validate_kernel_options(chunk_size: int, grad_filter_eps: float) -> None:
    """The kernels' tuning options of `arcface_head` (see its docstring)."""
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 0:
        raise ValueError(f"chunk_size must be an int >= 0 (0: automatic), got {chunk_size!r}")
    if not isinstance(grad_filter_eps, (int, float)) or not 0.0 <= grad_filter_eps < 1.0:
        raise ValueError(f"grad_filter_eps must be a number in [0, 1), got {grad_filter_eps!r}")


def validate_aux_inputs(
    ri_pred: torch.Tensor,
    ri_target: torch.Tensor,
    mu_ui: object,
    *,
    tau: float,
    beta: float,
    attn: Optional[torch.Tensor],
    embeddings: Optional[torch.Tensor],
    ui_center: Optional[torch.Tensor],
    recognizable: Optional[torch.Tensor],
    weights: Sequence[float],
) -> None:
    """Raises TypeError/ValueError naming the argument for anything `ree_aux_loss` cannot take."""
    _tensor("ri_pred", ri_pred, 1)
    _tensor("ri_target", ri_target, 1)
    batch = ri_pred.shape[0]
    if batch == 0:
        raise ValueError("ri_pred has no rows (B = 0)")
    _length("ri_target", ri_target, batch, "the length of ri_pred")
    if isinstance(mu_ui, torch.Tensor):
        if mu_ui.numel() != 1:
            raise ValueError(f"mu_ui must be a scalar, got shape {tuple(mu_ui.shape)}")
        _tensor("mu_ui", mu_ui.reshape(()), 0)
    else:
        _finite_scalar("mu_ui", mu_ui)
    _finite_scalar("tau", tau)
    _finite_scalar("beta", beta, positive=True)
    if attn is not None:
        _tensor("attn", attn, 2)
        if embeddings is None or ui_center is None:
            raise ValueError("attn needs embeddings and ui_center (the PAM target is built from them)")
        _length("attn", attn, batch, "the length of ri_pred")
        if attn.shape[1] == 0:
            raise ValueError("attn has no columns (D = 0)")
    if embeddings is not None:
        _tensor("embeddings", embeddings, 2)
        _length("embeddings", embeddings, batch, "the length of ri_pred")
        if attn is not None and embeddings.shape[1] != attn.shape[1]:
            raise ValueError(f"embeddings has D = {embeddings.shape[1]} but attn has D = {attn.shape[1]}")
    if ui_center is not None:
        _tensor("ui_center", ui_center, 1)
        if embeddings is not None and ui_center.shape[0] != embeddings.shape[1]:
            raise ValueError(f"ui_center has D = {ui_center.shape[0]} but embeddings has D = {embeddings.shape[1]}")
    if recognizable is not None:
        _tensor("recognizable", recognizable, 1, (torch.bool,))
        _length("recognizable", recognizable, batch, "the length of ri_pred")
    _same_device("ri_pred", ri_pred, ri_target=ri_target, attn=attn, embeddings=embeddings,
                 ui_center=ui_center, recognizable=recognizable,
                 mu_ui=mu_ui if isinstance(mu_ui, torch.Tensor) else None)
    if len(weights) != 3:
        raise ValueError(f"weights must hold three numbers (l1, id, mse), got {len(weights)}")
    for name, w in zip(("weights[0]", "weights[1]", "weights[2]"), weights):
        _finite_scalar(name, w)
