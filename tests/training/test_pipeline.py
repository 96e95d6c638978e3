"""The evaluation driver's own logic (the metrics themselves are tested with ree.evaluation)."""
import math

import numpy as np
import pytest
import torch

from ree.evaluation import pipeline as E
from ree.models import ModelConfig, REEModel


def test_bin_edges():
    assert E.bin_edges(np.array([25, 25, 25])) == [25, 26]
    assert E.bin_edges(np.array([8, 16, 8])) == [8, 16, 17]
    edges = E.bin_edges(np.arange(8, 33))
    assert edges[0] == 8 and edges[-1] == 33 and len(edges) == 5


def test_max_pairs_is_what_the_protocol_can_draw():
    labels = np.repeat(np.arange(4), 3)  # 4 ids x 3 images: 12 genuine pairs
    assert E.max_pairs(labels) == 24
    protocol = E.make_protocol(labels, np.full(12, 10), num_pairs=10_000)
    assert len(protocol.same) == 24 and protocol.same.sum() == 12


def test_spearman():
    assert E.spearman(np.array([1, 2, 3, 4.0]), np.array([10, 20, 30, 40])) == pytest.approx(1.0)
    assert E.spearman(np.array([4, 3, 2, 1.0]), np.array([10, 20, 30, 40])) == pytest.approx(-1.0)
    assert math.isnan(E.spearman(np.ones(4), np.arange(4)))


def test_perfect_embeddings_score_perfectly():
    labels = np.repeat(np.arange(10), 4)
    emb = np.eye(10)[labels] + 0.01 * np.random.default_rng(0).normal(size=(40, 10))
    scored = E.Scored(emb, np.zeros(40), np.ones(40), np.ones(40))
    resolutions = np.repeat([8, 12, 16, 20], 10)
    protocol = E.make_protocol(labels, resolutions, num_pairs=100)
    rec = E.recognition(scored, labels, resolutions, protocol)
    overall = rec["overall"]
    assert overall["tar@0.01"] == 1.0 and overall["acc"] == 1.0 and overall["rank-1"] == 1.0
    assert sum(b["pairs"] for b in rec["bins"].values()) == 100 == overall["pairs"]
    assert set(rec["bins"]) == {"8-11 px", "12-15 px", "16-19 px", "20 px"}


def test_score_quality_norm_and_ers():
    torch.manual_seed(0)
    model = REEModel(ModelConfig(embedding_size=16)).eval()
    images = torch.rand(6, 3, 32, 32) * 2 - 1
    center = torch.randn(16)
    scored = E.score(model, images, center)
    with torch.no_grad():
        out, flipped = model(images), model(images.flip(3))
    v = out.embedding
    expected_ers = 1 - torch.nn.functional.normalize(v, dim=1) @ torch.nn.functional.normalize(center, dim=0)
    np.testing.assert_allclose(scored.ers, expected_ers.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scored.quality, out.quality.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scored.norm, v.norm(dim=1).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scored.embeddings, (v + flipped.embedding).numpy(), rtol=1e-5, atol=1e-5)
    # without a tracker centre: the mean normalised embedding of UIs synthesised from the images
    center = E.ui_center_from_images(model, images, seed=3)
    assert center.shape == (16,) and torch.equal(center, E.ui_center_from_images(model, images, seed=3))
    assert 0 < float(center.norm()) <= 1.0 + 1e-6
