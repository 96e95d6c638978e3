"""The seeded prototype init, the same rows for every world size."""
from __future__ import annotations

from typing import Optional

import torch

PROTOTYPE_INIT_STD = 0.01
"""The prototypes start as N(0, 0.01²), as insightface's PartialFC initialises them."""

PROTOTYPE_INIT_BLOCK = 16384
"""The init draws each block of this many rows from its own seeded generator, so a shard draws
only its own blocks and the rows come out the same for every world size."""


def _block_seed(seed: int, block: int) -> int:
    """A 32-bit seed per (seed, block) (the CPU generator keeps only 32 bits): splitmix64."""
    z = (seed * 2 ** 32 + block + 0x9E3779B97F4A7C15) % 2 ** 64
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 % 2 ** 64
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB % 2 ** 64
    return (z ^ (z >> 31)) % 2 ** 32


def init_prototypes(
    num_classes: int,
    embedding_dim: int,
    start: int = 0,
    stop: Optional[int] = None,
    *,
    seed: int = 0,
    dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Rows [start, stop) of the seeded N(0, 0.01²) prototype init of `num_classes` classes.

    The rows are the same whichever slice is asked for, so the shards of any world size
    concatenate to the single-process init of the same seed.

    Raises:
        ValueError: [start, stop) is not a non-empty range of [0, num_classes), or seed is not
            an int in [0, 2**32).
    """
    stop = num_classes if stop is None else stop
    if not 0 <= start < stop <= num_classes:
        raise ValueError(f"need 0 <= start < stop <= num_classes, got [{start}, {stop}) of {num_classes}")
    if not isinstance(seed, int) or not 0 <= seed < 2 ** 32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    blocks = []
    for block in range(start // PROTOTYPE_INIT_BLOCK, (stop - 1) // PROTOTYPE_INIT_BLOCK + 1):
        generator = torch.Generator().manual_seed(_block_seed(seed, block))
        values = torch.randn(PROTOTYPE_INIT_BLOCK, embedding_dim, generator=generator) * PROTOTYPE_INIT_STD
        first = block * PROTOTYPE_INIT_BLOCK
        blocks.append(values[max(start - first, 0): min(stop - first, PROTOTYPE_INIT_BLOCK)])
    return torch.cat(blocks).to(device=device, dtype=dtype or torch.get_default_dtype())
