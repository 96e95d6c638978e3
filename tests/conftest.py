import os

import numpy as np
import pytest
import torch
from PIL import Image

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors (docs/spec.md §5). The
# variable must be set before Triton (or ree_kernels) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device (runs only where one exists)")
    config.addinivalue_line("markers", "cuda_emulation: the CUDA backend on CPU tensors, emulated "
                            "(runs where REE_CUDA_EMULATION_LIBRARY names its build: make gpu-verify-cuda)")
    # Triton's interpreter evaluates tl.log in numpy, which warns on the log(0) = −inf of rows
    # masked out of a tile; torch.compile's import of torch.jit warns about its own deprecation.
    config.addinivalue_line("filterwarnings", "ignore:divide by zero encountered in log:RuntimeWarning")
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    if not os.environ.get("REE_CUDA_EMULATION_LIBRARY"):
        skip_emulation = pytest.mark.skip(reason="the CUDA emulation is not built: make gpu-verify-cuda runs these")
        for item in items:
            if "cuda_emulation" in item.keywords:
                item.add_marker(skip_emulation)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny training runs: they gain nothing from a second
    thread, and on a shared machine OpenMP's spinning threads make them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def poisoned_outputs():
    """Every torch.empty (Python or C++) is filled with NaN / the largest integer, so an output
    element a kernel never wrote shows up in the comparison with the reference (docs/spec.md §5)."""
    previous = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous)
    torch.utils.deterministic.fill_uninitialized_memory = fill


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """5 identities x 8 PNGs of 32x32: a per-identity pattern plus noise."""
    root = tmp_path_factory.mktemp("faces")
    rng = np.random.default_rng(0)
    for k in range(5):
        base = rng.integers(0, 256, (32, 32, 3))
        (root / f"id{k}").mkdir()
        for j in range(8):
            pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"id{k}" / f"{j}.png")
    return root
