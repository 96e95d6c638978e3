"""Tile sizes, autotuning and class splits of the Triton head (docs/design.md, "Tiles,
autotuning, `chunk_size`"): which configs a launch may use, how many programs split the classes,
and the launch itself (one config, or `triton.autotune` over several on a GPU)."""
from __future__ import annotations

import functools
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import triton

from ..backends import TRITON_INTERPRET, TRITON_MAX_CLASS_TILE

MIN_TILE = 16
"""Smallest class tile that `chunk_size` may set (tl.dot needs at least 16)."""
MAX_TILE = TRITON_MAX_CLASS_TILE
"""Largest class tile: the widest whose reshaped candidates (`_fit_class_tile`) compiled without
spills for sm_80 and sm_90 (256 spilled on sm_80; at 1024 ptxas failed on the register
allocation or spilled ~38 KB per thread: benchmarks/gpu_verify_triton.py)."""

ROW_BLOCK = 16
"""Rows per program of the per-row kernels (forward finish, backward rows)."""
ROW_BLOCK_K = 64
"""Columns of D per step of the per-row kernels."""

# Interpreter tiles: small, so that the test shapes (tests/support.py) cross several row and
# class tiles and split the classes; D is cut in two (both the D loop of the cosines and the D
# blocks of the backward run twice), at least 16 for tl.dot.
INTERPRETER_TILES = {"BLOCK_B": 16, "BLOCK_C": 32}

INTERPRETER_SMS = 4
"""Stand-in for the multiprocessor count under the interpreter: small B then splits C."""

# GPU autotune candidates, per kind of product: "16-bit" (bfloat16/float16 on tensor cores) and
# "float32" (input_precision="ieee": FMA products whose operand tiles sit in registers, hence the
# narrower BLOCK_K and tiles). Each one, and each reshaped for chunk_size 16 and 128, compiles for
# sm_80 and sm_90 at D = 512 without a register spill and within the shared memory of an A100
# (benchmarks/gpu_verify_triton.py, the tables in benchmarks/results/). The sets are small because
# the autotuner compiles every candidate at a shape's first call. Speed is not measured yet.
# Forward: (BLOCK_B, BLOCK_C, BLOCK_K, num_warps, num_stages).
FORWARD_CONFIGS = {
    "16-bit": ((128, 128, 64, 8, 3), (64, 128, 64, 8, 3), (64, 64, 32, 4, 3)),
    "float32": ((128, 64, 16, 8, 2), (64, 128, 16, 8, 2), (64, 64, 16, 4, 2)),
}
# Backward: (BLOCK_B, BLOCK_C, BLOCK_K, BLOCK_DO, num_warps, num_stages). Each D block recomputes
# the cosines, but wider BLOCK_DO spilled: [BLOCK_B, BLOCK_DO] float32 accumulators next to the
# cosine tile (16-bit: BLOCK_DO = 512 on sm_90, 256 on sm_80; float32: ~100 KB per thread at 512,
# and a few bytes for most 64 × 64 and 32 × 32 × 128 tiles on one of the two targets).
# With the gradient filter on, every candidate takes the first one's (BLOCK_B, BLOCK_C): the
# prototype kernel skips exactly the tiles the embedding kernel marked, so they share the tiling.
BACKWARD_CONFIGS = {
    "16-bit": ((64, 64, 64, 128, 8, 2),),
    "float32": ((32, 32, 16, 64, 4, 2),),
}


def _dot_kind(dtype: torch.dtype) -> str:
    return "float32" if dtype == torch.float32 else "16-bit"


def _fit_class_tile(block_b: int, block_c: int, block_do: int, warps: int,
                    class_tile: Optional[int]) -> Tuple[int, int, int, int]:
    """(BLOCK_B, BLOCK_C, BLOCK_DO, num_warps) of a candidate with `chunk_size`'s class tile
    (block_do 0 for the forward). A wider class tile narrows BLOCK_B (at least 16) and BLOCK_DO
    (at least 32: float32 tiles with 16 spilled on sm_90) by as much, so the float32 tiles held in
    registers ([BLOCK_B, BLOCK_C] cosines, [BLOCK_C, BLOCK_DO] and [BLOCK_B, BLOCK_DO]
    accumulators) stay about the size of the candidate's; the warps follow the largest of them,
    between 4 and 8 (8 warps on a 64 × 16 float32 forward tile spilled)."""
    if class_tile is None:
        return block_b, block_c, block_do, warps
    widen = max(1, class_tile // block_c)
    new_b, new_do = max(MIN_TILE, block_b // widen), max(32, block_do // widen) if block_do else 0

    def largest(b: int, c: int, do: int) -> int:
        return max(b * c, b * do, c * do)

    scaled = warps * largest(new_b, class_tile, new_do) // largest(block_b, block_c, block_do)
    return new_b, class_tile, new_do, max(4, min(max(warps, 8), scaled))


def interpreter_tiles(dim: int, class_tile: Optional[int]) -> Dict[str, int]:
    half = max(16, triton.next_power_of_2(dim) // 2)
    return dict(INTERPRETER_TILES, BLOCK_C=class_tile or INTERPRETER_TILES["BLOCK_C"], BLOCK_K=half, BLOCK_DO=half)


def class_tile_override(chunk_size: int) -> Optional[int]:
    """`chunk_size` sets the class tile (BLOCK_C); 0 leaves it to the tuning.

    Raises:
        TypeError: chunk_size is not an int.
        ValueError: naming chunk_size, when it is not 0 or a power of two in [MIN_TILE, MAX_TILE].
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
    if chunk_size == 0:
        return None
    if not MIN_TILE <= chunk_size <= MAX_TILE or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size for backend='triton' is the class tile: 0 (automatic) or a power of two "
                         f"in [{MIN_TILE}, {MAX_TILE}] (a wider tile does not compile without register spills), "
                         f"got {chunk_size}")
    return chunk_size


def precision(dtype: torch.dtype) -> str:
    # tl.dot would take float32 operands as TF32 on the GPU: 10 mantissa bits, not float32.
    return "ieee" if dtype == torch.float32 else "tf32"


def upcast(dtype: torch.dtype) -> bool:
    return TRITON_INTERPRET and dtype == torch.bfloat16


@functools.lru_cache(maxsize=None)
def _cuda_multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def multiprocessors(device: torch.device) -> int:
    """The multiprocessor count the class splits are sized for: the card's, or INTERPRETER_SMS
    off CUDA. benchmarks/gpu_verify_triton.py replaces it to compile for a given card."""
    if device.type != "cuda":
        return INTERPRETER_SMS
    return _cuda_multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


def _programs_wanted(device: torch.device) -> int:
    """Enough programs for two waves over the multiprocessors."""
    return 2 * multiprocessors(device)


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


def forward_configs(dim: int, class_tile: Optional[int], dtype: torch.dtype) -> List[Dict[str, int]]:
    if TRITON_INTERPRET:
        tiles = interpreter_tiles(dim, class_tile)
        del tiles["BLOCK_DO"]
        return [tiles]
    configs = []
    for bb, bc, bk, warps, stages in FORWARD_CONFIGS[_dot_kind(dtype)]:
        bb, bc, _, warps = _fit_class_tile(bb, bc, 0, warps, class_tile)
        config = dict(BLOCK_B=bb, BLOCK_C=bc, BLOCK_K=bk, num_warps=warps, num_stages=stages)
        if config not in configs:
            configs.append(config)
    return configs


def backward_configs(dim: int, class_tile: Optional[int], filtered: bool, dtype: torch.dtype) -> List[Dict[str, int]]:
    if TRITON_INTERPRET:
        return [interpreter_tiles(dim, class_tile)]
    configs = []
    candidates = BACKWARD_CONFIGS[_dot_kind(dtype)]
    for bb, bc, bk, bdo, warps, stages in candidates:
        if filtered:
            bb, bc = candidates[0][:2]
        bb, bc, bdo, warps = _fit_class_tile(bb, bc, bdo, warps, class_tile)
        config = dict(BLOCK_B=bb, BLOCK_C=bc, BLOCK_K=bk, BLOCK_DO=min(bdo, max(MIN_TILE, triton.next_power_of_2(dim))),
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
