"""The reference against an independent, naive per-row implementation written from docs/spec.md §1–§3
with Python floats and the math module (float64), plus gradchecks of the public ops."""
import math

import pytest
import torch

from ree_kernels import arcface_head, ree_aux_loss, reference
from support import aux_inputs, head_inputs


def naive_phi(c: float, mode: str, m: float) -> float:
    if mode == "cosface":
        return c - m
    # cos(θ + m) = c·cos m − sin θ·sin m, with the spec's floor sin θ ≥ 1e-6 (docs/method.md).
    shifted = c * math.cos(m) - math.sqrt(max(1 - c * c, 1e-12)) * math.sin(m)
    if mode == "arcface":
        return shifted if c > math.cos(math.pi - m) else c - m * math.sin(m)
    if mode == "arcface_easy":
        return shifted if c > 0 else c
    return shifted  # arcface_st: no fallback


def naive_ri(cp: float, cn: float, cu, form: str) -> float:
    dp, dn = 1 - cp, 1 - cn
    du = 1.0 if cu is None else 1 - cu
    if form == "product":
        return du * (dn - dp)
    if form == "ratio":
        return du * dn / max(dp, 1e-6)
    if form == "crfiqa":  # CR-FIQA's certainty ratio: no UI term
        return cp / (cn + 1 + 1e-6)
    return du + dn - dp


def unit(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / max(n, 1e-12) for x in v]


def naive_head(emb, protos, labels, ui, *, scale, margin, mode, form, weights, ignore_index, reduction):
    """Row by row: cosines, logits with the margin at the label, log-sum-exp, statistics."""
    emb, protos, labels = emb.tolist(), protos.tolist(), labels.tolist()
    w_hat = [unit(w) for w in protos]
    u_hat = None if ui is None else unit(ui.tolist())
    losses, cos_pos, cos_neg, neg_idx, cos_ui, ri, lse = [], [], [], [], [], [], []
    for i, v in enumerate(emb):
        v_hat = unit(v)
        cos = [min(1.0, max(-1.0, sum(a * b for a, b in zip(v_hat, w)))) for w in w_hat]
        y = labels[i]
        counted = y != ignore_index
        logits = [scale * c for c in cos]
        if counted:
            logits[y] = scale * naive_phi(cos[y], mode, margin)
        top = max(logits)
        row_lse = top + math.log(sum(math.exp(x - top) for x in logits))
        best, best_j = -math.inf, -1
        for j, c in enumerate(cos):
            if counted and j == y:
                continue
            if c > best:  # strict: the lowest index wins ties
                best, best_j = c, j
        if best_j < 0:
            best = -1.0
        cu = None if u_hat is None else min(1.0, max(-1.0, sum(a * b for a, b in zip(v_hat, u_hat))))
        losses.append(row_lse - logits[y] if counted else 0.0)
        cos_pos.append(cos[y] if counted else math.nan)
        cos_neg.append(best)
        neg_idx.append(best_j)
        cos_ui.append(math.nan if cu is None else cu)
        ri.append(naive_ri(cos[y], best, cu, form) if counted else math.nan)
        lse.append(row_lse)
    w = [0.0 if labels[i] == ignore_index else (1.0 if weights is None else float(weights[i]))
         for i in range(len(labels))]
    weighted = [a * b for a, b in zip(w, losses)]
    if reduction == "none":
        loss = torch.tensor(weighted, dtype=torch.float64)
    elif reduction == "sum":
        loss = torch.tensor(sum(weighted), dtype=torch.float64)
    else:
        loss = torch.tensor(sum(weighted) / sum(w) if sum(w) != 0 else 0.0, dtype=torch.float64)
    t = lambda xs, dt=torch.float64: torch.tensor(xs, dtype=dt)  # noqa: E731
    return loss, t(cos_pos), t(cos_neg), t(neg_idx, torch.int64), t(cos_ui), t(ri), t(lse)


CASES = [
    dict(ignored=0, weights=False, plant=("peaky", "opposite")),
    dict(ignored=3, weights=True, plant=("peaky", "opposite", "zero_row")),
]


@pytest.mark.parametrize("mode", reference.MARGIN_MODES)
@pytest.mark.parametrize("form", reference.RI_FORMS)
@pytest.mark.parametrize("reduction", reference.REDUCTIONS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_reference_matches_naive_loop(mode, form, reduction, case):
    inputs = head_inputs(11, 23, 9, seed=100 + case, dtype=torch.float64, **CASES[case])
    out = arcface_head(inputs["embeddings"], inputs["prototypes"], inputs["labels"], inputs["ui_center"],
                       scale=32.0, margin=0.4, margin_mode=mode, ri_form=form,
                       sample_weight=inputs["sample_weight"], reduction=reduction, backend="reference")
    expected = naive_head(inputs["embeddings"], inputs["prototypes"], inputs["labels"], inputs["ui_center"],
                          scale=32.0, margin=0.4, mode=mode, form=form, weights=inputs["sample_weight"],
                          ignore_index=-100, reduction=reduction)
    for name, got, want in zip(("loss", "cos_pos", "cos_neg", "neg_index", "cos_ui", "ri", "lse"), out, expected):
        if name == "neg_index":
            assert torch.equal(got, want), name
        else:
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, equal_nan=True, msg=name)


def test_opposite_row_takes_the_linear_fallback():
    """W_y = −v: θ = π, so arcface uses c − m·sin m, not cos(θ + m)."""
    inputs = head_inputs(4, 5, 6, seed=3, dtype=torch.float64, plant=("opposite",), ui_center=False)
    out = arcface_head(inputs["embeddings"], inputs["prototypes"], inputs["labels"], reduction="none",
                       backend="reference")
    assert out.cos_pos[1] == pytest.approx(-1.0)
    phi = -1.0 - 0.5 * math.sin(0.5)
    expected = float(out.lse[1]) - 64.0 * phi
    assert float(out.loss[1]) == pytest.approx(expected, rel=1e-12)


def test_all_ignored_and_zero_weights_give_zero_loss_and_gradients():
    inputs = head_inputs(6, 7, 5, seed=4, dtype=torch.float64, ignored=6)
    emb = inputs["embeddings"].requires_grad_()
    protos = inputs["prototypes"].requires_grad_()
    out = arcface_head(emb, protos, inputs["labels"], backend="reference")
    out.loss.backward()
    assert float(out.loss.detach()) == 0.0
    assert float(emb.grad.abs().max()) == 0.0 and float(protos.grad.abs().max()) == 0.0
    inputs = head_inputs(6, 7, 5, seed=5, dtype=torch.float64, weights=True)
    out = arcface_head(inputs["embeddings"], inputs["prototypes"], inputs["labels"],
                       sample_weight=torch.zeros(6, dtype=torch.float64), backend="reference")
    assert float(out.loss) == 0.0


def test_single_class_has_no_negative():
    inputs = head_inputs(5, 1, 4, seed=6, dtype=torch.float64, plant=())
    out = arcface_head(inputs["embeddings"], inputs["prototypes"], inputs["labels"], backend="reference")
    assert torch.equal(out.neg_index, torch.full((5,), -1)) and bool((out.cos_neg == -1).all())


@pytest.mark.parametrize("mode", ["arcface", "arcface_easy", "cosface"])
@pytest.mark.parametrize("reduction", reference.REDUCTIONS)
def test_gradcheck_head(mode, reduction):
    inputs = head_inputs(5, 7, 4, seed=7, dtype=torch.float64, ignored=1, weights=True, plant=())
    emb = inputs["embeddings"].requires_grad_()
    protos = inputs["prototypes"].requires_grad_()

    def loss(e, w):
        return arcface_head(e, w, inputs["labels"], inputs["ui_center"], scale=8.0, margin=0.3, margin_mode=mode,
                            sample_weight=inputs["sample_weight"], reduction=reduction, backend="reference").loss

    assert torch.autograd.gradcheck(loss, (emb, protos))


def test_straight_through_gradient_is_the_identity():
    """arcface_st: forward cos(θ + m), gradient as if φ(c) = c."""
    c = torch.tensor([0.3, -0.2, 0.9], dtype=torch.float64, requires_grad=True)
    phi = reference.margin_logit(c, "arcface_st", 0.5)
    torch.testing.assert_close(phi, torch.cos(torch.acos(c.detach()) + 0.5), rtol=1e-12, atol=1e-12)
    phi.sum().backward()
    torch.testing.assert_close(c.grad, torch.ones(3, dtype=torch.float64))


def naive_aux(pred, target, mu, tau, beta, attn, emb, ui, keep, weights):
    pred, target = pred.tolist(), target.tolist()
    keep = [True] * len(pred) if keep is None else keep.tolist()
    l1 = []
    for p, t in zip(pred, target):
        d = abs(p - t)
        l1.append(0.5 * d * d / beta if d < beta else d - 0.5 * beta)
    kept = [i for i, k in enumerate(keep) if k]
    idl = sum(max(0.0, mu + tau - pred[i]) for i in kept) / len(kept) if kept else 0.0
    mse = 0.0
    if attn is not None and kept:
        u = unit(ui.tolist())
        total = 0.0
        for i in kept:
            v = unit(emb[i].tolist())
            along = sum(a * b for a, b in zip(v, u))
            target_dir = unit([a - along * b for a, b in zip(v, u)])
            total += sum((a - b) ** 2 for a, b in zip(attn[i].tolist(), target_dir))
        mse = total / (len(kept) * attn.shape[1])
    l1m = sum(l1) / len(l1)
    return weights[0] * l1m + weights[1] * idl + weights[2] * mse, l1m, idl, mse


@pytest.mark.parametrize("recognizable", ["mixed", None, "none"])
@pytest.mark.parametrize("with_attn", [True, False])
def test_aux_reference_matches_naive_loop(recognizable, with_attn):
    inputs = aux_inputs(9, 6, seed=8, dtype=torch.float64, attn=with_attn, recognizable=recognizable)
    out = ree_aux_loss(inputs["ri_pred"], inputs["ri_target"], inputs["mu_ui"], tau=0.3, beta=0.5,
                       attn=inputs["attn"], embeddings=inputs["embeddings"], ui_center=inputs["ui_center"],
                       recognizable=inputs["recognizable"], weights=(1.0, 0.7, 2.0), backend="reference")
    expected = naive_aux(inputs["ri_pred"], inputs["ri_target"], float(inputs["mu_ui"]), 0.3, 0.5, inputs["attn"],
                         inputs["embeddings"], inputs["ui_center"], inputs["recognizable"], (1.0, 0.7, 2.0))
    for name, got, want in zip(("total", "l1", "id", "mse"), out, expected):
        assert float(got) == pytest.approx(want, rel=1e-12, abs=1e-12), name


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_aux(backend):
    inputs = aux_inputs(6, 5, seed=9, dtype=torch.float64)
    pred = inputs["ri_pred"].requires_grad_()
    attn = inputs["attn"].requires_grad_()

    def losses(p, a):
        out = ree_aux_loss(p, inputs["ri_target"], inputs["mu_ui"], attn=a, embeddings=inputs["embeddings"],
                           ui_center=inputs["ui_center"], recognizable=inputs["recognizable"],
                           weights=(1.0, 0.5, 2.0), backend=backend)
        return out.total, out.l1, out.id, out.mse

    assert torch.autograd.gradcheck(losses, (pred, attn))


def test_gradients_flow_only_into_ri_pred_and_attn():
    inputs = aux_inputs(6, 5, seed=10, dtype=torch.float64)
    for key in ("ri_pred", "ri_target", "mu_ui", "attn", "embeddings", "ui_center"):
        inputs[key].requires_grad_()
    out = ree_aux_loss(inputs["ri_pred"], inputs["ri_target"], inputs["mu_ui"], attn=inputs["attn"],
                       embeddings=inputs["embeddings"], ui_center=inputs["ui_center"], backend="reference")
    grads = torch.autograd.grad(out.total, [inputs[k] for k in ("ri_pred", "ri_target", "mu_ui", "attn",
                                                                  "embeddings", "ui_center")], allow_unused=True)
    assert grads[0] is not None and grads[3] is not None
    assert all(g is None for g in (grads[1], grads[2], grads[4], grads[5]))
