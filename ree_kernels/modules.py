"""The ArcFace head as `nn.Module`s: the prototypes and the fused loss over them, on one process
(`ArcFaceHead`) or sharded by class over torch.distributed ranks (`ShardedArcFaceHead`), with
the same options, built by `make_arcface_head`."""
from __future__ import annotations

import abc
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn

from .backends import BACKENDS
from .distributed.group import Group, shard_range
from .distributed.init import PROTOTYPE_INIT_STD, init_prototypes
from .distributed.op import sharded_arcface_head
from .distributed.state import _class_range, gather_shard
from .head import arcface_head
from .reference import IGNORE_INDEX, HeadOutput
from .sampling import keep_unsampled_rows, num_sampled, sample_classes
from .validation import validate_head_inputs

_SHORT_LABELS = (torch.int32, torch.int16, torch.uint8)


def _initial_prototypes(num_classes: int, embedding_size: int, rows: Tuple[int, int], seed: Optional[int],
                        device: Optional[torch.device], dtype: Optional[torch.dtype]) -> torch.Tensor:
    """Rows [start, stop) of the N(0, 0.01²) init of [num_classes, embedding_size]: `init_prototypes`
    of `seed`, or with seed None insightface's draw of the whole matrix from torch's global RNG
    (every rank then needs the same RNG state, and holds C × D for a moment)."""
    start, stop = rows
    if seed is not None:
        return init_prototypes(num_classes, embedding_size, start, stop, seed=seed, dtype=dtype, device=device)
    weight = torch.normal(0.0, PROTOTYPE_INIT_STD, (num_classes, embedding_size))
    return weight[start:stop].clone().to(device=device, dtype=dtype or torch.get_default_dtype())


class _PrototypeHead(nn.Module, abc.ABC):
    """What both heads share: the options, the prototypes of classes [class_start, class_stop) of
    `num_classes`, the cast to the embeddings' dtype, and the record of the sampled classes."""

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        *,
        scale: float = 64.0,
        margin: float = 0.5,
        margin_mode: str = "arcface",
        ri_form: str = "product",
        ignore_index: int = IGNORE_INDEX,
        backend: str = "auto",
        chunk_size: int = 0,
        seed: Optional[int] = None,
        sample_rate: float = 1.0,
        generator: Optional[torch.Generator] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        for name, value in (("embedding_size", embedding_size), ("num_classes", num_classes)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        num_sampled(num_classes, sample_rate)  # checks the rate
        if sample_rate < 1.0 and ignore_index >= 0:
            raise ValueError(f"sample_rate < 1 needs a negative ignore_index, got {ignore_index}")
        self.num_classes = num_classes
        self.class_start, self.class_stop = self._held_classes(num_classes)
        self.scale, self.margin, self.margin_mode, self.ri_form = scale, margin, margin_mode, ri_form
        self.ignore_index, self.backend, self.chunk_size = ignore_index, backend, chunk_size
        self.weight = nn.Parameter(_initial_prototypes(num_classes, embedding_size,
                                                       (self.class_start, self.class_stop), seed, device, dtype))
        self.sample_rate, self.generator = float(sample_rate), generator
        self.sampled_classes: Optional[torch.Tensor] = None  # global class ids

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        *,
        ui_center: Optional[torch.Tensor] = None,
        sample_weight: Optional[torch.Tensor] = None,
        reduction: str = "mean",
        return_stats: bool = False,
        differentiable_stats: bool = False,
    ) -> Union[torch.Tensor, HeadOutput]:
        """The loss of [B, D] embeddings (any scale) with [B] class ids (int64, or a narrower
        int type, widened) or `ignore_index`; the whole `HeadOutput` with return_stats=True.
        The other arguments are those of `ree_kernels.arcface_head`.

        Raises:
            TypeError, ValueError: as `ree_kernels.arcface_head` (the sharded head: as
                `sharded_arcface_head`), naming the bad argument.
        """
        if isinstance(embeddings, torch.Tensor) and embeddings.is_floating_point():
            prototypes = self.weight.to(embeddings.dtype)
        else:
            prototypes = self.weight  # the op names the bad argument
        if isinstance(labels, torch.Tensor) and labels.dtype in _SHORT_LABELS:
            labels = labels.long()
        self.sampled_classes = None
        out = self._loss(embeddings, prototypes, labels, ui_center, sample_weight, reduction, differentiable_stats,
                         self.sample_rate if self.training else 1.0)
        return out if return_stats else out.loss

    def _held_classes(self, num_classes: int) -> Tuple[int, int]:
        """The classes [start, stop) whose prototypes this head holds."""
        return 0, num_classes

    @abc.abstractmethod
    def _loss(self, embeddings: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor,
              ui_center: Optional[torch.Tensor], sample_weight: Optional[torch.Tensor], reduction: str,
              differentiable_stats: bool, sample_rate: float) -> HeadOutput:
        """The op's output over this head's prototypes (cast), at this step's sample rate."""

    def _options(self, reduction: str) -> Dict[str, Any]:
        return dict(scale=self.scale, margin=self.margin, margin_mode=self.margin_mode, ri_form=self.ri_form,
                    ignore_index=self.ignore_index, reduction=reduction)

    def keep_unsampled_rows(self, optimizer: torch.optim.Optimizer) -> List[Callable[[], None]]:
        """Makes `optimizer.step()` leave the prototypes that the last forward did not sample,
        and their optimiser state, exactly as they were (`ree_kernels.sampling.keep_unsampled_rows`).

        Returns:
            The hooks' `remove` callables.
        """
        return keep_unsampled_rows(self, optimizer, lambda: self.sampled_classes,
                                   lambda classes: classes - self.class_start)

    def extra_repr(self) -> str:
        classes = (f"num_classes={self.num_classes}" if (self.class_start, self.class_stop) == (0, self.num_classes)
                   else f"classes [{self.class_start}, {self.class_stop}) of {self.num_classes}")
        return (f"embedding_size={self.weight.shape[1]}, {classes}, scale={self.scale}, margin={self.margin}, "
                f"margin_mode={self.margin_mode!r}, backend={self.backend!r}, sample_rate={self.sample_rate}")


_OPTIONS_DOC = """
    Options (the same for both heads):
        embedding_size, num_classes: the prototypes are [num_classes, embedding_size] (a sharded
            head holds its rows of them), initialised N(0, 0.01²) as in insightface.
        scale, margin, margin_mode, ri_form: s, m, φ and the RI form (docs/spec.md §3);
            insightface's CombinedMarginLoss (s, 1.0, m, 0.0) is `margin_mode="arcface_st"`,
            (s, 1.0, 0.0, m) is "cosface"; the default "arcface" is the classic insightface form
            with its fallback.
        ignore_index: labels with this value add no loss (e.g. unlabelled crops).
        backend: passed to the op ("auto": the fastest built kernel for the device).
        chunk_size: classes per chunk of the op's passes (0: automatic).
        seed: an int takes the init from `ree_kernels.distributed.init_prototypes(..., seed=seed)`,
            the same rows at any world size; None draws it from torch's global RNG (insightface's
            draw of the whole matrix: every rank must hold the same RNG state).
        sample_rate: PartialFC's r in (0, 1]; 1 uses every class. Needs a negative ignore_index.
        generator: the random source of the class draw (on the weight's device), or None for
            torch's default one.
        device, dtype: of the prototypes (default: the CPU, torch's default dtype).

    Class sampling (r < 1, in training mode; eval mode uses every class): each forward runs
    the loss over the batch's labelled classes plus uniformly drawn others, ⌈r·C⌉ in all
    (`ree_kernels.sample_classes`; a sharded head draws ⌈r·C_r⌉ among its own), reading those
    prototypes through the index; the others get an exactly zero gradient. The optimiser would
    still move them (weight decay, momentum): arcface_torch's PartialFC_V2 lets it, since it trains
    the whole weight with a plain SGD. `keep_unsampled_rows(optimizer)` instead leaves them (and
    their optimiser state) exactly as they were, as the original PartialFC's sparse update did:
    `ree train` does that. The last draw's classes (global ids) are in `sampled_classes` (None
    without sampling).

    The prototypes are cast to the embeddings' dtype in the forward (bfloat16/float16 under
    autocast), so they keep float32 master values, as PartialFC does.

    Raises:
        ValueError: embedding_size or num_classes not a positive int, an unknown backend, a
            sample_rate outside (0, 1], or sample_rate < 1 with a non-negative ignore_index"""


class ArcFaceHead(_PrototypeHead):
    __doc__ = """ArcFace (or CosFace) classification loss over `num_classes` learned prototypes, computed
    by `ree_kernels.arcface_head` without materialising the B × C logits.

    A drop-in for insightface arcface_torch's `PartialFC_V2(CombinedMarginLoss(...))` in a
    single-process or DDP data-parallel loop (every rank holds all prototypes), with PartialFC's
    class sampling at `sample_rate` < 1::

        # insightface
        margin_loss = CombinedMarginLoss(64, 1.0, 0.5, 0.0)
        module_partial_fc = PartialFC_V2(margin_loss, 512, num_classes, 0.1, False)
        # ree
        from ree.models import ArcFaceHead
        module_partial_fc = ArcFaceHead(512, num_classes, scale=64.0, margin=0.5, margin_mode="arcface_st",
                                        sample_rate=0.1)

        opt = torch.optim.SGD([{"params": backbone.parameters()},
                               {"params": module_partial_fc.parameters()}], lr=0.1, momentum=0.9)
        loss = module_partial_fc(backbone(images), labels)  # the same call, a scalar
        loss.backward()

    `forward(..., return_stats=True)` returns the whole `HeadOutput` (loss, cos_pos, cos_neg,
    neg_index, cos_ui, ri, lse) instead; `differentiable_stats=True` makes its statistics
    differentiable (`ree_kernels.arcface_head`). `ShardedArcFaceHead` is its class-parallel twin.
    """ + _OPTIONS_DOC + ".\n    "

    def _loss(self, embeddings, prototypes, labels, ui_center, sample_weight, reduction, differentiable_stats,
              sample_rate) -> HeadOutput:
        options = self._options(reduction)
        class_index = None
        if sample_rate < 1.0:
            # The labels are checked against all C classes before they are mapped into the set.
            validate_head_inputs(embeddings, prototypes, labels, ui_center, sample_weight, **options)
            class_index, labels = sample_classes(labels, self.num_classes, sample_rate,
                                                 ignore_index=self.ignore_index, generator=self.generator)
        self.sampled_classes = class_index
        out = arcface_head(embeddings, prototypes, labels, ui_center, sample_weight=sample_weight,
                           backend=self.backend, chunk_size=self.chunk_size,
                           differentiable_stats=differentiable_stats, class_index=class_index, **options)
        if class_index is not None:  # the nearest negative as a class id
            out = out._replace(neg_index=torch.where(out.neg_index >= 0, class_index[out.neg_index.clamp_min(0)], -1))
        return out


def _check_range_before_loading(module: "ShardedArcFaceHead", state_dict, prefix, *_) -> None:
    """Checks the class range before load_state_dict copies a weight of the same shape."""
    if prefix + "_extra_state" in state_dict:
        module.set_extra_state(state_dict[prefix + "_extra_state"])


class ShardedArcFaceHead(_PrototypeHead):
    __doc__ = """The ArcFace prototypes of this rank's classes and `sharded_arcface_head` over them: the
    class-parallel twin of `ArcFaceHead` (the same options and forward), as insightface's
    PartialFC_V2. `forward` takes this rank's [B_r, D] rows with their global labels; every rank
    of the group calls it at every step, and the loss ("mean", "sum") is the global batch's.

    `weight` holds the classes [class_start, class_stop) of `num_classes` (`shard_range` of this
    rank in `process_group`, default the world; all of them without torch.distributed); with the
    same seed the shards of any world size concatenate to `ArcFaceHead`'s init. `state_dict()`
    records the class range, and loading a state dict of another range raises: re-shard
    checkpoints for another world size with `merge_state_dicts` / `shard_state_dict`, or gather the
    full one with `gather_state_dict`. Keep it out of DistributedDataParallel, and read the
    gradient convention (`embedding_grad`: "ddp" or "exact") in the package docstring of
    ree_kernels.distributed. `differentiable_stats=True` raises ValueError: the sharded pass does
    not give the statistics' gradients.
    """ + _OPTIONS_DOC + """;
            the group has more ranks than num_classes (see shard_range); load_state_dict of
            another class range.
    """

    def __init__(self, embedding_size: int, num_classes: int, *, process_group: Optional[dist.ProcessGroup] = None,
                 embedding_grad: str = "ddp", **options: Any) -> None:
        # Plain attributes, set first: _held_classes reads the group while the base builds the weight.
        self.process_group, self.embedding_grad = process_group, embedding_grad
        super().__init__(embedding_size, num_classes, **options)
        self.register_load_state_dict_pre_hook(_check_range_before_loading)

    def _held_classes(self, num_classes: int) -> Tuple[int, int]:
        group = Group(self.process_group)
        return shard_range(num_classes, group.rank, group.world)

    def _loss(self, embeddings, prototypes, labels, ui_center, sample_weight, reduction, differentiable_stats,
              sample_rate) -> HeadOutput:
        if differentiable_stats:
            raise ValueError("differentiable_stats=True: the class-sharded head's statistics are not differentiable")

        def record(classes: torch.Tensor) -> None:
            self.sampled_classes = classes

        return sharded_arcface_head(
            embeddings, prototypes, labels, ui_center, num_classes=self.num_classes,
            process_group=self.process_group, sample_weight=sample_weight, backend=self.backend,
            embedding_grad=self.embedding_grad, chunk_size=self.chunk_size, sample_rate=sample_rate,
            generator=self.generator, on_sample=record, **self._options(reduction),
        )

    def get_extra_state(self) -> Dict[str, int]:
        return {"num_classes": self.num_classes, "class_start": self.class_start, "class_stop": self.class_stop}

    def set_extra_state(self, state: Any) -> None:
        saved = _class_range({"_extra_state": state}, "the loaded state dict")
        mine = (self.num_classes, self.class_start, self.class_stop)
        if saved != mine:
            raise ValueError(
                f"the state dict holds classes [{saved[1]}, {saved[2]}) of num_classes={saved[0]}, but this "
                f"head holds [{mine[1]}, {mine[2]}) of {mine[0]}: re-shard it with "
                "shard_state_dict(merge_state_dicts(shards), rank, world)")

    def gather_state_dict(self, dst: Optional[int] = 0) -> Optional[Dict[str, Any]]:
        """The full state dict, on rank `dst` of the process group (None on the others), or on
        every rank with dst=None. A collective: every rank must call it.

        Raises:
            ValueError: the weight does not hold this rank's classes.
        """
        weight = gather_shard(self.state_dict()["weight"], self.num_classes, process_group=self.process_group,
                              dst=dst)
        if weight is None:
            return None
        return {"weight": weight, "_extra_state": {"num_classes": self.num_classes, "class_start": 0,
                                                   "class_stop": self.num_classes}}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, embedding_grad={self.embedding_grad!r}"


def make_arcface_head(embedding_size: int, num_classes: int, *, process_group: Optional[dist.ProcessGroup] = None,
                      **options: Any) -> Union[ArcFaceHead, ShardedArcFaceHead]:
    """The head for one process (`process_group` None: `ArcFaceHead`) or sharded by class over
    `process_group` (`ShardedArcFaceHead`; pass `torch.distributed.group.WORLD` for every
    process). `options` are the heads' keywords (see `ArcFaceHead`; `embedding_grad` is the
    sharded head's alone); with the same `seed`, either starts from the same prototypes.

    Raises:
        TypeError: an option neither head takes (or `embedding_grad` without a group).
        ValueError: as the head's constructor.
    """
    if process_group is None:
        return ArcFaceHead(embedding_size, num_classes, **options)
    return ShardedArcFaceHead(embedding_size, num_classes, process_group=process_group, **options)
