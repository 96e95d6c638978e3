"""What a benchmark run writes (docs/spec.md §6): CSV rows, a JSON summary of ratios, a PNG per sweep,
and the summary table printed at the end. Ratios are taken within one run only."""
from __future__ import annotations

import csv
import json
import os
import platform
import re
import subprocess
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from benchmarks.harness import Stats

CSV_COLUMNS = ("kernel", "provider", "mode", "metric", "B", "C", "D", "dtype", "p50", "p20", "p80",
               "device", "commit", "timestamp")
MEMORY_MODE = "full"
"""Workspace is measured over forward and backward together, as docs/spec.md §4 defines it."""


@dataclass(frozen=True)
class Key:
    kernel: str
    provider: str
    mode: str
    metric: str
    B: int
    C: int  # 0 for aux, which has no classes
    D: int
    dtype: str

    @property
    def shape(self) -> Tuple[int, int, int]:
        return self.B, self.C, self.D


Results = Dict[Key, Stats]


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    """The device as file names and the CSV name it: cpu-<model>-<threads>t or cuda-<card>."""
    if device == "cuda":
        return "cuda-" + slug(torch.cuda.get_device_name())
    return f"cpu-{slug(cpu_model())}-{torch.get_num_threads()}t"


def git_commit(root: Path) -> str:
    """The checkout's commit (`+dirty` with uncommitted changes), else $REE_COMMIT or unknown."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty=+dirty", "--abbrev=12"], cwd=root,
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("REE_COMMIT", "unknown")


def shape_text(kernel: str, shape: Tuple[int, int, int]) -> str:
    B, C, D = shape
    return f"B={B} D={D}" if kernel == "aux" else f"B={B} C={C} D={D}"


def csv_rows(results: Results, device: str, commit: str, timestamp: str) -> List[dict]:
    rows = []
    for key, stats in results.items():
        row = asdict(key)
        row["C"] = row["C"] or ""  # aux has no C
        row.update(p50=f"{stats.p50:.6g}", p20=f"{stats.p20:.6g}", p80=f"{stats.p80:.6g}",
                   device=device, commit=commit, timestamp=timestamp)
        rows.append(row)
    return rows


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    if num is None or den is None or den <= 0:
        return None
    return num / den


def ratios(results: Results, resolution_mb: float = 0.01) -> List[dict]:
    """Per kernel, shape, dtype, mode and provider: the p50 time against the floor's and the
    eager provider's (same mode), and for the workspace mode eager's workspace over this one,
    unless this one is below the measurement's resolution."""
    def p50(kernel, provider, mode, metric, shape, dtype) -> Optional[float]:
        stats = results.get(Key(kernel, provider, mode, metric, *shape, dtype))
        return None if stats is None else stats.p50

    records = []
    for key in results:
        if key.metric != "time_ms":
            continue
        time_ms = results[key].p50
        record = {
            "kernel": key.kernel, "B": key.B, "C": key.C or None, "D": key.D, "dtype": key.dtype,
            "mode": key.mode, "provider": key.provider, "time_ms": time_ms,
            "time_vs_floor": _ratio(time_ms, p50(key.kernel, "floor", key.mode, "time_ms", key.shape, key.dtype)),
            "time_vs_eager": _ratio(time_ms, p50(key.kernel, "eager", key.mode, "time_ms", key.shape, key.dtype)),
        }
        if key.mode == MEMORY_MODE:
            mine = p50(key.kernel, key.provider, key.mode, "peak_mem_mb", key.shape, key.dtype)
            eager = p50(key.kernel, "eager", key.mode, "peak_mem_mb", key.shape, key.dtype)
            record["workspace_mb"] = mine
            record["eager_workspace_over_this"] = (
                None if mine is None or mine < resolution_mb else _ratio(eager, mine))
        records.append(record)
    return records


def write_json(path: Path, summary: dict) -> None:
    """Writes `summary` as JSON; NaN and infinity (which JSON lacks) become null."""
    plain = json.loads(json.dumps(summary, default=str), parse_constant=lambda _: None)
    path.write_text(json.dumps(plain, indent=1) + "\n")


def _fmt_ms(stats: Optional[Stats]) -> str:
    if stats is None:
        return "-"
    return f"{stats.p50:.4g}" if stats.p50 < 1000 else f"{stats.p50:.0f}"


def _fmt_x(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def summary_table(results: Results, resolution_mb: float = 0.01) -> str:
    """One line per kernel, shape, dtype and provider: p50 ms per mode, the full step against
    the floor and eager, and the workspace (MB) with eager's over it."""
    groups: Dict[tuple, List[str]] = defaultdict(list)
    for key in results:
        group = (key.kernel, key.shape, key.dtype)
        if key.provider not in groups[group]:
            groups[group].append(key.provider)
    header = ("kernel", "shape", "dtype", "provider", "fwd ms", "bwd ms", "full ms", "full/floor",
              "full/eager", "work MB", "eager/work")
    lines = [header]
    by_key = {(r["kernel"], (r["B"], r["C"] or 0, r["D"]), r["dtype"], r["mode"], r["provider"]): r
              for r in ratios(results, resolution_mb)}
    for (kernel, shape, dtype), providers in groups.items():
        for provider in providers:
            times = {mode: results.get(Key(kernel, provider, mode, "time_ms", *shape, dtype))
                     for mode in ("fwd", "bwd", "full")}
            full = by_key.get((kernel, shape, dtype, MEMORY_MODE, provider), {})
            memory = results.get(Key(kernel, provider, MEMORY_MODE, "peak_mem_mb", *shape, dtype))
            lines.append((kernel, shape_text(kernel, shape), dtype, provider, _fmt_ms(times["fwd"]),
                          _fmt_ms(times["bwd"]), _fmt_ms(times["full"]), _fmt_x(full.get("time_vs_floor")),
                          _fmt_x(full.get("time_vs_eager")),
                          "-" if memory is None else f"{memory.p50:.1f}",
                          _fmt_x(full.get("eager_workspace_over_this"))))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(line, widths)).rstrip() for line in lines)


def plot_sweep(path: Path, title: str, kernel: str, shapes: Sequence[Tuple[int, int, int]],
               providers: Sequence[str], modes: Sequence[str], dtype: str, results: Results,
               footnotes: Sequence[str] = ()) -> Optional[str]:
    """A PNG of the sweep: time (p50, p20–p80 bars) and workspace per provider, against the
    axis that varies, or per mode when the sweep has one shape; `footnotes` under the axes.
    None, or why no plot."""
    try:
        import matplotlib
        import matplotlib.ticker
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"

    providers = [p for p in providers if any(k.kernel == kernel and k.provider == p and k.dtype == dtype
                                             and k.shape in shapes for k in results)]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    varying = [i for i in range(3) if len({s[i] for s in shapes}) > 1]
    if varying:
        axis = varying[0]
        mode = MEMORY_MODE if MEMORY_MODE in modes else modes[0]
        for provider in providers:
            for ax, metric in ((ax_t, "time_ms"), (ax_m, "peak_mem_mb")):
                points = [(s[axis], results[k]) for s in shapes
                          if (k := Key(kernel, provider, mode, metric, *s, dtype)) in results]
                if not points:
                    continue
                xs, st = zip(*points)
                ax.errorbar(xs, [s.p50 for s in st],
                            yerr=[[s.p50 - s.p20 for s in st], [s.p80 - s.p50 for s in st]],
                            marker="o", capsize=3, label=provider)
        for ax in (ax_t, ax_m):
            ax.set_xscale("log")
            ticks = sorted({s[axis] for s in shapes})
            ax.set_xticks(ticks, [f"{t / 1e6:g}M" if t >= 1e6 else f"{t / 1e3:g}k" if t >= 1e3 else str(t)
                                  for t in ticks])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_xlabel("BCD"[axis])
        ax_t.set_yscale("log")
        ax_m.set_yscale("symlog", linthresh=1.0)  # workspaces of 0 MB stay on the plot
        ax_m.set_ylim(bottom=0)
        title += ", " + " ".join(f"{'BCD'[i]}={shapes[0][i]}" for i in range(3) if i != axis and shapes[0][i])
        ax_t.set_title(f"time, {mode} (ms, p50 with p20-p80)")
    else:
        width = 0.8 / max(1, len(providers))
        for j, provider in enumerate(providers):
            stats = [results.get(Key(kernel, provider, m, "time_ms", *shapes[0], dtype)) for m in modes]
            xs = [i + j * width for i, s in enumerate(stats) if s is not None]
            st = [s for s in stats if s is not None]
            if st:
                ax_t.bar(xs, [s.p50 for s in st], width,
                         yerr=[[s.p50 - s.p20 for s in st], [s.p80 - s.p50 for s in st]], capsize=2,
                         label=provider)
            memory = results.get(Key(kernel, provider, MEMORY_MODE, "peak_mem_mb", *shapes[0], dtype))
            if memory is not None:
                ax_m.bar([j], [memory.p50], 0.8, label=provider)
        ax_t.set_xticks([i + width * (len(providers) - 1) / 2 for i in range(len(modes))], modes)
        ax_t.set_yscale("log")
        ax_t.set_title("time (ms, p50 with p20-p80)")
        ax_m.set_xticks(range(len(providers)), providers, rotation=30)
        title += f", {shape_text(kernel, shapes[0])}"
    ax_m.set_title(f"workspace, {MEMORY_MODE} (MB)")
    for ax in (ax_t, ax_m):
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    if footnotes:
        fig.text(0.01, 0.01, "\n".join(footnotes), fontsize=7, va="bottom", wrap=True)
        fig.tight_layout(rect=(0, 0.04 * len(footnotes), 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
