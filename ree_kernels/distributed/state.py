"""Checkpoints of the sharded head: merge the shards, re-shard for another world size, gather."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .group import Group, shard_range


def _class_range(state: Mapping[str, Any], what: str) -> Tuple[int, int, int]:
    try:
        extra = state["_extra_state"]
        return int(extra["num_classes"]), int(extra["class_start"]), int(extra["class_stop"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"{what} is not a ShardedArcFaceHead state dict (no class range: {err!r})") from None


def merge_state_dicts(shards: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """The full (single-process) state dict from the state dicts of all the shards, in any order.

    Raises:
        ValueError: no shards, a state dict without a class range, or shards that do not tile
            [0, num_classes) exactly once.
    """
    if not shards:
        raise ValueError("shards is empty")
    ranges = sorted((_class_range(s, f"shards[{i}]"), i) for i, s in enumerate(shards))
    num_classes = ranges[0][0][0]
    expected_start = 0
    for (classes, start, stop), i in ranges:
        if classes != num_classes:
            raise ValueError(f"shards[{i}] has num_classes={classes}, another has {num_classes}")
        if start != expected_start:
            raise ValueError(f"the shards do not tile [0, {num_classes}): a gap or overlap at class "
                             f"{min(start, expected_start)}")
        if shards[i]["weight"].shape[0] != stop - start:
            raise ValueError(f"shards[{i}] holds classes [{start}, {stop}) but its weight has "
                             f"{shards[i]['weight'].shape[0]} rows")
        expected_start = stop
    if expected_start != num_classes:
        raise ValueError(f"the shards cover [0, {expected_start}) of num_classes={num_classes}")
    weight = torch.cat([shards[i]["weight"] for _, i in ranges])
    return {"weight": weight, "_extra_state": {"num_classes": num_classes, "class_start": 0,
                                               "class_stop": num_classes}}


def shard_state_dict(full: Mapping[str, Any], rank: int, world: int) -> Dict[str, Any]:
    """Rank `rank`'s state dict for `world` ranks from a full one (`merge_state_dicts`, or a
    one-process head's `state_dict()`).

    Raises:
        ValueError: `full` is not a full state dict (no class range, or only some classes), or
            rank/world are out of range (see shard_range).
    """
    num_classes, start, stop = _class_range(full, "full")
    if (start, stop) != (0, num_classes):
        raise ValueError(f"full holds classes [{start}, {stop}) of {num_classes}, not all of them: "
                         "merge the shards first (merge_state_dicts)")
    start, stop = shard_range(num_classes, rank, world)
    return {"weight": full["weight"][start:stop].clone(),
            "_extra_state": {"num_classes": num_classes, "class_start": start, "class_stop": stop}}


def gather_shard(shard: torch.Tensor, num_classes: int, *, process_group: Optional[dist.ProcessGroup] = None,
                 dst: Optional[int] = 0) -> Optional[torch.Tensor]:
    """The full [num_classes, ...] tensor from every rank's rows `shard_range(num_classes, rank,
    world)` of it (the prototype shard, or optimiser state of the same rows), on rank `dst` of
    the process group (None on the others), or on every rank with dst=None. A collective.

    Raises:
        ValueError: `shard` does not hold this rank's rows.
    """
    group = Group(process_group)
    start, stop = shard_range(num_classes, group.rank, group.world)
    if shard.dim() == 0 or shard.shape[0] != stop - start:
        raise ValueError(f"shard has shape {tuple(shard.shape)}, but rank {group.rank} of {group.world} holds "
                         f"the rows [{start}, {stop}) of {num_classes}")
    if group.world == 1:
        return shard
    rows = -(-num_classes // group.world)
    padded = shard.new_zeros((rows, *shard.shape[1:]))
    padded[: stop - start] = shard
    if dst is None:
        gathered: Optional[torch.Tensor] = group.all_gather(padded)
    else:
        gathered = padded.new_empty((group.world, *padded.shape)) if group.rank == dst else None
        dist.gather(padded, None if gathered is None else list(gathered.unbind(0)),
                    group=process_group, group_dst=dst)
    if gathered is None:
        return None
    sizes = [stop - start for start, stop in (shard_range(num_classes, r, group.world) for r in range(group.world))]
    return torch.cat([gathered[r, :size] for r, size in enumerate(sizes)])
