"""The ops layer around the kernels: backend descriptions and the extension's build report, a
broken Triton, scalar precision, host synchronisation, double backward, torch.library.opcheck of
every registered op, and the differentiable statistics."""
from __future__ import annotations

import dataclasses
import inspect
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ree_kernels
from ree_kernels import arcface_head, backends, ree_aux_loss, reference, validation
from support import FORWARD_TOL, GRAD_TOL, assert_spec_close, aux_inputs, generator, head_inputs

ROOT = Path(__file__).resolve().parents[2]
aten = torch.ops.aten

# (backend, device) pairs that run here, with the dtypes they take.
HERE = [pytest.param("cpu", id="cpu"), pytest.param("triton", id="triton-interpret"),
        pytest.param("reference", id="reference")]
SHAPES = {"triton": (13, 131, 19), "cpu": (37, 1031, 67), "reference": (37, 1031, 67)}


# --------------------------------------------------------------------------------------------
# Backend descriptions and the extension's build report
# --------------------------------------------------------------------------------------------

def test_names_dtypes_and_cli_choices_come_from_the_descriptions():
    from ree.config import CHOICES

    names = tuple(b.name for b in backends.DESCRIPTIONS)
    assert backends.BACKENDS == ("auto",) + names == ree_kernels.BACKENDS == CHOICES["backend"]
    assert {n: backends.KERNEL_DTYPES[n] for n in names} == {b.name: b.dtypes for b in backends.DESCRIPTIONS}
    assert set(validation.FLOAT_DTYPES) == {d for b in backends.DESCRIPTIONS for d in b.dtypes}
    assert CHOICES["ri_form"] == reference.RI_FORMS and CHOICES["margin_mode"] == reference.MARGIN_MODES


def test_auto_takes_the_first_description_that_runs_the_op():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert backends.resolve_backend("auto", "head", cpu, torch.float32) == "cpu"
    # On CUDA tensors Triton comes first; float64 only the reference takes (cpu is CPU-only).
    assert backends.resolve_backend("auto", "head", cuda, torch.float32) == "triton"
    assert backends.resolve_backend("auto", "aux", cuda, torch.float64) == "reference"


def test_auto_falls_back_to_the_reference_without_the_extension(monkeypatch):
    monkeypatch.setattr(backends, "EXTENSION_ERROR", "No module named 'ree_kernels._C'")
    assert backends.resolve_backend("auto", "head", torch.device("cpu"), torch.float32) == "reference"


@pytest.mark.parametrize("backend,given,fitted", [
    ("triton", 0, 0), ("triton", 64, 64), ("triton", 100, 64), ("triton", 3000, 128), ("triton", 5, 16),
    ("cpu", 3, 3), ("cpu", 3000, 3000), ("cuda", 100, 100), ("reference", 7, 7),
])
def test_chunk_size_is_fitted_under_auto_and_checked_by_name(backend, given, fitted):
    assert backends.chunk_size_for("auto", backend, given) == fitted
    if given == fitted:
        assert backends.chunk_size_for(backend, backend, given) == given
    else:
        with pytest.raises(ValueError, match=f"chunk_size for backend='{backend}'.*got {given}"):
            backends.chunk_size_for(backend, backend, given)


def test_a_chunk_size_for_the_cpu_runs_on_triton_under_auto(monkeypatch):
    """chunk_size=100 is a CPU chunk; where auto picks Triton (made to here) it becomes a 64-tile."""
    inputs = head_inputs(*SHAPES["triton"], seed=1)
    args = (inputs["embeddings"], inputs["prototypes"], inputs["labels"], inputs["ui_center"])
    with pytest.raises(ValueError, match="chunk_size for backend='triton'"):
        arcface_head(*args, backend="triton", chunk_size=100)
    monkeypatch.setattr(backends, "DESCRIPTIONS", tuple(
        dataclasses.replace(b, auto_devices=("cpu",)) if b.name == "triton" else b for b in backends.DESCRIPTIONS))
    assert backends.resolve_backend("auto", "head", torch.device("cpu"), torch.float32) == "triton"
    ours = arcface_head(*args, backend="auto", chunk_size=100)
    ref = arcface_head(*args, backend="reference")
    torch.testing.assert_close(ours.loss, ref.loss, rtol=1e-5, atol=1e-5)


def test_build_info_reports_the_kernels_the_dispatcher_holds():
    info = ree_kernels._C.build_info()
    assert set(info) == {"with_cuda", "cuda_runtime", "torch", "compiler", "cpu_features", "kernels"}
    assert info["torch"] == torch.__version__.split("+")[0]
    assert info["with_cuda"] == (info["cuda_runtime"] is not None)
    cpp_ops = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
               if name.startswith("ree::") and not name.startswith("ree::triton_")}
    assert cpp_ops, "no C++ op is registered"
    for key in ("CPU", "CUDA"):
        with_kernel = {op for op in cpp_ops if torch._C._dispatch_has_kernel_for_dispatch_key(f"ree::{op}", key)}
        assert set(info["kernels"][key]) == with_kernel, key
    assert backends.CPP_KERNELS == {(op, key) for op, needed in backends.KERNEL_OPS.items()
                                    for key in ("CPU", "CUDA") if set(needed) <= set(info["kernels"][key])}
    assert ("head", "CPU") in backends.CPP_KERNELS and ("aux", "CPU") in backends.CPP_KERNELS
    assert (("head", "CUDA") in backends.CPP_KERNELS) == info["with_cuda"]


FAKE_TRITONS = {
    "raises on import": ("raise RuntimeError('simulated: libcuda.so.1: cannot open shared object file')",
                         "simulated: libcuda.so.1"),
    "incomplete": ("", "triton.language"),
}


@pytest.mark.parametrize("kind", sorted(FAKE_TRITONS))
def test_a_broken_triton_leaves_the_other_backends_working(tmp_path, kind):
    body, reason = FAKE_TRITONS[kind]
    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "__init__.py").write_text(body + "\n")
    script = textwrap.dedent("""
        import torch, ree_kernels
        from ree_kernels import backends
        assert backends.TRITON_INSTALLED and not backends.TRITON_USABLE, backends.TRITON_ERROR
        g = torch.Generator().manual_seed(0)
        e, w, y = torch.randn(4, 6, generator=g), torch.randn(5, 6, generator=g), torch.tensor([0, 1, 4, 2])
        for backend in ("cpu", "reference", "auto"):
            assert torch.isfinite(ree_kernels.arcface_head(e, w, y, backend=backend).loss)
        try:
            ree_kernels.arcface_head(e, w, y, backend="triton")
        except RuntimeError as err:
            print("triton:", err)
        else:
            raise SystemExit("backend='triton' ran")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "importing the Triton backend failed" in done.stdout and reason in done.stdout, done.stdout


# --------------------------------------------------------------------------------------------
# Scalars: no precision lost on the way to a float64 kernel
# --------------------------------------------------------------------------------------------

def test_float64_scalars_keep_their_precision():
    """Awkward Python scalars (not float32-representable) must reach a float64 kernel intact:
    mu_ui=0.1 through float32 was a 3e-9 relative error in the id loss."""
    inputs = head_inputs(19, 53, 11, seed=3, dtype=torch.float64, ignored=2, weights=True)
    options = dict(scale=37.123456789012345, margin=0.3217654321098765, sample_weight=inputs["sample_weight"])
    outs = {}
    for backend in ("cpu", "reference"):
        emb = inputs["embeddings"].clone().requires_grad_()
        protos = inputs["prototypes"].clone().requires_grad_()
        out = arcface_head(emb, protos, inputs["labels"], inputs["ui_center"], backend=backend, **options)
        outs[backend] = (*out, *torch.autograd.grad(out.loss, (emb, protos)))
    for field, ours, ref in zip(reference.HeadOutput._fields + ("grad e", "grad w"), outs["cpu"], outs["reference"]):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12, equal_nan=True, msg=field)

    aux = aux_inputs(19, 11, seed=4, dtype=torch.float64)
    options = dict(tau=0.123456789012345, beta=0.7654321098765, weights=(0.3, 1.7, 0.9), attn=aux["attn"],
                   embeddings=aux["embeddings"], ui_center=aux["ui_center"], recognizable=aux["recognizable"])
    cpu = ree_aux_loss(aux["ri_pred"], aux["ri_target"], 0.1, backend="cpu", **options)
    ref = ree_aux_loss(aux["ri_pred"], aux["ri_target"], 0.1, backend="reference", **options)
    for field in reference.AuxOutput._fields:
        torch.testing.assert_close(getattr(cpu, field), getattr(ref, field), rtol=1e-12, atol=1e-12, msg=field)


# --------------------------------------------------------------------------------------------
# No host synchronisation where it would cost one (CUDA)
# --------------------------------------------------------------------------------------------

class SyncRecorder(TorchDispatchMode):
    """Records every op that hands a tensor's value to the host: a Python number or bool as the
    result, or an output whose size depends on the values."""

    DATA_DEPENDENT = {aten.nonzero, aten.masked_select, aten.unique_consecutive, aten._unique2}

    def __init__(self) -> None:
        super().__init__()
        self.syncs: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        boolean_index = func is aten.index.Tensor and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
        if isinstance(out, (bool, int, float)) or func.overloadpacket in self.DATA_DEPENDENT or boolean_index:
            self.syncs.append(str(func))
        return out


def step_inputs(backend: str, device: str = "cpu") -> Dict:
    batch = SHAPES.get(backend, SHAPES["cpu"])[0]
    inputs = head_inputs(batch, 23, 9, seed=5, ignored=2, weights=True, device=device)
    aux = aux_inputs(batch, 9, seed=6, device=device)
    return {**{f"head {k}": v for k, v in inputs.items()}, **{f"aux {k}": v for k, v in aux.items()}}


def training_step(x: Dict, backend: str) -> None:
    emb = x["head embeddings"].clone().requires_grad_()
    protos = x["head prototypes"].clone().requires_grad_()
    pred = x["aux ri_pred"].clone().requires_grad_()
    out = arcface_head(emb, protos, x["head labels"], x["head ui_center"], sample_weight=x["head sample_weight"],
                       backend=backend)
    losses = ree_aux_loss(pred, out.ri.nan_to_num(0.0), x["aux mu_ui"], attn=x["aux attn"], embeddings=emb.detach(),
                          ui_center=x["head ui_center"], recognizable=x["aux recognizable"], backend=backend)
    (out.loss + losses.total).backward()
    tracker = ree_kernels.UITracker(9).to(emb.device)
    tracker.update(emb.detach()[:3], pred.detach()[:3])
    tracker.update(emb.detach()[:0], pred.detach()[:0])


@pytest.mark.parametrize("backend", HERE)
def test_a_training_step_on_the_device_path_never_syncs(backend, monkeypatch):
    """On CPU tensors the label check reads its result back (free there) and names the label;
    on the device path (CUDA, forced here) it must not: a device-side assertion instead."""
    x = step_inputs(backend)
    with SyncRecorder() as eager:
        training_step(x, backend)
    assert eager.syncs, "the recorder sees the CPU path's label check"

    monkeypatch.setattr(validation, "labels_checked_on_device", lambda device: True)
    with SyncRecorder() as device:
        training_step(x, backend)
    assert device.syncs == [], f"host synchronisations on the device path: {device.syncs}"

    bad = head_inputs(6, 9, 5, seed=7)
    bad["labels"][2] = 9
    with pytest.raises(RuntimeError, match=r"labels must lie in \[0, 9\)"):  # _assert_async fires at once on CPU
        arcface_head(bad["embeddings"], bad["prototypes"], bad["labels"], backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "reference"])
def test_a_cuda_training_step_never_syncs(backend):
    x = step_inputs(backend, "cuda")
    training_step(x, backend)  # warm-up: autotuning and lazy initialisation may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        training_step(x, backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_the_cpu_path_names_the_bad_label():
    bad = head_inputs(6, 9, 5, seed=7)
    bad["labels"][2] = 11
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 9\) or equal ignore_index=-100; found 11"):
        arcface_head(bad["embeddings"], bad["prototypes"], bad["labels"])


# --------------------------------------------------------------------------------------------
# Double backward: differentiated twice correctly (reference), or refused (kernels)
# --------------------------------------------------------------------------------------------

def head_case(backend: str, reduction: str):
    inputs = head_inputs(5, 7, 4, seed=8, dtype=torch.float64 if backend != "triton" else torch.float32,
                         plant=(), ignored=1)
    emb = inputs["embeddings"].clone().requires_grad_()
    protos = inputs["prototypes"].clone().requires_grad_()

    def loss(e, w):
        out = arcface_head(e, w, inputs["labels"], inputs["ui_center"], backend=backend, reduction=reduction,
                           scale=4.0)
        return out.loss if reduction != "none" else (out.loss * torch.linspace(0.5, 1.5, 5, dtype=out.loss.dtype)).sum()

    return loss, (emb, protos)


def aux_case(backend: str):
    inputs = aux_inputs(6, 4, seed=9, dtype=torch.float64 if backend != "triton" else torch.float32)
    pred = inputs["ri_pred"].clone().requires_grad_()
    attn = inputs["attn"].clone().requires_grad_()

    def loss(p, a):
        return ree_aux_loss(p, inputs["ri_target"], inputs["mu_ui"], attn=a, embeddings=inputs["embeddings"],
                            ui_center=inputs["ui_center"], recognizable=inputs["recognizable"], beta=0.3,
                            backend=backend).total

    return loss, (pred, attn)


CASES = {"head mean": lambda b: head_case(b, "mean"), "head none": lambda b: head_case(b, "none"),
         "aux": aux_case}
REFUSING_OP = {("cpu", "head mean"): "ree::head_forward_with_grad", ("cpu", "head none"): "ree::head_forward",
               ("cpu", "aux"): "ree::aux_forward", ("triton", "head mean"): "ree::triton_head_forward",
               ("triton", "head none"): "ree::triton_head_forward", ("triton", "aux"): "ree::triton_aux_forward"}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("backend", HERE)
def test_double_backward_is_correct_or_refused(backend, case):
    loss, inputs = CASES[case](backend)
    if backend == "reference":
        assert torch.autograd.gradgradcheck(loss, inputs)
        return
    first = torch.autograd.grad(loss(*inputs), inputs)  # once is fine
    assert all(torch.isfinite(g).all() for g in first)
    with pytest.raises(RuntimeError, match=rf"{REFUSING_OP[backend, case]} can be differentiated once only.*"
                                           r"backend='reference'"):
        torch.autograd.grad(loss(*inputs), inputs, create_graph=True)


def test_the_eager_cpu_backward_scales_the_saved_gradients_in_place(monkeypatch):
    """One C × D gradient at the peak (docs/design.md): the backward of head_forward_with_grad
    returns its saved gradient, scaled in place, unless the graph is kept for another backward."""
    import ree_kernels.head as head

    saved = []

    def spy(backend, name):
        op = backends.kernel_op(backend, name)

        def call(*args):
            out = op(*args)
            saved.append(out[7])
            return out

        return call if name == "head_forward_with_grad" else op

    monkeypatch.setattr(head, "kernel_op", spy)
    inputs = head_inputs(9, 40, 6, seed=13)
    protos = inputs["prototypes"].clone().requires_grad_()
    kept = arcface_head(inputs["embeddings"], protos, inputs["labels"], backend="cpu").loss
    first = torch.autograd.grad(kept * 3.0, protos, retain_graph=True)[0]
    second = torch.autograd.grad(kept * 3.0, protos)[0]
    assert first.data_ptr() != saved[0].data_ptr() and torch.equal(first, second)
    assert second.data_ptr() == saved[0].data_ptr(), "the last backward must scale in place"
    assert torch.equal(second, first)


# --------------------------------------------------------------------------------------------
# torch.library.opcheck on every registered op
# --------------------------------------------------------------------------------------------

def opcheck_samples() -> Dict[str, List[tuple]]:
    """Small inputs for each torch.ops.ree op. No ignored row and always a UI centre: opcheck
    compares eager and traced outputs without equal_nan, and an ignored row's statistics, or
    cos_ui without a centre, are NaN."""
    g = generator(10)
    emb = torch.randn(5, 8, generator=g).requires_grad_()
    protos = torch.randn(11, 8, generator=g).requires_grad_()
    labels = torch.tensor([0, 3, 10, 2, 4])
    center = torch.randn(8, generator=g)
    options = (64.0, 0.5, "arcface", -100, 0, 0.0, center, "product")
    pred = torch.randn(5, generator=g).requires_grad_()
    attn = torch.randn(5, 8, generator=g).requires_grad_()
    aux = [(pred, torch.randn(5, generator=g), torch.tensor(0.1), attn, torch.randn(5, 8, generator=g),
            torch.randn(8, generator=g), torch.tensor([True, False, True, True, False]), 0.2, 0.75),
           (pred, torch.randn(5, generator=g), torch.tensor(0.1), None, None, None, None, 0.2, 0.75)]
    samples: Dict[str, List[tuple]] = {}
    for prefix in ("",) + (("triton_",) if backends.TRITON_USABLE else ()):
        lse = getattr(torch.ops.ree, f"{prefix}head_forward")(emb, protos, labels, *options)[4].detach()
        samples[f"{prefix}head_forward"] = [(emb, protos, labels, *options),
                                            (emb, protos, labels, 30.0, 0.3, "cosface", -100, 16, 0.0, center,
                                             "crfiqa")]
        samples[f"{prefix}head_backward"] = [(emb.detach(), protos.detach(), labels, lse, torch.rand(5, generator=g),
                                              64.0, 0.5, "arcface", 0, 0.0)]
        samples[f"{prefix}aux_forward"] = aux
    samples["head_forward_with_grad"] = [(emb, protos, labels, torch.full((5,), 0.2), *options)]
    return samples


def test_every_registered_op_has_an_opcheck_sample():
    registered = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("ree::")}
    assert registered == set(opcheck_samples())


@pytest.mark.parametrize("name", sorted(opcheck_samples()))
def test_opcheck(name):
    for args in opcheck_samples()[name]:
        torch.library.opcheck(getattr(torch.ops.ree, name), args)


# --------------------------------------------------------------------------------------------
# Differentiable statistics
# --------------------------------------------------------------------------------------------

def undetached_statistics(emb, protos, labels, ui_center, ri_form, ignore_index=-100):
    """The statistics from the B × C cosines without detaching (the reference's formulas with a
    gradient): cos_pos at the label, cos_neg the maximum over the other classes, cos_ui, and the
    RI of these. The RI's inputs are finite on rows without a label (cos_label is 0 there), as a
    NaN inside would turn their zero gradient into NaN."""
    logits = reference.arcface_logits(emb, protos, labels, ignore_index=ignore_index)
    cos_neg, _ = logits.cos.masked_fill(logits.target, -math.inf).max(1)
    cos_neg = torch.where(cos_neg == -math.inf, -1.0, cos_neg)
    cos_ui = None if ui_center is None else reference.cosine_to_ui(emb, ui_center)
    ri = reference.recognizability_index(logits.cos_label, cos_neg, cos_ui, ri_form, detach=False)
    nan_where = lambda x: torch.where(logits.has_target, x, math.nan)  # noqa: E731
    return (nan_where(logits.cos_label), cos_neg,
            torch.full_like(cos_neg, math.nan) if cos_ui is None else cos_ui, nan_where(ri))


def statistic_objective(stats, weights):
    """Σ_k Σ_i weights[k, i]·stat_k,i over the defined (non-NaN) entries."""
    return sum((w * torch.where(torch.isnan(s), 0.0, s)).sum() for s, w in zip(stats, weights))


def statistic_gradients(inputs, dtype, ri_form, backend=None):
    """(statistics, gradients of statistic_objective) by arcface_head(differentiable_stats=True)
    on `backend`, or by undetached_statistics when backend is None. On a backend, it also checks
    that the option changes no value and that the statistics carry no gradient without it."""
    emb = inputs["embeddings"].to(dtype).requires_grad_()
    protos = inputs["prototypes"].to(dtype).requires_grad_()
    ui = None if inputs["ui_center"] is None else inputs["ui_center"].to(dtype).requires_grad_()
    if backend is None:
        stats = undetached_statistics(emb, protos, inputs["labels"], ui, ri_form)
    else:
        outs = [arcface_head(emb, protos, inputs["labels"], ui, ri_form=ri_form, backend=backend,
                             differentiable_stats=flag) for flag in (False, True)]
        assert not any(t.requires_grad for t in outs[0][1:]), "the statistics carry no gradient by default"
        for name in reference.HeadOutput._fields:
            plain, with_grad = (getattr(out, name).detach() for out in outs)
            assert torch.equal(plain.nan_to_num(7.0), with_grad.nan_to_num(7.0)), f"{name} changed value"
        stats = (outs[1].cos_pos, outs[1].cos_neg, outs[1].cos_ui, outs[1].ri)
    weights = torch.rand(4, emb.shape[0], generator=generator(11), dtype=torch.float64).to(stats[0].dtype) - 0.5
    wrt = [t for t in (emb, protos, ui) if t is not None]
    return stats, torch.autograd.grad(statistic_objective(stats, weights), wrt)


STATS_CASES = {
    "planted, ignored rows": dict(plant=("peaky", "opposite"), ignored=3, ri_form="product"),
    "C = 1": dict(classes=1, ignored=2, ri_form="ratio"),
    "no ui_center": dict(ui_center=False, ignored=1, ri_form="sum"),
}


@pytest.mark.parametrize("case", sorted(STATS_CASES))
@pytest.mark.parametrize("backend", HERE)
def test_differentiable_statistics_match_the_undetached_reference(backend, case):
    """Gradients of a mix of the four statistics, held to docs/spec.md §5 against the statistics
    of the B × C cosines without detaching (gt in float64, pt in the dtype); every gradient
    finite although ignored rows have NaN statistics."""
    options = dict(STATS_CASES[case])
    form = options.pop("ri_form")
    batch, classes, dim = SHAPES[backend]
    inputs = head_inputs(batch, options.pop("classes", classes), dim, seed=12, dtype=torch.float64, **options)
    gt_stats, gt = statistic_gradients(inputs, torch.float64, form)
    for dtype in [d for d in (torch.float64, torch.float32) if d in backends.KERNEL_DTYPES[backend]]:
        stats, ours = statistic_gradients(inputs, dtype, form, backend)
        pt_stats, pt = statistic_gradients(inputs, dtype, form)
        for name, s, p, g in zip(("cos_pos", "cos_neg", "cos_ui", "ri"), stats, pt_stats, gt_stats):
            assert_spec_close(s, p, g, FORWARD_TOL[dtype], f"{dtype} {name}")
        for name, o, p, g in zip(("embeddings", "prototypes", "ui_center"), ours, pt, gt):
            assert bool(torch.isfinite(o).all()), f"{dtype} grad {name} is not finite"
            assert_spec_close(o, p, g, GRAD_TOL[dtype], f"{dtype} grad {name}")


# --------------------------------------------------------------------------------------------
# The public API documents what it raises
# --------------------------------------------------------------------------------------------

def test_public_functions_document_what_they_raise():
    import ree_kernels.distributed as distributed

    public = ([getattr(ree_kernels, n) for n in ree_kernels.__all__]
              + [getattr(distributed, n) for n in distributed.__all__])
    public += [backends.resolve_backend, backends.chunk_size_for, validation.validate_head_inputs,
               validation.validate_aux_inputs, validation.validate_kernel_options]
    missing = [obj.__name__ for obj in public
               if (inspect.isfunction(obj) or (inspect.isclass(obj) and issubclass(obj, torch.nn.Module)))
               and "Raises:" not in (inspect.getdoc(obj) or "")]
    assert missing == []
    for output in (reference.HeadOutput, reference.AuxOutput):
        doc = inspect.getdoc(output)
        assert all(f"{field}:" in doc for field in output._fields), output.__name__
