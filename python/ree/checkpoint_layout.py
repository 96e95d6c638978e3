"""The layout of checkpoints across ranks: every checkpoint is in the single-process layout
(the whole head, its whole optimiser state), whatever the number of processes that wrote it,
so that it resumes at any number (docs/scaling.md, "Multi-process training").

Writing (`gather`, a collective): rank 0 assembles the whole prototypes and their optimiser
state from the ranks' shards, and every rank's RNG states. Reading (`scatter`, no
communication): each rank cuts its rows out of the whole head and optimiser state and takes
the RNG states of its own rank in the saved run."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, NamedTuple, Optional

import torch

from ree_kernels.distributed import gather_shard, shard_range, shard_state_dict

from .checkpoint import CheckpointError
from .distributed import Ranks, gather_objects


class RankState(NamedTuple):
    """What one rank loads from a checkpoint: its criterion and optimiser state dicts (its rows
    of the prototypes), and its RNG states (None: the saved run had no process of this rank)."""

    criterion: Dict[str, Any]
    optimizer: Dict[str, Any]
    rng: Optional[Dict[str, Any]]


def gather(criterion: torch.nn.Module, optimizer: torch.optim.Optimizer, head_index: int, rng: Dict[str, Any],
           ranks: Ranks) -> Optional[Dict[str, Any]]:
    """The checkpoint entries "criterion", "optimizer" and "rng" in the single-process layout
    (plus "world_size" and every rank's RNGs as "rank_rng" with several ranks), on rank 0;
    None on the others. `criterion` is a `ree.losses.REELoss` whose `head` is the optimiser's
    parameter `head_index`; `rng` is this rank's RNG state. With several ranks a collective."""
    criterion_state, optimizer_state = criterion.state_dict(), optimizer.state_dict()
    if ranks.world == 1:
        return {"criterion": criterion_state, "optimizer": optimizer_state, "rng": rng}
    head = criterion.head
    full = head.gather_state_dict(dst=0)
    optimizer_state = gather_sharded_state(optimizer_state, head_index, head.weight, head.num_classes, ranks)
    rank_rng = gather_objects(rng, ranks)
    if not ranks.leader:
        return None
    criterion_state = {k: full["weight"] if k == "head.weight" else v for k, v in criterion_state.items()
                       if k != "head._extra_state"}
    return {"criterion": criterion_state, "optimizer": optimizer_state, "rng": rng, "world_size": ranks.world,
            "rank_rng": rank_rng}


def scatter(state: Dict[str, Any], criterion: torch.nn.Module, head_index: int, ranks: Ranks,
            path: str | Path) -> RankState:
    """This rank's part of checkpoint `state` (written at any world size) for `criterion` (a
    `ree.losses.REELoss` of this run) and its optimiser, whose parameter `head_index` is the head.

    Raises:
        CheckpointError (naming `path`): the saved head or optimiser state does not fit."""
    saved_rng = state.get("rank_rng") or [state["rng"]]
    rng = saved_rng[ranks.rank] if ranks.rank < len(saved_rng) else None
    criterion_state, optimizer_state = state["criterion"], state["optimizer"]
    if ranks.world == 1:
        return RankState(criterion_state, optimizer_state, rng)
    head = criterion.head
    full = criterion_state.get("head.weight")
    expected = (head.num_classes, head.weight.shape[1])
    if not isinstance(full, torch.Tensor) or tuple(full.shape) != expected:
        raise CheckpointError(f"checkpoint {path} does not fit this loss (prototypes / UI tracker): head.weight "
                              f"is {tuple(getattr(full, 'shape', ()))}, expected {expected}")
    mine = shard_state_dict({"weight": full, "_extra_state": {"num_classes": expected[0], "class_start": 0,
                                                              "class_stop": expected[0]}},
                            ranks.rank, ranks.world)
    criterion_state = {**{k: v for k, v in criterion_state.items() if k != "head.weight"},
                       "head.weight": mine["weight"], "head._extra_state": mine["_extra_state"]}
    try:
        optimizer_state = shard_state(optimizer_state, head_index, full.shape, ranks)
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path} has an unusable optimiser state: {err!r}") from err
    return RankState(criterion_state, optimizer_state, rng)


def gather_sharded_state(optimizer_state: Dict[str, Any], index: int, shard: torch.Tensor, num_classes: int,
                         ranks: Ranks) -> Optional[Dict[str, Any]]:
    """`optimizer.state_dict()` whose state of parameter `index`, this rank's rows of a tensor of
    `num_classes` rows split by `shard_range` (SGD momentum, Adam moments), is gathered whole,
    on rank 0 (None on the others): the single-process layout. A collective."""
    if index not in optimizer_state["state"]:  # no step yet: the same on every rank
        return optimizer_state if ranks.leader else None
    whole = {key: gather_shard(value, num_classes, process_group=ranks.group, dst=0)
             if isinstance(value, torch.Tensor) and value.shape == shard.shape else value
             for key, value in sorted(optimizer_state["state"][index].items())}
    if not ranks.leader:
        return None
    return {**optimizer_state, "state": {**optimizer_state["state"], index: whole}}


def shard_state(optimizer_state: Dict[str, Any], index: int, full_shape: torch.Size, ranks: Ranks) -> Dict[str, Any]:
    """The inverse of `gather_sharded_state` for this rank (any world size): the state of
    parameter `index` cut to this rank's rows of `full_shape`."""
    if index not in optimizer_state["state"]:
        return optimizer_state
    start, stop = shard_range(full_shape[0], ranks.rank, ranks.world)
    mine = {key: value[start:stop].clone() if isinstance(value, torch.Tensor) and value.shape == full_shape else value
            for key, value in optimizer_state["state"][index].items()}
    return {**optimizer_state, "state": {**optimizer_state["state"], index: mine}}
