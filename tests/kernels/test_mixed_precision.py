"""Mixed precision as trainers run it (issue 18, item 2): a loss scaled by torch.amp.GradScaler's
default 2^16 must not overflow inside an op, whose gradients must be the scaled ones rounded
once, and a GradScaler loop on float16 activations must be able to raise its scale."""
from __future__ import annotations

import pytest
import torch

from ree_kernels import arcface_head, ree_aux_loss
from support import KERNEL_BACKENDS, generator

BACKENDS = KERNEL_BACKENDS + [pytest.param(("reference", "cpu"), id="reference")]
SCALE = 2.0 ** 16  # GradScaler's default init_scale: infinite in float16


def head_grads(backend: str, device: str, loss_scale: float, reduction: str):
    g = generator(3)
    # Norms near 100: the gradients (about s / ‖x‖ / B) times 2^16 stay inside float16's range.
    emb = (20 * torch.randn(6, 32, generator=g)).to(device, torch.float16).requires_grad_()
    protos = (20 * torch.randn(11, 32, generator=g)).to(device, torch.float16).requires_grad_()
    labels = torch.randint(0, 11, (6,), generator=g).to(device)
    out = arcface_head(emb, protos, labels, backend=backend, reduction=reduction)
    loss = out.loss if reduction == "mean" else out.loss.sum()
    (loss * loss_scale).backward()
    return emb.grad.float(), protos.grad.float()


def assert_scaled(scaled: torch.Tensor, plain: torch.Tensor) -> None:
    assert torch.isfinite(scaled).all(), "a gradient overflowed inside the op"
    # Both are rounded once to float16 from the same float32 value up to the scale: equal
    # relatively, to float16's rounding (and below its normal range, to its subnormal step).
    torch.testing.assert_close(scaled.cpu() / SCALE, plain.cpu(), rtol=2e-3, atol=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_head_gradients_scale_without_overflow_in_float16(backend, reduction):
    name, device = backend
    scaled = head_grads(name, device, SCALE, reduction)
    plain = head_grads(name, device, 1.0, reduction)
    for s, p in zip(scaled, plain):
        assert p.abs().max() > 0
        assert_scaled(s, p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_aux_gradients_scale_without_overflow_in_float16(backend):
    name, device = backend
    g = generator(4)
    pred0 = torch.randn(9, generator=g).to(device, torch.float16)
    attn0 = torch.randn(9, 16, generator=g).to(device, torch.float16)
    target = torch.randn(9, generator=g).to(device, torch.float16)
    emb = torch.randn(9, 16, generator=g).to(device, torch.float16)
    center = torch.randn(16, generator=g).to(device, torch.float16)

    def grads(loss_scale: float):
        pred, attn = pred0.clone().requires_grad_(), attn0.clone().requires_grad_()
        out = ree_aux_loss(pred, target, 0.1, attn=attn, embeddings=emb, ui_center=center, backend=name)
        (out.total * loss_scale).backward()
        return pred.grad.float(), attn.grad.float()

    for s, p in zip(grads(SCALE), grads(1.0)):
        assert p.abs().max() > 0
        assert_scaled(s, p)


def test_grad_scaler_raises_its_scale_on_the_cpu_training_path():
    """float32 parameters, float16 activations (autocast's pattern, spelled out: CPU autocast
    makes bfloat16), GradScaler at its defaults but growing every step, on gradients that fit
    float16 at every scale reached: no step may be skipped for inf/NaN (before, the first one
    always was, and the scale could not rise above 2^15)."""
    torch.manual_seed(0)
    backbone = torch.nn.Linear(24, 32)
    prototypes = torch.nn.Parameter(20 * torch.randn(40, 32))
    opt = torch.optim.SGD([*backbone.parameters(), prototypes], lr=0.01)
    scaler = torch.amp.GradScaler("cpu", growth_interval=1)
    x, labels = torch.randn(16, 24), torch.randint(0, 40, (16,))
    scales = []
    for _ in range(3):
        opt.zero_grad()
        emb = (50 * backbone(x)).half()  # norms near 100: the gradients fit float16 at 2^19
        loss = arcface_head(emb, prototypes.half(), labels, backend="cpu").loss
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    assert scales == [2.0 ** 17, 2.0 ** 18, 2.0 ** 19], scales
