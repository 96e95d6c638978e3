"""The synthetic demo's tables, sentences and plots, computed from its result dicts."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from .. import evaluation as ev
from ..evaluation import pipeline as E

METHODS = {"REE": "ree", "ArcFace": "arcface"}
"""Report name -> TrainConfig.method."""


def erc_rows(ercs: Dict[str, Dict[str, Dict[str, ev.ErcResult]]], fmr: float) -> Tuple[List[str], List[List[Any]]]:
    headers = ["recognizer", "quality", "AUC recompute", "pAUC recompute", "AUC fixed", "pAUC fixed"]
    rows = []
    for recognizer, modes in ercs.items():
        for quality in modes["recompute"]:
            r, f = modes["recompute"][quality], modes["fixed"][quality]
            rows.append([recognizer, quality, r.auc[fmr], r.pauc[fmr], f.auc[fmr], f.pauc[fmr]])
    return headers, rows


def quality_resolution_rows(result: Dict[str, Any]) -> Tuple[List[str], List[List[Any]]]:
    edges = result["protocol"].edges
    bins = [name for name, _ in ev.resolution_bins(result["resolutions"], edges)]
    headers = ["model", "quality", "Spearman vs resolution"] + [f"mean {b}" for b in bins]
    rows = []
    for name, scored in result["scored"].items():
        table = E.quality_by_resolution(scored, result["resolutions"], edges)
        for quality, values in table.items():
            if quality == "REE ξ̂" and name != "REE":
                continue  # the baseline's PRM is untrained
            rows.append([name, quality, values["spearman"]] + [values["bins"][b] for b in bins])
    return headers, rows


def summary_table(synthetic: Dict[str, Any], digits: Dict[str, Any], lfw: Dict[str, Dict[str, float]],
                  times: Dict[str, float]) -> Tuple[List[str], List[List[Any]]]:
    fmr = E.ERC_FMRS[0]
    headers = ["model", "TAR@FAR=1e-2", "TAR@FAR=1e-3", "10-fold acc", "rank-1", "rank-5", "rank-20",
               "ERC AUC (ξ̂ or norm)", "LFW face AUC", "digits acc", "digits ERC AUC", "train min"]
    rows = []
    for name in METHODS:
        overall = synthetic["recognition"][name]["overall"]
        quality = "REE ξ̂" if name == "REE" else "feature norm"
        rows.append([
            name, overall["tar@0.01"], overall["tar@0.001"], overall["acc"], overall["rank-1"], overall["rank-5"],
            overall["rank-20"], synthetic["erc"][name]["recompute"][quality].auc[fmr], lfw[name][quality],
            digits["recognition"][name]["overall"]["acc"], digits["erc"][name]["recompute"][quality].auc[fmr],
            f"{times[name] / 60:.1f}"])
    return headers, rows


LOWER_IS_BETTER = ("ERC AUC (ξ̂ or norm)", "digits ERC AUC")


def verdict(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """One sentence per metric of the summary: which model is ahead, by how much."""
    ree, arc = (dict(zip(headers, row)) for row in rows)
    compared = []
    for key in headers[1:]:
        a, b = ree[key], arc[key]
        if not (isinstance(a, float) and isinstance(b, float)) or math.isnan(a) or math.isnan(b):
            continue  # the training minutes, or a metric a small set cannot support
        better = (a < b) if key in LOWER_IS_BETTER else (a > b)
        compared.append((key, "tie" if a == b else ("REE" if better else "ArcFace"), a, b))
    wins = sum(winner == "REE" for _, winner, _, _ in compared)
    return (f"REE is ahead on {wins} of {len(compared)} summary metrics, ArcFace on the rest. "
            + "; ".join(f"{key}: {winner} ({a:.4f} vs {b:.4f})" for key, winner, a, b in compared) + ".")


def best_quality_sentence(ercs: Dict[str, Dict[str, Dict[str, ev.ErcResult]]], fmr: float) -> str:
    """Which quality has the lowest ERC AUC, per recognizer and threshold mode."""
    parts = []
    for recognizer, modes in ercs.items():
        for mode, results in modes.items():
            ranked = sorted(results, key=lambda q: results[q].auc[fmr])
            parts.append(f"{recognizer}'s pairs, {mode}: " + " < ".join(
                f"{q} {results[q].auc[fmr]:.4f}" for q in ranked))
    return "Lowest ERC AUC first (FMR 1e-2): " + "; ".join(parts) + "."


def write_plots(out: Path, synthetic: Dict[str, Any], digits: Dict[str, Any]) -> List[Tuple[str, str]]:
    from ..evaluation import plots

    images = []
    for name in METHODS:
        for mode in E.THRESHOLD_MODES:
            png = f"erc_{name.lower()}_{mode}.png"
            plots.plot_erc(synthetic["erc"][name][mode], None, out / png)
            images.append((png, f"ERC on {name}'s pairs, threshold {mode}"))
    plots.plot_cmc({n: r["cmc_curve"] for n, r in synthetic["recognition"].items()}, out / "cmc.png")
    images.append(("cmc.png", "CMC with distractors"))
    scored = synthetic["scored"]
    values = {"REE ξ̂": scored["REE"].quality, "REE feature norm": scored["REE"].norm,
              "ArcFace feature norm": scored["ArcFace"].norm, "REE ERS": scored["REE"].ers}
    plots.plot_ri_vs_resolution(synthetic["resolutions"], values, out / "quality_vs_resolution.png",
                                synthetic["protocol"].edges)
    images.append(("quality_vs_resolution.png", "quality scores against resolution"))
    plots.plot_erc(digits["erc"]["REE"]["recompute"], None, out / "erc_digits.png")
    images.append(("erc_digits.png", "ERC on the digits (REE's pairs)"))
    return images
