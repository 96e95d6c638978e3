"""Evaluation driver (docs/spec.md §7): score a set with a model, then verification, identification and
quality (ERC) overall and per resolution bin, with the ree.evaluation metrics and the ree.data
protocols. `evaluate_checkpoint` is what `ree eval` runs; the demo composes the same pieces."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import evaluation as ev
from ..data import protocol as protocols
from ..data.degrade import synthesize_uis
from ..models.ree_model import REEModel, embed, ers_score

FARS = (1e-2, 1e-3)
RANKS = (1, 5, 20)
ERC_FMRS = (1e-2, 1e-3)
"""FMRs of the ERCs: FMR 1e-4 needs ~10^5 impostor pairs, more than these test sets have."""
THRESHOLD_MODES = ("recompute", "fixed")


@dataclass
class Scored:
    """One model's view of an image set (numpy, float64): flip-fused embeddings [N, D], the
    PRM quality ξ̂, the feature norm ‖v‖ and ERS = 1 − cos(v, ū) (distance to the UI centre)."""

    embeddings: np.ndarray
    quality: np.ndarray
    norm: np.ndarray
    ers: np.ndarray

    def qualities(self, with_prm: bool = True) -> Dict[str, np.ndarray]:
        """The per-image quality scores to compare, named as in the reports."""
        out = {"REE ξ̂": self.quality} if with_prm else {}
        out.update({"feature norm": self.norm, "ERS": self.ers})
        return out


def set_tensors(dataset: Any) -> Tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """(images [N, 3, S, S] normalised, labels, resolutions) of a FaceArrays-like set."""
    if hasattr(dataset, "tensors"):
        return dataset.tensors(), np.asarray(dataset.labels), np.asarray(dataset.resolutions)
    items = [dataset[i] for i in range(len(dataset))]
    return (torch.stack([it[0] for it in items]), np.array([int(it[1]) for it in items]),
            np.array([int(it[2]) for it in items]))


@torch.no_grad()
def ui_center_from_images(model: REEModel, images: torch.Tensor, seed: int = 0, limit: int = 512) -> torch.Tensor:
    """ū for a model without a trained UI tracker (the ArcFace baseline): the mean normalised
    embedding of UIs synthesised (docs/spec.md §1.10) from up to `limit` of `images`."""
    generator = torch.Generator().manual_seed(seed)
    chosen = images[torch.randperm(images.shape[0], generator=generator)[:limit]]
    uis = synthesize_uis(chosen, generator=generator)
    v = embed(model, uis, flip=False).embeddings
    return torch.nn.functional.normalize(v, dim=1).mean(0)


def score(model: REEModel, images: torch.Tensor, ui_center: Optional[torch.Tensor], *, seed: int = 0) -> Scored:
    """Embeds `images` (flip fusion) and computes the three quality scores; ū from the model's
    tracker when given, else `ui_center_from_images` on these images."""
    center = ui_center if ui_center is not None else ui_center_from_images(model, images, seed)
    out = embed(model, images, flip=True)
    ers = ers_score(out.plain, center)
    return Scored(out.embeddings.double().numpy(), out.quality.double().numpy(), out.norm.double().numpy(),
                  ers.double().numpy())


def bin_edges(resolutions: np.ndarray) -> List[int]:
    """Resolution bin edges: four bins of roughly equal width over the range, or one bin per
    distinct size when there are at most four (e.g. one native size)."""
    values = np.unique(resolutions)
    if values.size <= 4:
        return [int(v) for v in values] + [int(values[-1]) + 1]
    low, high = int(values[0]), int(values[-1]) + 1
    edges = np.unique(np.round(np.linspace(low, high, 5)).astype(int))
    return [int(e) for e in edges]


@dataclass
class EvalProtocol:
    """Verification pairs (a, b, same) and the identification gallery/probe split of a set."""

    pair_a: np.ndarray
    pair_b: np.ndarray
    same: np.ndarray
    identification: Any
    edges: List[int]


def max_pairs(labels: np.ndarray) -> int:
    """The most balanced verification pairs `verification_pairs` can draw from these labels:
    twice the genuine pairs there are, and at most half the impostor pairs possible."""
    _, counts = np.unique(labels[labels >= 0], return_counts=True)
    genuine = int((counts * (counts - 1) // 2).sum())
    impostor = int((counts.sum() ** 2 - (counts ** 2).sum()) // 2) // 2
    return min(2 * genuine, 2 * impostor)


def make_protocol(labels: np.ndarray, resolutions: np.ndarray, *, num_pairs: int = 6000, seed: int = 0,
                  distractor_fraction: float = 0.2) -> EvalProtocol:
    """Verification pairs (`num_pairs`, fewer on a set too small for them) and the
    identification split with `distractor_fraction` of the identities as distractors."""
    # shuffled: the folds mix both kinds
    a, b, same = protocols.verification_pairs(labels, min(num_pairs, max_pairs(labels)), seed)
    ident = protocols.identification_protocol(labels, seed, gallery_per_id=1, distractor_fraction=distractor_fraction)
    return EvalProtocol(np.asarray(a), np.asarray(b), np.asarray(same, dtype=bool), ident, bin_edges(resolutions))


def pair_scores(scored: Scored, protocol: EvalProtocol) -> np.ndarray:
    e = scored.embeddings / np.linalg.norm(scored.embeddings, axis=1, keepdims=True).clip(1e-12)
    return np.einsum("ij,ij->i", e[protocol.pair_a], e[protocol.pair_b])


def _safe(fn, *args, **kwargs) -> float:
    """A metric, or NaN where a subset cannot support it (e.g. a bin without impostor pairs)."""
    try:
        out = fn(*args, **kwargs)
    except ValueError:
        return math.nan
    return out


def recognition(scored: Scored, labels: np.ndarray, resolutions: np.ndarray, protocol: EvalProtocol) -> Dict[str, Any]:
    """Verification (TAR@FAR, 10-fold accuracy) and identification (CMC) overall and per bin
    (pairs binned by the lower resolution of the two, probes by their own)."""
    scores, same = pair_scores(scored, protocol), protocol.same
    ident = protocol.identification
    probe_idx, gallery_idx = np.asarray(ident.probe_idx), np.asarray(ident.gallery_idx)
    probe_labels, gallery_labels = np.asarray(ident.probe_labels), np.asarray(ident.gallery_labels)
    emb = scored.embeddings

    def block(mask_pairs: np.ndarray, mask_probes: np.ndarray) -> Dict[str, Any]:
        s, y = scores[mask_pairs], same[mask_pairs]
        out: Dict[str, Any] = {"pairs": int(mask_pairs.sum()), "probes": int(mask_probes.sum())}
        for far in FARS:
            out[f"tar@{far:g}"] = _safe(ev.tar_at_far, s, y, far)
        acc = _safe(ev.kfold_accuracy, s, y, 10)
        out["acc"], out["acc_std"] = (acc if isinstance(acc, tuple) else (math.nan, math.nan))
        if mask_probes.any():
            cmc = ev.cmc(emb[probe_idx[mask_probes]], probe_labels[mask_probes], emb[gallery_idx], gallery_labels,
                         RANKS)
            out.update({f"rank-{r}": cmc[r] for r in RANKS})
        else:
            out.update({f"rank-{r}": math.nan for r in RANKS})
        return out

    pair_res = np.minimum(resolutions[protocol.pair_a], resolutions[protocol.pair_b])
    probe_res = resolutions[probe_idx]
    result = {"overall": block(np.ones_like(same), np.ones(len(probe_idx), dtype=bool)), "bins": {}}
    pair_bins = ev.resolution_bins(pair_res, protocol.edges)
    probe_bins = ev.resolution_bins(probe_res, protocol.edges)
    for (name, pairs), (_, probes) in zip(pair_bins, probe_bins):
        result["bins"][name] = block(pairs, probes)
    curve = ev.cmc_curve(emb[probe_idx], probe_labels, emb[gallery_idx], gallery_labels, max(RANKS))
    result["cmc_curve"] = curve.tolist()
    return result


def quality_ercs(scores: np.ndarray, protocol: EvalProtocol, qualities: Mapping[str, np.ndarray], *,
                 seed: int = 0) -> Dict[str, Dict[str, "ev.ErcResult"]]:
    """{threshold_mode: {quality name: ErcResult}} on these pair scores, with a random
    quality as the floor every real one should beat."""
    per_image = dict(qualities)
    per_image["random"] = np.random.default_rng(seed + 7).random(len(next(iter(qualities.values()))))
    out = {}
    for mode in THRESHOLD_MODES:
        out[mode] = {name: ev.erc(scores, protocol.same, q[protocol.pair_a], q[protocol.pair_b], fmrs=ERC_FMRS,
                                  threshold_mode=mode) for name, q in per_image.items()}
    return out


def quality_by_resolution(scored: Scored, resolutions: np.ndarray, edges: Sequence[int]) -> Dict[str, Any]:
    """Mean of each quality score per resolution bin, and its Spearman correlation with the
    resolution (how well it tracks the one degradation the synthetic set varies)."""
    table: Dict[str, Any] = {}
    for name, q in scored.qualities().items():
        table[name] = {"spearman": spearman(q, resolutions),
                       "bins": {b: float(q[m].mean()) if m.any() else math.nan
                                for b, m in ev.resolution_bins(resolutions, edges)}}
    return table


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (mid-ranks for ties)."""
    def ranks(v: np.ndarray) -> np.ndarray:
        _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
        return (np.cumsum(counts) - (counts - 1) / 2)[inverse]

    rx, ry = ranks(np.asarray(x)), ranks(np.asarray(y))
    if rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def erc_summary(results: Mapping[str, "ev.ErcResult"]) -> Dict[str, Any]:
    return {name: {"auc": {f"{k:g}": v for k, v in r.auc.items()}, "pauc": {f"{k:g}": v for k, v in r.pauc.items()},
                   "threshold_mode": r.threshold_mode, "pauc_limit": r.pauc_limit, "num_pairs": r.num_pairs}
            for name, r in results.items()}


def recognition_rows(results: Mapping[str, Dict[str, Any]]) -> Tuple[List[str], List[List[Any]]]:
    """Headers and rows of the main recognition table, one row per model."""
    headers = ["model"] + [f"TAR@FAR={f:g}" for f in FARS] + ["10-fold acc"] + [f"rank-{r}" for r in RANKS]
    rows = [[name] + [r["overall"][f"tar@{f:g}"] for f in FARS] + [r["overall"]["acc"]]
            + [r["overall"][f"rank-{k}"] for k in RANKS] for name, r in results.items()]
    return headers, rows


def bin_rows(results: Mapping[str, Dict[str, Any]]) -> Tuple[List[str], List[List[Any]]]:
    headers = ["model", "resolution", "pairs", f"TAR@FAR={FARS[0]:g}", "10-fold acc", "probes", "rank-1"]
    rows = []
    for name, r in results.items():
        for b, m in r["bins"].items():
            rows.append([name, b, m["pairs"], m[f"tar@{FARS[0]:g}"], m["acc"], m["probes"], m["rank-1"]])
    return headers, rows


def to_jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_json(path: Path, value: Any, indent: int = 2) -> None:
    ev.report.write_text_atomic(path, json.dumps(to_jsonable(value), indent=indent, sort_keys=True) + "\n")


def evaluation_set(config: Any, data: Optional[str] = None):
    """The set `ree eval` scores: the synthetic test split (held-out identities) for
    `data="synthetic"` or a checkpoint trained on it, else every image of the ImageFolder
    directory or .rec file `data` names (which must hold other images than the training set)."""
    from ..data.sources import build_dataset

    if data is None and config.data != "synthetic":
        raise ValueError(f"the checkpoint was trained on {config.data}: name a held-out evaluation set with data= "
                         "(an ImageFolder directory or a .rec file) or data='synthetic'")
    source = config.data if data is None else data
    if source == "synthetic":
        from ..data.synthetic import SyntheticConfig, generate

        size = config.model_config().resolved_input_size
        return generate(SyntheticConfig(**{"image_size": size, **config.synthetic}), cache_dir=config.cache_dir).test
    return build_dataset(type(config).from_dict({**config.to_dict(), "data": source}))


def evaluate_checkpoint(checkpoint: str | Path, output: str | Path, *, data: Optional[str] = None,
                        device: str = "auto", num_pairs: int = 6000, seed: int = 0) -> str:
    """`ree eval`: scores the evaluation set with the checkpoint's model and writes
    output/report.md, output/metrics.json and the plots; returns the main table (markdown)."""
    from ..checkpoint import load_model
    from ..devices import resolve_device
    from . import plots

    output = Path(output)
    trained = load_model(checkpoint, resolve_device(device))
    images, labels, resolutions = set_tensors(evaluation_set(trained.config, data))
    protocol = make_protocol(labels, resolutions, num_pairs=num_pairs, seed=seed)
    scored = score(trained.model, images, trained.ui_center, seed=seed)
    name = "REE" if not trained.config.baseline else "ArcFace"
    rec = recognition(scored, labels, resolutions, protocol)
    ercs = quality_ercs(pair_scores(scored, protocol), protocol, scored.qualities(not trained.config.baseline),
                        seed=seed)
    by_res = quality_by_resolution(scored, resolutions, protocol.edges)

    report = ev.Report(f"ree eval: {Path(checkpoint).name} (step {trained.step})")
    headers, rows = recognition_rows({name: rec})
    report.table(headers, rows)
    report.heading("Per resolution bin")
    report.table(*bin_rows({name: rec}))
    report.heading("Quality: ERC")
    for mode in THRESHOLD_MODES:
        report.text(ev.erc_table(ercs[mode]))
    plots.plot_erc(ercs["recompute"], None, output / "erc.png")
    plots.plot_cmc({name: rec["cmc_curve"]}, output / "cmc.png")
    plots.plot_ri_vs_resolution(resolutions, scored.qualities(), output / "quality_vs_resolution.png", protocol.edges)
    for png, alt in (("erc.png", "ERC"), ("cmc.png", "CMC"), ("quality_vs_resolution.png", "quality vs resolution")):
        report.image(png, alt)
    report.write(output / "report.md")
    write_json(output / "metrics.json", {"recognition": rec, "quality_by_resolution": by_res,
                                         "erc": {m: erc_summary(r) for m, r in ercs.items()}})
    return ev.markdown_table(headers, rows)
