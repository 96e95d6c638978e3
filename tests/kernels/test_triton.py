"""Triton-specific tests: the margin formula, the class splits, the tile override
(`chunk_size`), the gradient filter, and larger bf16/fp16 shapes on a GPU.
The docs/spec.md §5 suites (test_head_kernels.py, test_aux_kernels.py) cover the rest."""
import math

import pytest
import torch

import ree_kernels
from ree_kernels import reference
from support import aux_inputs, compare_aux, compare_head, head_inputs

triton = pytest.importorskip("triton")
tl = triton.language
from ree_kernels.triton import formulas, tiling  # noqa: E402  (after the importorskip)
from ree_kernels.triton import head as triton_head  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("poisoned_outputs")


@triton.jit
def _margin_probe(cos_ptr, phi_ptr, dphi_ptr, n, margin, cos_m, sin_m, threshold, fallback,
                  MODE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    ok = offs < n
    cos = tl.load(cos_ptr + offs, mask=ok, other=0.0)
    phi, dphi = formulas.margin_logit(cos, 1.0 - cos * cos, margin, cos_m, sin_m, threshold, fallback, MODE)
    tl.store(phi_ptr + offs, phi, mask=ok)
    tl.store(dphi_ptr + offs, dphi, mask=ok)


@pytest.mark.parametrize("margin_mode", reference.MARGIN_MODES)
def test_margin_formula_matches_reference_autograd(margin_mode):
    """φ and φ′ against reference.margin_logit and its autograd, across both branches, the
    fallback threshold and the SIN_EPS clamp at cos = ±1."""
    margin = 0.5
    threshold = math.cos(math.pi - margin)
    cos = torch.tensor([-1.0, -0.999999, threshold - 1e-4, threshold + 1e-4, -0.3, 0.0, 1e-6, 0.4,
                        0.87, 0.999999, 1.0], dtype=torch.float32, device=DEVICE)
    phi = torch.empty_like(cos)
    dphi = torch.empty_like(cos)
    args = triton_head.margin_args(margin, margin_mode)
    _margin_probe[(1,)](cos, phi, dphi, cos.numel(), BLOCK=16, **args)
    leaf = cos.clone().requires_grad_(True)
    expected = reference.margin_logit(leaf, margin_mode, margin)
    (expected_grad,) = torch.autograd.grad(expected.sum(), leaf)
    torch.testing.assert_close(phi, expected.detach(), rtol=0, atol=2e-6)
    torch.testing.assert_close(dphi, expected_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("classes", [1, 31, 32, 33, 131, 1000])
def test_class_splits_cover_the_classes_without_empty_splits(classes):
    for wanted in (None, 1, 2, 3, 7, 10_000):
        splits, size = tiling.class_splits(classes, 1, 32, torch.device("cpu"), wanted)
        assert size % 32 == 0 and splits >= 1
        assert (splits - 1) * size < classes <= splits * size


def test_shared_suite_shapes_split_the_classes():
    """The interpreter's heuristic splits C for the shared suites' shape (B=13, C=131), so they
    run the multi-split forward and backward, not only the single-split one."""
    splits, _ = tiling.class_splits(131, 1, 32, torch.device("cpu"), None)
    assert splits > 1


@pytest.mark.parametrize("num_splits", [1, 2, 5])
def test_forced_splits_match_reference(num_splits):
    batch, classes, dim = 13, 131, 19
    inputs = head_inputs(batch, classes, dim, seed=50, ignored=2, plant=("peaky", "opposite"))
    e, w = inputs["embeddings"].float().to(DEVICE), inputs["prototypes"].float().to(DEVICE)
    y = inputs["labels"].to(DEVICE)
    rows = triton_head.forward_rows(e, w, y, 64.0, 0.5, "arcface", -100, num_splits=num_splits)
    gt = reference.arcface_rows(e.double(), w.double(), y, scale=64.0, margin=0.5)
    for name, ours, ref in zip(("loss", "cos_pos", "cos_neg", "neg_index", "lse"), rows, gt):
        torch.testing.assert_close(ours.double(), ref.double().detach(), rtol=0, atol=1e-4, equal_nan=True,
                                   msg=lambda m, n=name: f"{n}: {m}")
    # As the autograd passes it: 0 on ignored rows (the op itself gives them lse's gradient).
    row_grad = torch.linspace(0.5, 1.5, batch, device=DEVICE) * (y != -100)
    grads = triton_head.backward_grads(e, w, y, rows[4], row_grad, 64.0, 0.5, "arcface", num_splits=num_splits)
    e64, w64 = e.double().requires_grad_(True), w.double().requires_grad_(True)
    ref_loss = reference.arcface_rows(e64, w64, y, scale=64.0, margin=0.5).loss
    ref_grads = torch.autograd.grad((ref_loss.nan_to_num() * row_grad.double()).sum(), (e64, w64))
    for ours, ref in zip(grads, ref_grads):
        torch.testing.assert_close(ours.double(), ref, rtol=0, atol=2e-4)


@pytest.mark.parametrize("chunk_size", [8, 100, 256, 1024, 2048, -16])
def test_chunk_size_must_be_a_power_of_two_tile(chunk_size):
    inputs = head_inputs(5, 40, 8, seed=51)
    with pytest.raises(ValueError, match="chunk_size"):
        ree_kernels.arcface_head(inputs["embeddings"].float().to(DEVICE), inputs["prototypes"].float().to(DEVICE),
                                 inputs["labels"].to(DEVICE), backend="triton", chunk_size=chunk_size)


def _peaky_inputs(batch: int, classes: int, dim: int, *, seed: int, target_cos: tuple) -> dict:
    """Scores as in training: each embedding at a cosine drawn from `target_cos` (lo, hi) to its
    own prototype, the other prototypes random (cosines ~ N(0, 1/D))."""
    g = torch.Generator().manual_seed(seed)
    protos = reference.normalize(torch.randn(classes, dim, generator=g, dtype=torch.float64))
    labels = torch.randint(0, classes, (batch,), generator=g)
    noise = reference.normalize(torch.randn(batch, dim, generator=g, dtype=torch.float64))
    noise = reference.normalize(noise - (noise * protos[labels]).sum(1, keepdim=True) * protos[labels])
    lo, hi = target_cos
    cos = (lo + (hi - lo) * torch.rand(batch, 1, generator=g, dtype=torch.float64))
    emb = cos * protos[labels] + (1 - cos ** 2).sqrt() * noise
    return {"embeddings": emb.float().to(DEVICE) * 3.0, "prototypes": protos.float().to(DEVICE) * 0.7,
            "labels": labels.to(DEVICE)}


def _half_certain_batch(batch: int, classes: int, dim: int, *, seed: int) -> dict:
    """Rows alternately confident (cos_pos 0.9 to 0.99) and hard (0.3 to 0.6), one prototype set."""
    confident = _peaky_inputs(batch // 2, classes, dim, seed=seed, target_cos=(0.9, 0.99))
    hard = _peaky_inputs(batch // 2, classes, dim, seed=seed, target_cos=(0.3, 0.6))
    inputs = dict(confident)
    for key in ("embeddings", "labels"):
        inputs[key] = torch.stack((confident[key], hard[key]), 1).flatten(0, 1)
    return inputs


def _filtered_grads(inputs: dict, eps: float, chunk_size: int = 0):
    """(grad_embeddings, grad_prototypes), the kept-tile flags, and row_grad (= 1/B)."""
    e, w, y = inputs["embeddings"], inputs["prototypes"], inputs["labels"]
    rows = triton_head.forward_rows(e, w, y, 64.0, 0.5, "arcface", -100, chunk_size)
    row_grad = torch.full((e.shape[0],), 1.0 / e.shape[0], device=e.device)
    needed = []
    grads = triton_head.backward_grads(e, w, y, rows[4], row_grad, 64.0, 0.5, "arcface", chunk_size, eps,
                                       tiles_needed=needed)
    return grads, (needed[0] if needed else None)


def test_grad_filter_off_and_below_every_entry_is_exact():
    """eps = 0 is the exact path; an eps below every |softmax − one-hot| runs the filtered
    kernels, skips nothing and gives the same bits."""
    inputs = _peaky_inputs(13, 131, 19, seed=52, target_cos=(0.3, 0.6))
    exact, none_flags = _filtered_grads(inputs, 0.0)
    assert none_flags is None
    filtered, needed = _filtered_grads(inputs, 1e-37)
    assert bool((needed == 1).all())
    for a, b in zip(exact, filtered):
        assert torch.equal(a, b)


def test_grad_filter_skips_tiles_with_a_bounded_error():
    """A late-training batch, s = 64: half the rows confident (cos_pos 0.9 to 0.99), half hard
    (0.3 to 0.6), interleaved. The filter groups the confident rows and skips most of their
    tiles; the gradients move by less than the skipped entries can carry. The measured relative
    error (max |filtered − exact| / max |exact|) is printed (pytest -s)."""
    batch, classes, dim = 32, 512, 128
    inputs = _half_certain_batch(batch, classes, dim, seed=53)
    (exact_e, exact_w), _ = _filtered_grads(inputs, 0.0)
    inv_e = 1 / inputs["embeddings"].norm(dim=1).min()
    inv_w = 1 / inputs["prototypes"].norm(dim=1).min()
    max_dphi = 4.0  # φ′ = cos m + cos·sin m / sin θ ≤ 4 for cos_pos ≤ 0.99
    for eps in (1e-6, 1e-4):
        (grad_e, grad_w), needed = _filtered_grads(inputs, eps)
        skipped = float((needed == 0).float().mean())
        err_e, err_w = (grad_e - exact_e).abs().max(), (grad_w - exact_w).abs().max()
        print(f"\ngrad filter eps={eps:g}: {skipped:.1%} of tiles skipped; max|filtered − exact| / max|exact|: "
              f"grad_embeddings {float(err_e / exact_e.abs().max()):.2e}, "
              f"grad_prototypes {float(err_w / exact_w.abs().max()):.2e}")
        assert skipped > 0.4
        # A skipped entry has |G| ≤ (1/B)·s·eps·φ′; ∂/∂e_i meets at most C of them, ∂/∂w_j at
        # most B, each through a unit vector, and the normalisation's backward at most doubles it.
        entry = (1 / batch) * 64.0 * eps * max_dphi
        assert float(err_e) <= 2 * inv_e * classes * entry
        assert float(err_w) <= 2 * inv_w * batch * entry


def test_grad_filter_skips_everything_when_every_row_is_certain():
    """Every embedding on its prototype: softmax = one-hot to float32 precision, so every tile
    is skipped and the gradients are exactly zero (the exact ones are tiny)."""
    inputs = _peaky_inputs(13, 131, 19, seed=54, target_cos=(1.0, 1.0))
    (exact_e, exact_w), _ = _filtered_grads(inputs, 0.0)
    (grad_e, grad_w), needed = _filtered_grads(inputs, 1e-3)
    assert bool((needed == 0).all())
    assert float(grad_e.abs().max()) == 0.0 and float(grad_w.abs().max()) == 0.0
    assert float(exact_e.abs().max()) < 1e-3 and float(exact_w.abs().max()) < 1e-3


def test_chunk_size_sets_the_class_tile():
    inputs = _peaky_inputs(13, 131, 19, seed=55, target_cos=(0.3, 0.6))
    for chunk in (16, 64):
        _, needed = _filtered_grads(inputs, 1e-37, chunk_size=chunk)
        assert needed.shape[1] == math.ceil(131 / chunk)


def test_autotuned_launch_path(monkeypatch):
    """The GPU launch path: several configs through triton.autotune (the benchmark replaced by a
    plain call, so it runs under the interpreter), with the class splits, the D blocks and the
    filter flags sized for configs whose tiles differ."""
    real_autotune = triton.autotune

    def run_once(kernel_call, quantiles):
        kernel_call()
        return [1.0 for _ in quantiles]

    monkeypatch.setattr(tiling.triton, "autotune",
                        lambda **kw: real_autotune(do_bench=run_once, **kw))
    monkeypatch.setattr(tiling, "forward_configs", lambda dim, tile, dtype: [
        dict(BLOCK_B=16, BLOCK_C=32, BLOCK_K=16, num_warps=4, num_stages=2),
        dict(BLOCK_B=32, BLOCK_C=16, BLOCK_K=32, num_warps=4, num_stages=2)])
    real_backward_configs = tiling.backward_configs

    def backward_configs(dim, tile, filtered, dtype):
        base = real_backward_configs(dim, tile, filtered, dtype)[0]
        other = dict(base, BLOCK_K=32, BLOCK_DO=32) if filtered else dict(base, BLOCK_B=32, BLOCK_C=16, BLOCK_DO=32)
        return [dict(base, num_warps=4, num_stages=2), dict(other, num_warps=4, num_stages=2)]

    monkeypatch.setattr(tiling, "backward_configs", backward_configs)
    tiling.autotuned.cache_clear()
    try:
        inputs = head_inputs(13, 131, 19, seed=63, ignored=2, weights=True)
        compare_head(inputs, backend="triton", dtype=torch.float32, device=DEVICE)
        peaky = _peaky_inputs(13, 131, 19, seed=64, target_cos=(0.3, 0.6))
        (exact_e, exact_w), _ = _filtered_grads(peaky, 0.0)
        (grad_e, grad_w), needed = _filtered_grads(peaky, 1e-37)
        assert bool((needed == 1).all())
        torch.testing.assert_close(grad_e, exact_e, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(grad_w, exact_w, rtol=1e-5, atol=1e-7)
    finally:
        tiling.autotuned.cache_clear()


def test_single_row_and_single_class():
    inputs = head_inputs(1, 1, 7, seed=56, plant=())
    compare_head(inputs, backend="triton", dtype=torch.float32, device=DEVICE)
    inputs = head_inputs(1, 40, 7, seed=57, plant=())
    compare_head(inputs, backend="triton", dtype=torch.float32, device=DEVICE, reduction="none")
    aux = aux_inputs(1, 7, seed=58, recognizable=None)
    compare_aux(aux, backend="triton", dtype=torch.float32, device=DEVICE)


def test_op_rejects_what_validation_would_catch():
    e = torch.randn(4, 8, device=DEVICE)
    w = torch.randn(10, 8, device=DEVICE)
    y = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    op = torch.ops.ree.triton_head_forward
    with pytest.raises(TypeError, match="dtype"):
        op(e, w.double(), y, 64.0, 0.5, "arcface", -100, 0, 0.0)
    with pytest.raises(ValueError, match="share D"):
        op(e, w[:, :4].contiguous(), y, 64.0, 0.5, "arcface", -100, 0, 0.0)
    with pytest.raises(ValueError, match="margin_mode"):
        op(e, w, y, 64.0, 0.5, "sphereface", -100, 0, 0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        op(e, w, y, 64.0, 0.5, "arcface", -100, 48, 0.0)
    with pytest.raises(ValueError, match="ui_center"):
        op(e, w, y, 64.0, 0.5, "arcface", -100, 0, 0.0, torch.zeros(3, device=DEVICE), "product")
    with pytest.raises(ValueError, match="ri_form"):
        op(e, w, y, 64.0, 0.5, "arcface", -100, 0, 0.0, None, "max")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_larger_shapes(dtype):
    inputs = head_inputs(300, 20011, 512, seed=60, device="cuda", ignored=5, weights=True)
    compare_head(inputs, backend="triton", dtype=dtype, device="cuda")
    compare_head(inputs, backend="triton", dtype=dtype, device="cuda", chunk_size=64, margin_mode="cosface")
    aux = aux_inputs(1024, 512, seed=61, device="cuda")
    compare_aux(aux, backend="triton", dtype=dtype, device="cuda")


@pytest.mark.gpu
def test_gpu_split_and_filter_paths():
    inputs = _half_certain_batch(256, 50_000, 512, seed=62)
    (exact_e, exact_w), _ = _filtered_grads(inputs, 0.0)
    (grad_e, grad_w), needed = _filtered_grads(inputs, 1e-6)
    assert float((needed == 0).float().mean()) > 0.4
    assert float((grad_e - exact_e).abs().max() / exact_e.abs().max()) < 1e-2
    assert float((grad_w - exact_w).abs().max() / exact_w.abs().max()) < 1e-2
    e, w, y = inputs["embeddings"], inputs["prototypes"], inputs["labels"]
    one = triton_head.forward_rows(e, w, y, 64.0, 0.5, "arcface", -100, num_splits=1)
    many = triton_head.forward_rows(e, w, y, 64.0, 0.5, "arcface", -100, num_splits=97)
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, equal_nan=True)
