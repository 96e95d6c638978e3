"""The C++ CPU head beyond the shared suite: its tiling override, its two gradient paths (the
row-block pass that computes the gradients in the forward, and forward + recomputing backward
in chunks of classes), determinism, float64 gradcheck, and direct calls of the ops."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ree_kernels import arcface_head, reference
from support import compare_head, head_inputs, planted_tie_inputs, run_head

pytestmark = pytest.mark.usefixtures("poisoned_outputs")

OPS = torch.ops.ree
# Rows per block of the with-gradient pass (kRowBlock in csrc/cpu/head.cpp): a batch above it
# takes several blocks.
ROW_BLOCK = 128


def direct_inputs(batch, classes, dim, *, seed, dtype=torch.float32, ignored=1):
    inputs = head_inputs(batch, classes, dim, seed=seed, ignored=ignored, weights=True)
    emb = inputs["embeddings"].to(dtype)
    protos = inputs["prototypes"].to(dtype)
    labels = inputs["labels"]
    coef = reference.loss_coefficients(labels, inputs["sample_weight"], -100, "mean", reference.stat_dtype(dtype))
    return emb, protos, labels, coef


def assert_close_rows(a, b, rtol, atol):
    """The five per-row outputs of head_forward (or rows[1:6] of head_forward_with_grad)."""
    for name, x, y in zip(("loss_rows", "cos_pos", "cos_neg", "neg_index", "lse"), a, b):
        if name == "neg_index":
            assert torch.equal(x, y), name
        else:
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol, equal_nan=True, msg=name)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunk_sizes_agree(reduction):
    """chunk_size 1, odd sizes, C − 1, C and above C give the same results (and the reference's)."""
    batch, classes, dim = 19, 97, 33
    inputs = head_inputs(batch, classes, dim, seed=40, ignored=2, weights=True)
    base, base_g = run_head(inputs, backend="cpu", dtype=torch.float32, reduction=reduction)
    for chunk_size in (1, 7, 64, classes - 1, classes, classes + 5):
        out, grads = run_head(inputs, backend="cpu", dtype=torch.float32, reduction=reduction, chunk_size=chunk_size)
        assert torch.equal(out.neg_index, base.neg_index), chunk_size
        for field in ("loss", "cos_pos", "cos_neg", "lse", "ri"):
            torch.testing.assert_close(getattr(out, field), getattr(base, field), rtol=1e-5, atol=2e-6,
                                       equal_nan=True, msg=f"{field}, chunk_size={chunk_size}")
        for g, b in zip(grads, base_g):
            torch.testing.assert_close(g, b, rtol=1e-4, atol=2e-5, msg=f"gradient, chunk_size={chunk_size}")
        compare_head(inputs, backend="cpu", dtype=torch.float32, reduction=reduction, chunk_size=chunk_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [23, 2 * ROW_BLOCK + 44])
def test_with_grad_matches_forward_and_backward(dtype, batch):
    """The single-pass op agrees with head_forward + head_backward (row_grad = row_coef), over
    one row block and over several."""
    emb, protos, labels, coef = direct_inputs(batch, 61, 24, seed=41, dtype=dtype, ignored=3)
    options = (64.0, 0.5, "arcface")
    ui = torch.randn(emb.shape[1], dtype=dtype)
    loss, *rows, grad_e, grad_w, cos_ui, ri = OPS.head_forward_with_grad(emb, protos, labels, coef, *options, -100,
                                                                         0, 0.0, ui, "ratio")
    rows_ref = OPS.head_forward(emb, protos, labels, *options, -100, 0, 0.0, ui, "ratio")
    grad_e_ref, grad_w_ref = OPS.head_backward(emb, protos, labels, rows_ref[4], coef, *options, 0, 0.0)
    tol = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-12, 1e-13)}[dtype]
    assert_close_rows(rows, rows_ref, *tol)
    torch.testing.assert_close(cos_ui, rows_ref[5], rtol=0, atol=0)
    torch.testing.assert_close(ri, rows_ref[6], rtol=tol[0], atol=tol[1], equal_nan=True)
    torch.testing.assert_close(loss, (coef * rows_ref[0]).sum(), rtol=tol[0], atol=tol[1])
    torch.testing.assert_close(grad_e, grad_e_ref, rtol=100 * tol[0], atol=100 * tol[1])
    torch.testing.assert_close(grad_w, grad_w_ref, rtol=100 * tol[0], atol=100 * tol[1])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_several_row_blocks_match_reference(reduction):
    inputs = head_inputs(2 * ROW_BLOCK + 44, 61, 24, seed=42, ignored=5, weights=reduction == "mean")
    compare_head(inputs, backend="cpu", dtype=torch.float32, reduction=reduction)
    compare_head(inputs, backend="cpu", dtype=torch.float64, reduction=reduction)


@pytest.mark.parametrize("chunk_size", [0, 5])
def test_with_grad_is_bitwise_deterministic(chunk_size):
    """Row blocks (chunk_size 0) and chunks of classes (5 < C): the same bits every time."""
    emb, protos, labels, coef = direct_inputs(ROW_BLOCK + 9, 83, 40, seed=43)
    first = OPS.head_forward_with_grad(emb, protos, labels, coef, 64.0, 0.5, "arcface", -100, chunk_size, 0.0)
    for _ in range(2):
        again = OPS.head_forward_with_grad(emb, protos, labels, coef, 64.0, 0.5, "arcface", -100, chunk_size, 0.0)
        for a, b in zip(first, again):
            assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))


def test_large_dim():
    inputs = head_inputs(11, 203, 1500, seed=44, ignored=1, weights=True)
    compare_head(inputs, backend="cpu", dtype=torch.float32)
    compare_head(inputs, backend="cpu", dtype=torch.float32, reduction="none", chunk_size=64)


@pytest.mark.parametrize("margin_mode", ["arcface", "arcface_easy", "cosface"])
@pytest.mark.parametrize("reduction,chunk_size", [("mean", 0), ("mean", 2), ("none", 0), ("none", 3)])
def test_gradcheck_float64(margin_mode, reduction, chunk_size):
    """Analytic margins: the cpu gradients are the derivative of its own loss (row blocks with
    chunk_size 0 and mean; chunks of classes otherwise)."""
    inputs = head_inputs(5, 7, 6, seed=45, dtype=torch.float64, plant=(), weights=True)
    emb = inputs["embeddings"].clone().requires_grad_(True)
    protos = inputs["prototypes"].clone().requires_grad_(True)
    labels = inputs["labels"].clone()
    labels[-1] = -100
    weights = inputs["sample_weight"] + 0.25  # no zeros: every row counts
    row_mix = torch.linspace(0.5, 1.5, labels.numel(), dtype=torch.float64)

    def loss(e, w):
        out = arcface_head(e, w, labels, backend="cpu", scale=8.0, margin=0.4, margin_mode=margin_mode,
                           sample_weight=weights, reduction=reduction, chunk_size=chunk_size)
        return out.loss if reduction != "none" else (out.loss * row_mix).sum()

    assert torch.autograd.gradcheck(loss, (emb, protos), eps=1e-6, atol=1e-7, rtol=1e-5)


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "ree":
            self.ops.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("reduction,grad,expected", [
    ("mean", True, ["head_forward_with_grad"]),
    ("sum", True, ["head_forward_with_grad"]),
    ("none", True, ["head_forward", "head_backward"]),
    ("mean", False, ["head_forward"]),
])
def test_gradients_come_from_the_forward_for_mean_and_sum(reduction, grad, expected):
    inputs = head_inputs(9, 31, 8, seed=46)
    emb = inputs["embeddings"].float().requires_grad_(grad)
    protos = inputs["prototypes"].float().requires_grad_(grad)
    with _RecordOps() as record:
        out = arcface_head(emb, protos, inputs["labels"], backend="cpu", reduction=reduction)
        if grad:
            (out.loss if out.loss.dim() == 0 else out.loss.sum()).backward()
    assert record.ops == expected


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_ties_take_the_lowest_index_in_every_chunking(chunk_size):
    """Identical prototypes 3 and C − 2 fall at different places of their BLAS tiles; the tie
    must still go to 3, in float32 and float64, with and without gradients."""
    for dtype in (torch.float32, torch.float64):
        inputs = planted_tie_inputs(37, 203, 67, seed=47, dtype=dtype)
        for reduction in ("mean", "none"):
            out, _ = run_head(inputs, backend="cpu", dtype=dtype, chunk_size=chunk_size, reduction=reduction)
            assert bool((out.neg_index == 3).all()), (dtype, reduction, out.neg_index)


def test_out_of_range_label_in_the_gradient_ops():
    """Without validation (torch.compile) a label outside [0, C) poisons its row's loss, never
    reads out of bounds, and contributes no target term to the gradients."""
    emb, protos, labels, coef = direct_inputs(8, 13, 6, seed=48, ignored=0)
    labels = labels.clone()
    labels[0] = 13 + 4
    labels[1] = -7
    loss, loss_rows, *_, grad_e, grad_w, _, _ = OPS.head_forward_with_grad(
        emb, protos, labels, coef, 64.0, 0.5, "arcface", -100, 0, 0.0)
    assert math.isnan(float(loss)) and bool(loss_rows[:2].isnan().all()) and bool(loss_rows[2:].isfinite().all())
    assert bool(grad_e.isfinite().all()) and bool(grad_w.isfinite().all())
    lse = OPS.head_forward(emb, protos, labels, 64.0, 0.5, "arcface", -100, 0, 0.0)[4]
    grad_e_b, grad_w_b = OPS.head_backward(emb, protos, labels, lse, coef, 64.0, 0.5, "arcface", 0, 0.0)
    torch.testing.assert_close(grad_e_b, grad_e, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(grad_w_b, grad_w, rtol=1e-4, atol=2e-5)


def test_nan_prototype_is_the_nearest_negative_like_torch_max():
    inputs = head_inputs(6, 17, 5, seed=49, plant=())
    inputs["prototypes"][9, 2] = math.nan
    inputs["labels"][0] = 9
    ours, _ = run_head(inputs, backend="cpu", dtype=torch.float32, grad=False)
    ref, _ = run_head(inputs, backend="reference", dtype=torch.float32, grad=False)
    assert torch.equal(ours.neg_index, ref.neg_index)
    assert torch.equal(ours.cos_neg.isnan(), ref.cos_neg.isnan())
    assert bool(ours.lse.isnan().all()) and math.isnan(float(ours.loss))


def test_direct_calls_reject_bad_arguments():
    emb, protos, labels, coef = direct_inputs(4, 9, 5, seed=50)
    with pytest.raises(ValueError, match="grad_filter_eps"):
        OPS.head_forward(emb, protos, labels, 64.0, 0.5, "arcface", -100, 0, 0.1)
    with pytest.raises(ValueError, match="grad_filter_eps"):
        OPS.head_backward(emb, protos, labels, coef, coef, 64.0, 0.5, "arcface", 0, 0.1)
    with pytest.raises(TypeError, match="labels"):
        OPS.head_forward(emb, protos, labels.int(), 64.0, 0.5, "arcface", -100, 0, 0.0)
    with pytest.raises(ValueError, match="D = "):
        OPS.head_forward(emb, protos[:, :4], labels, 64.0, 0.5, "arcface", -100, 0, 0.0)
    with pytest.raises(ValueError, match="margin_mode"):
        OPS.head_forward(emb, protos, labels, 64.0, 0.5, "sphereface", -100, 0, 0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        OPS.head_forward(emb, protos, labels, 64.0, 0.5, "arcface", -100, -1, 0.0)
    with pytest.raises(ValueError, match="row_coef"):
        OPS.head_forward_with_grad(emb, protos, labels, coef[:2], 64.0, 0.5, "arcface", -100, 0, 0.0)
    with pytest.raises(ValueError, match="ui_center"):
        OPS.head_forward(emb, protos, labels, 64.0, 0.5, "arcface", -100, 0, 0.0, torch.zeros(3), "product")
    with pytest.raises(ValueError, match="ri_form"):
        OPS.head_forward_with_grad(emb, protos, labels, coef, 64.0, 0.5, "arcface", -100, 0, 0.0, None, "max")


def test_huge_scale_gives_a_finite_loss():
    """A user's case (B=8, C=40, D=16): at scale 1e9 the loss was −inf, since the row's sum was
    shifted by a BLAS cosine one rounding above the exact one that replaced it. The ops take any
    scale (arcface_head refuses those above reference.MAX_SCALE); the row's shift is now the
    largest logit the sum takes."""
    emb, protos, labels, coef = direct_inputs(8, 40, 16, seed=51, ignored=0)
    for scale in (1e6, 1e9):
        loss, loss_rows, *_ = OPS.head_forward_with_grad(emb, protos, labels, coef, scale, 0.5, "arcface", -100, 0, 0.0)
        rows = OPS.head_forward(emb, protos, labels, scale, 0.5, "arcface", -100, 0, 0.0)
        assert bool(loss_rows.isfinite().all()) and bool(rows[0].isfinite().all()) and bool(loss.isfinite())
        assert bool((rows[4] >= scale * rows[2]).all()), "the lse is at least the nearest negative's logit"
