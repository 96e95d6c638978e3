"""The embedded default dataset: procedural very-low-resolution faces, generated from a seed.

Each identity is a parametric face (`ree.data.faces`); each sample varies pose, expression and
illumination, is rendered at `render_size`, then captured at a resolution drawn uniformly in
[min_res, max_res] (blur, noise, JPEG: `ree.data.degrade.degrade`) and shown at `image_size`.
The resolution is recorded per image. Train, val and test identities are disjoint: identity k
of a split comes from its own random stream (seed, split, k), so it does not depend on the other
splits' sizes, and no identity is shared between splits. Same config -> identical arrays.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
import zipfile
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from . import faces
from .arrays import FaceArrays, save_npz_atomic
from .degrade import degrade

GENERATOR_VERSION = 1  # bump whenever the images a config produces change (invalidates caches)
_SPLITS = ("train", "val", "test")
_SAMPLE_STREAM = 1  # second word of a per-identity seed: 0 draws the identity, 1 its samples


@dataclass(frozen=True)
class SyntheticConfig:
    num_train_ids: int = 400
    num_val_ids: int = 50
    num_test_ids: int = 100
    train_per_id: int = 40
    val_per_id: int = 20
    test_per_id: int = 20
    image_size: int = 32  # the model input
    min_res: int = 8  # capture resolutions, drawn uniformly in [min_res, max_res]
    max_res: int = 32
    render_size: int = 64  # faces are drawn at this size, then degraded
    seed: int = 0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise TypeError(f"SyntheticConfig.{field.name} must be an int, got {value!r}")
        for name in ("num_train_ids", "num_val_ids", "num_test_ids"):
            if getattr(self, name) < 0:
                raise ValueError(f"SyntheticConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("train_per_id", "val_per_id", "test_per_id"):
            if getattr(self, name) < 1:
                raise ValueError(f"SyntheticConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size < 4:
            raise ValueError(f"SyntheticConfig.image_size must be >= 4, got {self.image_size}")
        if self.render_size < 32:
            raise ValueError(f"SyntheticConfig.render_size must be >= 32, got {self.render_size}")
        if not 2 <= self.min_res <= self.max_res <= self.render_size:
            raise ValueError("SyntheticConfig needs 2 <= min_res <= max_res <= render_size, got "
                             f"min_res={self.min_res}, max_res={self.max_res}, render_size={self.render_size}")
        if self.seed < 0:
            raise ValueError(f"SyntheticConfig.seed must be >= 0, got {self.seed}")

    def key(self) -> str:
        """Cache key: a hash of every field and of the generator version."""
        text = json.dumps({"version": GENERATOR_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class SyntheticSplits(NamedTuple):
    train: FaceArrays
    val: FaceArrays
    test: FaceArrays


def identity_parameters(config: SyntheticConfig, split: str) -> np.ndarray:
    """The uniform draws [num_ids, faces.ID_PARAMS] that define the split's identities."""
    return np.stack([_identity_rng(config, split, k).random(faces.ID_PARAMS)
                     for k in range(_num_ids(config, split))]) if _num_ids(config, split) \
        else np.zeros((0, faces.ID_PARAMS))


def _num_ids(config: SyntheticConfig, split: str) -> int:
    return getattr(config, f"num_{split}_ids")


def _identity_rng(config: SyntheticConfig, split: str, k: int, stream: int = 0) -> np.random.Generator:
    return np.random.default_rng([config.seed, _SPLITS.index(split), k, stream])


def _generate_split(config: SyntheticConfig, split: str, chunk: int = 64) -> FaceArrays:
    num_ids, per_id = _num_ids(config, split), getattr(config, f"{split}_per_id")
    size, canvas = config.image_size, config.render_size
    images = np.empty((num_ids * per_id, size, size, 3), np.uint8)
    resolutions = np.empty(num_ids * per_id, np.int64)
    ids_per_chunk = max(1, chunk // per_id)
    for first in range(0, num_ids, ids_per_chunk):
        ks = range(first, min(num_ids, first + ids_per_chunk))
        id_rngs = [_identity_rng(config, split, k) for k in ks]
        p = np.stack([r.random(faces.ID_PARAMS) for r in id_rngs])
        grids = [np.stack([r.standard_normal((g, g)) for r in id_rngs]) for g in faces.ID_TEXTURE]
        identities = faces.Identities(p, *grids)
        bases = faces.render_identities(identities, canvas)
        sample_rngs = [_identity_rng(config, split, k, _SAMPLE_STREAM) for k in ks]
        q = np.concatenate([r.random((per_id, faces.SAMPLE_PARAMS + 1)) for r in sample_rngs])
        background = np.concatenate([r.standard_normal((per_id, faces.SAMPLE_TEXTURE, faces.SAMPLE_TEXTURE))
                                     for r in sample_rngs])
        owner = np.repeat(np.arange(len(ks)), per_id)
        rendered = faces.render(identities.take(owner), bases[owner], faces.Samples(q[:, :-1], background), canvas)
        span = config.max_res - config.min_res + 1
        res = config.min_res + np.minimum((q[:, -1] * span).astype(np.int64), span - 1)
        start = first * per_id
        for i, (image, r) in enumerate(zip(rendered, res)):
            images[start + i] = degrade(image, int(r), sample_rngs[owner[i]], output_size=size)
        resolutions[start:start + len(res)] = res
    labels = np.repeat(np.arange(num_ids, dtype=np.int64), per_id)
    return FaceArrays(images, labels, resolutions)


def generate(config: SyntheticConfig | None = None, cache_dir: str | os.PathLike | None = None) -> SyntheticSplits:
    """The train / val / test splits for `config` (the defaults when None).

    With `cache_dir`, the arrays are stored there as `synthetic-<key>.npz` (key: a hash of the
    config and the generator version) and a later call with the same config loads them.
    Train labels are 0..num_train_ids-1; val and test labels are their own 0..k-1.
    """
    config = SyntheticConfig() if config is None else config
    if not isinstance(config, SyntheticConfig):
        raise TypeError(f"config must be a SyntheticConfig, got {type(config).__name__}")
    path = None
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
        path = os.path.join(os.fspath(cache_dir), f"synthetic-{config.key()}.npz")
        cached = _load_cache(path, config)
        if cached is not None:
            return cached
    splits = SyntheticSplits(*(_generate_split(config, split) for split in _SPLITS))
    if path is not None:
        _save_cache(path, config, splits)
    return splits


def _save_cache(path: str, config: SyntheticConfig, splits: SyntheticSplits) -> None:
    arrays = {"config": np.array(json.dumps(dataclasses.asdict(config), sort_keys=True))}
    for name, split in zip(_SPLITS, splits):
        arrays.update({f"{name}_images": split.images, f"{name}_labels": split.labels,
                       f"{name}_resolutions": split.resolutions})
    save_npz_atomic(path, **arrays)


def _load_cache(path: str, config: SyntheticConfig) -> SyntheticSplits | None:
    if not os.path.exists(path):
        return None
    try:
        with np.load(path) as data:
            if str(data["config"]) != json.dumps(dataclasses.asdict(config), sort_keys=True):
                raise ValueError("written for another config")
            return SyntheticSplits(*(FaceArrays(data[f"{n}_images"], data[f"{n}_labels"],
                                                data[f"{n}_resolutions"]) for n in _SPLITS))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as error:
        warnings.warn(f"ignoring unreadable synthetic cache {path} ({error}); regenerating", stacklevel=2)
        return None
