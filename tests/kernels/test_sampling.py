"""PartialFC's class sampling: `ree_kernels.sample_classes` and `ArcFaceHead(sample_rate=r)`."""
import math

import pytest
import torch

import ree_kernels
from ree.models import ArcFaceHead
from ree_kernels import num_sampled, sample_classes


def test_num_sampled_is_the_ceiling_of_the_decimal_rate():
    assert num_sampled(1_000_000, 0.1) == 100_000
    assert num_sampled(10, 0.3) == 3  # 0.3·10 is 3.0000000000000004 in binary
    assert num_sampled(11, 0.1) == 2
    assert num_sampled(5, 0.01) == 1
    assert num_sampled(7, 1.0) == 7
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="sample_rate"):
            num_sampled(10, bad)


def test_sampled_set_holds_every_label_and_has_the_right_size():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        labels = torch.randint(0, 1000, (64,), generator=g)
        labels[:3] = -100
        labels[5] = 999  # the last class
        out = sample_classes(labels, 1000, 0.1, ignore_index=-100, generator=g)
        index = out.class_index
        assert index.shape == (100,)
        assert bool((index[1:] > index[:-1]).all()), "ascending and distinct"
        assert set(labels[3:].tolist()) <= set(index.tolist())
        has = labels != -100
        assert torch.equal(index[out.labels[has]], labels[has])
        assert bool((out.labels[~has] == -100).all())


def test_more_positives_than_the_rate_keeps_them_all():
    labels = torch.arange(30)
    out = sample_classes(labels, 100, 0.1, ignore_index=-100)
    assert torch.equal(out.class_index, torch.arange(30))
    assert torch.equal(out.labels, torch.arange(30))


def test_the_others_are_uniform():
    """A chi-square test of how often each non-label class is drawn (fixed seed: 2000 draws of
    11 among 46, 478 expected each; the 0.999 quantile of chi²(45) is about 80)."""
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([3, 8, 8, 21, 40])
    counts = torch.zeros(50)
    draws = 2000
    for _ in range(draws):
        counts[sample_classes(labels, 50, 0.3, ignore_index=-100, generator=g).class_index] += 1
    positives = torch.tensor([3, 8, 21, 40])
    assert bool((counts[positives] == draws).all())
    others = torch.ones(50, dtype=torch.bool)
    others[positives] = False
    expected = draws * (15 - 4) / 46
    chi2 = float(((counts[others] - expected) ** 2 / expected).sum())
    assert chi2 < 80.0, chi2
    assert math.isclose(float(counts[others].sum()), draws * 11)


def test_module_loss_is_the_head_over_the_sampled_classes():
    torch.manual_seed(0)
    head = ArcFaceHead(16, 200, sample_rate=0.1, backend="cpu", generator=torch.Generator().manual_seed(2))
    emb = torch.randn(12, 16)
    labels = torch.randint(0, 200, (12,))
    stats = head(emb, labels, return_stats=True, reduction="sum")
    index = head.sampled_classes
    assert index.shape == (20,)
    positions = torch.searchsorted(index, labels)
    expected = ree_kernels.arcface_head(emb, head.weight[index].detach(), positions, backend="reference",
                                        reduction="sum")
    torch.testing.assert_close(stats.loss, expected.loss)
    torch.testing.assert_close(stats.cos_pos, expected.cos_pos)
    assert torch.equal(stats.neg_index, index[expected.neg_index]), "neg_index is a class id"


def test_unsampled_prototypes_get_zero_gradient_and_stay_unchanged_after_a_step():
    torch.manual_seed(0)
    head = ArcFaceHead(8, 300, sample_rate=0.1, backend="cpu")
    opt = torch.optim.SGD(head.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    hooks = head.keep_unsampled_rows(opt)
    for step in range(3):
        before = head.weight.detach().clone()
        labels = torch.randint(0, 300, (10,))
        opt.zero_grad()
        head(torch.randn(10, 8), labels).backward()
        index = head.sampled_classes
        outside = torch.ones(300, dtype=torch.bool)
        outside[index] = False
        assert bool((head.weight.grad[outside] == 0).all())
        assert bool((head.weight.grad[index].abs().sum(1) > 0).any())
        opt.step()
        assert torch.equal(head.weight.detach()[outside], before[outside]), f"step {step} moved an unsampled row"
        assert not torch.equal(head.weight.detach()[index], before[index])
        if step == 0:  # the buffer the first step creates starts at 0 on the rows it did not step
            assert bool((opt.state[head.weight]["momentum_buffer"][outside] == 0).all())
    # Without the hooks, weight decay moves every row (what PartialFC_V2 does).
    for remove in hooks:
        remove()
    before = head.weight.detach().clone()
    opt.zero_grad()
    head(torch.randn(10, 8), torch.randint(0, 300, (10,))).backward()
    opt.step()
    outside = torch.ones(300, dtype=torch.bool)
    outside[head.sampled_classes] = False
    assert not torch.equal(head.weight.detach()[outside], before[outside])


def test_rate_one_and_eval_mode_are_the_unsampled_head_exactly():
    emb, labels = torch.randn(9, 16), torch.randint(0, 50, (9,))
    plain = ArcFaceHead(16, 50, seed=3, backend="cpu")
    one = ArcFaceHead(16, 50, seed=3, backend="cpu", sample_rate=1.0)
    sampled = ArcFaceHead(16, 50, seed=3, backend="cpu", sample_rate=0.2).eval()
    expected = plain(emb, labels, return_stats=True)
    for head in (one, sampled):
        out = head(emb, labels, return_stats=True)
        for a, b in zip(out, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
        assert head.sampled_classes is None


def test_module_refuses_bad_rates_and_labels():
    with pytest.raises(ValueError, match="sample_rate"):
        ArcFaceHead(8, 10, sample_rate=0.0)
    with pytest.raises(ValueError, match="ignore_index"):
        ArcFaceHead(8, 10, sample_rate=0.5, ignore_index=0)
    head = ArcFaceHead(8, 10, sample_rate=0.5)
    with pytest.raises(ValueError, match="labels"):
        head(torch.randn(2, 8), torch.tensor([1, 10]))


def test_ree_train_samples_and_leaves_the_other_prototypes(tmp_path):
    from ree.cli import build_parser
    from ree.train import Trainer
    from training_support import TinyFaces, config

    parser = build_parser()
    assert "PartialFC" in parser._subparsers._group_actions[0].choices["train"].format_help()
    assert parser.parse_args(["train", "--sample-rate", "0.1"]).sample_rate == 0.1
    trainer = Trainer(config(tmp_path, "sampled", sample_rate=0.25, weight_decay=0.1),
                      dataset=TinyFaces(n=80, classes=40))
    head = trainer.criterion.head
    assert head.sample_rate == 0.25
    before = head.weight.detach().clone()
    trainer.fit(stop_at=1)
    outside = torch.ones(head.num_classes, dtype=torch.bool)
    outside[head.sampled_classes] = False
    assert head.sampled_classes.numel() == 10
    assert bool(outside.any())
    assert torch.equal(head.weight.detach()[outside], before[outside])
    assert not torch.equal(head.weight.detach()[~outside], before[~outside])
