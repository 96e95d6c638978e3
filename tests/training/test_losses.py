"""REELoss: the composition of docs/spec.md §1 on the ops, where gradients flow, the baseline switch."""
import math

import pytest
import torch

from ree.losses import REELoss
from ree_kernels import reference

B, UI, D, C = 12, 4, 16, 7


def inputs(seed=0, dtype=torch.float64, unlabeled_uis=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(B + UI, D, generator=g, dtype=dtype).requires_grad_()
    ri_pred = (0.3 * torch.randn(B + UI, generator=g, dtype=dtype)).requires_grad_()
    attn = torch.randn(B + UI, D, generator=g, dtype=dtype).requires_grad_()
    labels = torch.randint(0, C, (B + UI,), generator=g)
    if unlabeled_uis:
        labels[B + UI - unlabeled_uis:] = -100
    is_ui = torch.arange(B + UI) >= B
    return emb, ri_pred, attn, labels, is_ui


def make_loss(**kwargs):
    torch.manual_seed(1)
    kwargs.setdefault("weights", (0.7, 1.3, 0.9))
    return REELoss(D, C, scale=16.0, margin=0.4, tau=0.3, momentum=0.5, **kwargs).double()


def hand_composition(loss, emb, ri_pred, attn, labels, is_ui, center, mu):
    """docs/spec.md §1 composed by hand from the reference ops, given the tracker's new state."""
    rec = ~is_ui
    head = reference.arcface_head(emb, loss.head.weight, labels, center, scale=16.0, margin=0.4,
                                  sample_weight=rec.double())
    keep = labels != -100
    aux = reference.ree_aux_loss(ri_pred[keep], head.ri[keep], mu, tau=0.3, beta=0.75, attn=attn[keep],
                                 embeddings=emb[keep], ui_center=center, recognizable=rec[keep],
                                 weights=loss.weights)
    return head, aux


@pytest.mark.parametrize("unlabeled_uis", [0, 2])
def test_components_match_hand_composition(unlabeled_uis):
    emb, ri_pred, attn, labels, is_ui = inputs(unlabeled_uis=unlabeled_uis)
    loss = make_loss()
    # a tracker that has seen UIs before: the update blends with momentum 0.5
    prior_center = torch.randn(D, generator=torch.Generator().manual_seed(5))
    loss.tracker.update(prior_center[None].double(), torch.tensor([0.25], dtype=torch.float64))
    out = loss(emb, labels, ri_pred, attn, is_ui)

    batch_center = reference.normalize(emb[is_ui].detach()).mean(0)
    center = 0.5 * reference.normalize(prior_center.double()) + 0.5 * batch_center
    mu = 0.5 * 0.25 + 0.5 * ri_pred[is_ui].detach().mean()
    torch.testing.assert_close(loss.tracker.center.double(), center, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss.tracker.mu.double(), mu, rtol=1e-6, atol=1e-6)

    head, aux = hand_composition(loss, emb, ri_pred, attn, labels, is_ui,
                                 loss.tracker.center.double(), loss.tracker.mu.double())
    torch.testing.assert_close(out.cls, head.loss.detach())
    torch.testing.assert_close(out.l1, aux.l1.detach())
    torch.testing.assert_close(out.id, aux.id.detach())
    torch.testing.assert_close(out.mse, aux.mse.detach())
    torch.testing.assert_close(out.total, head.loss + aux.total)
    assert out.mse > 0 and out.id > 0 and out.l1 > 0
    assert math.isfinite(float(out.total.detach()))
    # and the gradients of the whole objective agree
    got = torch.autograd.grad(out.total, (emb, ri_pred, attn, loss.head.weight))
    want = torch.autograd.grad(head.loss + aux.total, (emb, ri_pred, attn, loss.head.weight))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_first_batch_sets_the_ui_centre_before_the_losses():
    emb, ri_pred, attn, labels, is_ui = inputs(seed=3)
    loss = make_loss()
    assert loss.tracker.center_or_none() is None
    out = loss(emb, labels, ri_pred, attn, is_ui)
    torch.testing.assert_close(loss.tracker.center.double(), reference.normalize(emb[is_ui].detach()).mean(0),
                               rtol=1e-6, atol=1e-6)
    assert out.mse > 0  # the PAM target needs the centre, which the first batch already has


def test_no_uis_yet_means_no_centre_and_no_mse():
    emb, ri_pred, attn, labels, _ = inputs(seed=4)
    loss = make_loss()
    out = loss(emb, labels, ri_pred, attn, torch.zeros(B + UI, dtype=torch.bool))
    assert float(out.mse) == 0.0 and not bool(loss.tracker.initialized)
    head = reference.arcface_head(emb, loss.head.weight, labels, scale=16.0, margin=0.4)
    torch.testing.assert_close(out.cls, head.loss.detach())


def test_aux_losses_send_no_gradient_into_the_embeddings():
    # ri_target, the UI centre and the PAM target are detached: with separate leaves for ξ̂ and
    # v^attn, the embeddings' gradient is L_cls's alone, whatever the aux weights.
    grads = []
    for weights in ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (5.0, 0.0, 3.0)):
        emb, ri_pred, attn, labels, is_ui = inputs(seed=6)
        loss = make_loss(weights=weights)
        out = loss(emb, labels, ri_pred, attn, is_ui)
        grads.append(torch.autograd.grad(out.total, emb)[0])
        assert not out.ri.requires_grad and not out.cos_pos.requires_grad
        assert not loss.tracker.center.requires_grad
    torch.testing.assert_close(grads[0], grads[1])
    torch.testing.assert_close(grads[0], grads[2])


def test_uis_get_no_classification_gradient():
    emb, ri_pred, attn, labels, is_ui = inputs(seed=7)
    loss = make_loss()
    out = loss(emb, labels, ri_pred, attn, is_ui)
    g_emb, g_attn, g_w = torch.autograd.grad(out.total, (emb, attn, loss.head.weight))
    assert torch.count_nonzero(g_emb[is_ui]) == 0
    assert torch.count_nonzero(g_emb[~is_ui]) > 0
    # the UIs are not in L_ID / L_MSE either: the PAM output of a UI gets no gradient
    assert torch.count_nonzero(g_attn[is_ui]) == 0 and torch.count_nonzero(g_attn[~is_ui]) > 0
    # the prototypes see only the recognizable rows
    rec_only = reference.arcface_head(emb[~is_ui], loss.head.weight, labels[~is_ui], scale=16.0, margin=0.4)
    torch.testing.assert_close(g_w, torch.autograd.grad(rec_only.loss, loss.head.weight)[0])


def test_uis_do_feed_l1():
    emb, ri_pred, attn, labels, is_ui = inputs(seed=8)
    loss = make_loss(weights=(1.0, 0.0, 0.0))
    out = loss(emb, labels, ri_pred, attn, is_ui)
    g = torch.autograd.grad(out.total, ri_pred)[0]
    assert torch.count_nonzero(g[is_ui]) == UI


def test_unlabelled_uis_feed_the_tracker_but_not_l1():
    emb, ri_pred, attn, labels, is_ui = inputs(seed=9, unlabeled_uis=2)
    loss = make_loss(weights=(1.0, 1.0, 1.0))
    out = loss(emb, labels, ri_pred, attn, is_ui)
    assert math.isfinite(float(out.total.detach()))
    g = torch.autograd.grad(out.total, ri_pred)[0]
    assert torch.count_nonzero(g[labels == -100]) == 0
    torch.testing.assert_close(loss.tracker.mu.double(), ri_pred[is_ui].detach().mean(), rtol=1e-6, atol=1e-6)


def test_baseline_is_plain_arcface_on_the_same_path():
    emb, ri_pred, attn, labels, is_ui = inputs(seed=10)
    loss = make_loss(method="arcface")
    rec = ~is_ui
    out = loss(emb, labels, ri_pred, attn, is_ui)
    expected = reference.arcface_head(emb[rec], loss.head.weight, labels[rec], scale=16.0, margin=0.4).loss
    torch.testing.assert_close(out.total, expected)
    assert float(out.l1) == float(out.id) == float(out.mse) == 0.0
    assert not bool(loss.tracker.initialized)
    g_ri, g_attn = torch.autograd.grad(out.total, (ri_pred, attn), allow_unused=True)
    assert g_ri is None and g_attn is None
    # no PRM output needed
    torch.testing.assert_close(loss(emb, labels).total, reference.arcface_head(
        emb, loss.head.weight, labels, scale=16.0, margin=0.4).loss)


def test_float32_and_default_weights_run():
    torch.manual_seed(0)
    loss = REELoss(D, C)
    emb, ri_pred, attn, labels, is_ui = inputs(seed=11, dtype=torch.float32)
    out = loss(emb, labels, ri_pred, attn, is_ui)
    assert out.total.dtype == torch.float32 and math.isfinite(float(out.total.detach()))
    out.total.backward()


@pytest.mark.parametrize("kwargs, match", [
    (dict(weights=(1.0, 1.0)), "weights"),
    (dict(weights=(1.0, -1.0, 1.0)), "weights"),
    (dict(beta=0.0), "beta"),
    (dict(momentum=1.0), "momentum"),
    # Refused before the group is used, so a stand-in object is enough here.
    (dict(diversion_target="true", process_group=object()), "class-sharded head"),
])
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        REELoss(D, C, **kwargs)


def test_bad_call_arguments():
    loss = REELoss(D, C)
    emb, ri_pred, attn, labels, is_ui = inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match="is_ui"):
        loss(emb, labels, ri_pred, attn, is_ui[:3])
    with pytest.raises(ValueError, match="ri_pred"):
        loss(emb, labels, None, attn, is_ui)
    with pytest.raises(ValueError, match="labels"):
        loss(emb, labels.clamp_max(C - 1) + 1, ri_pred, attn, is_ui)


def test_crfiqa_regresses_the_certainty_ratio_only():
    emb, ri_pred, attn, labels, is_ui = inputs(seed=12)
    loss = make_loss(method="crfiqa", ri_form="product", beta=0.75)
    rec = ~is_ui
    out = loss(emb[rec], labels[rec], ri_pred[rec], attn[rec])
    head = reference.arcface_head(emb[rec], loss.head.weight, labels[rec], scale=16.0, margin=0.4, ri_form="crfiqa")
    expected_l1 = reference.smooth_l1(ri_pred[rec] - head.ri, 0.5).mean()  # CR-FIQA's β = 0.5
    torch.testing.assert_close(out.total, head.loss + 10.0 * expected_l1)
    torch.testing.assert_close(out.ri, head.ri)
    assert float(out.id) == float(out.mse) == 0.0 and not bool(loss.tracker.initialized)
    assert torch.autograd.grad(out.total, attn, allow_unused=True)[0] is None


def test_diversion_on_the_true_ri_pushes_the_embeddings():
    emb, ri_pred, attn, labels, is_ui = inputs(seed=13)
    predicted = make_loss(weights=(0.0, 1.0, 0.0))
    true = make_loss(weights=(0.0, 1.0, 0.0), diversion_target="true")
    out_p = predicted(emb, labels, ri_pred, attn, is_ui)
    out_t = true(emb, labels, ri_pred, attn, is_ui)
    center = true.tracker.center
    head = reference.arcface_head(emb, true.head.weight, labels, center, scale=16.0, margin=0.4,
                                  sample_weight=(~is_ui).double())
    # the statistics as differentiable functions of the embeddings (the reference's are detached)
    cos = reference.normalize(emb) @ reference.normalize(true.head.weight).T
    cos_pos = cos.gather(1, labels[:, None]).squeeze(1)
    cos_neg = cos.scatter(1, labels[:, None], -2.0).max(1).values
    cos_ui = reference.normalize(emb) @ reference.normalize(center.double())
    torch.testing.assert_close(cos_neg.detach(), head.cos_neg)
    ri = reference.recognizability_index(cos_pos, cos_neg, cos_ui, detach=False)
    keep = ~is_ui
    expected = torch.relu(true.tracker.mu + 0.3 - ri[keep]).mean()
    torch.testing.assert_close(out_t.id, expected.detach())
    torch.testing.assert_close(out_t.total, head.loss + expected)
    g_pred, g_true = torch.autograd.grad(out_t.total, (ri_pred, emb), allow_unused=True)
    assert g_pred is None or torch.count_nonzero(g_pred) == 0  # L_ID no longer trains the PRM
    torch.testing.assert_close(g_true, torch.autograd.grad(head.loss + expected, emb)[0])
    assert float(out_p.id) != float(out_t.id)
