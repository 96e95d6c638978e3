"""PNG plots for reports. Figures are built with matplotlib's object API on the Agg canvas, so
importing this module never touches pyplot's global state or needs a display."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ._arrays import int_vector, real_array
from .bins import resolution_bins
from .quality import ErcResult
from .report import format_cell

_DPI = 120


def _figure(panels: int, width: float = 5.0, height: float = 4.0) -> tuple[Figure, list]:
    figure = Figure(figsize=(width * panels, height), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, panels, squeeze=False)[0]
    return figure, list(axes)


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=_DPI)
    return path


def _result_key(result: ErcResult, fmr: float, name: str) -> float:
    for key in result.fmrs:
        if math.isclose(key, fmr, rel_tol=1e-9):
            return key
    raise ValueError(f"fmr {fmr:g} is not among the FMRs of result {name!r}: {result.fmrs}")


def plot_erc(results: Mapping[str, ErcResult], fmr: float | None, path: str | Path) -> Path:
    """ERC curves of several quality methods: FNMR against the fraction rejected, one panel at
    `fmr`, or one panel per FMR of the first result when `fmr` is None. Legends give the AUC and
    the threshold mode of each curve."""
    if not results:
        raise ValueError("results is empty")
    fmrs = list(next(iter(results.values())).fmrs) if fmr is None else [fmr]
    figure, axes = _figure(len(fmrs))
    for axis, target in zip(axes, fmrs):
        for name, result in results.items():
            key = _result_key(result, target, name)
            label = f"{name} (AUC {format_cell(result.auc[key])}, {result.threshold_mode})"
            axis.plot(result.reject, result.fnmr[key], marker="o", markersize=3, label=label)
        axis.set(title=f"ERC at FMR {target:g}", xlabel="fraction of pairs rejected (lowest quality first)",
                 ylabel="FNMR")
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    return _save(figure, path)


def plot_cmc(curves: Mapping[str, Mapping[int, float] | Sequence[float] | np.ndarray], path: str | Path) -> Path:
    """CMC curves: each value is {rank: rate} (as `cmc` returns) or a full curve whose element
    r - 1 is the rate at rank r (as `cmc_curve` returns)."""
    if not curves:
        raise ValueError("curves is empty")
    figure, (axis,) = _figure(1)
    for name, curve in curves.items():
        if isinstance(curve, Mapping):
            ranks = sorted(curve)
            rates = [curve[rank] for rank in ranks]
        else:
            rates = real_array(curve, f"curves[{name!r}]")
            ranks = np.arange(1, rates.size + 1)
        axis.plot(ranks, rates, marker="o", markersize=3, label=name)
    axis.set(title="CMC", xlabel="rank", ylabel="identification rate", ylim=(0, 1.02))
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    return _save(figure, path)


def plot_ri_vs_resolution(
    resolutions: object,
    values: Mapping[str, object],
    path: str | Path,
    edges: Sequence[int] | None = None,
) -> Path:
    """One panel per score (e.g. REE's ξ̂, the feature norm, ERS): a box per resolution bin
    (`edges`, see `bins.resolution_bins`) or per distinct resolution when `edges` is None, with
    the samples drawn as jittered dots over the boxes."""
    if not values:
        raise ValueError("values is empty")
    resolutions = int_vector(resolutions, "resolutions")
    if edges is None:
        groups = [(f"{r}", resolutions == r) for r in np.unique(resolutions)]
    else:
        groups = [(name, mask) for name, mask in resolution_bins(resolutions, edges) if mask.any()]
    position = np.zeros(resolutions.size)
    for index, (_, mask) in enumerate(groups):
        position[mask] = index
    position += np.random.default_rng(0).uniform(-0.15, 0.15, resolutions.size)
    figure, axes = _figure(len(values))
    for axis, (name, score) in zip(axes, values.items()):
        score = real_array(score, f"values[{name!r}]")
        if score.size != resolutions.size:
            raise ValueError(f"values[{name!r}] has {score.size} entries but resolutions has {resolutions.size}")
        axis.scatter(position, score, s=4, alpha=0.3, color="tab:blue")
        axis.boxplot([score[mask] for _, mask in groups], positions=np.arange(len(groups)), widths=0.6,
                     showfliers=False, tick_labels=[label for label, _ in groups])
        axis.set(title=f"{name} against resolution", xlabel="resolution (px)", ylabel=name)
        axis.tick_params(axis="x", labelrotation=45)
        axis.grid(alpha=0.3, axis="y")
    return _save(figure, path)
