"""Fine-tuning the last stage on features of a frozen backbone prefix, computed once.

With `trainable="last-stage"` only the backbone's last stage, the embedding layer, the PRM, the
PAM and the prototypes learn; everything before the last stage (`REEModel.prefix`) is frozen, so
its output for a given input image never changes. `cache_prefix=True` then runs the prefix once
per training image, on a training copy drawn as `Trainer.prepare_batch` draws them (a flip, a
side in [min_resolution, S], and for REE one UI), and every step trains from those stored
features: on SFace the prefix is 97 % of a forward pass, so a step costs a small fraction of a
full one. The price: each image keeps the one copy and the one UI drawn here for the whole run,
where the uncached loop draws new ones every epoch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from .data.arrays import fetch_batch
from .data.degrade import downsample, draw_uis, synthesize_uis
from .models.ree_model import REEModel, evaluating, inference_copy

CACHE_DTYPE = torch.float16
"""How the features are stored: half the memory of float32 (SFace: 50 KB an image), and the
prefix's outputs (after BatchNorm and PReLU) are well inside float16's range."""

PREFIX_BATCH = 32
"""Images per prefix call: SFace's prefix ran 1.3 times as fast in batches of 16–32 as in
batches of 64–256 on two CPU cores (its activations stay in the caches)."""


@dataclass
class PrefixCache:
    """`features` [N, C, h, w] of the training copies, `labels` [N] int64, and `ui_features`
    [N, C, h, w] of one UI made from each copy (None when the run has no UIs), on the CPU."""

    features: torch.Tensor
    labels: torch.Tensor
    ui_features: Optional[torch.Tensor]

    def __len__(self) -> int:
        return self.features.shape[0]

    def rows(self, indices: Sequence[int]) -> tuple:
        """(features, labels, UI features or None) of the items `indices`."""
        index = torch.as_tensor(indices, dtype=torch.int64)
        uis = None if self.ui_features is None else self.ui_features[index]
        return self.features[index], self.labels[index], uis

    def batch(self, features: torch.Tensor, labels: torch.Tensor, ui_features: Optional[torch.Tensor],
              count: int, device: torch.device, dtype: torch.dtype = torch.float32) -> tuple:
        """`rows` output -> (features, labels, is_ui) on `device`, with the UIs of the first
        `count` items appended under their labels, as `Trainer.prepare_batch` appends its UIs."""
        is_ui = torch.zeros(features.shape[0], dtype=torch.bool)
        if count:
            if ui_features is None:
                raise ValueError("the run asks for UIs, the prefix cache holds none (built with uis=False)")
            features = torch.cat([features, ui_features[:count]])
            labels = torch.cat([labels, labels[:count]])
            is_ui = torch.cat([is_ui, torch.ones(count, dtype=torch.bool)])
        return features.to(device, dtype), labels.to(device), is_ui.to(device)


def build_prefix_cache(model: REEModel, dataset: Any, *, seed: int, min_resolution: int, uis: bool,
                       ui_min_resolution: int, ui_max_resolution: int, batch_size: int = PREFIX_BATCH,
                       progress: bool = False) -> PrefixCache:
    """Runs `model.prefix` (of its `inference_copy`) once over a training copy of every item of
    `dataset` (a `FaceArrays`-like set with uint8 `images` [N, S, S, 3] and `labels`, or items
    (image [3, S, S], label, ...)): flipped with probability 1/2, downsampled to a side drawn
    uniformly in [min_resolution, S] (no downsampling when 0), and with `uis` a UI synthesised
    from that copy (docs/spec.md §1.10 [R]) at [ui_min_resolution, ui_max_resolution]. The draws
    come from a generator seeded by `seed` alone, so the cache, and a run resumed on it, is the
    same each time.

    Raises:
        ValueError: the model trains its whole backbone (its prefix would change under training),
            or the dataset is empty.
    """
    if model.config.trainable != "last-stage":
        raise ValueError(f"a prefix cache needs a model with trainable='last-stage', got {model.config.trainable!r}")
    n = len(dataset)
    if n == 0:
        raise ValueError("the training set is empty: nothing to cache")
    generator = torch.Generator().manual_seed(seed)
    size = model.input_size
    # drawn for the whole set first: an item's copy does not depend on the batch it is cached in
    flips = torch.rand(n, generator=generator) < 0.5
    sides = (torch.randint(min_resolution, size + 1, (n,), generator=generator) if min_resolution
             else torch.full((n,), size))
    ui_draws = draw_uis(n, 3, generator, max_res=ui_max_resolution) if uis else None
    device = next(model.parameters()).device
    fast = inference_copy(model)
    features, ui_features, labels = [], [], []
    chunks = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="caching the frozen prefix", unit="batch", leave=False, disable=None)
    for start in chunks:
        rows = slice(start, min(start + batch_size, n))
        images, chunk_labels = fetch_batch(dataset, range(rows.start, rows.stop))
        images = torch.where(flips[rows, None, None, None], images.flip(3), images)
        images = downsample(images, sides[rows])
        features.append(fast.prefix(images.to(device)).to("cpu", CACHE_DTYPE).contiguous())
        if ui_draws is not None:
            made = synthesize_uis(images, draws=ui_draws.rows(rows), min_res=ui_min_resolution,
                                  max_res=ui_max_resolution)
            ui_features.append(fast.prefix(made.to(device)).to("cpu", CACHE_DTYPE).contiguous())
        labels.append(chunk_labels)
    return PrefixCache(torch.cat(features), torch.cat(labels), torch.cat(ui_features) if uis else None)


def imprinted_prototypes(model: REEModel, cache: PrefixCache, num_classes: int, batch_size: int = 512
                         ) -> torch.Tensor:
    """The normalised mean of each class's normalised embeddings of the cached training copies,
    [num_classes, D] float32 on the CPU (weight imprinting, Qi et al., "Low-Shot Learning with
    Imprinted Weights", CVPR 2018): new prototypes that already agree with a pretrained
    backbone, so the first steps do not pull its features towards random directions.

    Raises:
        ValueError: a class in 0..num_classes-1 without a cached image.
    """
    device = next(model.parameters()).device
    sums = torch.zeros(num_classes, model.embedding_size)
    with evaluating(model):
        for start in range(0, len(cache), batch_size):
            rows = cache.features[start:start + batch_size].to(device, torch.float32)
            v = torch.nn.functional.normalize(model.forward_from_prefix(rows).embedding.float().cpu(), dim=1)
            sums.index_add_(0, cache.labels[start:start + batch_size], v)
    empty = torch.nonzero(sums.norm(dim=1) == 0).flatten()
    if empty.numel():
        raise ValueError(f"class {int(empty[0])} has no cached image to imprint its prototype from")
    return torch.nn.functional.normalize(sums, dim=1)
