"""Bad input raises the documented error naming the argument (docs/spec.md §2), for every backend."""
import math

import pytest
import torch

from ree_kernels import arcface_head, ree_aux_loss
from support import aux_inputs, head_inputs

BACKENDS = ["reference", "cpu", "auto"]


def head_args(**overrides):
    inputs = head_inputs(6, 9, 5, seed=1)
    args = dict(embeddings=inputs["embeddings"], prototypes=inputs["prototypes"], labels=inputs["labels"],
                ui_center=inputs["ui_center"])
    options = {}
    for key, value in overrides.items():
        (args if key in args else options)[key] = value
    return args, options


HEAD_CASES = [
    (dict(embeddings=torch.randn(6)), ValueError, "embeddings"),
    (dict(embeddings=[[1.0]]), TypeError, "embeddings"),
    (dict(embeddings=torch.randn(6, 5).to(torch.int32)), TypeError, "embeddings"),
    (dict(prototypes=torch.randn(9, 4)), ValueError, "prototypes"),
    (dict(prototypes=torch.randn(9, 5, dtype=torch.float64)), TypeError, "prototypes"),
    (dict(prototypes=torch.randn(0, 5)), ValueError, "prototypes"),
    (dict(embeddings=torch.randn(0, 5), labels=torch.zeros(0, dtype=torch.int64)), ValueError, "embeddings"),
    (dict(labels=torch.zeros(6, dtype=torch.int32)), TypeError, "labels"),
    (dict(labels=torch.zeros(5, dtype=torch.int64)), ValueError, "labels"),
    (dict(labels=torch.tensor([0, 1, 2, 9, 0, 1])), ValueError, "labels"),
    (dict(labels=torch.tensor([0, 1, 2, -1, 0, 1])), ValueError, "labels"),
    (dict(ui_center=torch.randn(4)), ValueError, "ui_center"),
    (dict(ui_center=torch.randn(5, 1)), ValueError, "ui_center"),
    (dict(sample_weight=torch.ones(4)), ValueError, "sample_weight"),
    (dict(scale=0.0), ValueError, "scale"),
    (dict(scale=math.inf), ValueError, "scale"),
    (dict(scale=1000.5), ValueError, r"scale must lie in \(0, 1000\]"),
    (dict(scale=1e39), ValueError, "scale"),
    (dict(scale=True), TypeError, "scale"),
    (dict(margin=math.nan), ValueError, "margin"),
    (dict(margin=-0.1), ValueError, "margin"),
    (dict(margin=math.pi / 2), ValueError, r"margin must lie in \[0, 1.5708\)"),
    (dict(margin=1e39), ValueError, "margin"),
    (dict(margin_mode="sphereface"), ValueError, "margin_mode"),
    (dict(ri_form="max"), ValueError, "ri_form"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
    (dict(ignore_index=2 ** 70), ValueError, "ignore_index"),
    (dict(backend="cudnn"), ValueError, "backend"),
    (dict(chunk_size=-1), ValueError, "chunk_size"),
    (dict(chunk_size=2 ** 70), ValueError, "chunk_size"),
    (dict(chunk_size=64.0), TypeError, "chunk_size"),
    (dict(differentiable_stats=1), TypeError, "differentiable_stats"),
    (dict(grad_filter_eps=1e-3), ValueError, "grad_filter_eps"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("overrides,error,name", HEAD_CASES)
def test_head_rejects_bad_input(backend, overrides, error, name):
    overrides = dict(overrides)
    overrides.setdefault("backend", backend)
    args, options = head_args(**overrides)
    with pytest.raises(error, match=name):
        arcface_head(**args, **options)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_ends_of_every_closed_range_are_accepted(backend):
    args, _ = head_args()
    assert torch.isfinite(arcface_head(**args, scale=1000.0, margin=0.0, backend=backend).loss)
    inputs = aux_inputs(6, 5, seed=2)
    for tau, beta in ((0.0, 10.0), (10.0, 1e-3)):
        out = ree_aux_loss(inputs["ri_pred"], inputs["ri_target"], -3.4e38, tau=tau, beta=beta, backend=backend)
        assert torch.isfinite(out.l1)


def test_head_rejects_mixed_devices():
    args, _ = head_args()
    args["labels"] = args["labels"].to("meta")
    with pytest.raises(ValueError, match="labels"):
        arcface_head(**args)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_unavailable_backend_says_how_to_get_it(backend, monkeypatch):
    import ree_kernels.backends as backends

    monkeypatch.setattr(backends, "TRITON_INTERPRET", False)
    args, _ = head_args()
    with pytest.raises(RuntimeError, match="CUDA|TRITON_INTERPRET"):
        arcface_head(**args, backend=backend)


def test_missing_extension_error_names_the_build_command(monkeypatch):
    import ree_kernels.backends as backends

    monkeypatch.setattr(backends, "EXTENSION_ERROR", "No module named 'ree_kernels._C'")
    args, _ = head_args()
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation -e ."):
        arcface_head(**args, backend="cpu")
    # auto falls back to the reference
    assert torch.isfinite(arcface_head(**args).loss)


def test_ignore_index_inside_the_class_range_ignores_those_rows():
    args, _ = head_args()
    out = arcface_head(**args, ignore_index=0, reduction="none", backend="reference")
    assert bool((out.loss[args["labels"] == 0] == 0).all())


AUX_CASES = [
    (dict(ri_pred=torch.randn(6, 1)), ValueError, "ri_pred"),
    (dict(ri_pred=torch.zeros(0), ri_target=torch.zeros(0)), ValueError, "ri_pred"),
    (dict(ri_target=torch.randn(5)), ValueError, "ri_target"),
    (dict(mu_ui=torch.zeros(2)), ValueError, "mu_ui"),
    (dict(mu_ui="0.1"), TypeError, "mu_ui"),
    (dict(mu_ui=1e39), ValueError, "mu_ui"),
    (dict(mu_ui=math.nan), ValueError, "mu_ui"),
    (dict(tau=math.nan), ValueError, "tau"),
    (dict(tau=-0.1), ValueError, "tau"),
    (dict(tau=10.5), ValueError, r"tau must lie in \[0, 10\]"),
    (dict(tau=1e39), ValueError, "tau"),
    (dict(beta=0.0), ValueError, "beta"),
    (dict(beta=10.5), ValueError, r"beta must lie in \(0, 10\]"),
    (dict(beta=math.inf), ValueError, "beta"),
    (dict(embeddings=None), ValueError, "attn"),
    (dict(attn=torch.randn(6, 4)), ValueError, "attn|embeddings"),
    (dict(ui_center=torch.randn(4)), ValueError, "ui_center"),
    (dict(recognizable=torch.ones(6)), TypeError, "recognizable"),
    (dict(recognizable=torch.ones(5, dtype=torch.bool)), ValueError, "recognizable"),
    (dict(weights=(1.0, 1.0)), ValueError, "weights"),
    (dict(weights=(1.0, 1e39, 1.0)), ValueError, r"weights\[1\]"),
    (dict(weights=(1.0, 1.0, math.nan)), ValueError, r"weights\[2\]"),
    (dict(backend="fast"), ValueError, "backend"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("overrides,error,name", AUX_CASES)
def test_aux_rejects_bad_input(backend, overrides, error, name):
    inputs = aux_inputs(6, 5, seed=2)
    args = dict(ri_pred=inputs["ri_pred"], ri_target=inputs["ri_target"], mu_ui=inputs["mu_ui"],
                attn=inputs["attn"], embeddings=inputs["embeddings"], ui_center=inputs["ui_center"],
                recognizable=inputs["recognizable"], backend=backend)
    args.update(overrides)
    with pytest.raises(error, match=name):
        ree_aux_loss(args.pop("ri_pred"), args.pop("ri_target"), args.pop("mu_ui"), **args)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_zero_norm_rows_stay_finite(backend):
    inputs = head_inputs(6, 9, 5, seed=3, plant=("zero_row",))
    inputs["ui_center"] = torch.zeros(5)
    emb = inputs["embeddings"].requires_grad_()
    protos = inputs["prototypes"].clone()
    protos[4] = 0.0
    protos.requires_grad_()
    out = arcface_head(emb, protos, inputs["labels"], inputs["ui_center"], backend=backend)
    out.loss.backward()
    outputs = (out.loss, out.cos_neg, out.cos_ui, out.lse, emb.grad, protos.grad)
    assert all(bool(torch.isfinite(t).all()) for t in outputs)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_nan_and_inf_inputs_give_non_finite_loss(backend):
    for bad in (math.nan, math.inf):
        inputs = head_inputs(6, 9, 5, seed=4)
        inputs["embeddings"][2, 1] = bad
        out = arcface_head(inputs["embeddings"], inputs["prototypes"], inputs["labels"], backend=backend)
        assert not bool(torch.isfinite(out.loss))
        aux = aux_inputs(6, 5, seed=5)
        aux["ri_pred"][0] = bad
        assert not bool(torch.isfinite(ree_aux_loss(aux["ri_pred"], aux["ri_target"], 0.1, backend=backend).total))
