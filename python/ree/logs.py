"""Where the training log goes: log.csv, TensorBoard and a tqdm progress bar.

`TrainLog` opens the sinks a run asks for and writes each log row to all of them; the trainer
only computes the rows."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Dict, Optional

LOG_FIELDS = ("step", "epoch", "lr", "loss", "cls", "l1", "id", "mse", "ri_mean", "cos_pos", "ui_mu",
              "grad_norm", "images_per_s")
"""The columns of log.csv (and, but for "step", the TensorBoard scalars train/<field>)."""


class CsvLog:
    """log.csv, appended to; a resumed run first drops the rows past its checkpoint's step
    (written by the interrupted run after its last checkpoint), so the log reads as one run."""

    def __init__(self, path: Path, step: int) -> None:
        self.path = path
        rows = []
        if step > 0 and path.is_file():
            with path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
        with path.open("w", newline="") as f:
            out = csv.DictWriter(f, fieldnames=LOG_FIELDS)
            out.writeheader()
            out.writerows(rows)

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
