"""In-memory image sets and the one image normalisation used everywhere (docs/spec.md §7)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ree_kernels.contract import IGNORE_INDEX

IGNORE_LABEL = IGNORE_INDEX  # gallery distractors and unlabelled images (docs/spec.md §7, ignore_index)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 images [..., H, W, 3] -> float32 [..., 3, H, W] normalised as (x/255 - 0.5)/0.5."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise TypeError(f"images must be a uint8 numpy array, got {type(images).__name__}"
                        f"{'' if not isinstance(images, np.ndarray) else ' of ' + str(images.dtype)}")
    if images.ndim < 3 or images.shape[-1] != 3:
        raise ValueError(f"images must have shape [..., H, W, 3], got {tuple(images.shape)}")
    if not images.flags.writeable:  # e.g. np.asarray of a PIL image; torch warns on those
        images = images.copy()
    x = torch.from_numpy(np.ascontiguousarray(images)).movedim(-1, -3)
    return x.to(torch.float32).div_(127.5).sub_(1.0)


def save_npz_atomic(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Writes an uncompressed .npz through a temporary file and a rename, so that a reader (or a
    concurrent run) never sees a half-written file."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except BaseException:  # an interrupt too: no temporary left behind
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclass(eq=False)  # arrays do not compare to one bool
class FaceArrays(Dataset):
    """A labelled image set held in memory.

    images: uint8 [N, H, W, 3]; labels: int64 [N] (IGNORE_LABEL for unlabelled images);
    resolutions: int64 [N], the pixel size each face was degraded to (the native size for
    undegraded sets); names: label k's identity name, or None for numbered identities. Items
    are (image float32 [3, H, W] normalised, label, resolution).
    """

    images: np.ndarray
    labels: np.ndarray
    resolutions: np.ndarray
    names: Optional[Sequence[str]] = None

    def __post_init__(self) -> None:
        self.images = np.asarray(self.images)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.resolutions = np.asarray(self.resolutions, dtype=np.int64)
        if self.images.dtype != np.uint8:
            raise TypeError(f"images must be uint8, got {self.images.dtype}")
        if self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(f"images must have shape [N, H, W, 3], got {self.images.shape}")
        n = len(self.images)
        for name in ("labels", "resolutions"):
            value = getattr(self, name)
            if value.shape != (n,):
                raise ValueError(f"{name} must have shape [{n}] to match images, got {value.shape}")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        return to_tensor(self.images[index]), int(self.labels[index]), int(self.resolutions[index])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    @property
    def num_classes(self) -> int:
        """Size a classifier needs: 1 + the largest label (ignored labels do not count)."""
        labelled = self.labels[self.labels >= 0]
        return int(labelled.max()) + 1 if len(labelled) else 0

    @property
    def class_names(self) -> list[str]:
        """Label k's name: `names`, else "id0000", "id0001", ... (numbered identities, like the
        synthetic set's)."""
        if self.names is not None:
            return list(self.names)
        return [f"id{label:04d}" for label in range(self.num_classes)]

    def tensors(self, indices: np.ndarray | None = None) -> torch.Tensor:
        """All (or the indexed) images as one normalised float32 batch [N, 3, H, W]."""
        return to_tensor(self.images if indices is None else self.images[indices])

    def subset(self, indices: np.ndarray) -> "FaceArrays":
        return FaceArrays(self.images[indices], self.labels[indices], self.resolutions[indices])

    def save(self, path: str | os.PathLike) -> None:
        """Writes an uncompressed .npz atomically (`save_npz_atomic`)."""
        save_npz_atomic(path, images=self.images, labels=self.labels, resolutions=self.resolutions)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FaceArrays":
        try:
            with np.load(os.fspath(path)) as data:
                return cls(data["images"], data["labels"], data["resolutions"])
        except (OSError, KeyError, ValueError) as error:
            raise ValueError(f"{os.fspath(path)}: not a FaceArrays .npz file ({error})") from error


def fetch_batch(dataset: Any, indices: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images [n, 3, S, S] normalised, labels [n] int64) of `dataset`'s items `indices`: one
    gather from a set with `images` (uint8 [N, S, S, 3]) and `labels` arrays, like `FaceArrays`,
    else item by item (items (image [3, S, S], label, ...))."""
    images = getattr(dataset, "images", None)
    if isinstance(images, np.ndarray):
        rows = list(indices)
        return to_tensor(images[rows]), torch.as_tensor(np.asarray(dataset.labels)[rows], dtype=torch.int64)
    items = [dataset[i] for i in indices]
    return torch.stack([item[0] for item in items]), torch.as_tensor([int(item[1]) for item in items])
