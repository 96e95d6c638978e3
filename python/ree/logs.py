"""Where the training log goes: log.csv, TensorBoard and a tqdm progress bar.

`TrainLog` opens the sinks a run asks for and writes each log row to all of them; the trainer
only computes the rows."""
from __future__ import annotations

import csv
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Dict, Optional

LOG_FIELDS = ("step", "epoch", "lr", "loss", "cls", "l1", "id", "mse", "ri_mean", "cos_pos", "ui_mu",
              "grad_norm", "images_per_s")
"""The columns of log.csv (and, but for "step", the TensorBoard scalars train/<field>)."""


def _complete(row: Dict[str, Optional[str]]) -> bool:
    """A log row with every field, its step an integer (not one torn by a kill mid-write)."""
    return all(row.get(k) not in (None, "") for k in LOG_FIELDS) and row["step"].isdigit() and None not in row


def tensorboard_installed() -> bool:
    """Whether the tensorboard package (which torch.utils.tensorboard writes through) is importable."""
    return importlib.util.find_spec("tensorboard") is not None


class CsvLog:
    """log.csv, appended to; a resumed run first drops the rows past its checkpoint's step
    (written by the interrupted run after its last checkpoint) and a row a kill cut short, so the
    log reads as one run. That rewrite is atomic (a temporary file, then a rename)."""

    def __init__(self, path: Path, step: int) -> None:
        self.path = path
        rows = []
        if step > 0 and path.is_file():
            with path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if _complete(r) and int(r["step"]) <= step]
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with tmp.open("w", newline="") as f:
                out = csv.DictWriter(f, fieldnames=LOG_FIELDS)
                out.writeheader()
                out.writerows(rows)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def write(self, row: Dict[str, float]) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=LOG_FIELDS).writerow(row)


class TrainLog:
    """The sinks of one run from step `step` on: `output_dir`/log.csv when `log_csv`,
    `output_dir`/tb (TensorBoard, purged past `step` on resume) when `tensorboard`, and a tqdm
    bar to `total` steps when `progress` (off without a TTY). A context manager: leaving it
    closes the bar and the TensorBoard writer."""

    def __init__(self, output_dir: Path, step: int, total: int, *, log_csv: bool, tensorboard: bool, progress: bool,
                 desc: str = "") -> None:
        self.csv = CsvLog(output_dir / "log.csv", step) if log_csv else None
        self.writer: Optional[Any] = None
        self.bar: Optional[Any] = None
        if tensorboard and not tensorboard_installed():
            # on by default, but an extra: a base install trains without it rather than failing
            print("TensorBoard logging off: tensorboard is not installed (pip install 'ree-kernels[tensorboard]'; "
                  "--no-tensorboard silences this)", file=sys.stderr)
            tensorboard = False
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output_dir / "tb"), purge_step=step if step > 0 else None)
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=step, desc=desc, dynamic_ncols=True, leave=False, disable=None)

    def advance(self) -> None:
        """One more step done (the progress bar)."""
        if self.bar is not None:
            self.bar.update(1)

    def write(self, row: Dict[str, float]) -> None:
        """A row with the LOG_FIELDS keys, to every sink."""
        if self.csv is not None:
            self.csv.write(row)
        if self.writer is not None:
            for key, value in row.items():
                if key != "step":
                    self.writer.add_scalar(f"train/{key}", value, row["step"])
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.3f}", cls=f"{row['cls']:.3f}", img_s=f"{row['images_per_s']:.0f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()

    def __enter__(self) -> "TrainLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
