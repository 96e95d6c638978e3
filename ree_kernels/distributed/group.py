"""The ranks a head is sharded over, and which classes each one holds."""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
import torch.distributed as dist

# The collectives' names since torch 2.13 (pytorch#186123), and the ones they replace, which
# are all older releases have (torch 2.8 is the floor, pyproject.toml says why).
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def shard_range(num_classes: int, rank: int, world: int) -> Tuple[int, int]:
    """The classes [start, stop) of `rank`: `num_classes // world + (rank < num_classes % world)`
    contiguous classes, in rank order.

    Raises:
        TypeError: an argument is not an int.
        ValueError: world < 1, rank outside [0, world), or fewer classes than ranks.
    """
    for name, value in (("num_classes", num_classes), ("rank", rank), ("world", world)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if world < 1:
        raise ValueError(f"world must be at least 1, got {world}")
    if not 0 <= rank < world:
        raise ValueError(f"rank must lie in [0, world={world}), got {rank}")
    if num_classes < world:
        raise ValueError(f"num_classes={num_classes} is smaller than the world size {world}: "
                         "every rank needs at least one class")
    base, extra = divmod(num_classes, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


class Group:
    """The ranks the head is sharded over; one lone rank when torch.distributed is not initialised."""

    def __init__(self, process_group: Optional[dist.ProcessGroup]) -> None:
        initialised = dist.is_available() and dist.is_initialized()
        self.group = process_group
        if not initialised:
            if process_group is not None:
                raise ValueError("process_group was given but torch.distributed is not initialised")
            self.rank, self.world = 0, 1
            return
        self.rank, self.world = dist.get_rank(process_group), dist.get_world_size(process_group)
        if self.rank < 0:
            raise ValueError("this process is not a member of process_group")

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[world, *x.shape]: every rank's x (same shape on every rank)."""
        if self.world == 1:
            return x.unsqueeze(0)
        out = x.new_empty((self.world * x.shape[0], *x.shape[1:]))
        _ALL_GATHER(out, x.contiguous(), group=self.group)
        return out.view(self.world, *x.shape)

    def all_reduce(self, x: torch.Tensor, op: dist.ReduceOp.RedOpType) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(x, op=op, group=self.group)
        return x

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        """x is [world, ...] on every rank: this rank's block of the sum over ranks."""
        if self.world == 1:
            return x[0]
        out = x.new_empty(x.shape[1:])
        _REDUCE_SCATTER(out, x.flatten(0, 1).contiguous(), group=self.group)
        return out

    def all_gather_object(self, obj: Any) -> List[Any]:
        out: List[Any] = [None] * self.world
        if self.world == 1:
            out[0] = obj
        else:
            dist.all_gather_object(out, obj, group=self.group)
        return out
