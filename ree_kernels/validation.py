"""Input checks shared by every backend (docs/spec.md §2): one function per op, errors that name the argument.

Scalars are checked with comparisons only, so that the checks also trace under
`torch.compile(dynamic=True)`, where a Python number may arrive as a SymInt or SymFloat (NaN fails
every comparison, so it is refused with the rest)."""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch

from .backends import FLOAT_DTYPES
from .contract import MARGIN_MODES, MAX_SCALE, REDUCTIONS, RI_FORMS, HeadOptions

FLOAT32_MAX = torch.finfo(torch.float32).max
MAX_MARGIN = math.pi / 2
"""margin must be below this: at m ≥ π/2 the target logit of an orthogonal face falls to −s."""
MAX_TAU = 10.0
MAX_BETA = 10.0
"""The ranges of the aux losses' τ ([0, MAX_TAU]) and smooth-L1 β ((0, MAX_BETA]): both are on
the RI's scale (|ξ| ≤ 4 for the product and sum forms, docs/spec.md §1.4), where a value
beyond 10 can only be a unit mistake."""
INT64_RANGE = (-(2 ** 63), 2 ** 63 - 1)

_INTS = (int, torch.SymInt)
_NUMBERS = (int, float, torch.SymInt, torch.SymFloat)


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


def _number(name: str, value: object, low: float, high: float, *, low_open: bool = False,
            high_open: bool = False, integer: bool = False) -> None:
    """A Python number (an int with `integer`) in the interval from low to high, each end open or
    closed. Every bound is finite, so inf and NaN are refused whatever the interval, and the
    bounds of float arguments lie within float32's range, so values like 1e39 are refused too."""
    if isinstance(value, bool) or not isinstance(value, _INTS if integer else _NUMBERS):
        raise TypeError(f"{name} must be {'an int' if integer else 'a Python number'}, got {type(value).__name__}")
    above = low < value if low_open else low <= value
    below = value < high if high_open else value <= high
    if not (above and below):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must lie in {interval}, got {value}")


def _float32_number(name: str, value: object) -> None:
    """Finite and representable in float32 (the kernels' accumulation type)."""
    _number(name, value, -FLOAT32_MAX, FLOAT32_MAX)


def labels_checked_on_device(device: torch.device) -> bool:
    """Whether the label range is checked by a device-side assertion instead of on the host: on
    CUDA, where reading the result back would stall the host on the device at every step."""
    return device.type == "cuda"


def bad_labels(labels: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """[B] bool, on the labels' device (not read back): labels outside [0, num_classes) that are
    not ignore_index."""
    return ((labels < 0) | (labels >= num_classes)) & (labels != ignore_index)


def label_range_message(num_classes: int, ignore_index: int, found: object) -> str:
    return f"labels must lie in [0, {num_classes}) or equal ignore_index={ignore_index}; found {found}"


def _underlying(x: torch.Tensor) -> torch.Tensor:
    """The plain tensor under torch.func's wrappers (vmap's BatchedTensor, grad's wrapper): under
    vmap it holds the labels of every slice, and reading it back is not data-dependent control
    flow inside the transform, which `bool()` on the wrapper is (torch refuses it)."""
    while torch._C._functorch.is_functorch_wrapped_tensor(x):
        x = torch._C._functorch.get_unwrapped(x)
    return x


def _check_label_range(labels: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    if torch.compiler.is_compiling():
        return  # no check inside a graph: the kernels poison the row's loss with NaN
    labels = _underlying(labels)
    bad = bad_labels(labels, num_classes, ignore_index)
    if labels_checked_on_device(labels.device):
        # Fails at the next synchronisation, never waits; the value is not known without a read.
        torch._assert_async(~bad.any(), label_range_message(num_classes, ignore_index, "a label out of range"))
    elif bool(bad.any()):
        raise ValueError(label_range_message(num_classes, ignore_index, int(labels[bad][0])))


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
    num_classes: Optional[int] = None,
    check_labels: bool = True,
    **options: Any,
) -> None:
    """Checks everything `arcface_head` takes (docs/spec.md §2): shapes, dtypes, devices, the
    head's options (the keywords of `contract.HeadOptions`, defaults for those not given) and
    the range of every scalar (scale in (0, contract.MAX_SCALE], margin in [0, π/2); chunk_size
    and grad_filter_eps as `validate_kernel_options` says). The backend's name and what it
    takes are `backends.resolve_backend`'s.

    Labels must lie in [0, num_classes) (by default the number of prototypes; a class shard
    passes the total) or equal ignore_index. That check reads the data, so where it costs a
    host-device synchronisation it does not wait: on CPU tensors a bad label raises ValueError
    here; on CUDA tensors a device-side assertion (`torch._assert_async`) fails the next
    synchronisation instead (a CUDA error that carries the message); inside torch.compile it is
    skipped, and the kernels turn an out-of-range label into a NaN loss for its row rather than
    reading out of bounds. `check_labels=False` leaves the check to the caller (the sharded head
    folds it into the exchange its ranks make anyway).

    Raises:
        TypeError: an argument of the wrong type or dtype, an unknown option.
        ValueError: a wrong shape, a device mismatch, an empty input, a scalar out of its
            range, an unknown option value, or (CPU tensors) a label out of range.
    """
    opts = HeadOptions(**options)
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
    _number("scale", opts.scale, 0.0, MAX_SCALE, low_open=True)
    _number("margin", opts.margin, 0.0, MAX_MARGIN, high_open=True)
    _choice("margin_mode", opts.margin_mode, MARGIN_MODES)
    _choice("ri_form", opts.ri_form, RI_FORMS)
    _choice("reduction", opts.reduction, REDUCTIONS)
    _number("ignore_index", opts.ignore_index, *INT64_RANGE, integer=True)
    validate_kernel_options(opts.chunk_size, opts.grad_filter_eps)
    if check_labels:
        _check_label_range(labels, prototypes.shape[0] if num_classes is None else num_classes, opts.ignore_index)


def validate_class_index(class_index: object, prototypes: torch.Tensor) -> int:
    """Checks a PartialFC class index: int64 [C'], C' ≥ 1, on the prototypes' device; on the CPU
    also that its entries are distinct and lie in [0, C) (elsewhere that would read the data back,
    so it is left to the caller, as `ree.models` samples it). Returns C'.

    Raises:
        TypeError: not an int64 tensor.
        ValueError: a wrong shape or device, an entry out of range or repeated.
    """
    index = _tensor("class_index", class_index, 1, (torch.int64,))
    _same_device("prototypes", prototypes, class_index=index)
    if index.shape[0] == 0:
        raise ValueError("class_index is empty (C' = 0)")
    if index.device.type == "cpu":
        classes = prototypes.shape[0]
        bad = (index < 0) | (index >= classes)
        if bool(bad.any()):
            raise ValueError(f"class_index must lie in [0, {classes}); found {int(index[bad][0])}")
        if torch.unique(index).shape[0] != index.shape[0]:
            raise ValueError("class_index has a repeated class")
    return index.shape[0]


def validate_kernel_options(chunk_size: int, grad_filter_eps: float) -> None:
    """The kernels' tuning options of `arcface_head` (see its docstring); what each backend
    accepts of chunk_size beyond this is `backends.chunk_size_for`'s.

    Raises:
        TypeError: chunk_size is not an int, or grad_filter_eps not a number.
        ValueError: chunk_size < 0 (or beyond int64), grad_filter_eps outside [0, 1).
    """
    _number("chunk_size", chunk_size, 0, INT64_RANGE[1], integer=True)
    _number("grad_filter_eps", grad_filter_eps, 0.0, 1.0, high_open=True)


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
    """Checks everything `ree_aux_loss` takes (docs/spec.md §2): shapes, dtypes, devices and the
    range of every scalar (tau in [0, 10], beta in (0, 10], mu_ui and the weights finite within
    float32's range). A tensor mu_ui is not read (no host synchronisation).

    Raises:
        TypeError: an argument of the wrong type or dtype.
        ValueError: a wrong shape, a device mismatch, an empty input, a scalar out of its
            range, or attn without embeddings and ui_center.
    """
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
        _float32_number("mu_ui", mu_ui)
    _number("tau", tau, 0.0, MAX_TAU)
    _number("beta", beta, 0.0, MAX_BETA, low_open=True)
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
    for k, w in enumerate(weights):
        _float32_number(f"weights[{k}]", w)
