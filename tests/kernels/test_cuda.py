"""Checks specific to the C++ extension's CUDA kernels (csrc/cuda), beyond the shared docs/spec.md §5
suites: chunking and row splits, the documented deterministic mode, no host synchronisation,
64-bit offsets, and no B × C workspace. Every test needs a GPU; the module imports without one."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import ree_kernels
from ree_kernels import backends, reference
from support import aux_inputs, compare_head, head_inputs

pytestmark = pytest.mark.gpu

DEVICE = "cuda"


def test_extension_has_the_cuda_kernels():
    assert ("head", "CUDA") in backends.CPP_KERNELS and ("aux", "CUDA") in backends.CPP_KERNELS, (
        "ree_kernels._C was built without its CUDA kernels: " + backends.BUILD_HINT)


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("chunk_size", [1, 7, 128, 1000, 1031, 5000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_size_override(chunk_size, dtype):
    """C = 1031 is a multiple of none of the chunks; 1 and 7 leave most row splits empty; 1031
    is one exact chunk and 5000 one larger than C."""
    inputs = head_inputs(37, 1031, 67, seed=70 + chunk_size, device=DEVICE, ignored=3, weights=True)
    compare_head(inputs, backend="cuda", dtype=dtype, device=DEVICE, chunk_size=chunk_size)


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("batch", [1, 5, 2500])
def test_row_splits_follow_the_batch(batch):
    """The forward splits each row over up to 64 blocks when B is small and not at all when it is
    large (kernels.h: head_row_splits); the result must not depend on it."""
    inputs = head_inputs(batch, 3001, 64, seed=80 + batch, device=DEVICE, plant=("peaky",))
    compare_head(inputs, backend="cuda", dtype=torch.float32, device=DEVICE)


def test_grad_filter_eps_is_rejected():
    inputs = head_inputs(4, 9, 8, seed=81, device=DEVICE)
    with pytest.raises(ValueError, match="triton"):
        torch.ops.ree.head_forward(inputs["embeddings"].float(), inputs["prototypes"].float(), inputs["labels"],
                                   64.0, 0.5, "arcface", -100, 0, 0.1)


def test_current_stream_is_used():
    """The kernels run on the caller's current stream, with cuBLAS: a side stream gives the same bits."""
    inputs = head_inputs(64, 4099, 96, seed=82, device=DEVICE, ignored=2)

    def run():
        emb = inputs["embeddings"].float().requires_grad_()
        protos = inputs["prototypes"].float().requires_grad_()
        out = ree_kernels.arcface_head(emb, protos, inputs["labels"], backend="cuda", chunk_size=512)
        out.loss.backward()
        return out.loss, out.lse, out.neg_index, emb.grad, protos.grad

    torch.cuda.synchronize()
    expected = run()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = run()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for e, g in zip(expected, got):
        assert torch.equal(e, g)


def test_no_host_synchronisation():
    """The ops never wait for the device (no .item(): the recognizable count stays on it)."""
    head = head_inputs(32, 517, 64, seed=83, device=DEVICE, ignored=2)
    aux = aux_inputs(32, 64, seed=84, device=DEVICE)
    emb, protos, labels = head["embeddings"].float(), head["prototypes"].float(), head["labels"]
    args = (64.0, 0.5, "arcface")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rows = torch.ops.ree.head_forward(emb, protos, labels, *args, -100, 0, 0.0)
        torch.ops.ree.head_backward(emb, protos, labels, rows[4], torch.ones_like(rows[4]), *args, 0, 0.0)
        torch.ops.ree.aux_forward(aux["ri_pred"].float(), aux["ri_target"].float(), aux["mu_ui"].float(),
                                  aux["attn"].float(), aux["embeddings"].float(), aux["ui_center"].float(),
                                  aux["recognizable"], 0.2, 0.75)
    finally:
        torch.cuda.set_sync_debug_mode(0)


DETERMINISM_SCRIPT = textwrap.dedent("""
    import hashlib, sys, torch, ree_kernels
    torch.use_deterministic_algorithms(True)
    g = torch.Generator().manual_seed(0)
    digest = hashlib.sha256()
    for dtype in (torch.float32, torch.bfloat16):
        for chunk in (0, 1000):
            emb = torch.randn(96, 128, generator=g).to("cuda", dtype).requires_grad_()
            protos = torch.randn(20011, 128, generator=g).to("cuda", dtype).requires_grad_()
            labels = torch.randint(0, 20011, (96,), generator=g).cuda()
            out = ree_kernels.arcface_head(emb, protos, labels, backend="cuda", chunk_size=chunk)
            out.loss.backward()
            for t in (*out, emb.grad, protos.grad):
                digest.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    print(digest.hexdigest())
""")


def test_bitwise_deterministic_across_processes_in_deterministic_mode():
    """docs/design.md: with CUBLAS_WORKSPACE_CONFIG set and torch.use_deterministic_algorithms(True),
    outputs and gradients are bitwise identical from run to run (here: two fresh processes)."""
    env = dict(os.environ, CUBLAS_WORKSPACE_CONFIG=":4096:8")
    digests = []
    for _ in range(2):
        run = subprocess.run([sys.executable, "-c", DETERMINISM_SCRIPT], env=env, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stderr
        digests.append(run.stdout.strip().splitlines()[-1])
    assert digests[0] == digests[1]


def test_workspace_has_no_batch_by_classes_tensor():
    """docs/spec.md §4: peak memory during forward + backward, minus the inputs and the returned
    gradients, stays far below one B × C float32 tensor (an allocation bound, not a timing)."""
    batch, classes, dim = 1024, 200_000, 512
    g = torch.Generator(device=DEVICE).manual_seed(85)
    emb = torch.randn(batch, dim, device=DEVICE, generator=g, dtype=torch.bfloat16).requires_grad_()
    protos = torch.randn(classes, dim, device=DEVICE, generator=g, dtype=torch.bfloat16).requires_grad_()
    labels = torch.randint(0, classes, (batch,), device=DEVICE, generator=g)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = ree_kernels.arcface_head(emb, protos, labels, backend="cuda")
    out.loss.backward()
    torch.cuda.synchronize()
    returned = emb.grad.numel() * emb.grad.element_size() + protos.grad.numel() * protos.grad.element_size()
    workspace = torch.cuda.max_memory_allocated() - before - returned
    one_logit_matrix = batch * classes * 4
    assert bool(torch.isfinite(out.loss)), out.loss
    assert workspace < one_logit_matrix / 4, f"workspace {workspace / 2**20:.0f} MiB"


# ---- 64-bit offsets: C × D > 2^31 --------------------------------------------------------------

LARGE_CLASSES, LARGE_DIM, LARGE_BATCH = 4_200_000, 512, 64
FIRST_BEYOND_INT32 = 2**31 // LARGE_DIM  # rows of W from here start past 2^31 elements


def streamed_reference(emb, protos, labels, row_grad, check_rows, *, scale=64.0, margin=0.5, chunk=1 << 18):
    """reference.arcface_rows in float64, over chunks of classes (no B × C tensor), with the
    gradients of Σ row_grad_i·loss_i by autograd: with the log-sum-exp held fixed, each chunk's
    Σ row_grad_i·exp(logit_ij − lse_i) has exactly the chunk's share of the gradient."""
    v = emb.double().requires_grad_()
    labels_w = protos[labels].double().requires_grad_()
    v_hat = reference.normalize(v)
    target_cos = (v_hat * reference.normalize(labels_w)).sum(1).clamp(-1, 1)
    target_logit = scale * reference.margin_logit(target_cos, "arcface", margin)
    # Forward: log-sum-exp over the negatives plus the target, nearest negative.
    lse = target_logit.detach().clone()
    best = torch.full_like(lse, -math.inf)
    best_index = torch.full_like(labels, -1)
    with torch.no_grad():
        for begin in range(0, protos.shape[0], chunk):
            cos = (v_hat @ reference.normalize(protos[begin:begin + chunk].double()).T).clamp(-1, 1)
            cols = torch.arange(begin, begin + cos.shape[1], device=cos.device)
            cos = cos.masked_fill(cols[None] == labels[:, None], -math.inf)
            lse = torch.logaddexp(lse, torch.logsumexp(scale * cos, 1))
            value, index = cos.max(1)
            better = value > best
            best = torch.where(better, value, best)
            best_index = torch.where(better, index + begin, best_index)
    loss = lse - target_logit.detach()
    # Backward, with lse fixed.
    grad_v = torch.zeros_like(v)
    grad_rows = {}
    for begin in range(0, protos.shape[0], chunk):
        w = protos[begin:begin + chunk].double().requires_grad_()
        cos = (reference.normalize(v) @ reference.normalize(w).T).clamp(-1, 1)
        cols = torch.arange(begin, begin + cos.shape[1], device=cos.device)
        phi = reference.margin_logit(cos, "arcface", margin)
        logits = scale * torch.where(cols[None] == labels[:, None], phi, cos)
        part = (row_grad[:, None] * torch.exp(logits - lse[:, None])).sum()
        gv, gw = torch.autograd.grad(part, (v, w))
        grad_v += gv
        for r in check_rows:
            if begin <= r < begin + cos.shape[1]:
                grad_rows[r] = gw[r - begin]
    gv, glw = torch.autograd.grad(-(row_grad * target_logit).sum(), (v, labels_w))
    grad_v += gv
    for i, label in enumerate(labels.tolist()):
        if label in grad_rows:
            grad_rows[label] = grad_rows[label] + glw[i]
    return lse, loss, target_cos.detach(), best, best_index, grad_v, grad_rows


def test_offsets_past_int32_with_4_2_million_classes():
    """C × D = 2.15e9 bf16 prototypes: labels, nearest negatives and gradients in the rows past
    element 2^31 must be right (a 32-bit offset would read or write the wrong rows)."""
    g = torch.Generator(device=DEVICE).manual_seed(88)
    emb = torch.randn(LARGE_BATCH, LARGE_DIM, device=DEVICE, generator=g).to(torch.bfloat16)
    protos = torch.randn(LARGE_CLASSES, LARGE_DIM, device=DEVICE, generator=g, dtype=torch.bfloat16)
    labels = torch.randint(0, LARGE_CLASSES, (LARGE_BATCH,), device=DEVICE, generator=g)
    planted = [FIRST_BEYOND_INT32, FIRST_BEYOND_INT32 + 1, LARGE_CLASSES - 1, 12_345]
    negatives = [LARGE_CLASSES - 2, FIRST_BEYOND_INT32 + 7, 3, LARGE_CLASSES - 1000]
    for row, (label, negative) in enumerate(zip(planted, negatives)):
        labels[row] = label
        protos[negative] = emb[row] * 2  # the row's unique nearest negative
    row_grad = torch.linspace(0.5, 1.5, LARGE_BATCH, device=DEVICE, dtype=torch.float32)

    emb.requires_grad_()
    protos.requires_grad_()
    out = ree_kernels.arcface_head(emb, protos, labels, backend="cuda", reduction="none")
    grad_emb, grad_protos = torch.autograd.grad(out.loss, (emb, protos), grad_outputs=row_grad)
    emb, protos = emb.detach(), protos.detach()
    assert bool(torch.isfinite(grad_protos).all()) and bool(torch.isfinite(grad_emb).all())

    check_rows = sorted(set(planted + negatives + [0, LARGE_CLASSES // 2]))
    lse, loss, cos_pos, cos_neg, neg_index, ref_grad_emb, ref_grad_rows = streamed_reference(
        emb, protos, labels, row_grad.double(), check_rows)

    assert torch.allclose(out.lse.double(), lse, atol=2e-3, rtol=0)
    assert torch.allclose(out.loss.double(), loss, atol=2e-3, rtol=0)
    assert torch.allclose(out.cos_pos.double(), cos_pos, atol=1e-5, rtol=0)
    assert torch.allclose(out.cos_neg.double(), cos_neg, atol=1e-4, rtol=0)
    assert out.neg_index[:len(negatives)].tolist() == negatives
    at_index = (reference.normalize(emb.double()) * reference.normalize(protos[out.neg_index].double())).sum(1)
    assert torch.allclose(at_index, cos_neg, atol=1e-4, rtol=0)

    # bf16 gradients: within 2% of the gradient's scale (a wrong row or offset is off by O(scale)).
    def close(ours, ref, scale, what):
        err = float((ours.double() - ref).abs().max())
        assert err <= 2e-2 * scale, f"{what}: max error {err:.3e}, scale {scale:.3e}"

    close(grad_emb, ref_grad_emb, float(ref_grad_emb.abs().max()), "grad embeddings")
    rows_scale = max(float(g.abs().max()) for g in ref_grad_rows.values())
    for r in check_rows:
        close(grad_protos[r], ref_grad_rows[r], rows_scale, f"grad prototypes row {r}")
