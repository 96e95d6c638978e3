"""Argument checks of the sharded head: every rank raises, or none does (a rank that raised
alone would leave the others waiting in the next collective)."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

import torch

from ..backends import FLOAT_DTYPES, chunk_size_for, resolve_backend
from ..contract import MARGIN_MODES, REDUCTIONS, HeadOptions
from ..validation import bad_labels, label_range_message, validate_head_inputs
from .group import Group, shard_range

EMBEDDING_GRADS = ("ddp", "exact")
"""The conventions of the embedding gradient (the package docstring)."""

# What every rank must agree on, with how to print it.
SHARED_FIELDS: Dict[str, Callable[[float], str]] = {
    "num_classes": lambda v: str(int(v)),
    "D (embeddings.shape[1])": lambda v: str(int(v)),
    "dtype": lambda v: str(FLOAT_DTYPES[int(v)]).replace("torch.", ""),
    "scale": repr,
    "margin": repr,
    "margin_mode": lambda v: MARGIN_MODES[int(v)],
    "ignore_index": lambda v: str(int(v)),
    "reduction": lambda v: REDUCTIONS[int(v)],
    "sample_weight given": lambda v: str(bool(v)),
    "embedding_grad": lambda v: EMBEDDING_GRADS[int(v)],
}


class LocalCheck(NamedTuple):
    """What `check_local` found: this rank's class range [start, stop), the options with the
    concrete backend and the chunk_size it takes, and [the number of out-of-range labels, the
    first one] on the device."""

    start: int
    stop: int
    options: HeadOptions
    label_summary: torch.Tensor


def check_local(group: Group, embeddings, prototype_shard, labels, ui_center, sample_weight, *,
                num_classes, embedding_grad, **options: Any) -> LocalCheck:
    """Validates this rank's arguments (`options`: the keywords of `contract.HeadOptions`), each
    once. The label summary is left on the device for `agree` to read with the rest (no read of
    its own: one synchronisation per step, not two, on CUDA)."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool):
        raise TypeError(f"num_classes must be an int, got {type(num_classes).__name__}")
    start, stop = shard_range(num_classes, group.rank, group.world)
    if not isinstance(prototype_shard, torch.Tensor) or prototype_shard.dim() != 2:
        raise ValueError("prototype_shard must be a 2-D tensor [classes of this rank, D]")
    if prototype_shard.shape[0] != stop - start:
        raise ValueError(
            f"prototype_shard has {prototype_shard.shape[0]} rows, but rank {group.rank} of {group.world} "
            f"holds the classes [{start}, {stop}) of num_classes={num_classes}: {stop - start} rows "
            "(see shard_range)")
    opts = HeadOptions(**options)
    validate_head_inputs(embeddings, prototype_shard, labels, ui_center, sample_weight, num_classes=num_classes,
                         check_labels=False, **options)
    if embedding_grad not in EMBEDDING_GRADS:
        raise ValueError(f"embedding_grad must be one of {EMBEDDING_GRADS}, got {embedding_grad!r}")
    chosen = resolve_backend(opts.backend, "head", embeddings.device, embeddings.dtype)
    chunk_size = chunk_size_for(opts.backend, chosen, opts.chunk_size)
    if opts.grad_filter_eps and chosen != "triton":
        raise ValueError(f"grad_filter_eps is implemented by the triton backend only, not {chosen!r}")
    bad = bad_labels(labels, num_classes, opts.ignore_index)
    label_summary = torch.stack([bad.sum(), labels[bad.int().argmax()]])
    return LocalCheck(start, stop, opts._replace(backend=chosen, chunk_size=chunk_size), label_summary)


def agree(group: Group, device: torch.device, error: Optional[BaseException], values: Sequence[float],
          label_summary: Optional[torch.Tensor], num_classes: object, ignore_index: object) -> List[int]:
    """One all-gather of [failed, batch, *values, bad label count, first bad label] per rank;
    raises on every rank if any rank's arguments failed, its labels are out of range, or the
    ranks disagree. The batch size of each rank."""
    mine = torch.tensor([float(error is not None), *values], dtype=torch.float64, device=device)
    labels = (torch.zeros(2, dtype=torch.float64, device=device) if label_summary is None
              else label_summary.to(torch.float64))
    meta = group.all_gather(torch.cat([mine, labels])).cpu()
    failed = [rank for rank in range(group.world) if meta[rank, 0] != 0]
    if failed:
        messages = group.all_gather_object(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        raise ValueError(f"rank {failed[0]} of {group.world} rejected its arguments ({messages[failed[0]]})")
    bad = [rank for rank in range(group.world) if meta[rank, -2] != 0]
    if bad:
        message = label_range_message(num_classes, ignore_index, int(meta[bad[0], -1]))
        if group.rank in bad:
            raise ValueError(label_range_message(num_classes, ignore_index, int(meta[group.rank, -1])))
        raise ValueError(f"rank {bad[0]} of {group.world} rejected its arguments (ValueError: {message})")
    for column, (name, show) in enumerate(SHARED_FIELDS.items(), start=2):
        column_values = meta[:, column]
        if bool((column_values != column_values[0]).any()):
            per_rank = ", ".join(f"rank {r}: {show(float(v))}" for r, v in enumerate(column_values))
            raise ValueError(f"{name} differs across ranks ({per_rank}); every rank must pass the same")
    return [int(b) for b in meta[:, 1]]


def device_of(*candidates: object) -> torch.device:
    for x in candidates:
        if isinstance(x, torch.Tensor):
            return x.device
    return torch.device("cpu")
