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

Verification adds, per resolution (`extended_verification`): TAR@FAR=1e-3 on the extended pairs
(`protocol.extended_pairs`) and bootstrap 95 % intervals, from resamples drawn once per
evaluation set (`uncertainty`) so that models and seeds are compared on the same ones.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import evaluation as ev
from ..data.arrays import to_tensor
from ..data.degrade import downsample
from ..evaluation import bootstrap as bs
from ..evaluation.pipeline import FARS, RANKS, EvalProtocol, quality_ercs, spearman, ui_center_from_images
from ..models.ree_model import SERFIQ_PASSES, REEModel, embed, ers_score, inference_copy
from ..prefix_cache import CACHE_DTYPE, PREFIX_BATCH
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
          seed: int = 0, batch_size: int = 512, progress: Optional[str] = None,
          prefixes: Optional[Sequence[torch.Tensor]] = None) -> Views:
    """Embeds uint8 crops [N, S, S, 3] (S: the model input) at every level (S itself: undegraded)
    with `embed` (flip fusion, SER-FIQ passes). ū: the model's UI centre, or None to take it from
    UIs synthesised out of these images (`ui_center_from_images`). `progress`: the label of a
    progress bar over the levels (shown on a terminal only). `prefixes`: `level_prefixes` of a
    frozen prefix the model shares with others; the model (its `inference_copy`) runs from them,
    without flip fusion."""
    size = model.input_size
    if images.ndim != 4 or images.shape[1] != size:
        raise ValueError(f"images must be crops at the model input ({size} px), got shape {images.shape}")
    if prefixes is not None and len(prefixes) != len(levels):
        raise ValueError(f"prefixes must hold one tensor per level ({len(levels)}), got {len(prefixes)}")
    crops = to_tensor(images)
    steps = list(enumerate(levels))
    if progress is not None:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=progress, unit="resolution", leave=False, disable=None)
    if prefixes is not None:
        model = inference_copy(model)
    results = [embed(model, downsample(crops, level), flip=prefixes is None, batch_size=batch_size,
                     serfiq_passes=SERFIQ_PASSES, seed=seed, prefix=None if prefixes is None else prefixes[k])
               for k, level in steps]
    if ui_center is None:
        ui_center = ui_center_from_images(model, crops[: min(len(crops), 512)], seed)
    stack = lambda key: torch.stack([getattr(r, key) for r in results])  # noqa: E731
    ers = ers_score(stack("plain"), ui_center)
    as_np = lambda t: t.double().numpy()  # noqa: E731
    return Views(as_np(stack("embeddings")), as_np(stack("norm")), as_np(stack("quality")), as_np(stack("serfiq")),
                 as_np(ers))


def level_prefixes(model: REEModel, images: np.ndarray, levels: Sequence[int], batch_size: int = PREFIX_BATCH
                   ) -> List[torch.Tensor]:
    """`model.prefix` (of its `inference_copy`) of uint8 crops [N, S, S, 3] at every level,
    float16 on the CPU: computed once for every model fine-tuned from the same frozen prefix
    (`views(prefixes=...)`)."""
    crops = to_tensor(images)
    fast = inference_copy(model)
    out = []
    for level in levels:
        degraded = downsample(crops, level)
        out.append(torch.cat([fast.prefix(degraded[i:i + batch_size]).to(CACHE_DTYPE).contiguous()
                              for i in range(0, len(degraded), batch_size)]))
    return out


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


# ------------------------------------------------------------------ intervals and the extended set

BOOTSTRAP_SEED = 0
"""The seed of the resamples: one draw per evaluation set, shared by every model and seed."""
EXT_FAR = 1e-3
EXT_KEY = "tar_far_1e-3_ext"
"""The extended set's metric: TAR at FAR 1e-3 on `EvalSet.extended`."""
INTERVAL_METRICS = ("acc", "tar@0.01", EXT_KEY)
"""Metrics given a bootstrap interval: the official pairs' 10-fold accuracy and TAR@FAR=1e-2
(pairs resampled within fold × genuine/impostor), the extended set's TAR (people resampled)."""


@dataclass
class Uncertainty:
    """The bootstrap resamples of one `EvalSet`: drawn once, applied to every model, resolution
    and seed, so that differences between them are paired.

    folds [n]: each official pair's fold (as `verification` assigns them); official [B, n]: the
    official pairs' weights; people [B, P]: the people's multiplicities; impostor_total [B]: the
    extended set's total impostor weight per replicate."""

    folds: np.ndarray
    official: np.ndarray
    people: np.ndarray
    impostor_total: np.ndarray


def official_folds(n: int) -> np.ndarray:
    """[n] the fold of each pair in `verification`'s 10-fold accuracy."""
    folds = np.empty(n, np.int64)
    for fold, block in enumerate(np.array_split(_interleaved(n), FOLDS)):
        folds[block] = fold
    return folds


def uncertainty(evalset: EvalSet, replicates: int = bs.REPLICATES, seed: int = BOOTSTRAP_SEED) -> Uncertainty:
    """The resamples of `evalset` (which must have its `extended` pairs).

    Raises:
        ValueError: the evaluation set was built without its extended pairs.
    """
    ext = evalset.extended
    if ext is None:
        raise ValueError("the evaluation set has no extended pairs: build it with evaluation_set(extended=True)")
    folds = official_folds(len(evalset.same))
    official = bs.pair_resamples(folds * 2 + evalset.same, replicates, seed)
    people = bs.people_resamples(len(evalset.names), replicates, seed + 1)
    impostors = ~ext.same
    total = bs.people_pair_total(people, ext.person_a[impostors], ext.person_b[impostors])
    return Uncertainty(folds, official, people, total)


def pair_cosines(first: np.ndarray, second: np.ndarray, a: np.ndarray, b: np.ndarray, block: int = 1024) -> np.ndarray:
    """[n] cos(first[a], second[b]) for unit rows first, second [N, D] and pairs sorted by `a`:
    one [block, N] Gram matrix at a time, so that half a million pairs cost N²·D flops and no
    [n, D] gather."""
    out = np.empty(len(a))
    for start in range(0, len(first), block):
        lo, hi = np.searchsorted(a, [start, start + block])
        if lo < hi:
            gram = first[start: start + block] @ second.T
            out[lo:hi] = gram[a[lo:hi] - start, b[lo:hi]]
    return out


def extended_verification(view: Views, evalset: EvalSet, unc: Uncertainty, level: float = bs.LEVEL
                          ) -> Tuple[Dict[str, Dict[str, Dict[str, Any]]], Dict[str, Dict[str, Dict[str, np.ndarray]]]]:
    """What `recognition` gains, per kind ("vlr", "cross") and level: `EXT_KEY` (TAR@FAR=1e-3 on
    the extended pairs; for "cross" the first image of each pair at HR) and the bootstrap
    interval of every `INTERVAL_METRICS` entry (`<metric>_ci95`). -> (those fields, the
    replicates {kind: {level: {metric: [B]}}} that `experiment.differences` pairs across models)."""
    ext = evalset.extended
    e = _unit(view.embeddings)
    fields: Dict[str, Dict[str, Dict[str, Any]]] = {"vlr": {}, "cross": {}}
    replicates: Dict[str, Dict[str, Dict[str, np.ndarray]]] = {"vlr": {}, "cross": {}}
    key = bs.ci_name(level)
    for k, lv in enumerate(evalset.levels):
        name = "HR" if k == 0 else str(lv)
        for kind, first in (("vlr", k), ("cross", 0)):
            if kind == "cross" and k == 0:
                continue
            official = np.einsum("ij,ij->i", e[first, evalset.pair_a], e[k, evalset.pair_b])
            extended = pair_cosines(e[first], e[k], ext.a, ext.b)
            reps = {
                "acc": bs.kfold_accuracy_weighted(official, evalset.same, unc.folds, unc.official),
                "tar@0.01": bs.tar_at_far_weighted(official[evalset.same], unc.official[:, evalset.same],
                                                   official[~evalset.same], unc.official[:, ~evalset.same], 1e-2),
                EXT_KEY: bs.tar_at_far_people(extended, ext.same, ext.person_a, ext.person_b, EXT_FAR, unc.people,
                                              impostor_total=unc.impostor_total),
            }
            out: Dict[str, Any] = {EXT_KEY: ev.tar_at_far(extended, ext.same, EXT_FAR)}
            out.update({f"{metric}_{key}": bs.interval(values, level) for metric, values in reps.items()})
            fields[kind][name] = out
            replicates[kind][name] = reps
    return fields, replicates
