"""The ops under torch.func (issue 18, item 1): grad, vjp, vmap and per-sample gradients through
vmap(grad(...)) on every backend, against the reference; what they do not support (a second
derivative, forward-mode AD) raises naming the op, the backend and what works instead; a bad
label under vmap is refused like any other."""
from __future__ import annotations

import pytest
import torch
from torch.func import grad, jvp, vjp, vmap

from ree_kernels import arcface_head, ree_aux_loss
from support import KERNEL_BACKENDS, generator

BACKENDS = KERNEL_BACKENDS + [pytest.param(("reference", "cpu"), id="reference")]
B, C, D = 5, 7, 16


def inputs(device: str, seed: int = 0):
    g = generator(seed)
    emb, protos = torch.randn(B, D, generator=g), torch.randn(C, D, generator=g)
    labels = torch.randint(0, C, (B,), generator=g)
    return emb.to(device), protos.to(device), labels.to(device)


def head_loss(backend: str, labels: torch.Tensor):
    def loss(emb: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
        return arcface_head(emb, protos, labels, scale=16.0, backend=backend).loss
    return loss


def sample_loss(backend: str):
    """One row's loss: what per-sample gradients differentiate, vmapped over the rows."""
    def loss(emb_row: torch.Tensor, protos: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return arcface_head(emb_row[None], protos, label[None], scale=16.0, backend=backend).loss
    return loss


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.cpu(), b.cpu(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_and_vjp_match_the_reference(backend):
    name, device = backend
    emb, protos, labels = inputs(device)
    expected = grad(head_loss("reference", labels), argnums=(0, 1))(emb.double(), protos.double())
    got = grad(head_loss(name, labels), argnums=(0, 1))(emb, protos)
    for g, e in zip(got, expected):
        close(g, e.float())
    loss, pullback = vjp(head_loss(name, labels), emb, protos)
    for g, e in zip(pullback(torch.tensor(3.0, device=device)), expected):
        close(g, 3.0 * e.float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_gradients_through_vmap_of_grad(backend):
    name, device = backend
    emb, protos, labels = inputs(device)
    per_sample = vmap(grad(sample_loss(name), argnums=(0, 1)), in_dims=(0, None, 0))(emb, protos, labels)
    assert per_sample[0].shape == (B, D) and per_sample[1].shape == (B, C, D)
    for i in range(B):
        one = grad(sample_loss("reference"), argnums=(0, 1))(emb[i].double(), protos.double(), labels[i])
        close(per_sample[0][i], one[0].float())
        close(per_sample[1][i], one[1].float())
    values = vmap(sample_loss(name), in_dims=(0, None, 0))(emb, protos, labels)
    reference = arcface_head(emb.double(), protos.double(), labels, scale=16.0, reduction="none",
                             backend="reference").loss
    close(values, reference.float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_aux_loss_per_sample_gradients(backend):
    name, device = backend
    g = generator(1)
    pred, target = torch.randn(4, 6, generator=g).to(device), torch.randn(4, 6, generator=g).to(device)

    def total(backend_name):
        return lambda p, t: ree_aux_loss(p, t, 0.1, backend=backend_name).total

    got = vmap(grad(total(name)))(pred, target)
    expected = vmap(grad(total("reference")))(pred.double(), target.double())
    close(got, expected.float())


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0][0] != "reference"])
def test_what_the_kernels_do_not_differentiate_is_refused_by_name(backend):
    name, device = backend
    emb, protos, labels = inputs(device)
    loss = head_loss(name, labels)
    op = "ree::triton_head_forward" if name == "triton" else "ree::head_forward"
    with pytest.raises(RuntimeError, match=rf"{op}\w* can be differentiated once only \(backend='{name}'\).*"
                                           r"backend='reference'"):
        grad(lambda x: grad(lambda e: loss(e, protos))(x).sum())(emb)
    with pytest.raises(RuntimeError, match=rf"{op}\w* \(backend='{name}'\) has no forward-mode derivative.*"
                                           r"backend='reference'"):
        jvp(lambda e: loss(e, protos), (emb,), (torch.ones_like(emb),))


def test_grad_of_grad_works_on_the_reference():
    emb, protos, labels = inputs("cpu")
    emb, protos = emb.double(), protos.double()
    hessian_diag = grad(lambda x: grad(lambda e: head_loss("reference", labels)(e, protos))(x).sum())(emb)
    assert torch.isfinite(hessian_diag).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bad_label_under_vmap_is_refused_naming_labels(backend):
    name, device = backend
    emb, protos, labels = inputs(device)
    labels[3] = C + 4
    with pytest.raises(ValueError, match=rf"labels must lie in \[0, {C}\).*found {C + 4}"):
        vmap(grad(sample_loss(name)), in_dims=(0, None, 0))(emb, protos, labels)
