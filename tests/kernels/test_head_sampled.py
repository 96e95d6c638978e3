"""`arcface_head(..., class_index=...)` (PartialFC sampling) on every backend: the same as the head
over `prototypes[class_index]` with the labels as positions (docs/spec.md §5 bounds), with a zero
gradient on every prototype outside the index."""
import pytest
import torch

import ree_kernels
from ree_kernels import reference
from support import (
    DTYPES,
    FORWARD_TOL,
    GRAD_TOL,
    KERNEL_BACKENDS,
    assert_spec_close,
    check_nearest_negative,
    generator,
    head_inputs,
    head_shape,
    run_head,
)

pytestmark = pytest.mark.usefixtures("poisoned_outputs")


@pytest.fixture(params=[pytest.param(("reference", "cpu"), id="reference")] + KERNEL_BACKENDS)
def kernel(request):
    return request.param


def sampled_problem(inputs, *, seed: int, fraction: float = 0.4):
    """A duplicate-free index in random order holding every label's class plus random others
    (one label's class planted at the last position), and the inputs with labels as positions."""
    labels, classes = inputs["labels"].cpu(), inputs["prototypes"].shape[0]
    has = labels >= 0
    positives = torch.unique(labels[has])
    g = generator(seed)
    taken = set(positives.tolist())
    others = torch.tensor([c for c in torch.randperm(classes, generator=g).tolist() if c not in taken])
    extra = max(int(fraction * classes) - positives.numel(), 1)
    index = torch.cat([positives, others[:extra]])
    index = index[torch.randperm(index.numel(), generator=g)]
    last = int(labels[0])  # row 0 is the planted peaky row
    index = torch.cat([index[index != last], torch.tensor([last])])
    position = torch.full((classes,), -1, dtype=torch.int64)
    position[index] = torch.arange(index.numel())
    pos_labels = torch.where(has, position[labels.clamp_min(0)], labels)
    device = inputs["prototypes"].device
    sampled = dict(inputs, labels=pos_labels.to(device))
    compact = dict(sampled, prototypes=inputs["prototypes"][index.to(device)])
    return index.to(device), sampled, compact


def compare_sampled(inputs, *, seed, backend, dtype, device, **options):
    index, sampled, compact = sampled_problem(inputs, seed=seed)
    ours, (ours_ge, ours_gw) = run_head(sampled, backend=backend, dtype=dtype, device=device,
                                        class_index=index, **options)
    pt, (pt_ge, pt_gw) = run_head(compact, backend="reference", dtype=dtype, device=device, **options)
    gt, (gt_ge, gt_gw) = run_head(compact, backend="reference", dtype=torch.float64, device=device, **options)
    for field in ("loss", "cos_pos", "cos_neg", "cos_ui", "ri", "lse"):
        assert_spec_close(getattr(ours, field), getattr(pt, field), getattr(gt, field), FORWARD_TOL[dtype], field)
    check_nearest_negative(ours, gt, compact, dtype)  # neg_index: positions in the index
    assert_spec_close(ours_ge, pt_ge, gt_ge, GRAD_TOL[dtype], "grad embeddings")
    assert ours_gw.shape == inputs["prototypes"].shape and ours_gw.dtype == dtype
    assert_spec_close(ours_gw[index], pt_gw, gt_gw, GRAD_TOL[dtype], "grad prototypes (sampled rows)")
    outside = torch.ones(ours_gw.shape[0], dtype=torch.bool, device=ours_gw.device)
    outside[index] = False
    assert bool((ours_gw[outside] == 0).all()), "a prototype outside the index got a gradient"


@pytest.mark.parametrize("margin_mode", ["arcface", "cosface"])
def test_sampled_matches_the_head_over_the_gathered_prototypes(kernel, margin_mode):
    backend, device = kernel
    batch, classes, dim = head_shape(kernel)
    dtypes = DTYPES.get(tuple(kernel), (torch.float64, torch.float32))
    for k, dtype in enumerate(dtypes):
        inputs = head_inputs(batch, classes, dim, seed=40 + k, device=device, ignored=2, weights=True,
                             plant=("peaky", "opposite", "near_negative"))
        compare_sampled(inputs, seed=k, backend=backend, dtype=dtype, device=device, margin_mode=margin_mode)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_sampled_small_chunks(kernel, reduction):
    """Chunks that split the index unevenly (the CPU and CUDA drivers gather a chunk at a time)."""
    backend, device = kernel
    batch, classes, dim = head_shape(kernel)
    inputs = head_inputs(batch, classes, dim, seed=3, device=device)
    chunk = {"cpu": 7, "cuda": 7}.get(backend, 0)
    compare_sampled(inputs, seed=5, backend=backend, dtype=torch.float32, device=device,
                    reduction=reduction, chunk_size=chunk)


def test_index_of_every_class_gives_the_unsampled_result_exactly(kernel):
    backend, device = kernel
    batch, classes, dim = head_shape(kernel)
    inputs = head_inputs(batch, classes, dim, seed=7, device=device, ignored=1)
    # The CPU's whole-row path (unsampled, no chunk_size) rounds differently from its chunks: a
    # chunk size puts both on the same driver.
    options = dict(chunk_size=64) if backend == "cpu" else {}
    full, full_g = run_head(inputs, backend=backend, dtype=torch.float32, device=device, **options)
    every = torch.arange(classes, device=device)
    ours, ours_g = run_head(inputs, backend=backend, dtype=torch.float32, device=device, class_index=every,
                            **options)
    for field in full._fields:
        torch.testing.assert_close(getattr(ours, field), getattr(full, field), rtol=0, atol=0, equal_nan=True,
                                   msg=field)
    for name, a, b in zip(("grad embeddings", "grad prototypes"), ours_g, full_g):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_bad_class_index_is_refused(kernel):
    backend, device = kernel
    inputs = head_inputs(5, 20, 8, seed=1, device=device)
    labels = torch.tensor([0, 1, 2, 1, 0], device=device)
    emb, protos = inputs["embeddings"].float(), inputs["prototypes"].float()
    cases = [
        (torch.tensor([0, 1, 2, 2], device=device), "repeated"),
        (torch.tensor([0, 1, 20], device=device), r"\[0, 20\)"),
        (torch.tensor([0, 1, -1], device=device), r"\[0, 20\)"),
        (torch.tensor([0.0, 1.0, 2.0], device=device), "class_index"),
        (torch.tensor([0, 1], device=device), r"labels must lie in \[0, 2\)"),
        (torch.tensor([], dtype=torch.int64, device=device), "empty"),
    ]
    for index, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            ree_kernels.arcface_head(emb, protos, labels, backend=backend, class_index=index)


def test_cpu_op_refuses_an_index_out_of_range():
    """The op itself (callers may skip the Python validation) names the argument."""
    from ree_kernels.backends import kernel_op

    emb, protos = torch.randn(3, 4), torch.randn(6, 4)
    labels = torch.tensor([0, 1, 0])
    with pytest.raises(ValueError, match="class_index"):
        kernel_op("cpu", "head_forward")(emb, protos, labels, 64.0, 0.5, "arcface", reference.IGNORE_INDEX, 0, 0.0,
                                         None, "product", torch.tensor([0, 6]))
