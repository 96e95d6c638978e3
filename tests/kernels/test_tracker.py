import pytest
import torch

from ree_kernels import UITracker, reference


def test_first_update_sets_then_blends():
    g = torch.Generator().manual_seed(0)
    tracker = UITracker(4, momentum=0.75)
    assert tracker.center_or_none() is None
    emb1, ri1 = torch.randn(5, 4, generator=g), torch.randn(5, generator=g)
    tracker.update(emb1, ri1)
    mean1 = reference.normalize(emb1).mean(0)
    torch.testing.assert_close(tracker.center, mean1)
    torch.testing.assert_close(tracker.mu, ri1.mean())
    emb2, ri2 = torch.randn(3, 4, generator=g), torch.randn(3, generator=g)
    tracker.update(emb2, ri2)
    torch.testing.assert_close(tracker.center, 0.75 * mean1 + 0.25 * reference.normalize(emb2).mean(0))
    torch.testing.assert_close(tracker.mu, 0.75 * ri1.mean() + 0.25 * ri2.mean())
    assert tracker.center_or_none() is tracker.center


def test_empty_batch_changes_nothing():
    tracker = UITracker(3)
    tracker.update(torch.zeros(0, 3), torch.zeros(0))
    assert not bool(tracker.initialized) and tracker.center_or_none() is None


def test_state_dict_round_trip():
    tracker = UITracker(6, momentum=0.5)
    tracker.update(torch.randn(4, 6), torch.randn(4))
    restored = UITracker(6, momentum=0.5)
    restored.load_state_dict(tracker.state_dict())
    for key, value in tracker.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key
    assert bool(restored.initialized)


@pytest.mark.parametrize("bad", [dict(dim=0), dict(dim=4, momentum=1.0), dict(dim=4, momentum=-0.1)])
def test_bad_construction(bad):
    with pytest.raises(ValueError):
        UITracker(**bad)


def test_bad_update_shapes():
    tracker = UITracker(4)
    with pytest.raises(ValueError, match="ui_embeddings"):
        tracker.update(torch.randn(3, 5), torch.randn(3))
    with pytest.raises(ValueError, match="ui_ri_pred"):
        tracker.update(torch.randn(3, 4), torch.randn(2))
