"""ONNX export: the file's embedding and quality match PyTorch under onnxruntime."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ree.export import check_onnx, export_onnx
from ree.models import ModelConfig, REEModel


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = REEModel(ModelConfig(embedding_size=48, dropout=0.2, prm_dropout=0.3))
    m.train()
    with torch.no_grad():  # non-trivial BN running statistics
        for _ in range(3):
            m(torch.randn(16, 3, 32, 32))
    return m


@pytest.fixture(scope="module")
def exported(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("onnx") / "m.onnx"
    return path, export_onnx(model, path, check_batch=5)


def test_export_matches_pytorch(exported, model):
    path, diffs = exported
    assert set(diffs) == {"embedding", "quality"} and max(diffs.values()) < 1e-4
    assert model.training  # the caller's model is left as it was
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    assert [o.name for o in graph.graph.output] == ["embedding", "quality"]
    # an independent run at another batch size: the batch dimension is dynamic
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.rand(7, 3, 32, 32) * 2 - 1
    emb, quality = session.run(None, {"images": x.numpy()})
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train()
    assert emb.shape == (7, 48) and quality.shape == (7,)
    np.testing.assert_allclose(emb, out.embedding.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(quality, out.quality.numpy(), atol=1e-4, rtol=1e-4)


def test_check_detects_a_different_model(exported):
    path, _ = exported
    other = REEModel(ModelConfig(embedding_size=48))
    with pytest.raises(RuntimeError, match="differs"):
        check_onnx(other, path)


def test_export_rejects_bad_arguments(tmp_path, model):
    with pytest.raises(TypeError, match="model"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="check_batch"):
        export_onnx(model, tmp_path / "x.onnx", check_batch=0)
