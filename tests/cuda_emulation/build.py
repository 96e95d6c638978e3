"""Builds the CUDA backend for the CPU (the CUDA emulation, docs/design.md ## CUDA backend): the
unmodified glue csrc/cuda/*.cpp (with REE_CUDA_EMULATION, its ops become ree::cuda_emulated_* on
CPU tensors) and kernels csrc/cuda/*.cu (their launches rewritten by rewrite_launches.py), compiled
by g++ against include/ (the emulated CUDA runtime) and torch, into one shared library. Prints its
path, which REE_CUDA_EMULATION_LIBRARY takes (ree_kernels.backends.CUDA_EMULATION_LIBRARY).

Usage: python tests/cuda_emulation/build.py [--asan] [--build-dir DIR]
With --asan the library is built with AddressSanitizer; then this process (and every process that
loads the library) needs libasan preloaded, without its leak report (which the compilers started
here would fail on): LD_PRELOAD=$(g++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0.
Rebuilds only what changed (ninja, through torch.utils.cpp_extension).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torch.utils import cpp_extension

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from rewrite_launches import rewrite  # noqa: E402

# -ffp-contract=off: a product is never fused into an FMA behind the kernels' back (nvcc's
# explicit fmaf calls stay FMAs); -pthread: one OS thread per CUDA thread.
FLAGS = ["-std=c++20", "-ffp-contract=off", "-pthread", "-DREE_CUDA_EMULATION"]
OPTIMISE = ["-O2"]
SANITIZE = ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"]


def rewritten_kernels(out: Path) -> list[str]:
    """Each csrc/cuda/*.cu as a .cpp under `out` with its launches rewritten (unchanged files are
    left alone, so that ninja does not recompile them)."""
    paths = []
    for source in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        text, launches = rewrite(source.read_text())
        if launches == 0 or "<<<" in text:
            raise SystemExit(f"{source}: the launches could not all be rewritten")
        target = out / f"{source.stem}.cpp"
        new = f'#line 1 "{source}"\n{text}'
        if not target.exists() or target.read_text() != new:
            target.write_text(new)
        paths.append(str(target))
    return paths


def build(asan: bool, build_dir: Path) -> Path:
    name = "ree_cuda_emulation_asan" if asan else "ree_cuda_emulation"
    out = build_dir / name
    (out / "src").mkdir(parents=True, exist_ok=True)
    sources = [str(p) for p in sorted((ROOT / "csrc" / "cuda").glob("*.cpp"))] + rewritten_kernels(out / "src")
    cpp_extension.load(
        name=name,
        sources=sources,
        extra_cflags=FLAGS + (SANITIZE if asan else OPTIMISE),
        extra_ldflags=["-pthread"] + (["-fsanitize=address"] if asan else []),
        extra_include_paths=[str(HERE / "include"), str(ROOT / "csrc" / "include"), str(ROOT / "csrc" / "cuda")],
        build_directory=str(out),
        is_python_module=False,
        verbose=False,
    )
    return out / f"{name}.so"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--asan", action="store_true", help="build with AddressSanitizer")
    parser.add_argument("--build-dir", type=Path, default=ROOT / "build" / "cuda-emulation")
    args = parser.parse_args()
    print(build(args.asan, args.build_dir.resolve()))


if __name__ == "__main__":
    main()
