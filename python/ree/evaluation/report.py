"""Markdown for runs/<name>/report.md: tables, the ERC and CMC tables, and a small report builder
that writes its file atomically (a temporary file renamed over the target)."""
from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .quality import ErcResult

MISSING = "n/a"


def format_cell(value: object, floatfmt: str = ".4f") -> str:
    """A table cell: floats with `floatfmt`, NaN / None as "n/a", '|' escaped, newlines joined."""
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return MISSING
    if isinstance(value, (float, np.floating)):
        text = format(float(value), floatfmt)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[object], rows: Sequence[Sequence[object]], *, floatfmt: str = ".4f") -> str:
    """A GitHub-flavoured markdown table; numbers are right-aligned, other columns left."""
    headers = [format_cell(header) for header in headers]
    if not headers:
        raise ValueError("headers is empty")
    for index, row in enumerate(rows):
        if len(row) != len(headers):
            raise ValueError(f"rows[{index}] has {len(row)} cells but there are {len(headers)} headers")
    numeric = [
        bool(rows) and all(isinstance(row[column], (int, float, np.number)) and not isinstance(row[column], bool)
                           for row in rows)
        for column in range(len(headers))
    ]
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---:" if is_number else ":---" for is_number in numeric) + "|",
    ]
    lines += ["| " + " | ".join(format_cell(cell, floatfmt) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def erc_table(results: Mapping[str, ErcResult], *, floatfmt: str = ".4f") -> str:
    """One row per quality method: threshold mode, then AUC and pAUC at each FMR, preceded by a
    line recording the grid, the pAUC limit and the pair count. The results must share the
    reject grid, the FMRs and the pAUC limit (ValueError otherwise: their areas would not
    compare)."""
    if not results:
        raise ValueError("results is empty")
    first = next(iter(results.values()))
    for name, result in results.items():
        if not (np.array_equal(result.reject, first.reject) and result.fmrs == first.fmrs
                and result.pauc_limit == first.pauc_limit):
            raise ValueError(f"result {name!r} has another reject grid, FMRs or pAUC limit than the first")
    low, high = first.reject_range
    note = (f"ERC over reject fractions {low:g}-{high:g} ({first.reject.size} points, {first.num_pairs} pairs);"
            f" AUC and pAUC (up to {first.pauc_limit:g}) by the trapezoid rule, not normalised; lower is better.")
    headers = ["quality", "threshold"]
    headers += [f"AUC @ FMR {fmr:g}" for fmr in first.fmrs] + [f"pAUC @ FMR {fmr:g}" for fmr in first.fmrs]
    rows = [[name, result.threshold_mode] + [result.auc[fmr] for fmr in first.fmrs]
            + [result.pauc[fmr] for fmr in first.fmrs] for name, result in results.items()]
    return note + "\n\n" + markdown_table(headers, rows, floatfmt=floatfmt)


def cmc_table(results: Mapping[str, Mapping[int, float]], *, floatfmt: str = ".4f") -> str:
    """One row per model: its identification rate at each rank (the ranks of the first result)."""
    if not results:
        raise ValueError("results is empty")
    ranks = sorted(next(iter(results.values())))
    rows = [[name] + [curve.get(rank) for rank in ranks] for name, curve in results.items()]
    return markdown_table(["model"] + [f"rank-{rank}" for rank in ranks], rows, floatfmt=floatfmt)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary file in the same folder and a rename, so a
    reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    return path


class Report:
    """A markdown document built block by block, e.g.

        report = Report("REE demo")
        report.heading("Verification")
        report.table(["model", "TAR@FAR=1e-3"], [["REE", 0.81]])
        report.image("erc.png", "ERC")   # relative to the report's folder
        report.write("runs/demo/report.md")
    """

    def __init__(self, title: str) -> None:
        self._blocks = [f"# {title}"]

    def heading(self, text: str, level: int = 2) -> None:
        if not 1 <= level <= 6:
            raise ValueError(f"level must be 1..6, got {level}")
        self._blocks.append("#" * level + " " + text)

    def text(self, markdown: str) -> None:
        """A paragraph, or any ready-made markdown block (e.g. `erc_table`'s output)."""
        self._blocks.append(markdown.strip())

    def table(self, headers: Sequence[object], rows: Sequence[Sequence[object]], *, floatfmt: str = ".4f") -> None:
        self._blocks.append(markdown_table(headers, rows, floatfmt=floatfmt))

    def image(self, path: str | Path, alt: str) -> None:
        self._blocks.append(f"![{alt}]({Path(path).as_posix()})")

    def render(self) -> str:
        return "\n\n".join(self._blocks) + "\n"

    def write(self, path: str | Path) -> Path:
        return write_text_atomic(path, self.render())
