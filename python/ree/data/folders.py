"""Image files on disk: `ImageFolderDataset` (one folder per identity), `load_images` (a list
of files, for scoring), and `RecordIODataset` (insightface .rec/.idx, see `recordio`)."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .arrays import FaceArrays, to_tensor
from .images import decode_resized
from .recordio import RecordIODataset

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderDataset", "RecordIODataset", "load_images"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def _check_size(image_size) -> int:
    if not isinstance(image_size, (int, np.integer)) or isinstance(image_size, bool) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    return int(image_size)


class ImageFolderDataset(Dataset):
    """root/<identity>/<image>: labels follow the sorted folder names (`classes`, also
    `class_names`); files are the images with a known extension (IMAGE_EXTENSIONS), sorted.
    Items are (image float32 [3, H, W] normalised, label, native resolution = the shorter side
    of the file), as in `FaceArrays`; images decode with `ree.data.images.decode_image`.

    Raises:
        FileNotFoundError: `root` is not a directory.
        DataError (a ValueError): `root` holds no identity folder, or an identity folder holds no image (it
            would be a class without images: the message names the folders).
    """

    def __init__(self, root: str | os.PathLike, image_size: int = 112):
        self.root = os.fspath(root)
        self.image_size = _check_size(image_size)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"root: no such directory {self.root}")
        self.classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
        self.samples = []
        empty = []
        for label, name in enumerate(self.classes):
            folder = os.path.join(self.root, name)
            files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
            if not files:
                empty.append(folder)
            self.samples += [(os.path.join(folder, f), label) for f in files]
        if not self.classes:
            raise DataError(f"root: {self.root} holds no identity folders (expected root/<identity>/<image>)")
        if empty:
            more = f" and {len(empty) - 3} more" if len(empty) > 3 else ""
            raise DataError(f"root: identity folder {', '.join(empty[:3])}{more} holds no images (extensions "
                             f"{', '.join(IMAGE_EXTENSIONS)}); remove it or add its images, or it becomes a class "
                             "without images")
        self.labels = np.array([label for _, label in self.samples], np.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        path, label = self.samples[index]
        pixels, native = decode_resized(path, self.image_size)
        return to_tensor(pixels), label, native

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        """The identity folders' names; label k is the k-th."""
        return list(self.classes)

    def to_arrays(self) -> FaceArrays:
        """Every image decoded into memory."""
        decoded = [decode_resized(path, self.image_size) for path, _ in self.samples]
        return FaceArrays(np.stack([d[0] for d in decoded]), self.labels, np.array([d[1] for d in decoded]))


def load_images(paths: Sequence[str | os.PathLike], image_size: int) -> torch.Tensor:
    """Image files as one normalised float32 batch [N, 3, image_size, image_size] (each decoded
    by `ree.data.images.decode_image`, resized bicubically).

    Raises:
        ValueError: naming the file that cannot be read; or image_size is not a positive int.
        TypeError: `paths` is a single path."""
    image_size = _check_size(image_size)
    if isinstance(paths, (str, os.PathLike)):
        raise TypeError("paths must be a sequence of paths, not a single path")
    if len(paths) == 0:
        return torch.empty(0, 3, image_size, image_size)
    return to_tensor(np.stack([decode_resized(p, image_size)[0] for p in paths]))
