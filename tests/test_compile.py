"""`torch.compile(fullgraph=True)` over a training-step-like function calling both ops, on every
kernel backend: the custom ops trace through their fake kernels and differentiate through their
registered autograd (docs/spec.md §2). One compile per backend: each costs ~30 s on this machine."""
import pytest
import torch

import ree_kernels
from support import KERNEL_BACKENDS, aux_inputs, head_inputs, head_shape


def step(emb, protos, labels, ui, weight, ri_pred, attn, recognizable, backend):
    head = ree_kernels.arcface_head(emb, protos, labels, ui, sample_weight=weight, backend=backend)
    aux = ree_kernels.ree_aux_loss(ri_pred, head.ri.nan_to_num(0.0), 0.1, attn=attn, embeddings=emb.detach(),
                                   ui_center=ui, recognizable=recognizable, backend=backend)
    return head.loss + aux.total, head.neg_index, head.ri


@pytest.mark.parametrize("kernel", KERNEL_BACKENDS)
def test_fullgraph_compile_matches_eager(kernel):
    backend, device = kernel
    batch, classes, dim = head_shape(kernel)
    torch._dynamo.reset()
    inputs = head_inputs(batch, classes, dim, seed=60, device=device, ignored=2, weights=True)
    aux = aux_inputs(batch, dim, seed=61, device=device)

    def run(fn):
        emb = inputs["embeddings"].clone().requires_grad_()
        protos = inputs["prototypes"].clone().requires_grad_()
        pred = aux["ri_pred"].clone().requires_grad_()
        attn = aux["attn"].clone().requires_grad_()
        loss, idx, ri = fn(emb, protos, inputs["labels"], inputs["ui_center"], inputs["sample_weight"], pred, attn,
                           aux["recognizable"], backend)
        loss.backward()
        return loss.detach(), idx, ri, emb.grad, protos.grad, pred.grad, attn.grad

    eager = run(step)
    compiled = run(torch.compile(step, fullgraph=True))
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6, equal_nan=True)
