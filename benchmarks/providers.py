"""What the benchmarks run (docs/spec.md §6): the inputs, and each provider as a forward and a backward.

A provider is one way to compute a kernel: `floor` (the head's plain matrix products),
`eager` (the reference backend: what a user writes without fused kernels), `compiled`
(torch.compile of the same call), `cpu` / `cuda` / `triton` (our kernels), `triton-filter`
(Triton with the gradient filter), and three peers that compute plain linear cross-entropy,
softmax(E·Wᵀ) against the labels, with no normalisation, margin or statistics: `cce-compile`
and `cce` (Cut Cross-Entropy's `linear_cross_entropy` with impl "torch_compile", which runs on
the CPU, and with its Triton kernels on CUDA) and `liger` (Liger-Kernel's fused linear
cross-entropy, CUDA). They show how far our head, which does more, is from the best plain fused
cross-entropy. `build` returns a provider's two steps or raises `Unavailable` with the reason,
so the runner can say why a provider was skipped.
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

import ree_kernels
from ree_kernels.backends import resolve_backend
from ree_kernels.head import GRAD_IN_FORWARD

KERNELS = ("head", "aux")
MODES = ("fwd", "bwd", "full")
PROVIDERS = ("floor", "eager", "compiled", "cpu", "cuda", "triton", "triton-filter", "cce-compile", "cce", "liger")
PLAIN_CE = {"cce-compile": "cut_cross_entropy", "cce": "cut_cross_entropy", "liger": "liger_kernel"}
"""The plain linear cross-entropy peers (head only), and the module each needs."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

FILTER_EPS = 1e-6
"""grad_filter_eps of the `triton-filter` provider."""

EXACT_COUNTERPART = {"triton-filter": "triton", "cce": "cce-compile"}
"""Approximate providers, and the exact provider their error is measured against."""

MATERIALISING = ("eager", "compiled", "cce-compile")
"""Providers that hold B × C tensors, and so fall under the eager memory limit."""

EAGER_BYTES_PER_LOGIT = 40
"""What the eager head holds per B × C element at its peak, for the skip rule: about ten
float32 B × C tensors (cosines, logits, masks, softmax, their gradients). Measured: ~8."""


ARGUMENTS = {"head": ("embeddings", "prototypes", "labels", "ui_center"),
             "aux": ("ri_pred", "ri_target", "mu_ui", "attn", "embeddings", "ui_center", "recognizable")}
DIFFERENTIABLE = {"head": ("embeddings", "prototypes"), "aux": ("ri_pred", "attn")}
"""Each kernel's positional inputs, and those its backward returns gradients for, in order."""


def gradients_in_forward(kernel: str, provider: str) -> Optional[str]:
    """Why `provider`'s `fwd` time includes the gradients (and its `bwd` time is only a scaling),
    or None when it does not. Compare such providers on `full`."""
    if kernel == "head" and provider in GRAD_IN_FORWARD:
        return (f"{provider}: the head's forward of a training call (reduction mean/sum, inputs requiring "
                "grad) computes the gradients in the same pass (ree_kernels.head.GRAD_IN_FORWARD), so its "
                "fwd time holds the whole step and its bwd only scales the saved gradients; compare full")
    if kernel == "head" and provider == "liger":
        return "liger: computes the gradients in its forward, like our cpu head; compare full"
    if kernel == "aux" and provider not in ("eager", "compiled"):
        return (f"{provider}: aux_forward returns the per-row gradients with the losses (they are elementwise), "
                "so bwd is only the chain rule")
    return None


class Unavailable(Exception):
    """The provider cannot run this case on this machine or build; the message says why."""


@dataclass(frozen=True)
class Case:
    """One kernel on one shape and dtype, run by one provider. `C` is 0 for aux."""

    kernel: str
    provider: str
    B: int
    C: int
    D: int
    dtype: str
    device: str


Inputs = Dict[str, Optional[torch.Tensor]]
Forward = Callable[[Inputs], Any]
Backward = Callable[[Any], Tuple[torch.Tensor, ...]]


def head_inputs(B: int, C: int, D: int, dtype: torch.dtype, device: str, *, cos_pos: float,
                seed: int, floor: bool = False) -> Inputs:
    """Seeded head inputs in a training-like state: each embedding lies at cosine `cos_pos`
    from its own prototype (0: i.i.d. random, as at initialisation), with random norms.
    Only the gradient filter's speed depends on it; every other provider does the same work
    whatever the values. `floor` adds the [B, C] incoming gradient of the plain products."""
    g = torch.Generator(device=device).manual_seed(seed)
    prototypes = torch.randn(C, D, generator=g, device=device)
    labels = torch.randint(0, C, (B,), generator=g, device=device)
    own = F.normalize(prototypes[labels], dim=1)
    noise = torch.randn(B, D, generator=g, device=device)
    noise = F.normalize(noise - (noise * own).sum(1, keepdim=True) * own, dim=1)
    norms = 8.0 + 16.0 * torch.rand(B, 1, generator=g, device=device)
    embeddings = (cos_pos * own + math.sqrt(1.0 - cos_pos * cos_pos) * noise) * norms
    inputs: Inputs = {
        "embeddings": embeddings.to(dtype),
        "prototypes": prototypes.to(dtype),
        "labels": labels,
        "ui_center": torch.randn(D, generator=g, device=device).to(dtype),
    }
    if floor:
        inputs["grad_logits"] = (torch.randn(B, C, generator=g, device=device) * 1e-3).to(dtype)
    return inputs


def aux_inputs(B: int, D: int, dtype: torch.dtype, device: str, *, seed: int) -> Inputs:
    """Seeded inputs of `ree_aux_loss` with all three terms on and 70 % recognizable rows."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    return {
        "ri_pred": randn(B, scale=0.5),
        "ri_target": randn(B, scale=0.5),
        "mu_ui": torch.tensor(0.05, device=device).to(dtype),
        "attn": randn(B, D, scale=0.1),
        "embeddings": randn(B, D),
        "ui_center": randn(D),
        "recognizable": torch.rand(B, generator=g, device=device) > 0.3,
    }


def make_inputs(case: Case, *, cos_pos: float, seed: int) -> Inputs:
    dtype = DTYPES[case.dtype]
    if case.kernel == "head":
        return head_inputs(case.B, case.C, case.D, dtype, case.device, cos_pos=cos_pos, seed=seed,
                           floor=case.provider == "floor")
    return aux_inputs(case.B, case.D, dtype, case.device, seed=seed)


def _backend_name(provider: str) -> str:
    return {"eager": "reference", "compiled": "reference", "triton-filter": "triton"}.get(provider, provider)


def check_available(case: Case, *, eager_limit_bytes: float) -> None:
    """Raises Unavailable when `case.provider` cannot run `case` here."""
    if case.provider not in PROVIDERS:
        raise Unavailable(f"unknown provider (known: {', '.join(PROVIDERS)})")
    if case.kernel == "aux" and (case.provider in ("floor", "triton-filter") or case.provider in PLAIN_CE):
        raise Unavailable("the gradient filter is a head option" if case.provider == "triton-filter"
                          else "defined for the head only")
    if case.device == "cuda" and not torch.cuda.is_available():
        raise Unavailable("no CUDA device")
    if case.provider in ("triton", "triton-filter", "cce", "liger") and case.device != "cuda":
        raise Unavailable("Triton kernels are benchmarked on a GPU only (the CPU interpreter is for tests)")
    if case.provider in MATERIALISING and case.kernel == "head":
        need = EAGER_BYTES_PER_LOGIT * case.B * case.C
        if need > eager_limit_bytes:
            raise Unavailable(f"would need ~{need / 2**30:.1f} GB for its B x C tensors "
                              f"(limit {eager_limit_bytes / 2**30:.1f} GB, --eager-limit-gb)")
    if case.provider in PLAIN_CE:
        if importlib.util.find_spec(PLAIN_CE[case.provider]) is None:
            package = PLAIN_CE[case.provider].replace("_", "-")
            raise Unavailable(f"{package} is not installed (pip install {package}; pinned in requirements.txt)")
    elif case.provider != "floor":
        try:
            resolve_backend(_backend_name(case.provider), case.kernel, torch.device(case.device),
                            DTYPES[case.dtype])
        except (RuntimeError, TypeError) as err:
            raise Unavailable(str(err)) from None


# The calls return every output, so that torch.compile cannot drop the statistics as dead code.
def _head_call(backend: str, **options: Any) -> Callable:
    def call(e, w, labels, ui_center):
        return tuple(ree_kernels.arcface_head(e, w, labels, ui_center, backend=backend, **options))
    return call


def _aux_call(backend: str) -> Callable:
    def call(ri_pred, ri_target, mu_ui, attn, embeddings, ui_center, recognizable):
        return tuple(ree_kernels.ree_aux_loss(ri_pred, ri_target, mu_ui, attn=attn, embeddings=embeddings,
                                              ui_center=ui_center, recognizable=recognizable,
                                              backend=backend))
    return call


def _floor_steps() -> Tuple[Forward, Backward]:
    """[B, D]·[D, C] forward; [B, C]·[C, D] and [C, B]·[B, D] backward; raw rows, same dtype."""

    def forward(x: Inputs) -> Any:
        return x["embeddings"] @ x["prototypes"].T, x

    def backward(state: Any) -> Tuple[torch.Tensor, ...]:
        _, x = state  # the logits stay alive through the backward, as in an unfused head
        return x["grad_logits"] @ x["prototypes"], x["grad_logits"].T @ x["embeddings"]

    return forward, backward


def _plain_ce_call(provider: str) -> Callable:
    """The peer's loss of (embeddings, prototypes, labels), imported on first use."""
    if provider == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return liger_fused_linear_cross_entropy
    from cut_cross_entropy import linear_cross_entropy

    impl = "torch_compile" if provider == "cce-compile" else "cce"
    return lambda e, w, labels: linear_cross_entropy(e, w, labels, impl=impl)


def build(case: Case, *, eager_limit_bytes: float) -> Tuple[Forward, Backward]:
    """The provider's forward (inputs -> state) and backward (state -> the gradients it
    returns). The forward takes gradients-requiring leaves; `full` is backward(forward(x))."""
    check_available(case, eager_limit_bytes=eager_limit_bytes)
    if case.provider == "floor":
        return _floor_steps()
    diff_keys, arg_keys = DIFFERENTIABLE[case.kernel], ARGUMENTS[case.kernel]
    if case.provider in PLAIN_CE:
        loss = _plain_ce_call(case.provider)
        arg_keys = arg_keys[:3]  # no UI centre

        def call(e, w, labels):
            return (loss(e, w, labels),)
    elif case.kernel == "head":
        backend = _backend_name(case.provider)
        call = _head_call(backend, **({"grad_filter_eps": FILTER_EPS} if case.provider == "triton-filter" else {}))
    else:
        call = _aux_call(_backend_name(case.provider))
    if case.provider == "compiled":
        # A fresh compile per case: no recompile limit, no dynamic-shape graph from an earlier case.
        torch._dynamo.reset()
        call = torch.compile(call, dynamic=False)

    def forward(x: Inputs) -> Any:
        leaves = {k: x[k].detach().requires_grad_(True) for k in diff_keys}
        outputs = call(*(leaves.get(k, x[k]) for k in arg_keys))
        return outputs, tuple(leaves[k] for k in diff_keys)

    def backward(state: Any) -> Tuple[torch.Tensor, ...]:
        outputs, leaves = state
        return torch.autograd.grad(outputs[0], leaves)  # the loss (head) or the total (aux)

    return forward, backward
