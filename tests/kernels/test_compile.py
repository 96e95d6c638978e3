"""`torch.compile(fullgraph=True)` over a training-step-like function calling both ops, on every
kernel backend: the custom ops trace through their fake kernels and differentiate through their
registered autograd (docs/spec.md §2). One compile per case: each costs ~30 s on this machine."""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

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


# torch.compile(dynamic=True): Python numbers and sizes arrive as SymFloat/SymInt, which the
# validation must take (comparisons only); one graph must serve two batch sizes.

def ops_step(emb, protos, labels, ui, ri_pred, attn, scale, margin, tau, mu):
    head = ree_kernels.arcface_head(emb, protos, labels, ui, scale=scale, margin=margin, differentiable_stats=True)
    aux = ree_kernels.ree_aux_loss(ri_pred, head.ri.nan_to_num(0.0), mu, tau=tau, attn=attn, embeddings=emb.detach(),
                                   ui_center=ui)
    return head.loss + aux.total + head.cos_pos.nan_to_num(0.0).sum()


def dynamic_case(target: str, batch: int):
    """(function to compile, its arguments, the tensors whose gradients are compared)."""
    inputs = head_inputs(batch, 17, 6, seed=batch, ignored=1)
    aux = aux_inputs(batch, 6, seed=batch + 1)
    emb = inputs["embeddings"].clone().requires_grad_()
    if target == "ops":
        protos = inputs["prototypes"].clone().requires_grad_()
        pred, attn = aux["ri_pred"].clone().requires_grad_(), aux["attn"].clone().requires_grad_()
        args = (emb, protos, inputs["labels"], inputs["ui_center"], pred, attn, 30.0, 0.3, 0.1, 0.05)
        return ops_step, args, (emb, protos, pred, attn)
    if target == "ArcFaceHead":
        from ree.models import ArcFaceHead

        head = ArcFaceHead(6, 17, seed=0, scale=30.0)
        return head, (emb, inputs["labels"]), (emb, head.weight)
    tracker = ree_kernels.UITracker(6, momentum=0.9)

    def update(e, r):
        tracker.update(e, r)
        tracker.update(e[:0], r[:0])  # a batch without UIs changes nothing
        tracker.update(e.flip(0), r.flip(0))
        return tracker.center.clone(), tracker.mu.clone(), tracker.initialized.clone()

    return update, (inputs["embeddings"], aux["ri_pred"]), ()


@pytest.mark.parametrize("target", ["ops", "ArcFaceHead", "UITracker.update"])
def test_dynamic_fullgraph_compile_matches_eager(target):
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled, graphs = None, []
    for batch in (7, 11):
        results = []
        for run in ("eager", "compiled"):
            fn, args, wrt = dynamic_case(target, batch)
            if run == "compiled":
                # The ops are plain functions: one compiled callable must serve both batch sizes. A
                # module or closure is a new object per case, so it gets its own (still dynamic) one.
                compiled = (compiled if target == "ops" and compiled is not None
                            else torch.compile(fn, backend=counter, dynamic=True, fullgraph=True))
                fn = compiled
            out = fn(*args)
            grads = torch.autograd.grad(out, wrt) if wrt else ()
            results.append((out if isinstance(out, tuple) else (out,)) + tuple(grads))
        graphs.append(counter.frame_count)
        for e, c in zip(*results):
            torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6, equal_nan=True)
    if target == "ops":
        assert graphs[1] == graphs[0], f"recompiled for another batch size: {graphs}"
