"""Tile sizes, autotuning and class splits of the Triton head (docs/design.md, "Tiles,
autotuning, `chunk_size`"): which configs a launch may use, how many programs split the classes,
and the launch itself (one config, or `triton.autotune` over several on a GPU)."""
from __future__ import annotations

import functools
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import triton

from ..backends import TRITON_INTERPRET

MIN_TILE, MAX_TILE = 16, 1024
"""Bounds of the class tile that `chunk_size` may set (tl.dot needs at least 16)."""

ROW_BLOCK = 32
"""Rows per program of the per-row kernels (forward finish, backward rows)."""

# Interpreter tiles: small, so that the test shapes (tests/support.py) cross several row and
# class tiles and split the classes; D is cut in two (both the D loop of the cosines and the D
# blocks of the backward run twice), at least 16 for tl.dot.
INTERPRETER_TILES = {"BLOCK_B": 16, "BLOCK_C": 32}

INTERPRETER_SMS = 4
"""Stand-in for the multiprocessor count under the interpreter: small B then splits C."""

# GPU autotune candidates (BLOCK_B, BLOCK_C, BLOCK_K, num_warps, num_stages). First guesses for
# Hopper: measure on the card (docs/design.md lists what the first GPU run checks).
FORWARD_CONFIGS = (
    (128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
    (128, 256, 64, 8, 3), (64, 64, 64, 4, 3), (128, 128, 32, 8, 4),
)
# Backward: (BLOCK_B, BLOCK_C, BLOCK_K, BLOCK_DO or 0 for all of D up to 512, num_warps, num_stages).
# A BLOCK_DO below D recomputes the cosines once per D block.
BACKWARD_CONFIGS = (
    (64, 64, 64, 0, 8, 2), (64, 128, 64, 0, 8, 2), (64, 64, 64, 256, 4, 3), (128, 64, 64, 128, 8, 3),
)
FILTER_TILE = (64, 64)
"""(BLOCK_B, BLOCK_C) of both backward kernels when the gradient filter is on: the prototype
kernel skips exactly the tiles the embedding kernel marked, so they must share the tiling."""
MAX_BLOCK_DO = 512


def interpreter_tiles(dim: int, class_tile: Optional[int]) -> Dict[str, int]:
    half = max(16, triton.next_power_of_2(dim) // 2)
    return dict(INTERPRETER_TILES, BLOCK_C=class_tile or INTERPRETER_TILES["BLOCK_C"], BLOCK_K=half, BLOCK_DO=half)


def class_tile_override(chunk_size: int) -> Optional[int]:
    """`chunk_size` sets the class tile (BLOCK_C); 0 leaves it to the tuning."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
    if chunk_size == 0:
        return None
    if not MIN_TILE <= chunk_size <= MAX_TILE or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size for backend='triton' is the class tile: 0 (automatic) or a power of two "
                         f"in [{MIN_TILE}, {MAX_TILE}], got {chunk_size}")
    return chunk_size


def precision(dtype: torch.dtype) -> str:
    # tl.dot would take float32 operands as TF32 on the GPU: 10 mantissa bits, not float32.
    return "ieee" if dtype == torch.float32 else "tf32"


def upcast(dtype: torch.dtype) -> bool:
    return TRITON_INTERPRET and dtype == torch.bfloat16


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _programs_wanted(device: torch.device) -> int:
    """Enough programs for two waves over the multiprocessors."""
    if device.type != "cuda":
        return 2 * INTERPRETER_SMS
    return 2 * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


def class_splits(num_classes: int, other_programs: int, align: int, device: torch.device,
                 num_splits: Optional[int]) -> Tuple[int, int]:
    """(splits, classes per split): C is split when the other grid axes leave multiprocessors
    idle. Splits start on a multiple of every class tile (`align`) and none is empty."""
    tiles = triton.cdiv(num_classes, align)
    if num_splits is None:
        num_splits = triton.cdiv(_programs_wanted(device), other_programs)
    num_splits = max(1, min(num_splits, tiles))
    split_size = triton.cdiv(tiles, num_splits) * align
    return triton.cdiv(num_classes, split_size), split_size


def forward_configs(dim: int, class_tile: Optional[int]) -> List[Dict[str, int]]:
    if TRITON_INTERPRET:
        tiles = interpreter_tiles(dim, class_tile)
        del tiles["BLOCK_DO"]
        return [tiles]
    configs = []
    for bb, bc, bk, warps, stages in FORWARD_CONFIGS:
        config = dict(BLOCK_B=bb, BLOCK_C=class_tile or bc, BLOCK_K=bk, num_warps=warps, num_stages=stages)
        if config not in configs:
            configs.append(config)
    return configs


def backward_configs(dim: int, class_tile: Optional[int], filtered: bool) -> List[Dict[str, int]]:
    if TRITON_INTERPRET:
        return [interpreter_tiles(dim, class_tile)]
    full = min(triton.next_power_of_2(dim), MAX_BLOCK_DO)
    configs = []
    for bb, bc, bk, bdo, warps, stages in BACKWARD_CONFIGS:
        if filtered:
            bb, bc = FILTER_TILE
        config = dict(BLOCK_B=bb, BLOCK_C=class_tile or bc, BLOCK_K=bk, BLOCK_DO=min(bdo or full, full),
                      num_warps=warps, num_stages=stages)
        if config not in configs:
            configs.append(config)
    return configs


_LAUNCH_KEYS = ("num_warps", "num_stages")


@functools.lru_cache(maxsize=None)
def autotuned(kernel: Callable, configs: Tuple[Tuple[Tuple[str, int], ...], ...]) -> Callable:
    return triton.autotune(
        configs=[triton.Config({k: v for k, v in c if k not in _LAUNCH_KEYS},
                               **{k: v for k, v in c if k in _LAUNCH_KEYS}) for c in configs],
        key=["B", "C", "D"],
    )(kernel)


def launch(kernel, grid: Callable[[Dict[str, int]], tuple], configs: Sequence[Dict[str, int]], **args) -> None:
    """Runs `kernel` with the one config given, or autotuned over several (GPU)."""
    if len(configs) == 1:
        config = configs[0]
        kernel[grid(config)](**args, **config)
    else:
        autotuned(kernel, tuple(tuple(sorted(c.items())) for c in configs))[grid](**args)
