"""The CUDA emulation's own checks (tests/cuda_emulation; docs/design.md, ## CUDA backend): the
launch rewrite, and the cases of tests/kernels/test_cuda.py that the emulated CUDA backend can run at
small sizes (chunk sizes that leave row splits empty, the split count following the batch).
The shared suites run the emulated backend through the `cuda-emulated` param of KERNEL_BACKENDS."""
import sys
from pathlib import Path

import pytest
import torch

from support import aux_inputs, compare_aux, compare_head, head_inputs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cuda_emulation"))
from rewrite_launches import rewrite  # noqa: E402

EMULATED = ("cuda", "cpu")


def test_rewrite_turns_every_launch_into_a_runtime_call():
    source = """
        kernel<<<grid, kThreads, 0, stream>>>(a, b);
        templated<T><<<grid_for(rows, kThreads / kWarp), kThreads, 0, stream>>>(
            static_cast<const T*>(x), rows);
        ns::plain<<<1, 256>>>();
    """
    text, launches = rewrite(source)
    assert launches == 3 and "<<<" not in text and ">>>" not in text
    assert "::ree_emulation::launch(kernel, grid, kThreads, 0, stream)(a, b);" in text
    assert "::ree_emulation::launch(templated<T>, grid_for(rows, kThreads / kWarp), kThreads, 0, stream)(" in text
    assert "::ree_emulation::launch(ns::plain, 1, 256)();" in text


def test_rewrite_leaves_other_code_alone():
    source = "x = a << 3 >> 1; if (b < c && d > e) f<int>(g);"
    assert rewrite(source) == (source, 0)


@pytest.mark.cuda_emulation
@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("chunk_size", [1, 7, 11, 500])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_sizes_that_leave_splits_empty(chunk_size, dtype):
    """B = 16 gives 3 column splits per row on the emulated device: chunks of 1 and 7 columns leave
    splits empty (their state stays max −inf, sum 0 through the merges); 11 is C exactly, 500 more."""
    inputs = head_inputs(16, 11, 19, seed=90 + chunk_size, ignored=2, weights=True)
    compare_head(inputs, backend="cuda", dtype=dtype, chunk_size=chunk_size)


@pytest.mark.cuda_emulation
@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("batch", [1, 5, 300])
def test_row_splits_follow_the_batch(batch):
    """48, 10 and 1 column splits per row (head_row_splits on 6 emulated SMs), over 3 chunks; at
    B = 300 the finish kernel takes two blocks of 256 rows."""
    inputs = head_inputs(batch, 131, 19, seed=95 + batch, plant=("peaky",))
    compare_head(inputs, backend="cuda", dtype=torch.float32, chunk_size=48)


@pytest.mark.cuda_emulation
@pytest.mark.usefixtures("poisoned_outputs")
def test_gradient_kernel_strides_over_column_groups():
    """One chunk of 2100 columns: the backward's epilogue grid has 3 column groups of 1024 columns
    (grad_chunk_kernel's y extent), and each forward split 88 columns."""
    inputs = head_inputs(2, 2100, 8, seed=99, plant=())
    compare_head(inputs, backend="cuda", dtype=torch.float32)


@pytest.mark.cuda_emulation
@pytest.mark.usefixtures("poisoned_outputs")
def test_aux_batch_beyond_one_block():
    """B = 300: the finish kernel's threads each sum two rows before the shared-memory tree."""
    inputs = aux_inputs(300, 19, seed=98)
    compare_aux(inputs, backend="cuda", dtype=torch.float32)
