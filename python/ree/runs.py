"""Runs that cannot be lost: the output folder's guard, stopping on SIGINT/SIGTERM with a
checkpoint, and the temporary files a killed run leaves behind.

- `claim_output_dir`: a folder that already holds a run (a checkpoint or a log) is refused
  unless the run is resumed or `overwrite` is asked for (then its run files are removed).
- `StopSignals`: SIGINT and SIGTERM while training ask the loop to stop after the current step;
  the trainer then writes its checkpoint and returns, so the run resumes exactly. Before the loop
  (building the data and the model) and at a second signal, they raise KeyboardInterrupt at
  once, as Python's default SIGINT does.
- `forward_signals`: the `--nproc` launcher passes SIGINT/SIGTERM on to torchrun, which passes
  them on to every process it started.
- `remove_stale_temporaries`: the temporary files of an atomic write that a SIGKILL cut short.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Dict, Iterator, List, Optional

from .errors import RunFolderError

RUN_FILES = ("last.pt", "log.csv", "config.json", "tb")
"""What a training run writes into its output folder (`ree.train`, `ree.logs`, `ree.cli`)."""
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def claim_output_dir(output_dir: str | Path, *, resume: bool, overwrite: bool) -> None:
    """Makes sure that a new run does not silently replace another one in `output_dir`.

    A folder holding a checkpoint or a training log is refused unless `resume` (the run goes on
    there) or `overwrite` (its run files, RUN_FILES, are removed first; other files stay).

    Raises:
        RunFolderError: the folder holds a run, and neither `resume` nor `overwrite`.
    """
    folder = Path(output_dir)
    found = [name for name in ("last.pt", "log.csv") if (folder / name).exists()]
    if not found or resume:
        return
    if not overwrite and "last.pt" not in found:
        raise RunFolderError(f"--output-dir {folder} holds the log of a run that wrote no checkpoint: pass "
                             "--overwrite to start it again, or choose another --output-dir")
    if not overwrite:
        raise RunFolderError(f"--output-dir {folder} already holds a run ({', '.join(found)}): pass --resume to "
                             "continue it, --overwrite to replace it, or choose another --output-dir")
    for name in RUN_FILES:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


CLAIMED = "REE_RUN_CLAIMED"
"""Set by `ree train --nproc` for the processes it starts: the output folder they share is claimed."""


def claim_for_process(output_dir: str | Path, *, resume: bool, overwrite: bool) -> None:
    """`claim_output_dir` as each process of a run calls it, before any joins the process group
    (so before rank 0 can write): none where the --nproc launcher claimed the folder already;
    with `overwrite`, only rank 0 (environment RANK) removes the old run; otherwise every rank
    checks, and all refuse alike."""
    folder = str(Path(output_dir).resolve())
    if os.environ.get(CLAIMED) == folder or (overwrite and int(os.environ.get("RANK", "0")) != 0):
        return
    claim_output_dir(folder, resume=resume, overwrite=overwrite)


def claimed_env(output_dir: str | Path) -> Dict[str, str]:
    """The environment that tells the processes `ree train --nproc` starts that their folder is claimed."""
    return {CLAIMED: str(Path(output_dir).resolve())}


def remove_stale_temporaries(output_dir: str | Path, cache_dir: Optional[str | Path] = None) -> List[Path]:
    """Removes what a killed atomic write left: checkpoint temporaries (`.<name>.*.tmp`, written
    only by this run's leader) in `output_dir`, and in `cache_dir` the `.npz` temporaries of
    processes that no longer run (a concurrent run's are kept). Returns the removed paths."""
    removed = []
    folder = Path(output_dir)
    if folder.is_dir():
        removed += [p for p in folder.glob(".*.tmp") if p.is_file()]
    if cache_dir is not None and Path(cache_dir).is_dir():
        for path in Path(cache_dir).rglob("*.tmp-*.npz"):
            pid = path.name.rsplit(".tmp-", 1)[1][:-len(".npz")]
            if pid.isdigit() and not _running(int(pid)):
                removed.append(path)
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class StopSignals:
    """Installs SIGINT/SIGTERM handlers for a training run (a context manager; the previous
    handlers come back on exit). Until `arm()`, a signal raises KeyboardInterrupt (nothing to
    save yet); once armed, the first one only sets `requested` (the signal's name), which the
    training loop polls between steps; a second one raises KeyboardInterrupt."""

    def __init__(self, announce: bool = True) -> None:
        self.announce = announce  # print what happens (one process of several: rank 0 only)
        self.requested: Optional[str] = None
        self._armed = False
        self._previous: dict = {}

    def arm(self) -> None:
        """From now on a first signal asks for a stop instead of interrupting."""
        self._armed = True

    def __call__(self) -> bool:
        """Whether a stop was asked for."""
        return self.requested is not None

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if not self._armed or self.requested is not None:
            raise KeyboardInterrupt(signal.Signals(signum).name)
        self.requested = signal.Signals(signum).name
        if self.announce:
            print(f"\n{self.requested}: stopping after this step and writing a checkpoint (again to abort at once)",
                  file=sys.stderr, flush=True)

    def __enter__(self) -> "StopSignals":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@contextmanager
def forward_signals(process: subprocess.Popen) -> Iterator[List[int]]:
    """While the body runs, SIGINT and SIGTERM to this process are passed on to `process` (the
    launcher's torchrun) instead of stopping this one; yields the list of signals received."""
    received: List[int] = []

    def forward(signum: int, frame: Optional[FrameType]) -> None:
        received.append(signum)
        if process.poll() is None:
            process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
