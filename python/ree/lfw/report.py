"""Tables, goals and plots of LFW-VLR results (`experiment.run`'s summaries): means over seeds
with their sample standard deviation. Numbers come from the result dicts, never from strings."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, NamedTuple, Sequence, Tuple

import numpy as np

from . import protocol
from .experiment import Curves, slug
from .scoring import RANKS

Table = Tuple[List[str], List[List[Any]]]
LEVELS = ("HR",) + tuple(str(side) for side in protocol.RESOLUTIONS)


def mean_std(values: Sequence[float]) -> tuple:
    """(mean, sample std) ignoring NaN; std is NaN for one value."""
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    return float(np.mean(finite)), float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan


def cell(mean: float, std: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "—"
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _values(summary: Mapping[str, Any], *path: str) -> List[float]:
    out = []
    for seed in summary["per_seed"]:
        value: Any = seed
        for key in path:
            if isinstance(value, Mapping):
                value = value.get(key)
            elif isinstance(value, (list, tuple)) and key.isdigit() and int(key) < len(value):
                value = value[int(key)]  # an interval's bound
            else:
                value = None
        out.append(math.nan if value is None else float(value))
    return out


def stat(summary: Mapping[str, Any], *path: str) -> Tuple[float, float]:
    """(mean, std) over seeds of the value at `path` in each seed's results."""
    return mean_std(_values(summary, *path))


def methods(summary: Mapping[str, Any]) -> List[str]:
    return list(summary["per_seed"][0]["recognition"])


def verification_table(summary: Mapping[str, Any], metric: str = "tar@0.01") -> Table:
    """Rows: method × (VLR–VLR, cross-resolution); columns: HR and each probe resolution."""
    headers = ["model", "pairs"] + [f"{lv} px" if lv != "HR" else "HR" for lv in LEVELS]
    rows = []
    for name in methods(summary):
        for kind, label in (("vlr", "VLR–VLR"), ("cross", "HR–VLR")):
            rows.append([name, label] + [cell(*stat(summary, "recognition", name, kind, lv, metric))
                                         for lv in LEVELS])
    return headers, rows


def identification_table(summary: Mapping[str, Any]) -> Table:
    headers = ["model", "rank"] + [f"{lv} px" if lv != "HR" else "HR" for lv in LEVELS]
    rows = []
    for name in methods(summary):
        for rank in RANKS:
            rows.append([name, f"rank-{rank}"] + [cell(*stat(summary, "recognition", name, "ident", lv, f"rank-{rank}"))
                                                  for lv in LEVELS])
    return headers, rows


def quality_names(summary: Mapping[str, Any]) -> List[str]:
    first = summary["per_seed"][0]["erc"]
    return list(next(iter(first.values()))["recompute"])


def quality_table(summary: Mapping[str, Any]) -> Table:
    """ERC AUC (FMR 1e-2 and 1e-3, threshold recomputed, and 1e-2 fixed) of every quality score on
    each recognizer's pairs, and its Spearman correlation with the probe resolution."""
    recognizers = methods(summary)
    headers = ["quality"]
    for r in recognizers:
        headers += [f"{r}: AUC 1e-2", f"{r}: AUC 1e-3", f"{r}: AUC 1e-2 fixed"]
    headers.append("Spearman vs resolution")
    rows = []
    for q in quality_names(summary):
        row: List[Any] = [q]
        for r in recognizers:
            row += [cell(*stat(summary, "erc", r, "recompute", q, "auc", "0.01")),
                    cell(*stat(summary, "erc", r, "recompute", q, "auc", "0.001")),
                    cell(*stat(summary, "erc", r, "fixed", q, "auc", "0.01"))]
        row.append(cell(*stat(summary, "spearman", recognizers[0], q)) if q != "random" else "—")
        rows.append(row)
    return headers, rows


class Goal(NamedTuple):
    text: str
    measured: str
    met: bool


def recognition_goals(summary: Mapping[str, Any], ree: str = "REE", base: str = "ArcFace",
                      gain: float = 0.02) -> List[Goal]:
    """REE ≥ ArcFace + `gain` TAR@FAR=1e-2 at 8 and 12 px (VLR–VLR and cross), no worse at 24 px
    and HR; compared as means over seeds."""
    goals = []
    for kind, label in (("vlr", "VLR–VLR"), ("cross", "HR–VLR")):
        for level in LEVELS:
            if kind == "cross" and level == "HR":
                continue
            ours, _ = stat(summary, "recognition", ree, kind, level, "tar@0.01")
            theirs, _ = stat(summary, "recognition", base, kind, level, "tar@0.01")
            need = gain if level in ("8", "12") else 0.0 if level in ("24", "HR") else None
            if need is None:
                continue
            goals.append(Goal(f"{label} {level}{' px' if level != 'HR' else ''}: {ree} ≥ {base} + {need:g}",
                              f"{ours - theirs:+.3f} ({ours:.3f} vs {theirs:.3f})", ours - theirs >= need))
    return goals


def quality_goals(summary: Mapping[str, Any], score: str = "ξ̂", reference: Sequence[str] = ("resolution", "random")
                  ) -> List[Goal]:
    """ξ̂'s ERC AUC (FMR 1e-2, recompute) below every other score but the references, on each
    recognizer's pairs; compared as means over seeds."""
    goals = []
    for recognizer in methods(summary):
        ours, _ = stat(summary, "erc", recognizer, "recompute", score, "auc", "0.01")
        others = {q: stat(summary, "erc", recognizer, "recompute", q, "auc", "0.01")[0]
                  for q in quality_names(summary) if q != score and q not in reference}
        best = min(others, key=others.get)
        goals.append(Goal(f"{recognizer}'s pairs: ERC AUC of {score} below every baseline",
                          f"{score} {ours:.4f} vs best baseline {best} {others[best]:.4f}", ours < others[best]))
    return goals


def pretrained_goals(summary: Mapping[str, Any], ree: str = "REE", base: str = "ArcFace",
                     pretrained: str = "SFace") -> List[Goal]:
    """The pretrained suite's recognition goals (10-fold accuracy, VLR–VLR, means over seeds):
    fine-tuned REE ≥ the pretrained model + 0.05 at 8 and 12 px and ≥ it − 0.01 at HR; REE
    above fine-tuned ArcFace at 8 and 12 px with the paired 95 % interval (seeds × bootstrap)
    above 0."""
    goals = []
    for level, need in (("8", 0.05), ("12", 0.05), ("HR", -0.01)):
        ours, _ = stat(summary, "recognition", ree, "vlr", level, "acc")
        theirs, _ = stat(summary, "recognition", pretrained, "vlr", level, "acc")
        goals.append(Goal(f"VLR–VLR {level}{' px' if level != 'HR' else ''}: {ree} ≥ {pretrained} {need:+g} "
                          "(10-fold accuracy)", f"{ours - theirs:+.3f} ({ours:.3f} vs {theirs:.3f})",
                          ours - theirs >= need))
    table = summary.get("differences", {}).get(f"{ree} − {base}", {})
    for level in ("8", "12"):
        d = table.get("vlr", {}).get(level, {}).get("acc")
        if d is not None:
            low, high = d["ci95"]
            goals.append(Goal(f"VLR–VLR {level} px: {ree} > {base}, paired interval above 0 (10-fold accuracy)",
                              f"{d['mean']:+.3f} [{low:+.3f}, {high:+.3f}]", low > 0))
    return goals


def goals_table(goals: Sequence[Goal]) -> Table:
    rows = [[g.text, g.measured, "yes" if g.met else "no"] for g in goals]
    return ["goal", "measured (mean over seeds)", "met"], rows


def write_plots(curves: Curves, out: Path) -> List[Tuple[str, str]]:
    """ERC plots (FMR 1e-2, threshold recomputed) per recognizer and CMC plots per resolution;
    -> [(file name, caption)]."""
    from ..evaluation import plots

    images = []
    for recognizer, results in curves.erc.items():
        name = f"erc_{slug(recognizer)}.png"
        plots.plot_erc(results, 1e-2, out / name)
        images.append((name, f"ERC on {recognizer}'s LFW-VLR pairs (FMR 1e-2, threshold recomputed)"))
    for level in ("8", "12", "16"):
        name = f"cmc_{level}px.png"
        plots.plot_cmc({r: c[level] for r, c in curves.cmc.items()}, out / name)
        images.append((name, f"CMC of {level} px probes against the HR gallery with distractors"))
    return images


def per_seed_seconds(summary: Mapping[str, Any]) -> Dict[str, float]:
    return {name: stat(summary, "seconds", name)[0] for name in methods(summary)}


def ablation_table(summary: Mapping[str, Any], judge: str = "ArcFace") -> Table:
    """One row per variant: its recognition (TAR@FAR=1e-2 at HR, 12 and 8 px, VLR–VLR and
    HR–VLR, rank-1 at 8 px) and, for variants with a quality head, the ERC AUC of that head's
    score (FMR 1e-2, threshold recomputed) on `judge`'s pairs, one recognizer for all, and on
    the variant's own pairs, with its Spearman correlation with the resolution."""
    headers = ["variant", "TAR HR", "TAR 12", "TAR 8", "HR–12", "HR–8", "rank-1 8",
               f"ERC AUC on {judge}'s pairs", "ERC AUC on own pairs", "Spearman"]
    names = quality_names(summary)
    rows = []
    for name in methods(summary):
        def tar(kind: str, level: str, name: str = name) -> str:
            return cell(*stat(summary, "recognition", name, kind, level, "tar@0.01"))

        row: List[Any] = [name, tar("vlr", "HR"), tar("vlr", "12"), tar("vlr", "8"), tar("cross", "12"),
                          tar("cross", "8"), cell(*stat(summary, "recognition", name, "ident", "8", "rank-1"))]
        score = next((q for q in (f"ξ̂ ({name})", "ξ̂" if name == "REE" else None,
                                  "CR-FIQA" if name == "CR-FIQA" else None) if q in names), None)
        if score is None:
            row += ["—", "—", "—"]
        else:
            row += [cell(*stat(summary, "erc", judge, "recompute", score, "auc", "0.01"), digits=4),
                    cell(*stat(summary, "erc", name, "recompute", score, "auc", "0.01"), digits=4),
                    cell(*stat(summary, "spearman", judge, score))]
        rows.append(row)
    return headers, rows


# --------------------------------------------------------------- intervals and the summary.json

def interval_cell(summary: Mapping[str, Any], *path: str, digits: int = 3) -> str:
    """"mean ± std [low, high]": the metric at `path` over seeds, and the mean over seeds of its
    per-seed bootstrap interval (`<metric>_ci95` beside it)."""
    mean, std = stat(summary, *path)
    bounds = [mean_std(_values(summary, *path[:-1], f"{path[-1]}_ci95", str(k)))[0] for k in (0, 1)]
    text = cell(mean, std, digits)
    if math.isnan(bounds[0]):
        return text
    return f"{text} [{bounds[0]:.{digits}f}, {bounds[1]:.{digits}f}]"



def interval_table(summary: Mapping[str, Any], metric: str) -> Table:
    """`verification_table` with each cell's mean bootstrap interval (`interval_cell`)."""
    headers = ["model", "pairs"] + [f"{lv} px" if lv != "HR" else "HR" for lv in LEVELS]
    rows = []
    for name in methods(summary):
        for kind, label in (("vlr", "VLR–VLR"), ("cross", "HR–VLR")):
            rows.append([name, label] + [interval_cell(summary, "recognition", name, kind, lv, metric)
                                         if kind == "vlr" or lv != "HR" else "—" for lv in LEVELS])
    return headers, rows


def difference_table(summary: Mapping[str, Any], metric: str, digits: int = 3) -> Table:
    """Rows: each paired difference (e.g. REE − ArcFace) × (VLR–VLR, HR–VLR); cells: the mean
    over seeds of the difference and its 95 % interval over seeds × bootstrap resamples."""
    headers = ["difference", "pairs"] + [f"{lv} px" if lv != "HR" else "HR" for lv in LEVELS]
    rows = []
    for name, table in summary.get("differences", {}).items():
        for kind, label in (("vlr", "VLR–VLR"), ("cross", "HR–VLR")):
            row: List[Any] = [name, label]
            for lv in LEVELS:
                d = table.get(kind, {}).get(lv, {}).get(metric)
                row.append("—" if d is None else
                           f"{d['mean']:+.{digits}f} [{d['ci95'][0]:+.{digits}f}, {d['ci95'][1]:+.{digits}f}]")
            rows.append(row)
    return headers, rows


SUMMARY_KINDS = {"vlr-vlr": "vlr", "hr-vlr": "cross"}
"""summary.json's pair kinds -> the result dicts' keys."""
SUMMARY_METRICS = {"acc10": "acc", "tar_far_1e-3_ext": "tar_far_1e-3_ext"}
"""summary.json's verification metrics -> the result dicts' keys (`acc` is the 10-fold accuracy)."""
SUMMARY_SCORES = {"ξ̂": "xi_hat", "CR-FIQA": "cr_fiqa", "SER-FIQ": "ser_fiq", "ERS": "ers"}
"""Quality score names of the result dicts -> summary.json's; `norm (X)` becomes `norm(X)`."""


def summary_score_name(name: str, methods: Mapping[str, str] | None = None) -> str:
    """summary.json's name of a quality score: `SUMMARY_SCORES`, and `norm (X)` as `norm(Y)` with
    Y the summary name of model X in `methods`."""
    if name in SUMMARY_SCORES:
        return SUMMARY_SCORES[name]
    if name.startswith("norm (") and name.endswith(")"):
        model = name[len("norm ("):-1]
        return f"norm({(methods or {}).get(model, model)})"
    return name


def summary_json(per_seed: Sequence[Mapping[str, Any]], *, methods: Mapping[str, str] | None = None,
                 judge: str | None = None, scores: Sequence[str] | None = None) -> Dict[str, Any]:
    """The benchmark's summary over seeds (means and sample stds; std None for one seed):

        {"verification": {METHOD: {"vlr-vlr" | "hr-vlr": {"HR" | "24" | "16" | "12" | "8":
            {"acc10": [m, s], "tar_far_1e-3_ext": [m, s]}}}},
         "quality": {SCORE: {"erc_auc": [m, s], "spearman_px": [m, s]}}}

    per_seed: `experiment.evaluate` results, one per seed. methods: {result name: summary name}
    (default: every model under its own name). HR–VLR has no "HR" entry (HR–HR is VLR–VLR's).
    Quality: every score of `judge`'s ERCs (default: the first model) but `random` and
    `resolution`, or those named in `scores` (result names, e.g. "ξ̂", "norm (REE)"): ERC AUC at
    FMR 1e-2 with the threshold recomputed, on `judge`'s pairs, and the Spearman correlation
    with the probe side; named by `summary_score_name` (SER-FIQ is the judge's own).

    Raises:
        ValueError: no seeds, or a method, the judge or a score that the results lack.
    """
    if not per_seed:
        raise ValueError("per_seed is empty: summary_json needs the results of at least one seed")
    summary = {"per_seed": list(per_seed)}
    present = list(per_seed[0]["recognition"])
    methods = dict(methods) if methods is not None else {m: m for m in present}
    missing = [m for m in methods if m not in present]
    judge = judge if judge is not None else present[0]
    if missing or judge not in present:
        raise ValueError(f"the results have the models {present}; asked for {missing or [judge]}")
    pair = lambda *path: [None if math.isnan(v) else v for v in stat(summary, *path)]  # noqa: E731
    verification: Dict[str, Any] = {}
    for name, out_name in methods.items():
        kinds = verification.setdefault(out_name, {})
        for kind, key in SUMMARY_KINDS.items():
            kinds[kind] = {lv: {metric: pair("recognition", name, key, lv, field)
                                for metric, field in SUMMARY_METRICS.items()}
                           for lv in LEVELS if key == "vlr" or lv != "HR"}
    known = list(per_seed[0]["erc"][judge]["recompute"])
    chosen = list(scores) if scores is not None else [q for q in known if q not in ("random", "resolution")]
    absent = [q for q in chosen if q not in known]
    if absent:
        raise ValueError(f"scores {absent} are not among {judge}'s quality scores {known}")
    quality = {summary_score_name(q, methods): {"erc_auc": pair("erc", judge, "recompute", q, "auc", "0.01"),
                                       "spearman_px": pair("spearman", judge, q)} for q in chosen}
    return {"verification": verification, "quality": quality}


def write_summary(path: Path, per_seed: Sequence[Mapping[str, Any]], **options: Any) -> Dict[str, Any]:
    """`summary_json(per_seed, **options)` written to `path` (atomically, NaN as null); returns it."""
    from ..evaluation.pipeline import write_json

    value = summary_json(per_seed, **options)
    write_json(path, value)
    return value
