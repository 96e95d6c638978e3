"""`ree_aux_loss`: RI regression, index diversion and PAM losses in one pass (docs/spec.md §1.5–§1.7, §2).

Every kernel backend implements one op (schema in csrc/ops.cpp; Triton's is `triton_aux_forward`):
`aux_forward(ri_pred, ri_target, mu_ui, attn?, embeddings?, ui_center?, recognizable?, tau,
beta) -> (l1, id, mse, grad_ri_l1, grad_ri_id, grad_attn_mse)`. It computes the three losses and
their gradients in the same pass over the rows (they are cheap and elementwise), so the
backward (`registration.register_aux_op`) is only the chain rule; the weighted total is formed here, for every backend.
That backward multiplies saved gradients, so it cannot be differentiated again: with
create_graph=True it raises (`registration.refuse_double_backward`) instead of returning a gradient that
silently misses the second derivative.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from . import registration
from .backends import kernel_op, resolve_backend
from .contract import AuxOutput, stat_dtype
from .validation import validate_aux_inputs


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
        return registration.reference_op("ree_aux_loss")(
            ri_pred, ri_target, mu_ui, tau=tau, beta=beta, attn=attn, embeddings=embeddings,
            ui_center=ui_center, recognizable=recognizable, weights=weights,
        )
    sdt = stat_dtype(ri_pred.dtype)
    # dtype= converts a Python number straight to sdt: through the default dtype it would be
    # rounded to float32 first, a 1e-8 relative error in a float64 loss.
    mu = torch.as_tensor(mu_ui, dtype=sdt, device=ri_pred.device).reshape(())

    def contiguous(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if x is None else x.detach().contiguous()

    l1, idl, mse, *_ = registration.call(
        kernel_op(chosen, "aux_forward"), ri_pred.contiguous(), contiguous(ri_target), mu.detach(),
        None if attn is None else attn.contiguous(),
        contiguous(embeddings) if attn is not None else None, contiguous(ui_center) if attn is not None else None,
        contiguous(recognizable), float(tau), float(beta),
    )
    total = weights[0] * l1 + weights[1] * idl + weights[2] * mse
    return AuxOutput(total, l1, idl, mse)
