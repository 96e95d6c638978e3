"""`ShardedArcFaceHead`: this rank's prototypes and the sharded head over them, as a module."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from ..contract import IGNORE_INDEX, HeadOutput
from ..sampling import keep_unsampled_rows
from .group import Group, shard_range
from .init import init_prototypes
from .op import sharded_arcface_head
from .state import _class_range, gather_shard


def _check_range_before_loading(module: "ShardedArcFaceHead", state_dict, prefix, *_) -> None:
    """Checks the class range before load_state_dict copies a weight of the same shape."""
    if prefix + "_extra_state" in state_dict:
        module.set_extra_state(state_dict[prefix + "_extra_state"])


class ShardedArcFaceHead(nn.Module):
    """The ArcFace prototypes of this rank's classes and `sharded_arcface_head` over them: the
    class-parallel twin of `ree.models.ArcFaceHead` (same constructor order and forward), as
    insightface's PartialFC_V2. With `sample_rate` r < 1 (training mode only), each shard runs
    over its classes among the global batch's labels plus uniformly drawn others, ⌈r·C_r⌉ in all
    (`sharded_arcface_head`); the last draw's classes (global ids) are `sampled_classes`, and
    `keep_unsampled_rows(optimizer)` keeps the optimiser off the others (as `ArcFaceHead`'s).

    `weight` holds the classes [class_start, class_stop) of `num_classes` (`shard_range` of this
    rank in `process_group`; all of them without torch.distributed), initialised N(0, 0.01²) so
    that the shards of any world size concatenate to the one-process init of the same `seed`.
    `state_dict()` records the class range, and loading a state dict of another range raises:
    re-shard checkpoints for another world size with `merge_state_dicts` / `shard_state_dict`,
    or gather the full one with `gather_state_dict`. The weight is cast to the embeddings' dtype
    in the forward (bfloat16/float16 under autocast), so it keeps float32 master values.
    Keep it out of DistributedDataParallel, and read the gradient convention (`embedding_grad`)
    in the package docstring of ree_kernels.distributed.

    Raises:
        ValueError: embedding_size is not a positive int, or the group has more ranks than
            num_classes (see shard_range); load_state_dict of another class range.
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        *,
        process_group: Optional[dist.ProcessGroup] = None,
        seed: int = 0,
        scale: float = 64.0,
        margin: float = 0.5,
        margin_mode: str = "arcface",
        ri_form: str = "product",
        ignore_index: int = IGNORE_INDEX,
        backend: str = "auto",
        embedding_grad: str = "ddp",
        chunk_size: int = 0,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        sample_rate: float = 1.0,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__()
        if not isinstance(embedding_size, int) or isinstance(embedding_size, bool) or embedding_size < 1:
            raise ValueError(f"embedding_size must be a positive int, got {embedding_size!r}")
        group = Group(process_group)
        self.process_group = process_group
        self.num_classes = num_classes
        self.class_start, self.class_stop = shard_range(num_classes, group.rank, group.world)
        self.scale, self.margin, self.margin_mode, self.ri_form = scale, margin, margin_mode, ri_form
        self.ignore_index, self.backend, self.embedding_grad, self.chunk_size = (
            ignore_index, backend, embedding_grad, chunk_size)
        self.weight = nn.Parameter(init_prototypes(num_classes, embedding_size, self.class_start,
                                                   self.class_stop, seed=seed, dtype=dtype, device=device))
        self.register_load_state_dict_pre_hook(_check_range_before_loading)
        self.sample_rate, self.generator = float(sample_rate), generator
        self.sampled_classes: Optional[torch.Tensor] = None  # global ids

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        *,
        ui_center: Optional[torch.Tensor] = None,
        sample_weight: Optional[torch.Tensor] = None,
        reduction: str = "mean",
        return_stats: bool = False,
    ) -> Union[torch.Tensor, HeadOutput]:
        """The loss of this rank's [B_r, D] embeddings with [B_r] global labels (the whole
        HeadOutput with return_stats=True). Every rank of the group calls it at every step.

        Raises:
            TypeError, ValueError, RuntimeError: as `sharded_arcface_head`.
        """
        weight = self.weight
        if isinstance(embeddings, torch.Tensor) and embeddings.is_floating_point():
            weight = weight.to(embeddings.dtype)
        self.sampled_classes = None

        def record(classes: torch.Tensor) -> None:
            self.sampled_classes = classes

        out = sharded_arcface_head(
            embeddings, weight, labels, ui_center, num_classes=self.num_classes, process_group=self.process_group,
            scale=self.scale, margin=self.margin, margin_mode=self.margin_mode, ri_form=self.ri_form,
            sample_weight=sample_weight, ignore_index=self.ignore_index, reduction=reduction, backend=self.backend,
            embedding_grad=self.embedding_grad, chunk_size=self.chunk_size,
            sample_rate=self.sample_rate if self.training else 1.0, generator=self.generator, on_sample=record,
        )
        return out if return_stats else out.loss

    def keep_unsampled_rows(self, optimizer: torch.optim.Optimizer) -> List[Callable[[], None]]:
        """`ree.models.ArcFaceHead.keep_unsampled_rows` for this shard (its rows not sampled at
        the last forward). Returns the hooks' `remove` callables."""
        return keep_unsampled_rows(self, optimizer, lambda: self.sampled_classes,
                                   lambda classes: classes - self.class_start)

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
        return (f"embedding_size={self.weight.shape[1]}, classes [{self.class_start}, {self.class_stop}) of "
                f"{self.num_classes}, scale={self.scale}, margin={self.margin}, margin_mode={self.margin_mode!r}, "
                f"backend={self.backend!r}, embedding_grad={self.embedding_grad!r}")
