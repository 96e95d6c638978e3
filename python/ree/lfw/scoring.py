"""Scores of the LFW-VLR protocol: what each model makes of every evaluation image at every
resolution, and the recognition and quality metrics computed from it (docs/lfw.md).

Quality scores (higher = better quality), per image and resolution:
- `ξ̂`: the PRM output of an REE model (docs/spec.md §1.11); `CR-FIQA`: the same head of a model
  trained as CR-FIQA (Boutros et al., CVPR 2023).
- `norm`: the feature norm ‖v‖, read as quality the way MagFace does (Meng et al., CVPR 2021).
- `SER-FIQ`: 2·sigmoid(−(2/m²)·Σ_{i<j} ‖x_i − x_j‖) over m = 10 passes with dropout on in the
  embedding layer, x the normalised embeddings (Terhörst et al., CVPR 2020).
- `ERS`: 1 − cos(v, ū), the distance to the centre of the unrecognizable instances.
- `resolution`: the true probe side, the reference a quality estimate would like to match.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import evaluation as ev
from ..data.arrays import to_tensor
from ..data.degrade import downsample
from ..evaluation.pipeline import FARS, RANKS, EvalProtocol, quality_ercs, spearman, ui_center_from_images
from ..models.ree_model import SERFIQ_PASSES, REEModel, embed, ers_score
from .protocol import EvalSet

FOLDS = 10


@dataclass
class Views:
    """One model on every evaluation image at every resolution (float64 numpy).

    embeddings [L, N, D] flip-fused; norm, prm, serfiq, ers [L, N]; L follows `EvalSet.levels`."""

    embeddings: np.ndarray
    norm: np.ndarray
    prm: np.ndarray
    serfiq: np.ndarray
    ers: np.ndarray


def views(model: REEModel, images: np.ndarray, levels: Sequence[int], ui_center: Optional[torch.Tensor], *,
          seed: int = 0, batch_size: int = 512, progress: Optional[str] = None) -> Views:
    """Embeds uint8 crops [N, S, S, 3] (S: the model input) at every level (S itself: undegraded)
    with `embed` (flip fusion, SER-FIQ passes). ū: the model's UI centre, or None to take it from
    UIs synthesised out of these images (`ui_center_from_images`). `progress`: the label of a
    progress bar over the levels (shown on a terminal only)."""
    size = model.input_size
    if images.ndim != 4 or images.shape[1] != size:
        raise ValueError(f"images must be crops at the model input ({size} px), got shape {images.shape}")
    crops = to_tensor(images)
    if progress is not None:
        from tqdm.auto import tqdm

        levels = tqdm(levels, desc=progress, unit="resolution", leave=False, disable=None)
    results = [embed(model, downsample(crops, level), batch_size=batch_size, serfiq_passes=SERFIQ_PASSES, seed=seed)
               for level in levels]
    if ui_center is None:
        ui_center = ui_center_from_images(model, crops[: min(len(crops), 512)], seed)
    stack = lambda key: torch.stack([getattr(r, key) for r in results])  # noqa: E731
    ers = ers_score(stack("plain"), ui_center)
    as_np = lambda t: t.double().numpy()  # noqa: E731
    return Views(as_np(stack("embeddings")), as_np(stack("norm")), as_np(stack("quality")), as_np(stack("serfiq")),
                 as_np(ers))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _interleaved(n: int) -> np.ndarray:
    """An order putting pair k in fold k mod FOLDS, so that each fold of a pairs file sorted
    genuine-first holds both kinds."""
    return np.argsort(np.arange(n) % FOLDS, kind="stable")


def verification(scores: np.ndarray, same: np.ndarray) -> Dict[str, float]:
    order = _interleaved(len(scores))
    accuracy, _ = ev.kfold_accuracy(scores[order], same[order], FOLDS)
    out = {f"tar@{far:g}": ev.tar_at_far(scores, same, far) for far in FARS}
    out["acc"] = accuracy
    return out


def recognition(view: Views, evalset: EvalSet,
                cmc: Mapping[str, List[float]]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """{"vlr": {level: metrics}, "cross": {level: metrics}, "ident": {level: CMC at RANKS}} (levels
    as str, "HR" for the undegraded crop); `cmc`: the view's `cmc_curves`."""
    e = _unit(view.embeddings)
    hr = 0
    result: Dict[str, Dict[str, Dict[str, float]]] = {"vlr": {}, "cross": {}, "ident": {}}
    for k, level in enumerate(evalset.levels):
        name = "HR" if k == hr else str(level)
        scores = np.einsum("ij,ij->i", e[k, evalset.pair_a], e[k, evalset.pair_b])
        result["vlr"][name] = verification(scores, evalset.same)
        if k != hr:
            cross = np.einsum("ij,ij->i", e[hr, evalset.pair_a], e[k, evalset.pair_b])
            result["cross"][name] = verification(cross, evalset.same)
        result["ident"][name] = {f"rank-{r}": cmc[name][r - 1] for r in RANKS}
    return result


def cmc_curves(view: Views, evalset: EvalSet, max_rank: int = max(RANKS)) -> Dict[str, List[float]]:
    """{level: identification rate at ranks 1..max_rank} of the probes at each level."""
    e = _unit(view.embeddings)
    return {("HR" if k == 0 else str(level)): ev.cmc_curve(e[k, evalset.probes], evalset.probe_labels,
                                                          e[0, evalset.gallery], evalset.gallery_labels,
                                                          max_rank).tolist()
            for k, level in enumerate(evalset.levels)}


def erc_levels(evalset: EvalSet) -> Tuple[np.ndarray, np.ndarray]:
    """The level index (into `evalset.levels`) of side a and of side b of each quality pair."""
    level = {v: k for k, v in enumerate(evalset.levels)}
    return np.vectorize(level.get)(evalset.erc_res_a), np.vectorize(level.get)(evalset.erc_res_b)


def erc_scores(view: Views, evalset: EvalSet) -> np.ndarray:
    """Comparison scores of the quality pairs, each side at its drawn resolution."""
    la, lb = erc_levels(evalset)
    e = _unit(view.embeddings)
    return np.einsum("ij,ij->i", e[la, evalset.erc_a], e[lb, evalset.erc_b])


def resolution_map(evalset: EvalSet) -> np.ndarray:
    """The true resolution as a [L, N] per-image score."""
    return np.repeat(np.asarray(evalset.levels, np.float64)[:, None], len(evalset.rows), axis=1)


def ercs(scores: np.ndarray, evalset: EvalSet, qualities: Mapping[str, np.ndarray], *,
         seed: int = 0) -> Dict[str, Dict[str, "ev.ErcResult"]]:
    """{threshold_mode: {quality: ErcResult}} for [L, N] per-image qualities, plus `random`
    (`quality_ercs` on the qualities flattened, each pair side indexing its image at its level)."""
    la, lb = erc_levels(evalset)
    n = len(evalset.rows)
    pairs = EvalProtocol(la * n + evalset.erc_a, lb * n + evalset.erc_b, evalset.erc_same, identification=None,
                         edges=[])
    return quality_ercs(scores, pairs, {name: q.ravel() for name, q in qualities.items()}, seed=seed)


def resolution_correlation(qualities: Mapping[str, np.ndarray], evalset: EvalSet) -> Dict[str, float]:
    """Spearman correlation of each [L, N] quality with the true resolution, over all images."""
    truth = resolution_map(evalset).ravel()
    return {name: spearman(q.ravel(), truth) if np.isfinite(q).all() else math.nan for name, q in qualities.items()}
