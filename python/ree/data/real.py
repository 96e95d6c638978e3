"""Real images that ship inside installed packages (no download): LFW faces against non-faces
(scikit-image) and handwritten digits at 8x8 (scikit-learn)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .arrays import FaceArrays, to_tensor


def _grey_to_rgb(images: np.ndarray, image_size: int) -> np.ndarray:
    """float greys in [0, 1], [N, h, w] -> uint8 RGB [N, image_size, image_size, 3] (bicubic)."""
    out = np.empty((len(images), image_size, image_size, 3), np.uint8)
    for i, grey in enumerate(images):
        picture = Image.fromarray(np.clip(grey * 255 + 0.5, 0, 255).astype(np.uint8))
        picture = picture.resize((image_size, image_size), Image.Resampling.BICUBIC)
        out[i] = np.asarray(picture)[..., None]
    return out


def lfw_faces_vs_nonfaces(image_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The 200 images of skimage.data.lfw_subset(): 100 LFW faces and 100 non-face crops from
    the same photos, 25x25 grey, as normalised RGB [200, 3, image_size, image_size], and
    is_face bool [200] (a quality score should rank the faces first)."""
    from skimage.data import lfw_subset

    images = np.asarray(lfw_subset(), np.float64)  # [200, 25, 25] in [0, 1]: faces first
    is_face = torch.zeros(len(images), dtype=torch.bool)
    is_face[:100] = True
    return to_tensor(_grey_to_rgb(images, image_size)), is_face


def digits(image_size: int = 32, seed: int = 0, test_fraction: float = 0.5) -> tuple[FaceArrays, FaceArrays]:
    """sklearn's handwritten digits (1797 real 8x8 images, class = digit) as (train, test),
    split per class so that every digit is in both; resolution 8 for all."""
    from sklearn.datasets import load_digits

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    data = load_digits()
    images = _grey_to_rgb(data.images / 16.0, image_size)
    labels = data.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), bool)
    for digit in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == digit))
        test[idx[:min(len(idx) - 1, max(1, round(test_fraction * len(idx))))]] = True
    native = np.full(len(labels), 8, np.int64)
    split = lambda mask: FaceArrays(images[mask], labels[mask], native[mask])  # noqa: E731
    return split(~test), split(test)
