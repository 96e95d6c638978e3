"""Shared by the test modules of the training package `ree` (tests/training, and the trainer run
of tests/kernels/test_sampling.py): a tiny in-memory face set and the configuration of a short run."""
import numpy as np

from ree.config import TrainConfig


class TinyFaces:
    """A FaceArrays-like set: per-class base images plus noise, uint8 [N, 32, 32, 3]."""

    def __init__(self, n=64, classes=5, seed=0):
        rng = np.random.default_rng(seed)
        self.labels = np.arange(n) % classes
        base = rng.integers(0, 256, (classes, 32, 32, 3))
        self.images = np.clip(base[self.labels] + rng.normal(0, 25, (n, 32, 32, 3)), 0, 255).astype(np.uint8)
        self.num_classes = classes

    def __len__(self):
        return len(self.labels)


def config(tmp_path, name="run", **kwargs):
    values = dict(output_dir=str(tmp_path / name), steps=6, batch_size=8, warmup_steps=2, log_every=2,
                  save_every=100, progress=False, tensorboard=False, ui_fraction=0.25, embedding_size=32,
                  prm_dropout=0.2, dropout=0.1, lr=0.05)
    values.update(kwargs)
    return TrainConfig(**values)
