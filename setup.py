"""Builds `ree_kernels._C` (the C++ CPU kernels, and the CUDA kernels where torch has CUDA).

Everything else (name, version, dependencies, packages, the `ree` script) is in pyproject.toml;
build without isolation, against the installed torch: `pip install --no-build-isolation -e .`

Environment flags:
  REE_SKIP_CUDA=1        build the CPU kernels only, even where CUDA is available
  REE_FORCE_CUDA=1       build the CUDA kernels without a GPU (needs nvcc and a CUDA build of torch)
  REE_CUDA_ARCHS="80;90" the CUDA architectures to compile for (default 80;90)
  REE_CPU_NATIVE=1       compile the CPU kernels for this machine's CPU only (-march=native): the
                         library may then stop with an illegal instruction on another CPU. The
                         default is portable: the vectorised loops are compiled for AVX-512, AVX2
                         and baseline x86-64, and the CPU's widest is picked at load time
                         (csrc/cpu/lanes.h: REE_LANES), at the same speed (docs/design.md)
  MAX_JOBS=N             parallel compile jobs (read by torch's build extension)
"""
import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def flag(name: str, default: str) -> str:
    return os.environ.get(name, default).strip()


def sources(pattern: str) -> list:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extension():
    with_cuda = torch.cuda.is_available() or flag("REE_FORCE_CUDA", "0") == "1"
    with_cuda = with_cuda and CUDA_HOME is not None and flag("REE_SKIP_CUDA", "0") != "1"
    # -fopenmp: at::parallel_for is an inline `#pragma omp parallel` in ATen's headers; without
    # it the extension's parallel loops run on one thread. The library then resolves libgomp.so.1
    # to the one torch has already loaded (same soname), so both share one thread pool.
    # -fno-trapping-math (no result changes: nothing here reads floating-point exception flags)
    # lets GCC turn the lane loops' comparisons into vector selects inside the AVX2 and baseline
    # versions of REE_LANES functions, which it otherwise leaves scalar.
    # No -std: torch's build extension passes the standard its headers need (C++20 from torch
    # 2.13's; torch 2.14's headers refuse anything older, so a forced C++17 broke every build).
    cxx = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]
    if flag("REE_CPU_NATIVE", "0") == "1":
        cxx += ["-march=native", "-DREE_CPU_NATIVE"]
    src = ["csrc/ops.cpp", "csrc/python_module.cpp"] + sources("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    if not with_cuda:
        return CppExtension("ree_kernels._C", src, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    archs = [a for a in flag("REE_CUDA_ARCHS", "80;90").replace(",", ";").split(";") if a]
    # The .cu files never include torch's headers (csrc/cuda/kernels.h), so they keep one standard
    # whatever torch asks of the glue.
    nvcc = ["-O3", "-std=c++17", "-lineinfo"]
    nvcc += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    src += sources("csrc/cuda/*.cpp") + sources("csrc/cuda/*.cu")
    return CUDAExtension("ree_kernels._C", src, include_dirs=include_dirs,
                         extra_compile_args={"cxx": cxx + ["-DREE_WITH_CUDA"], "nvcc": nvcc},
                         extra_link_args=["-fopenmp"])


class ReusingBuildExtension(BuildExtension):
    """Compiles into one folder, build/ninja, whichever front end asks (an editable install
    asks for a fresh temporary folder each time): ninja then recompiles only the sources, headers
    or flags that changed, so `make install`, a wheel and a reinstall reuse each other's objects."""

    def finalize_options(self) -> None:
        super().finalize_options()
        self.build_temp = os.path.join(ROOT, "build", "ninja")


setup(ext_modules=[extension()], cmdclass={"build_ext": ReusingBuildExtension})
