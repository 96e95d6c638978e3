"""PartialFC's class sampling (An et al., "Partial FC", ICCV 2021; insightface arcface_torch's
PartialFC_V2): each step the loss runs over the batch's classes plus uniformly drawn others, a
fraction `sample_rate` of all classes, instead of every class.

`sample_classes` draws the set and maps the labels into it; the head ops read the sampled
prototypes through the index (`arcface_head(..., class_index=...)`). Two differences from
arcface_torch, both deliberate: the set has ⌈r·C⌉ classes (arcface_torch: ⌊r·C⌋), and r is
taken as written in decimal (0.3 of 10 classes is 3, not the 4 that 0.3·10 = 3.0000000000000004
would give).
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Callable, List, NamedTuple, Optional

import torch


class SampledClasses(NamedTuple):
    """One step's classes.

    Attributes:
        class_index: [C'] int64, ascending, distinct: every class among the labels, then others.
        labels: [B] int64, each label's position in class_index (ignore_index stays as it is).
    """

    class_index: torch.Tensor
    labels: torch.Tensor


def num_sampled(num_classes: int, sample_rate: float) -> int:
    """⌈r·C⌉ with r read as its shortest decimal form, at least 1.

    Raises:
        ValueError: sample_rate outside (0, 1] or num_classes < 1.
    """
    if not (isinstance(num_classes, int) and num_classes >= 1):
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not (isinstance(sample_rate, (int, float)) and math.isfinite(sample_rate) and 0.0 < sample_rate <= 1.0):
        raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate!r}")
    return max(1, math.ceil(Fraction(repr(float(sample_rate))) * num_classes))


def sample_classes(
    labels: torch.Tensor,
    num_classes: int,
    sample_rate: float,
    *,
    ignore_index: int,
    generator: Optional[torch.Generator] = None,
) -> SampledClasses:
    """The classes of one PartialFC step: the distinct labels (the positives) and, if they are
    fewer than k = `num_sampled(num_classes, sample_rate)`, k − P others drawn uniformly without
    replacement from the rest; more positives than k are all kept (as arcface_torch does).

    Args:
        labels: [B] int64 in [0, num_classes) or equal to ignore_index (not checked here: the
            head checks them); on any device.
        num_classes: C, the number of prototypes (a shard's own count on a class shard).
        sample_rate: r in (0, 1].
        ignore_index: the label of rows without a class; must be negative (a position in the
            sampled set could otherwise collide with it).
        generator: the random source of the draw (on the labels' device), or None for torch's
            default one.

    Returns:
        SampledClasses (class_index ascending, labels remapped to positions in it).

    Raises:
        ValueError: sample_rate or num_classes out of range, or ignore_index ≥ 0.
    """
    k = num_sampled(num_classes, sample_rate)
    if ignore_index >= 0:
        raise ValueError(f"class sampling needs a negative ignore_index, got {ignore_index}")
    has = labels != ignore_index
    positives = torch.unique(labels[has])  # ascending
    if positives.shape[0] >= k:
        index = positives
    else:
        # Uniform scores, positives above them all: the top k are the positives and a uniform
        # subset of the others.
        scores = torch.rand(num_classes, generator=generator, device=labels.device)
        scores[positives] = 2.0
        index = torch.topk(scores, k, sorted=False).indices.sort().values
    positions = torch.searchsorted(index, labels.clamp_min(0))
    return SampledClasses(index, torch.where(has, positions, labels))


def _like_weight(value: object, weight: torch.Tensor) -> bool:
    """An optimiser state tensor with one entry per element of the weight (momentum, moments)."""
    return isinstance(value, torch.Tensor) and value.shape == weight.shape


def keep_unsampled_rows(
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    sampled: Callable[[], Optional[torch.Tensor]],
    to_rows: Callable[[torch.Tensor], torch.Tensor] = lambda classes: classes,
) -> List[Callable[[], None]]:
    """Makes `optimizer.step()` leave the rows of `module.weight` that the last forward did not
    sample, and their optimiser state (momentum, Adam moments), exactly as they were: the
    original PartialFC's sparse update. arcface_torch's PartialFC_V2 does not: its plain SGD moves
    every row by weight decay and momentum. State that the step creates (a first momentum buffer)
    starts at 0 on those rows, as if they had never been stepped. The cost is one copy of the
    unsampled rows (and of their state) per step, the order of the step itself.

    Args:
        module: holds the prototypes as `weight` [C, D].
        optimizer: steps `module.weight`.
        sampled: the last forward's sampled classes, or None (no sampling: the step is left alone).
        to_rows: class ids -> rows of the weight (a shard's offset).

    Returns:
        The hooks' `remove` callables.
    """
    saved: dict = {}

    def before(opt, args, kwargs) -> None:
        saved.clear()
        if sampled() is None:
            return
        keep = torch.ones(module.weight.shape[0], dtype=torch.bool, device=module.weight.device)
        keep[to_rows(sampled())] = False
        rows = keep.nonzero().squeeze(1)
        state = opt.state.get(module.weight, {})
        saved.update(rows=rows, weight=module.weight.detach()[rows],
                     state={k: v[rows] for k, v in state.items() if _like_weight(v, module.weight)})

    def after(opt, args, kwargs) -> None:
        if not saved:
            return
        rows = saved["rows"]
        with torch.no_grad():
            module.weight.index_copy_(0, rows, saved["weight"])
            for k, v in opt.state.get(module.weight, {}).items():
                if _like_weight(v, module.weight):
                    old = saved["state"].get(k)
                    if old is None:
                        v.index_fill_(0, rows, 0.0)
                    else:
                        v.index_copy_(0, rows, old)
        saved.clear()

    return [optimizer.register_step_pre_hook(before).remove, optimizer.register_step_post_hook(after).remove]
