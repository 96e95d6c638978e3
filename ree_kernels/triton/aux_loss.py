"""`ree::triton_aux_forward`: the REE auxiliary losses and their gradients in Triton.

The contract is ree_kernels/aux_loss.py's; the semantics are `reference.ree_aux_loss_reference`,
and
csrc/cpu/aux_loss.cpp is the same pass in C++. Two kernels: `_aux_rows_kernel` computes each row's
three losses and gradients (a program per block of rows, the whole embedding row in
registers), `_aux_means_kernel` sums the rows in a fixed order (deterministic means).
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..registration import register_aux_op
from .formulas import inverse_norm, pam_residual

ROW_ELEMENTS = 8192
"""Elements of a row block's [rows, D] tile; D itself is padded to a power of two."""
MAX_DIM = 65536
_SUM_BLOCK = 1024
FP_FUSION = True
"""FMA contraction in both kernels, as every launch had it so far (Triton's default up to 3.9;
3.10 turns it off): passed explicitly so that a new Triton cannot change the numbers silently."""


@triton.jit
def _smooth_l1(x, beta):
    """reference.smooth_l1 and its derivative (torch's smooth_l1_loss with beta)."""
    size = tl.abs(x)
    value = tl.where(size < beta, 0.5 * x * x / beta, size - 0.5 * beta)
    grad = tl.where(x < -beta, -1.0, tl.where(x > beta, 1.0, x / beta))
    return value, grad


@triton.jit
def _aux_rows_kernel(pred_ptr, target_ptr, mu_ptr, keep_ptr, kept_ptr, attn_ptr, emb_ptr, ui_ptr,
                     l1_ptr, id_ptr, mse_ptr, grad_l1_ptr, grad_id_ptr, grad_attn_ptr,
                     B, D, tau, beta,
                     HAS_KEEP: tl.constexpr, HAS_ATTN: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per row: the three losses and their gradients, already divided by the means' counts."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    pred = tl.load(pred_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    target = tl.load(target_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    mu = tl.load(mu_ptr).to(tl.float32)
    if HAS_KEEP:
        keep = tl.load(keep_ptr + rows, mask=row_ok, other=0) != 0
        kept = tl.load(kept_ptr).to(tl.float32)
    else:
        keep = row_ok
        kept = B * 1.0
    per_kept = tl.where(kept > 0, 1.0 / tl.maximum(kept, 1.0), 0.0)

    # docs/spec.md §1.5: smooth L1 of the RI regression, mean over all rows.
    l1, l1_grad = _smooth_l1(pred - target, beta)
    tl.store(l1_ptr + rows, l1, mask=row_ok)
    tl.store(grad_l1_ptr + rows, l1_grad / B, mask=row_ok)
    # docs/spec.md §1.6 [R], statistics.index_diversion: relu(μ + τ − ξ̂) over the recognizable rows.
    gap = mu + tau - pred
    hinge = tl.maximum(gap, 0.0, propagate_nan=tl.PropagateNan.ALL)
    tl.store(id_ptr + rows, tl.where(keep, hinge, 0.0), mask=row_ok)
    tl.store(grad_id_ptr + rows, tl.where(keep & (gap > 0.0), -per_kept, 0.0), mask=row_ok)

    if HAS_ATTN:
        # docs/spec.md §1.7 [R], statistics.pam_target: v̇ = normalize(v̂ − (v̂·û)û), then (attn − v̇)².
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < D
        tile = rows.to(tl.int64)[:, None] * D + cols[None, :]
        tile_ok = row_ok[:, None] & col_ok[None, :]
        # Same order of operations as csrc/cpu/aux_loss.cpp: v̂·û from the raw dot products.
        attn = tl.load(attn_ptr + tile, mask=tile_ok, other=0.0).to(tl.float32)
        v = tl.load(emb_ptr + tile, mask=tile_ok, other=0.0).to(tl.float32)
        u = tl.load(ui_ptr + cols[None, :], mask=col_ok[None, :], other=0.0).to(tl.float32)
        v_inv = inverse_norm(tl.sum(v * v, axis=1))
        u_inv = inverse_norm(tl.sum(u * u, axis=1))
        along = tl.sum(v * u, axis=1) * v_inv * u_inv
        residual = pam_residual(v, u, v_inv[:, None], u_inv[:, None], along[:, None])
        err = attn - residual * inverse_norm(tl.sum(residual * residual, axis=1))[:, None]
        tl.store(mse_ptr + rows, tl.where(keep, tl.sum(err * err, axis=1), 0.0), mask=row_ok)
        grad = tl.where(keep[:, None], err * (2.0 * per_kept / D), 0.0)
        tl.store(grad_attn_ptr + tile, grad, mask=tile_ok)


@triton.jit
def _aux_means_kernel(l1_ptr, id_ptr, mse_ptr, kept_ptr, l1_out, id_out, mse_out, B, D,
                      HAS_KEEP: tl.constexpr, HAS_ATTN: tl.constexpr, BLOCK: tl.constexpr):
    """One program: the three sums in a fixed order, then the means of reference.ree_aux_loss_reference."""
    l1 = tl.zeros((BLOCK,), tl.float32)
    idl = tl.zeros((BLOCK,), tl.float32)
    mse = tl.zeros((BLOCK,), tl.float32)
    for b0 in range(0, B, BLOCK):
        rows = b0 + tl.arange(0, BLOCK)
        row_ok = rows < B
        l1 += tl.load(l1_ptr + rows, mask=row_ok, other=0.0)
        idl += tl.load(id_ptr + rows, mask=row_ok, other=0.0)
        if HAS_ATTN:
            mse += tl.load(mse_ptr + rows, mask=row_ok, other=0.0)
    if HAS_KEEP:
        kept = tl.load(kept_ptr).to(tl.float32)
    else:
        kept = B * 1.0
    denom = tl.maximum(kept, 1.0)
    tl.store(l1_out, tl.sum(l1) / B)
    tl.store(id_out, tl.sum(idl) / denom)
    tl.store(mse_out, tl.sum(mse) / (denom * D))


def _row_block(dim: int) -> Tuple[int, int]:
    block_d = triton.next_power_of_2(max(dim, 1))
    return max(1, min(64, ROW_ELEMENTS // block_d)), block_d


def aux_losses(ri_pred: torch.Tensor, ri_target: torch.Tensor, mu_ui: torch.Tensor, attn: Optional[torch.Tensor],
               embeddings: Optional[torch.Tensor], ui_center: Optional[torch.Tensor],
               recognizable: Optional[torch.Tensor], tau: float, beta: float
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The launcher of `ree::triton_aux_forward` (its body, callable outside the dispatcher):
    (l1, id, mse, ∂l1/∂ri_pred, ∂id/∂ri_pred, ∂mse/∂attn), float32; shapes as in
    ree_kernels/aux_loss.py. Raises ValueError for attn without embeddings/ui_center, beta <= 0
    or D > MAX_DIM."""
    has_attn = attn is not None
    if has_attn and (embeddings is None or ui_center is None):
        raise ValueError("attn needs embeddings and ui_center")
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    batch = ri_pred.shape[0]
    dim = attn.shape[1] if has_attn else 1
    if dim > MAX_DIM:
        raise ValueError(f"attn has D = {dim}; backend='triton' takes D <= {MAX_DIM}")
    device = ri_pred.device
    f32 = dict(dtype=torch.float32, device=device)
    pred, target = ri_pred.contiguous(), ri_target.contiguous()
    mu = mu_ui.reshape(1)
    has_keep = recognizable is not None
    keep = recognizable.contiguous() if has_keep else pred
    kept = recognizable.sum() if has_keep else pred  # a device scalar: no host sync
    a, v, u = ((attn.contiguous(), embeddings.contiguous(), ui_center.contiguous()) if has_attn
               else (pred, pred, pred))  # placeholders, never read

    l1_rows, id_rows = torch.empty(batch, **f32), torch.empty(batch, **f32)
    mse_rows = torch.empty(batch, **f32) if has_attn else l1_rows
    grad_l1, grad_id = torch.empty(batch, **f32), torch.empty(batch, **f32)
    grad_attn = torch.empty(batch, dim, **f32) if has_attn else torch.empty(0, **f32)
    block_b, block_d = _row_block(dim)
    _aux_rows_kernel[(triton.cdiv(batch, block_b),)](
        pred, target, mu, keep, kept, a, v, u, l1_rows, id_rows, mse_rows, grad_l1, grad_id,
        grad_attn if has_attn else l1_rows, batch, dim, tau, beta,
        HAS_KEEP=has_keep, HAS_ATTN=has_attn, BLOCK_B=block_b, BLOCK_D=block_d, enable_fp_fusion=FP_FUSION)
    l1, idl, mse = torch.empty((), **f32), torch.empty((), **f32), torch.empty((), **f32)
    _aux_means_kernel[(1,)](l1_rows, id_rows, mse_rows, kept, l1, idl, mse, batch, dim,
                            HAS_KEEP=has_keep, HAS_ATTN=has_attn, BLOCK=_SUM_BLOCK, enable_fp_fusion=FP_FUSION)
    return l1, idl, mse, grad_l1, grad_id, grad_attn


@torch.library.custom_op("ree::triton_aux_forward", mutates_args=())
def aux_forward(ri_pred: torch.Tensor, ri_target: torch.Tensor, mu_ui: torch.Tensor, attn: Optional[torch.Tensor],
                embeddings: Optional[torch.Tensor], ui_center: Optional[torch.Tensor],
                recognizable: Optional[torch.Tensor], tau: float,
                beta: float
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(l1, id, mse, ∂l1/∂ri_pred, ∂id/∂ri_pred, ∂mse/∂attn), float32 (`aux_losses`)."""
    return aux_losses(ri_pred, ri_target, mu_ui, attn, embeddings, ui_center, recognizable, tau, beta)


register_aux_op("triton_")
