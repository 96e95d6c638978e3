"""`ree_aux_loss`: RI regression, index diversion and PAM losses in one pass (docs/spec.md §1.5–§1.7, §2).

Every kernel backend implements one op (schema in csrc/ops.cpp; Triton's is `triton_aux_forward`):
`aux_forward(ri_pred, ri_target, mu_ui, attn?, embeddings?, ui_center?, recognizable?, tau,
beta) -> (l1, id, mse, grad_ri_l1, grad_ri_id, grad_attn_mse)`. It computes the three losses and
their gradients in the same pass over the rows (they are cheap and elementwise), so the
backward is only the chain rule below; the weighted total is formed here, for every backend.
That backward multiplies saved gradients, so it cannot be differentiated again: with
create_graph=True it raises (`head.refuse_double_backward`) instead of returning a gradient that
silently misses the second derivative.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from . import functorch, reference
from .backends import CUDA_EMULATED, CUDA_EMULATION_PREFIX, EXTENSION_ERROR, kernel_op, resolve_backend
from .head import refuse_double_backward
from .reference import AuxOutput, stat_dtype
from .validation import validate_aux_inputs


def _aux_forward_fake(ri_pred, ri_target, mu_ui, attn, embeddings, ui_center, recognizable, tau, beta):
    scalar = ri_pred.new_empty((), dtype=stat_dtype(ri_pred.dtype))
    grad_ri = ri_pred.new_empty(ri_pred.shape, dtype=scalar.dtype)
    grad_attn = (ri_pred.new_empty((0,), dtype=scalar.dtype) if attn is None
                 else attn.new_empty(attn.shape, dtype=scalar.dtype))
    return scalar, scalar.clone(), scalar.clone(), grad_ri, grad_ri.clone(), grad_attn


def register_aux_op(prefix: str) -> None:
    """Registers the fake kernel and the autograd of `ree::{prefix}aux_forward`."""
    name = f"ree::{prefix}aux_forward"

    def setup_context(ctx, inputs, output):
        ri_pred, attn = inputs[0], inputs[3]
        ctx.save_for_backward(output[3], output[4], output[5])
        ctx.mark_non_differentiable(*output[3:])  # the gradients computed in the forward
        ctx.dtypes = (ri_pred.dtype, None if attn is None else attn.dtype)
        ctx.num_inputs = len(inputs)
        ctx.differentiated = functorch.requires_second_derivative(*(x for x in (ri_pred, attn) if x is not None))
        ctx.backend = functorch.backend_of(name, ri_pred.device)

    def backward(ctx, grad_l1, grad_id, grad_mse, *_):
        refuse_double_backward(name, inputs_require_grad=ctx.differentiated, backend=ctx.backend)
        d_l1, d_id, d_attn = ctx.saved_tensors
        ri_dtype, attn_dtype = ctx.dtypes
        grad_ri = (grad_l1 * d_l1 + grad_id * d_id).to(ri_dtype)
        grad_attn = None if attn_dtype is None else (grad_mse * d_attn).to(attn_dtype)
        grads = [None] * ctx.num_inputs
        grads[0], grads[3] = grad_ri, grad_attn
        return tuple(grads)

    torch.library.register_fake(name)(_aux_forward_fake)
    torch.library.register_autograd(name, backward, setup_context=setup_context)
    functorch.register(name, setup_context, backward)


if EXTENSION_ERROR is None:
    register_aux_op("")
if CUDA_EMULATED:
    register_aux_op(CUDA_EMULATION_PREFIX)


def ree_aux_loss(
    ri_pred: torch.Tensor,
    ri_target: torch.Tensor,
    mu_ui: Union[float, torch.Tensor],
    *,
    tau: float = 0.2,
    beta: float = 0.75,
    attn: Optional[torch.Tensor] = None,
    embeddings: Optional[torch.Tensor] = None,
    ui_center: Optional[torch.Tensor] = None,
    recognizable: Optional[torch.Tensor] = None,
    weights: Sequence[float] = (1.0, 1.0, 1.0),
    backend: str = "auto",
) -> AuxOutput:
    """The REE auxiliary losses (docs/spec.md §1.5–§1.7) in one pass.

    Args:
        ri_pred: [B] the PRM's predicted RI ξ̂ (receives gradients); a float dtype the backend takes.
        ri_target: [B] the RI from `arcface_head` (detached).
        mu_ui: the EMA of ξ̂ over UIs (UITracker.mu), a number or a 0-d tensor (detached). A
            number is taken at the statistics' precision (float64 for float64 inputs).
        tau: the index diversion margin, in [0, 10]; beta: the smooth-L1 β, in (0, 10].
        attn: [B, D] the PAM output (receives gradients), or None for no MSE term.
        embeddings: [B, D] and ui_center: [D], from which the PAM target is built.
        recognizable: [B] bool, the rows that count in the ID and MSE means (all when None).
        weights: (λ_L1, λ_ID, λ_MSE) for `total`, finite numbers.
        backend: "auto" | "reference" | "cpu" | "cuda" | "triton" (`backends.BACKENDS`).

    Returns:
        AuxOutput (see its docstring); differentiable once with respect to ri_pred and attn
        (create_graph=True raises on the kernel backends; the reference differentiates any
        number of times).

    Raises:
        TypeError: an argument of the wrong type or dtype, or a dtype the backend does not take.
        ValueError: bad shapes or devices, a scalar out of range, attn without embeddings and
            ui_center, an unknown backend.
        RuntimeError: the backend cannot run here (not built, not installed, another device).
    """
    validate_aux_inputs(
        ri_pred, ri_target, mu_ui, tau=tau, beta=beta, attn=attn, embeddings=embeddings,
        ui_center=ui_center, recognizable=recognizable, weights=weights,
    )
    chosen = resolve_backend(backend, "aux", ri_pred.device, ri_pred.dtype)
    if chosen == "reference":
        return reference.ree_aux_loss(
            ri_pred, ri_target, mu_ui, tau=tau, beta=beta, attn=attn, embeddings=embeddings,
            ui_center=ui_center, recognizable=recognizable, weights=weights,
        )
    sdt = stat_dtype(ri_pred.dtype)
    # dtype= converts a Python number straight to sdt: through the default dtype it would be
    # rounded to float32 first, a 1e-8 relative error in a float64 loss.
    mu = torch.as_tensor(mu_ui, dtype=sdt, device=ri_pred.device).reshape(())

    def contiguous(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if x is None else x.detach().contiguous()

    l1, idl, mse, *_ = functorch.call(
        kernel_op(chosen, "aux_forward"), ri_pred.contiguous(), contiguous(ri_target), mu.detach(),
        None if attn is None else attn.contiguous(),
        contiguous(embeddings) if attn is not None else None, contiguous(ui_center) if attn is not None else None,
        contiguous(recognizable), float(tau), float(beta),
    )
    total = weights[0] * l1 + weights[1] * idl + weights[2] * mse
    return AuxOutput(total, l1, idl, mse)
