"""The training package's modules: shapes, the layouts, PRM/PAM, ArcFaceHead as a drop-in."""
import pytest
import torch

from ree.models import BACKBONES, PAM, PRM, ArcFaceHead, IResNet, ModelConfig, REEModel, backbone_config, embed
from ree_kernels import reference


def images(batch, size=32, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)).clamp(-1, 1)


def test_small_model_output_shapes():
    torch.manual_seed(0)
    model = REEModel(ModelConfig())
    out = model(images(5))
    assert out.embedding.shape == (5, 128)
    assert out.feature_map.shape == (5, 128, 4, 4)
    assert out.quality.shape == (5,)
    assert out.attn.shape == (5, 128)
    assert all(torch.isfinite(t).all() for t in out)


def test_model_config_embedding_and_input_size():
    config = ModelConfig(arch="small", input_size=64, embedding_size=96)
    model = REEModel(config)
    assert model.input_size == 64 and model.embedding_size == 96
    assert model(images(2, 64)).feature_map.shape == (2, 128, 8, 8)
    assert ModelConfig(arch="r50").resolved_embedding_size == 512
    assert ModelConfig(arch="r50").resolved_input_size == 112


def iresnet_parameter_count(layers, widths, stem, feature_size, dim):
    """insightface's iResNet (IBasicBlock: bn1, conv1 3x3, bn2, prelu, conv2 3x3 strided, bn3;
    1x1 conv + BN shortcut at each stage's first block; bn2, fc, BN1d output), counted by hand."""
    total = 3 * 9 * stem + 2 * stem + stem  # conv1, bn1, prelu
    c_in = stem
    for depth, c in zip(layers, widths):
        for i in range(depth):
            total += 2 * c_in + 9 * c_in * c + 2 * c + c + 9 * c * c + 2 * c
            if i == 0:
                total += c_in * c + 2 * c
            c_in = c
    return total + 2 * c_in + (c_in * feature_size ** 2 + 1) * dim + 2 * dim


def test_iresnet50_layout_matches_insightface():
    torch.manual_seed(0)
    model = REEModel(ModelConfig(arch="r50"))
    core = sum(p.numel() for m in (model.backbone, model.head) for p in m.parameters())
    assert core == iresnet_parameter_count((3, 4, 14, 3), (64, 128, 256, 512), 64, 7, 512)
    assert 43.5e6 < core < 43.7e6  # the "43.6M" usually quoted for insightface's r50
    assert model.backbone.config.feature_size == 7


def test_r18_forward_at_112():
    torch.manual_seed(0)
    model = REEModel(ModelConfig(arch="r18", embedding_size=64)).eval()
    with torch.no_grad():
        out = model(images(2, 112))
    assert out.embedding.shape == (2, 64) and out.feature_map.shape == (2, 512, 7, 7)


@pytest.mark.parametrize("kwargs, match", [
    (dict(arch="r200"), "arch"),
    (dict(input_size=30), "input_size"),
    (dict(embedding_size=0), "embedding_size"),
    (dict(dropout=1.0), "dropout"),
    (dict(pam_reduction=0), "pam_reduction"),
])
def test_model_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)


def test_backbone_rejects_wrong_image_shape():
    model = IResNet(BACKBONES["small"])
    with pytest.raises(ValueError, match="images"):
        model(torch.randn(2, 3, 28, 28))
    with pytest.raises(ValueError, match="images"):
        model(torch.randn(2, 1, 32, 32))


def test_embedding_bn_scale_is_fixed_like_insightface():
    model = REEModel(ModelConfig())
    assert not model.head.features.weight.requires_grad
    assert torch.equal(model.head.features.weight, torch.ones(128))


def test_prm_and_pam_shapes_and_gradients():
    torch.manual_seed(0)
    prm, pam = PRM(16, dropout=0.0), PAM(32, 16)
    v = torch.randn(6, 16, requires_grad=True)
    fmap = torch.randn(6, 32, 3, 3, requires_grad=True)
    q, a = prm(v), pam(fmap)
    assert q.shape == (6,) and a.shape == (6, 16)
    (q.sum() + a.sum()).backward()
    assert v.grad.abs().sum() > 0 and fmap.grad.abs().sum() > 0
    # reduction 16 on 32 channels: a 2-unit bottleneck; on fewer than 16 channels at least 1
    assert pam.channel.mlp[0].out_features == 2
    assert PAM(8, 4).channel.mlp[0].out_features == 1


def test_pam_attention_is_cbam_shaped():
    pam = PAM(32, 8)
    fmap = torch.randn(2, 32, 4, 4)
    with torch.no_grad():
        channel = pam.channel(fmap)
        ratio = channel / fmap
        # channel attention: one weight in (0, 1) per (sample, channel)
        assert torch.allclose(ratio, ratio[:, :, :1, :1].expand_as(ratio), atol=1e-5)
        assert ((ratio > 0) & (ratio < 1)).all()
        spatial = pam.spatial(channel) / channel
        # spatial attention: one weight per (sample, position), shared by the channels
        assert torch.allclose(spatial, spatial[:, :1].expand_as(spatial), atol=1e-5)


def test_embed_flip_fusion_and_modes():
    torch.manual_seed(0)
    model = REEModel(ModelConfig(prm_dropout=0.5))
    model.train()
    x = images(7)
    fused = embed(model, x, flip=True, batch_size=3)
    plain = embed(model, x, flip=False)
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x.flip(3))
    torch.testing.assert_close(fused.embeddings, a.embedding + b.embedding, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain.embeddings, a.embedding, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.plain, a.embedding, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.quality, a.quality, rtol=1e-5, atol=1e-5)  # eval mode: no dropout
    torch.testing.assert_close(fused.norm, a.embedding.norm(dim=1), rtol=1e-5, atol=1e-5)


def test_arcface_head_matches_reference_and_takes_gradients():
    torch.manual_seed(0)
    head = ArcFaceHead(16, 11, scale=32.0, margin=0.3)
    emb = torch.randn(9, 16, requires_grad=True)
    labels = torch.randint(0, 11, (9,))
    loss = head(emb, labels)
    expected = reference.arcface_head(emb, head.weight, labels, scale=32.0, margin=0.3).loss
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    loss.backward()
    assert emb.grad.abs().sum() > 0 and head.weight.grad.abs().sum() > 0
    stats = head(emb, labels, return_stats=True)
    assert stats.cos_pos.shape == (9,) and not stats.ri.requires_grad


def test_arcface_head_init_like_insightface():
    torch.manual_seed(0)
    head = ArcFaceHead(256, 2000)
    assert head.weight.shape == (2000, 256)
    w = head.weight.detach()
    assert abs(float(w.std()) - 0.01) < 5e-4 and abs(float(w.mean())) < 5e-4


def test_arcface_head_under_bf16_autocast_keeps_float32_weights():
    torch.manual_seed(0)
    head = ArcFaceHead(16, 5)
    emb = torch.randn(4, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(emb.to(torch.bfloat16), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert head.weight.dtype == torch.float32 and head.weight.grad.dtype == torch.float32
    assert torch.isfinite(head.weight.grad).all() and head.weight.grad.abs().sum() > 0


def test_arcface_head_errors_name_the_argument():
    head = ArcFaceHead(8, 3)
    with pytest.raises(ValueError, match="labels"):
        head(torch.randn(2, 8), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="D"):
        head(torch.randn(2, 7), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="num_classes"):
        ArcFaceHead(8, 0)
    with pytest.raises(ValueError, match="backend"):
        ArcFaceHead(8, 3, backend="gpu")


def test_backbone_config_override():
    assert backbone_config("r50", 224).feature_size == 14
    with pytest.raises(ValueError, match="input_size"):
        backbone_config("small", 20)


def insightface_style_loss(embeddings, weight, labels, s=64.0, m=0.5):
    """What arcface_torch's PartialFC_V2(CombinedMarginLoss(s, 1.0, m, 0.0)) computes with
    sample_rate 1 on one rank, re-derived here: normalised linear, then under no_grad the target
    logit becomes cos(θ + m) (so the gradient passes straight through), then scale and CE."""
    logits = torch.nn.functional.linear(torch.nn.functional.normalize(embeddings),
                                        torch.nn.functional.normalize(weight)).clamp(-1, 1)
    rows = torch.arange(len(labels))
    with torch.no_grad():
        theta = logits.arccos()
        theta[rows, labels] += m
        logits.copy_(theta.cos())
    return torch.nn.functional.cross_entropy(logits * s, labels)


def test_arcface_head_is_a_drop_in_for_insightface_partial_fc():
    torch.manual_seed(0)
    # float64: two float32 implementations of a loss with s = 64 differ by ~1e-5 in single gradient
    # elements, which would hide nothing but make the comparison flaky.
    head = ArcFaceHead(32, 50, scale=64.0, margin=0.5, margin_mode="arcface_st").double()
    emb = torch.randn(24, 32, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (24,))
    ours = head(emb, labels)
    g_ours = torch.autograd.grad(ours, (emb, head.weight))
    theirs = insightface_style_loss(emb, head.weight, labels)
    g_theirs = torch.autograd.grad(theirs, (emb, head.weight))
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_cosface_head_is_a_drop_in_for_insightface_combined_margin_cosface():
    """CombinedMarginLoss(s, 1.0, 0.0, m) (35 of arcface_torch's configs): the target cosine minus
    m, with its gradient, then scale and cross-entropy (re-derived here)."""
    torch.manual_seed(1)
    head = ArcFaceHead(32, 50, scale=64.0, margin=0.4, margin_mode="cosface").double()
    emb = torch.randn(24, 32, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (24,))
    ours = head(emb, labels)
    logits = torch.nn.functional.linear(torch.nn.functional.normalize(emb),
                                        torch.nn.functional.normalize(head.weight)).clamp(-1, 1)
    theirs = torch.nn.functional.cross_entropy(64.0 * (logits - 0.4 * torch.nn.functional.one_hot(labels, 50)),
                                               labels)
    torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-9)
    for a, b in zip(torch.autograd.grad(ours, (emb, head.weight)), torch.autograd.grad(theirs, (emb, head.weight))):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_serfiq_score_rewards_agreeing_passes():
    from ree.models.ree_model import serfiq_score

    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 5, 8, generator=g)
    same = base.expand(10, 5, 8)
    noisy = base + 0.3 * torch.randn(10, 5, 8, generator=g)
    noisier = base + 1.0 * torch.randn(10, 5, 8, generator=g)
    torch.testing.assert_close(serfiq_score(same), torch.ones(5))
    assert bool((serfiq_score(noisy) > serfiq_score(noisier)).all())
    # the formula on two passes: 2·sigmoid(−(2/4)·‖x1 − x2‖) of the normalised embeddings
    two = torch.randn(2, 3, 4, generator=g)
    x = torch.nn.functional.normalize(two, dim=2)
    expected = 2 * torch.sigmoid(-0.5 * (x[0] - x[1]).norm(dim=1))
    torch.testing.assert_close(serfiq_score(two), expected)


def test_embed_serfiq_is_seeded_and_leaves_the_global_rng_alone():
    model = REEModel(ModelConfig()).eval()
    images = torch.randn(6, 3, 32, 32)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = embed(model, images, serfiq_passes=4, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    b = embed(model, images, serfiq_passes=4, seed=1)
    c = embed(model, images, serfiq_passes=4, seed=2)
    assert torch.equal(a.serfiq, b.serfiq) and not torch.equal(a.serfiq, c.serfiq)
    assert a.serfiq.shape == (6,) and bool(((a.serfiq > 0) & (a.serfiq <= 1)).all())
    assert embed(model, images).serfiq is None
