"""Shared by the kernel test modules: backends under test, inputs with planted cases, and the
docs/spec.md §5 comparison against the float64 reference."""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence

import pytest
import torch

import ree_kernels
from ree_kernels import contract

# (backend, device) pairs that run the shared kernel suites. The CPU pairs must run here (an
# unbuilt extension fails the suite rather than skipping it); the CUDA pairs run on a GPU, and
# the CUDA backend on CPU tensors where it is emulated (`make gpu-verify-cuda`, tests/cuda_emulation).
KERNEL_BACKENDS = [
    pytest.param(("cpu", "cpu"), id="cpu"),
    pytest.param(("triton", "cpu"), id="triton-interpret"),
    pytest.param(("cuda", "cpu"), id="cuda-emulated", marks=pytest.mark.cuda_emulation),
    pytest.param(("cuda", "cuda"), id="cuda", marks=pytest.mark.gpu),
    pytest.param(("triton", "cuda"), id="triton-cuda", marks=pytest.mark.gpu),
]

# Awkward sizes (no tile multiple). The interpreter runs Triton programs one by one in
# Python, so it gets smaller ones.
# The emulated CUDA kernels run every CUDA thread as an OS thread: they get small ones too, with
# B = 16 for 3 column splits per row on the emulated device (tests/cuda_emulation: 6 SMs). (At
# B = 13 the "ratio" RI of the planted cos = 1 row, ≈ 3·10⁵ through its 1e-6 floor, misses the §5
# bound by one float32 ulp of cos_ui: an absolute tolerance on a value amplified 10⁶-fold.)
HEAD_SHAPES = {"default": (37, 1031, 67), ("triton", "cpu"): (13, 131, 19), ("cuda", "cpu"): (16, 131, 19)}
# At a logit scale near contract.MAX_SCALE a float32 gradient's error is s·u times its size, for
# the kernels and the float32 reference alike (the rounding of each cosine and of the lse): the
# docs/spec.md §5 bound then compares two maxima of errors with the same spread, and takes enough
# rows for those maxima to settle.
LARGE_SCALE_SHAPES = {"default": (256, 1031, 67), ("triton", "cpu"): (64, 131, 19), ("cuda", "cpu"): (64, 131, 19)}
AUX_SHAPES = {"default": (37, 67), ("triton", "cpu"): (13, 19), ("cuda", "cpu"): (16, 19)}

DTYPES = {
    ("cpu", "cpu"): (torch.float64, torch.float32, torch.bfloat16, torch.float16),
    ("triton", "cpu"): (torch.float32, torch.bfloat16, torch.float16),
    ("cuda", "cuda"): (torch.float32, torch.bfloat16, torch.float16),
    ("cuda", "cpu"): (torch.float32, torch.bfloat16, torch.float16),
    ("triton", "cuda"): (torch.float32, torch.bfloat16, torch.float16),
}

# docs/spec.md §5: |ours − gt| ≤ 2·|pt − gt| + tol.
FORWARD_TOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
# bfloat16 gradients: 2e-2. The reference computes half inputs' cosines in float32 (a loss
# scaler's upstream 2^16 must not overflow inside it), so pt no longer carries the rounding of a
# half-precision product, which the kernels' tensor-core products (Gᵀ·V with G in bfloat16) do: one
# bfloat16 ulp of a gradient near 2 is 1.6e-2 (Triton's planted-tie case: 1.39e-2 against 1.38e-2).
GRAD_TOL = {torch.float64: 1e-9, torch.float32: 5e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def head_shape(backend: Sequence[str]) -> tuple:
    return HEAD_SHAPES.get(tuple(backend), HEAD_SHAPES["default"])


def aux_shape(backend: Sequence[str]) -> tuple:
    return AUX_SHAPES.get(tuple(backend), AUX_SHAPES["default"])


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def head_inputs(
    batch: int,
    classes: int,
    dim: int,
    *,
    seed: int,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    plant: Iterable[str] = ("peaky", "opposite"),
    ignored: int = 0,
    weights: bool = False,
    ui_center: bool = True,
) -> Dict[str, Optional[torch.Tensor]]:
    """Fresh seeded inputs (never zeros) in float64, with planted rows:
    `peaky`: row 0's own prototype equals it (cos = 1, a one-hot softmax);
    `opposite`: row 1's prototype is its negative (cos = −1: θ + m > π);
    `zero_row`: row 2 is the zero vector (normalised with the epsilon);
    `near_one`: row 3's own prototype is 1e-6 from it in cosine (1 − cos ≈ 1e-6);
    `near_minus_one`: row 4's own prototype is 1e-6 from its negative (1 + cos ≈ 1e-6);
    `near_negative`: a prototype other than row 5's own is 1e-6 from it: the nearest negative at
    cos ≈ 1, which dominates the row's log-sum-exp.
    `ignored` rows from the end get ignore_index; `weights` draws weights with zeros."""
    g = generator(seed)
    emb = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    protos = torch.randn(classes, dim, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (batch,), generator=g)
    plant = set(plant)
    if "peaky" in plant:
        protos[labels[0]] = emb[0] * 1.5
    if "opposite" in plant and batch > 1:
        labels[1] = (labels[0] + 1) % classes if classes > 1 else 0
        protos[labels[1]] = -emb[1]
    if "zero_row" in plant and batch > 2:
        emb[2] = 0.0

    def nearby(v: torch.Tensor) -> torch.Tensor:
        # 1 − cos(v, v + n) ≈ ‖n‖²/(2‖v‖²) = 1e-6 for a random direction n.
        n = torch.randn(dim, generator=g, dtype=torch.float64)
        return v + n * (v.norm() / n.norm() * 2e-6 ** 0.5)

    if "near_one" in plant and batch > 3:
        protos[labels[3]] = nearby(emb[3])
    if "near_minus_one" in plant and batch > 4:
        protos[labels[4]] = nearby(-emb[4])
    if "near_negative" in plant and batch > 5 and classes > 1:
        protos[(labels[5] + 1) % classes] = nearby(emb[5])
    if ignored:
        labels[batch - ignored:] = -100
    out = {
        "embeddings": emb,
        "prototypes": protos,
        "labels": labels,
        "ui_center": torch.randn(dim, generator=g, dtype=torch.float64) if ui_center else None,
        "sample_weight": None,
    }
    if weights:
        w = torch.rand(batch, generator=g, dtype=torch.float64) * 2
        w[::4] = 0.0
        out["sample_weight"] = w
    return {k: cast(v, dtype, device) for k, v in out.items()}


def cast(x: Optional[torch.Tensor], dtype: torch.dtype, device: str) -> Optional[torch.Tensor]:
    if x is None:
        return None
    if x.is_floating_point():
        return x.to(device=device, dtype=dtype)
    return x.to(device)


def run_head(inputs: Dict, *, backend: str, dtype: torch.dtype, device: str = "cpu", grad: bool = True,
             **options) -> tuple:
    """Runs `arcface_head` on copies of `inputs` cast to dtype; returns (output, grads)."""
    emb = cast(inputs["embeddings"], dtype, device).detach().requires_grad_(grad)
    protos = cast(inputs["prototypes"], dtype, device).detach().requires_grad_(grad)
    out = ree_kernels.arcface_head(
        emb, protos, inputs["labels"].to(device), cast(inputs["ui_center"], dtype, device),
        sample_weight=cast(inputs["sample_weight"], dtype, device), backend=backend, **options,
    )
    if not grad:
        return out, None
    loss = out.loss if out.loss.dim() == 0 else (out.loss * torch.linspace(0.5, 1.5, out.loss.numel(),
                                                                          dtype=out.loss.dtype,
                                                                          device=out.loss.device)).sum()
    grads = torch.autograd.grad(loss, (emb, protos), allow_unused=True)
    return out, grads


def max_error(x: torch.Tensor, ref: torch.Tensor, what: str) -> float:
    """max |x − ref| over the elements, after checking they agree on which are NaN/inf."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    assert x.shape == ref.shape, f"{what}: shape {tuple(x.shape)} != {tuple(ref.shape)}"
    same_nan = torch.isnan(x) == torch.isnan(ref)
    assert bool(same_nan.all()), f"{what}: NaN at different places ({int((~same_nan).sum())} elements)"
    finite = torch.isfinite(ref)
    assert bool((torch.isfinite(x) == finite).all()), f"{what}: non-finite at different places"
    if not bool(finite.any()):
        return 0.0
    return float((x[finite] - ref[finite]).abs().max())


def assert_spec_close(ours: torch.Tensor, pt: torch.Tensor, gt: torch.Tensor, tol: float, what: str) -> None:
    """docs/spec.md §5: max|ours − gt| ≤ 2·max|pt − gt| + tol."""
    err = max_error(ours, gt, what)
    bound = 2 * max_error(pt, gt, what + " (pt)") + tol
    assert err <= bound, f"{what}: max|ours − gt| = {err:.3e} > 2·max|pt − gt| + tol = {bound:.3e}"


def compare_head(inputs: Dict, *, backend: str, dtype: torch.dtype, device: str = "cpu",
                 **options) -> None:
    """Runs ours, pt and gt and holds every output and both gradients to docs/spec.md §5."""
    ours, ours_g = run_head(inputs, backend=backend, dtype=dtype, device=device, **options)
    pt, pt_g = run_head(inputs, backend="reference", dtype=dtype, device=device, **options)
    gt, gt_g = run_head(inputs, backend="reference", dtype=torch.float64, device=device, **options)
    assert ours.loss.dtype == contract.stat_dtype(dtype)
    assert not any(t.requires_grad for t in ours[1:]), "only the loss may be differentiable"
    for field in ("loss", "cos_pos", "cos_neg", "cos_ui", "ri", "lse"):
        assert_spec_close(getattr(ours, field), getattr(pt, field), getattr(gt, field), FORWARD_TOL[dtype], field)
    check_nearest_negative(ours, gt, inputs, dtype)
    for name, o, p, g in zip(("grad embeddings", "grad prototypes"), ours_g, pt_g, gt_g):
        assert o.dtype == dtype, f"{name} has dtype {o.dtype}, expected {dtype}"
        assert_spec_close(o, p, g, GRAD_TOL[dtype], name)


def check_nearest_negative(ours, gt, inputs: Dict, dtype: torch.dtype) -> None:
    """The cosine at the returned index is the maximum over the row's negatives (docs/spec.md §5)."""
    idx = ours.neg_index.cpu()
    labels = inputs["labels"].cpu()
    assert bool((idx != labels).all()), "neg_index returned the label"
    has_neg = gt.neg_index.cpu() >= 0
    assert bool((idx[~has_neg] == -1).all()), "rows without a negative must give index -1"
    cos = torch.nn.functional.linear(contract.normalize(inputs["embeddings"].double().cpu()),
                                     contract.normalize(inputs["prototypes"].double().cpu())).clamp(-1, 1)
    rows = torch.nonzero(has_neg).squeeze(1)
    at_index = cos[rows, idx[rows]]
    slack = 1e-9 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 2e-2)
    assert bool(((at_index - gt.cos_neg.cpu()[rows]).abs() <= slack).all()), "cos at neg_index is not the maximum"


def aux_inputs(batch: int, dim: int, *, seed: int, dtype: torch.dtype = torch.float32, device: str = "cpu",
               attn: bool = True, recognizable: Optional[str] = "mixed") -> Dict:
    g = generator(seed)
    out = {
        "ri_pred": torch.randn(batch, generator=g, dtype=torch.float64) * 0.5,
        "ri_target": torch.randn(batch, generator=g, dtype=torch.float64) * 0.5,
        "mu_ui": torch.tensor(0.05, dtype=torch.float64),
        "attn": torch.randn(batch, dim, generator=g, dtype=torch.float64) * 0.1 if attn else None,
        "embeddings": torch.randn(batch, dim, generator=g, dtype=torch.float64) if attn else None,
        "ui_center": torch.randn(dim, generator=g, dtype=torch.float64) if attn else None,
        "recognizable": None,
    }
    if recognizable == "mixed":
        out["recognizable"] = torch.rand(batch, generator=g) > 0.3
    elif recognizable == "none":
        out["recognizable"] = torch.zeros(batch, dtype=torch.bool)
    return {k: cast(v, dtype, device) for k, v in out.items()}


def run_aux(inputs: Dict, *, backend: str, dtype: torch.dtype, device: str = "cpu", **options) -> tuple:
    pred = cast(inputs["ri_pred"], dtype, device).detach().requires_grad_(True)
    attn = cast(inputs["attn"], dtype, device)
    if attn is not None:
        attn = attn.detach().requires_grad_(True)
    out = ree_kernels.ree_aux_loss(
        pred, cast(inputs["ri_target"], dtype, device), cast(inputs["mu_ui"], dtype, device),
        attn=attn, embeddings=cast(inputs["embeddings"], dtype, device),
        ui_center=cast(inputs["ui_center"], dtype, device),
        recognizable=None if inputs["recognizable"] is None else inputs["recognizable"].to(device),
        backend=backend, **options,
    )
    targets = [pred] + ([attn] if attn is not None else [])
    # A mix of the components, so each one's gradient path is exercised.
    mixed = out.total + 0.3 * out.l1 - 0.7 * out.id + 1.9 * out.mse
    return out, torch.autograd.grad(mixed, targets)


def compare_aux(inputs: Dict, *, backend: str, dtype: torch.dtype, device: str = "cpu", **options) -> None:
    ours, ours_g = run_aux(inputs, backend=backend, dtype=dtype, device=device, **options)
    pt, pt_g = run_aux(inputs, backend="reference", dtype=dtype, device=device, **options)
    gt, gt_g = run_aux(inputs, backend="reference", dtype=torch.float64, device=device, **options)
    for field in ("total", "l1", "id", "mse"):
        assert_spec_close(getattr(ours, field), getattr(pt, field), getattr(gt, field), FORWARD_TOL[dtype], field)
    for name, o, p, g in zip(("grad ri_pred", "grad attn"), ours_g, pt_g, gt_g):
        assert o.dtype == dtype
        assert_spec_close(o, p, g, GRAD_TOL[dtype], name)


def planted_tie_inputs(batch: int, classes: int, dim: int, *, seed: int, dtype: torch.dtype,
                       device: str = "cpu") -> Dict:
    """Every row lies near one direction that two identical prototypes (3 and C − 2) share, so
    they tie as every row's nearest negative: the lowest index (3) must win. In low precision
    the tie is exact only up to rounding, so callers check it through the cosine there."""
    inputs = head_inputs(batch, classes, dim, seed=seed, dtype=torch.float64, plant=())
    g = generator(seed + 1)
    base = torch.randn(dim, generator=g, dtype=torch.float64)
    inputs["embeddings"] = base + 0.05 * torch.randn(batch, dim, generator=g, dtype=torch.float64)
    protos, labels = inputs["prototypes"], inputs["labels"]
    tied = (3, classes - 2)
    protos[tied[0]] = base
    protos[tied[1]] = base
    labels[(labels == tied[0]) | (labels == tied[1])] = 0
    return {k: cast(v, dtype, device) for k, v in inputs.items()}
