"""Fine-tuning the last stage: the frozen prefix stays as it was, the cache holds that prefix's
features of the drawn training copies, imprinted prototypes are class means, a cached run
resumes exactly, and models scored from shared prefix features equal models scored from images."""
import pytest
import torch
from torch import nn

from ree.config import ConfigError
from ree.data.degrade import downsample
from ree.models import sface
from ree.models.ree_model import ModelConfig, REEModel, embed, inference_copy
from ree.prefix_cache import CACHE_DTYPE, build_prefix_cache, imprinted_prototypes
from ree.train import Trainer
from training_support import TinyFaces, config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def faces():
    return TinyFaces()


def frozen_config(tmp_path, name="run", **kwargs):
    return config(tmp_path, name, trainable="last-stage", **kwargs)


def changed(before, after):
    return {k for k in after if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("cached", [False, True], ids=["images", "cache"])
def test_only_the_last_stage_and_the_heads_learn(tmp_path, faces, cached):
    trainer = Trainer(frozen_config(tmp_path, cache_prefix=cached, min_resolution=7), dataset=faces)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    moved = changed(before, trainer.model.state_dict())
    last = len(trainer.model.backbone.stages) - 1
    frozen = [k for k in before if k.startswith(("backbone.stem", "backbone.stages"))
              and not k.startswith(f"backbone.stages.{last}.")]
    assert frozen and not moved & set(frozen)  # weights and BatchNorm statistics
    assert any(k.startswith(f"backbone.stages.{last}.") for k in moved)
    assert {k.split(".")[0] for k in moved} >= {"head", "prm", "pam"}
    everything = Trainer(config(tmp_path, "all"), dataset=faces)
    everything.fit()
    assert set(frozen) & changed(before, everything.model.state_dict())  # the test can fail


@pytest.mark.parametrize("arch,size", [("small", 32), ("sface", sface.INPUT_SIZE)])
def test_the_inference_copy_is_the_model_with_its_batch_norms_folded(arch, size):
    torch.manual_seed(0)
    model = REEModel(ModelConfig(arch=arch, input_size=size, trainable="last-stage")).eval()
    for norm in (m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)):
        # statistics far from the identity, so that a wrong fold shows
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
        norm.weight.data.uniform_(0.5, 1.5)
        norm.bias.data.uniform_(-0.5, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(3, 3, size, size)
    fast = inference_copy(model)
    with torch.no_grad():
        for run in (lambda m: m.prefix(images), lambda m: m(images).embedding,
                    lambda m: m.forward_from_prefix(model.prefix(images)).feature_map):
            expected, got = run(model), run(fast)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    assert not fast.training and not any(p.requires_grad for p in fast.parameters())
    assert before.keys() == model.state_dict().keys() and not changed(before, model.state_dict())


def test_the_cache_holds_the_prefix_of_each_drawn_copy(faces):
    torch.manual_seed(0)
    model = REEModel(ModelConfig(trainable="last-stage"))
    cache = build_prefix_cache(model, faces, seed=3, min_resolution=0, uis=True, ui_min_resolution=2,
                               ui_max_resolution=3, batch_size=24)
    again = build_prefix_cache(model, faces, seed=3, min_resolution=0, uis=True, ui_min_resolution=2,
                               ui_max_resolution=3, batch_size=24)
    assert torch.equal(cache.features, again.features) and torch.equal(cache.ui_features, again.ui_features)
    # the draws do not depend on the batches (the convolutions may round by batch size)
    other = build_prefix_cache(model, faces, seed=3, min_resolution=0, uis=True, ui_min_resolution=2,
                               ui_max_resolution=3, batch_size=64)
    torch.testing.assert_close(other.ui_features, cache.ui_features, rtol=0, atol=2e-3)
    assert cache.features.dtype == CACHE_DTYPE and torch.equal(cache.labels, torch.as_tensor(faces.labels))
    images = (torch.from_numpy(faces.images).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5
    model.eval()
    with torch.no_grad():
        plain, mirrored = model.prefix(images), model.prefix(images.flip(3))
    error = torch.minimum((cache.features.float() - plain).abs().amax((1, 2, 3)),
                          (cache.features.float() - mirrored).abs().amax((1, 2, 3)))
    assert error.max() <= 2e-3 * plain.abs().max()  # float16 storage
    flips = (cache.features.float() - mirrored).abs().amax((1, 2, 3)) < (cache.features.float() - plain).abs().amax(
        (1, 2, 3))
    assert 0 < flips.sum() < len(flips)
    assert not torch.allclose(cache.ui_features.float(), cache.features.float(), atol=1e-2)
    vlr = build_prefix_cache(model, faces, seed=3, min_resolution=4, uis=False, ui_min_resolution=2,
                             ui_max_resolution=3)
    assert vlr.ui_features is None and not torch.equal(vlr.features, cache.features)


def test_a_cache_needs_a_frozen_prefix_and_runs_need_their_uis(tmp_path, faces):
    with pytest.raises(ValueError, match="trainable='last-stage'"):
        build_prefix_cache(REEModel(), faces, seed=0, min_resolution=0, uis=False, ui_min_resolution=2,
                           ui_max_resolution=3)
    with pytest.raises(ConfigError, match="cache_prefix needs trainable 'last-stage'"):
        config(tmp_path, cache_prefix=True)
    with pytest.raises(ConfigError, match="imprint needs cache_prefix"):
        frozen_config(tmp_path, imprint=True)
    with pytest.raises(ConfigError, match="trainable must be one of"):
        config(tmp_path, trainable="last")
    with pytest.raises(ConfigError, match="cache_prefix trains in one process, not 2"):
        frozen_config(tmp_path, cache_prefix=True).check_world_size(2)
    no_uis = build_prefix_cache(REEModel(ModelConfig(trainable="last-stage")), faces, seed=0, min_resolution=0,
                                uis=False, ui_min_resolution=2, ui_max_resolution=3)
    trainer = Trainer(frozen_config(tmp_path, cache_prefix=True), dataset=faces, prefix_cache=no_uis)
    with pytest.raises(ValueError, match="holds none"):
        trainer.fit()


def test_imprinted_prototypes_are_the_class_means(tmp_path, faces):
    trainer = Trainer(frozen_config(tmp_path, cache_prefix=True, imprint=True), dataset=faces)
    cache, model = trainer.prefix_cache, trainer.model
    model.eval()
    with torch.no_grad():
        v = torch.nn.functional.normalize(model.forward_from_prefix(cache.features.float()).embedding, dim=1)
    for c in range(faces.num_classes):
        mean = torch.nn.functional.normalize(v[cache.labels == c].mean(0), dim=0)
        torch.testing.assert_close(trainer.criterion.head.weight[c].detach(), mean, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="class 5 has no cached image"):
        imprinted_prototypes(model, cache, faces.num_classes + 1)


def test_a_cached_run_resumes_exactly(tmp_path, faces):
    kwargs = dict(cache_prefix=True, imprint=True, min_resolution=7)
    straight = Trainer(frozen_config(tmp_path, "straight", **kwargs), dataset=faces)
    straight.fit()
    first = Trainer(frozen_config(tmp_path, "split", **kwargs), dataset=faces)
    first.fit(stop_at=3)
    resumed = Trainer(frozen_config(tmp_path, "split", **kwargs), dataset=faces,
                      resume=tmp_path / "split" / "last.pt")
    resumed.fit()
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(straight.criterion.head.weight, resumed.criterion.head.weight)


def test_scoring_from_prefix_features_equals_scoring_images(faces):
    torch.manual_seed(0)
    model = REEModel(ModelConfig(trainable="last-stage")).eval()
    images = downsample((torch.from_numpy(faces.images[:20]).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5, 12)
    with torch.no_grad():
        prefix = model.prefix(images)
    direct = embed(model, images, flip=False, serfiq_passes=3)
    shared = embed(model, images, flip=False, serfiq_passes=3, prefix=prefix.to(CACHE_DTYPE), batch_size=7)
    for name in ("embeddings", "quality", "norm", "serfiq"):
        torch.testing.assert_close(getattr(shared, name), getattr(direct, name), rtol=2e-3, atol=2e-3)
    with pytest.raises(ValueError, match="needs flip=False"):
        embed(model, images, prefix=prefix)
    with pytest.raises(ValueError, match="one row per image"):
        embed(model, images, flip=False, prefix=prefix[:3])


def test_sface_splits_before_its_last_stage():
    backbone = sface.SFaceBackbone().eval()
    first = backbone.layers[sface.LAST_STAGE_START][0]
    assert (first.in_channels, first.out_channels, first.kernel_size) == (512, 1024, (1, 1))
    images = torch.randn(2, 3, sface.INPUT_SIZE, sface.INPUT_SIZE)
    with torch.no_grad():
        features = backbone.prefix(images)
        assert features.shape == (2, 512, sface.FEATURE_SIZE, sface.FEATURE_SIZE)
        torch.testing.assert_close(backbone.last_stage(features), backbone(images))
    model = REEModel(ModelConfig(arch="sface", trainable="last-stage"))
    trainable = sum(p.numel() for p in model.backbone.parameters() if p.requires_grad)
    assert 1_500_000 < trainable < 1_700_000  # the last three convolutions, their BatchNorms and PReLUs
