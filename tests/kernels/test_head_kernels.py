"""The docs/spec.md §5 suite for `arcface_head`, shared by every kernel backend (C++ CPU, Triton in the
interpreter here; CUDA and native Triton where a GPU exists)."""
import math

import pytest
import torch

from ree_kernels import reference
from ree_kernels.backends import kernel_op
from support import (
    DTYPES,
    FORWARD_TOL,
    GRAD_TOL,
    KERNEL_BACKENDS,
    LARGE_SCALE_SHAPES,
    assert_spec_close,
    compare_head,
    head_inputs,
    head_shape,
    planted_tie_inputs,
    run_head,
)

pytestmark = pytest.mark.usefixtures("poisoned_outputs")


@pytest.fixture(params=KERNEL_BACKENDS)
def kernel(request):
    return request.param


def dtypes_of(kernel):
    return DTYPES[tuple(kernel)]


@pytest.mark.parametrize("margin_mode", reference.MARGIN_MODES)
def test_matches_reference_every_dtype(kernel, margin_mode):
    backend, device = kernel
    batch, classes, dim = head_shape(kernel)
    for k, dtype in enumerate(dtypes_of(kernel)):
        inputs = head_inputs(batch, classes, dim, seed=10 + k, device=device, ignored=3, weights=True,
                             plant=("peaky", "opposite"))
        compare_head(inputs, backend=backend, dtype=dtype, device=device, margin_mode=margin_mode)


@pytest.mark.parametrize("reduction", reference.REDUCTIONS)
@pytest.mark.parametrize("ri_form", reference.RI_FORMS)
def test_reductions_and_ri_forms(kernel, reduction, ri_form):
    backend, device = kernel
    batch, classes, dim = head_shape(kernel)
    inputs = head_inputs(batch, classes, dim, seed=20, device=device, ignored=2, weights=reduction != "sum")
    compare_head(inputs, backend=backend, dtype=torch.float32, device=device, reduction=reduction,
                 ri_form=ri_form, scale=30.0, margin=0.3)


def test_zero_norm_row_and_no_ui_center(kernel):
    backend, device = kernel
    batch, classes, dim = head_shape(kernel)
    inputs = head_inputs(batch, classes, dim, seed=21, device=device, plant=("zero_row",), ui_center=False)
    out, grads = run_head(inputs, backend=backend, dtype=torch.float32, device=device)
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    assert bool(torch.isnan(out.cos_ui).all())
    compare_head(inputs, backend=backend, dtype=torch.float32, device=device)


def test_all_rows_ignored_gives_zero_loss_and_gradients(kernel):
    backend, device = kernel
    batch, classes, dim = head_shape(kernel)
    inputs = head_inputs(batch, classes, dim, seed=22, device=device, ignored=batch)
    out, grads = run_head(inputs, backend=backend, dtype=torch.float32, device=device)
    assert float(out.loss.detach()) == 0.0
    assert all(float(g.abs().max()) == 0.0 for g in grads)
    assert bool(torch.isnan(out.cos_pos).all()) and bool(torch.isnan(out.ri).all())
    compare_head(inputs, backend=backend, dtype=torch.float32, device=device)


def test_zero_weights_sum_to_zero(kernel):
    backend, device = kernel
    batch, classes, dim = head_shape(kernel)
    inputs = head_inputs(batch, classes, dim, seed=23, device=device, weights=True)
    inputs["sample_weight"] = torch.zeros_like(inputs["sample_weight"])
    out, grads = run_head(inputs, backend=backend, dtype=torch.float32, device=device)
    assert float(out.loss.detach()) == 0.0 and all(float(g.abs().max()) == 0.0 for g in grads)


@pytest.mark.parametrize("ignored", [0, 2])
def test_single_class(kernel, ignored):
    backend, device = kernel
    batch, _, dim = head_shape(kernel)
    inputs = head_inputs(batch, 1, dim, seed=24, device=device, ignored=ignored, plant=("peaky",))
    out, _ = run_head(inputs, backend=backend, dtype=torch.float32, device=device)
    counted = inputs["labels"] != -100
    assert bool((out.neg_index[counted] == -1).all()) and bool((out.cos_neg[counted] == -1).all())
    assert bool((out.neg_index[~counted] == 0).all())
    compare_head(inputs, backend=backend, dtype=torch.float32, device=device)


def test_nearest_negative_ties_take_the_lowest_index(kernel):
    backend, device = kernel
    batch, classes, dim = head_shape(kernel)
    for dtype in dtypes_of(kernel):
        inputs = planted_tie_inputs(batch, classes, dim, seed=25, dtype=dtype, device=device)
        out, _ = run_head(inputs, backend=backend, dtype=dtype, device=device, grad=False)
        if dtype in (torch.float32, torch.float64):
            assert bool((out.neg_index == 3).all()), out.neg_index
        compare_head(inputs, backend=backend, dtype=dtype, device=device)


def test_exact_index_without_ties(kernel):
    backend, device = kernel
    batch, classes, dim = head_shape(kernel)
    inputs = head_inputs(batch, classes, dim, seed=26, device=device, ignored=2)
    ours, _ = run_head(inputs, backend=backend, dtype=torch.float32, device=device, grad=False)
    gt, _ = run_head(inputs, backend="reference", dtype=torch.float64, device=device, grad=False)
    assert torch.equal(ours.neg_index.cpu(), gt.neg_index.cpu())


def test_non_contiguous_inputs(kernel):
    backend, device = kernel
    batch, classes, dim = head_shape(kernel)
    inputs = head_inputs(batch, classes, dim, seed=27, device=device)
    # Transposed copies: same values, non-contiguous strides.
    inputs["embeddings"] = inputs["embeddings"].t().contiguous().t()
    inputs["prototypes"] = inputs["prototypes"].t().contiguous().t()
    assert not inputs["embeddings"].is_contiguous()
    compare_head(inputs, backend=backend, dtype=torch.float32, device=device)


def test_bitwise_deterministic(kernel):
    backend, device = kernel
    batch, classes, dim = head_shape(kernel)
    inputs = head_inputs(batch, classes, dim, seed=28, device=device, ignored=2, weights=True)
    for reduction in ("mean", "none"):
        first, first_g = run_head(inputs, backend=backend, dtype=torch.float32, device=device, reduction=reduction)
        again, again_g = run_head(inputs, backend=backend, dtype=torch.float32, device=device, reduction=reduction)
        for a, b in zip((*first, *first_g), (*again, *again_g)):
            assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))


def test_nan_input_gives_non_finite_loss(kernel):
    backend, device = kernel
    batch, classes, dim = head_shape(kernel)
    for target in ("embeddings", "prototypes"):
        inputs = head_inputs(batch, classes, dim, seed=29, device=device)
        inputs[target][0, 0] = math.nan
        out, grads = run_head(inputs, backend=backend, dtype=torch.float32, device=device)
        assert not bool(torch.isfinite(out.loss))


def test_no_grad_forward_matches(kernel):
    backend, device = kernel
    batch, classes, dim = head_shape(kernel)
    inputs = head_inputs(batch, classes, dim, seed=30, device=device, ignored=1)
    with torch.no_grad():
        ours, _ = run_head(inputs, backend=backend, dtype=torch.float32, device=device, grad=False)
    gt, _ = run_head(inputs, backend="reference", dtype=torch.float64, device=device, grad=False)
    assert abs(float(ours.loss) - float(gt.loss)) < 1e-3


@pytest.mark.parametrize("chunk_size", [16, 64])
def test_chunk_edges(kernel, chunk_size):
    """Labels and nearest negatives on chunk boundaries, C not a multiple of the chunk, and a
    chunk larger than C."""
    backend, device = kernel
    batch, classes, dim = head_shape(kernel)
    for num_classes in (classes, chunk_size * 3 + 5, chunk_size - 3):
        inputs = head_inputs(batch, num_classes, dim, seed=31 + num_classes, device=device, ignored=1)
        labels, emb, protos = inputs["labels"], inputs["embeddings"], inputs["prototypes"]
        edges = [c for c in (0, chunk_size - 1, chunk_size, 2 * chunk_size - 1, num_classes - 1) if c < num_classes]
        for row, edge in enumerate(edges):
            labels[row] = edge
            # The next edge (cyclically) becomes this row's nearest negative.
            neighbour = edges[(row + 1) % len(edges)]
            if neighbour != edge:
                protos[neighbour] = emb[row] * 2.0
        compare_head(inputs, backend=backend, dtype=torch.float32, device=device, chunk_size=chunk_size)


def test_out_of_range_label_under_no_validation_poisons_its_row(kernel):
    """Inside torch.compile the label check cannot run; the kernel must then give a NaN loss
    for that row, not read out of bounds. Called through the op directly to skip validation."""
    backend, device = kernel
    batch, classes, dim = head_shape(kernel)
    inputs = head_inputs(batch, classes, dim, seed=32, device=device)
    labels = inputs["labels"].clone()
    labels[0] = classes + 5
    rows = kernel_op(backend, "head_forward")(
        inputs["embeddings"].float(), inputs["prototypes"].float(), labels, 64.0, 0.5, "arcface", -100, 0, 0.0)
    assert math.isnan(float(rows[0][0])) and bool(torch.isfinite(rows[0][1:]).all())


def _ui_and_ri(inputs, dtype, ri_form):
    """(cos_ui, ri) of the reference in `dtype`, from its own per-row pass."""
    emb, protos = inputs["embeddings"].to(dtype), inputs["prototypes"].to(dtype)
    ui = None if inputs["ui_center"] is None else inputs["ui_center"].to(dtype)
    rows = reference.arcface_rows(emb, protos, inputs["labels"])
    cos_ui = reference.cosine_to_ui(emb, ui)
    return cos_ui, reference.recognizability_index(rows.cos_pos, rows.cos_neg, None if ui is None else cos_ui, ri_form)


@pytest.mark.parametrize("ri_form", reference.RI_FORMS)
@pytest.mark.parametrize("centre", ["given", "none", "zero"])
def test_ui_cosine_and_ri_come_from_the_op(kernel, ri_form, centre):
    """One op call returns the whole HeadOutput: the UI cosine (the normalisation pre-pass) and
    the RI of every form (the epilogue), with a UI centre, without one (cos_ui NaN, d^UI = 1) and
    with a zero one (û = 0, so cos_ui = 0), on ignored rows (NaN RI), the planted rows and a
    zero-norm row; then the same through arcface_head, gradients included."""
    backend, device = kernel
    batch, classes, dim = head_shape(kernel)
    inputs = head_inputs(batch, classes, dim, seed=33, device=device, ignored=2, ui_center=centre != "none",
                         plant=("peaky", "opposite", "zero_row"))
    if centre == "zero":
        inputs["ui_center"] = torch.zeros_like(inputs["ui_center"])
    ui = None if inputs["ui_center"] is None else inputs["ui_center"].float()
    rows = kernel_op(backend, "head_forward")(inputs["embeddings"].float(), inputs["prototypes"].float(),
                                              inputs["labels"], 64.0, 0.5, "arcface", reference.IGNORE_INDEX, 0,
                                              0.0, ui, ri_form)
    assert len(rows) == 7
    pt = _ui_and_ri(inputs, torch.float32, ri_form)
    gt = _ui_and_ri(inputs, torch.float64, ri_form)
    for name, ours, p, g in zip(("cos_ui", "ri"), rows[5:], pt, gt):
        assert ours.dtype == torch.float32, name
        assert_spec_close(ours, p, g, FORWARD_TOL[torch.float32], name)
    assert bool(rows[6][-2:].isnan().all()), "ignored rows have no RI"
    if centre == "none":
        assert bool(rows[5].isnan().all())
    if centre == "zero":
        assert bool((rows[5] == 0).all())
    compare_head(inputs, backend=backend, dtype=torch.float32, device=device, ri_form=ri_form)


@pytest.mark.parametrize("scale", [64.0, reference.MAX_SCALE])
@pytest.mark.parametrize("reduction", reference.REDUCTIONS)
def test_forward_and_backward_agree_at_large_scales(kernel, scale, reduction):
    """At a logit scale s, a cosine one rounding u away moves the softmax by s·u relative: the
    backward must recompute exactly the forward's cosines and logits, or its softmax no longer
    sums to one against the forward's lse. Rows at and near cos = ±1 and a nearest negative at
    cos ≈ 1 (which dominates its row's lse), every reduction (mean and sum: the CPU's single
    pass; none: forward + recomputing backward), up to reference.MAX_SCALE: the gradients hold
    to the float64 reference by the docs/spec.md §5 rule, and the loss is finite."""
    backend, device = kernel
    batch, classes, dim = LARGE_SCALE_SHAPES.get(tuple(kernel), LARGE_SCALE_SHAPES["default"])
    inputs = head_inputs(batch, classes, dim, seed=34, device=device, ignored=2,
                         plant=("peaky", "opposite", "near_one", "near_minus_one", "near_negative"))
    ours, ours_g = run_head(inputs, backend=backend, dtype=torch.float32, device=device, scale=scale,
                            reduction=reduction)
    pt, pt_g = run_head(inputs, backend="reference", dtype=torch.float32, device=device, scale=scale,
                        reduction=reduction)
    gt, gt_g = run_head(inputs, backend="reference", dtype=torch.float64, device=device, scale=scale,
                        reduction=reduction)
    assert bool(torch.isfinite(ours.loss).all()) and bool(torch.isfinite(ours.lse).all())
    for name, o, p, g in zip(("grad embeddings", "grad prototypes"), ours_g, pt_g, gt_g):
        assert_spec_close(o, p, g, GRAD_TOL[torch.float32], f"{name}, scale {scale}")
