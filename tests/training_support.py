"""Shared by the test modules of the training package `ree` (tests/training, and the trainer run
of tests/kernels/test_sampling.py): a tiny in-memory face set, the configuration of a short run,
and the real inputs (LFW) that skip a test outside CI and fail it in CI when they are missing."""
import os
from pathlib import Path
from typing import NoReturn

import numpy as np
import pytest

from ree.config import TrainConfig
from ree.data import lfw


class TinyFaces:
    """A FaceArrays-like set: per-class base images plus noise, uint8 [N, size, size, 3]."""

    def __init__(self, n=64, classes=5, seed=0, size=32):
        rng = np.random.default_rng(seed)
        self.labels = np.arange(n) % classes
        base = rng.integers(0, 256, (classes, size, size, 3))
        self.images = np.clip(base[self.labels] + rng.normal(0, 25, (n, size, size, 3)), 0, 255).astype(np.uint8)
        self.num_classes = classes

    def __len__(self):
        return len(self.labels)


def tiny_lfw(root: Path, images: int = 2) -> Path:
    """A small tree in LFW's distribution layout under `root` (twelve people of noise faces, with
    `images` or `images` + 1 images each, 125 px; DevTest pairs among the first six) -> its
    image folder."""
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = root / "lfw-deepfunneled"
    people = [f"Person_{k:02d}" for k in range(12)]
    for k, name in enumerate(people):
        (folder / name).mkdir(parents=True)
        for num in range(1, images + 1 + k % 2):
            small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(small).resize((125, 125), Image.Resampling.BICUBIC).save(
                folder / name / lfw.image_name(name, num))
    held = people[:6]
    genuine = [f"{p}\t1\t2" for p in held] * 2
    impostor = [f"{held[i]}\t1\t{held[(i + 1) % 6]}\t2" for i in range(6)] * 2
    (root / "pairsDevTest.txt").write_text("12\n" + "\n".join(genuine + impostor) + "\n")
    (root / "pairsDevTrain.txt").write_text(f"1\n{people[6]}\t1\t2\n{people[6]}\t1\t{people[7]}\t1\n")
    (root / "pairs.txt").write_text(f"1\t1\n{people[0]}\t1\t2\n{people[0]}\t1\t{people[1]}\t1\n")
    return folder


def config(tmp_path, name="run", **kwargs):
    values = dict(output_dir=str(tmp_path / name), steps=6, batch_size=8, warmup_steps=2, log_every=2,
                  save_every=100, progress=False, tensorboard=False, ui_fraction=0.25, embedding_size=32,
                  prm_dropout=0.2, dropout=0.1, lr=0.05)
    values.update(kwargs)
    return TrainConfig(**values)


def required(what: str, why: str) -> NoReturn:
    """Skip outside CI; in CI (CI=1) the `what` tests' inputs are part of the suite and their absence fails."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the {what} tests: {why}")
    pytest.skip(why)


def real_lfw(what: str, purpose: str) -> lfw.LfwSource:
    """The real LFW copy that $REE_LFW_DIR names, else `required(what, ...)` saying why: the
    variable is unset (set it `to <purpose>`) or names no LFW copy."""
    path = os.environ.get(lfw.ENV_VAR)
    if not path:
        required(what, f"set {lfw.ENV_VAR} to the LFW folder (e.g. ../shared/data/lfw) to {purpose}")
    try:
        return lfw.find_lfw(path)
    except lfw.LfwNotFound as err:
        required(what, str(err))
