"""The head modules side by side (`ree_kernels.modules`): the one-process `ArcFaceHead` and the
class-sharded `ShardedArcFaceHead` (here one rank: no torch.distributed) take the same options,
start from the same prototypes and compute the same loss; `make_arcface_head` builds either."""
import pytest
import torch

from ree.losses import REELoss
from ree_kernels.modules import ArcFaceHead, ShardedArcFaceHead, make_arcface_head

OPTIONS = dict(scale=16.0, margin=0.3, margin_mode="cosface", ri_form="ratio", backend="reference", chunk_size=3,
               dtype=torch.float64)


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(9, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 11, (9,), generator=g, dtype=torch.int32)  # widened by both heads
    labels[2] = -100
    return emb, labels, torch.randn(6, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("seed", [7, None])
def test_both_heads_start_alike_and_compute_the_same(seed):
    torch.manual_seed(1)  # seed None: both draw from the global RNG
    one = ArcFaceHead(6, 11, seed=seed, **OPTIONS)
    torch.manual_seed(1)
    sharded = ShardedArcFaceHead(6, 11, seed=seed, **OPTIONS)
    assert torch.equal(one.weight, sharded.weight) and one.weight.dtype == torch.float64
    emb, labels, center = batch()
    outs = []
    for head in (one, sharded):
        x = emb.clone().requires_grad_(True)
        out = head(x, labels, ui_center=center, reduction="sum", return_stats=True)
        outs.append((out, torch.autograd.grad(out.loss, (x, head.weight))))
    (a, grads_a), (b, grads_b) = outs
    for field in a._fields:
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=0, atol=1e-12, equal_nan=True)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, rtol=0, atol=1e-12)


def test_sampling_options_and_sparse_update_are_shared():
    for cls in (ArcFaceHead, ShardedArcFaceHead):
        head = cls(6, 40, seed=3, sample_rate=0.25, generator=torch.Generator().manual_seed(0), backend="reference")
        emb, labels, _ = batch(1)
        opt = torch.optim.SGD(head.parameters(), lr=1.0, momentum=0.9, weight_decay=0.1)
        head.keep_unsampled_rows(opt)
        before = head.weight.detach().clone()
        head(emb.float(), labels).backward()
        opt.step()
        assert head.sampled_classes.numel() == 10
        moved = (head.weight != before).any(1)
        sampled = torch.zeros(40, dtype=torch.bool)
        sampled[head.sampled_classes] = True
        assert bool(moved[sampled].all()) and not bool(moved[~sampled].any()), cls.__name__
        with pytest.raises(ValueError, match="ignore_index"):
            cls(6, 40, sample_rate=0.5, ignore_index=0)
        with pytest.raises(ValueError, match="backend"):
            cls(6, 40, backend="gpu")


def test_the_sharded_head_refuses_differentiable_stats():
    emb, labels, _ = batch()
    with pytest.raises(ValueError, match="differentiable_stats"):
        ShardedArcFaceHead(6, 11, seed=0)(emb.float(), labels, differentiable_stats=True)


def test_factory_and_state_dict_keys():
    head = make_arcface_head(6, 11, seed=0, scale=30.0)
    assert type(head) is ArcFaceHead and head.scale == 30.0
    assert list(head.state_dict()) == ["weight"]  # checkpoints written before stay loadable
    assert list(ShardedArcFaceHead(6, 11, seed=0).state_dict()) == ["weight", "_extra_state"]
    assert list(REELoss(6, 11, seed=0).state_dict()) == ["head.weight", "tracker.center", "tracker.mu",
                                                          "tracker.initialized"]
    with pytest.raises(TypeError, match="embedding_grad"):
        make_arcface_head(6, 11, embedding_grad="exact")  # the sharded head's alone
    with pytest.raises(TypeError, match="scales"):
        REELoss(6, 11, scales=30.0)
