"""Checkpoints: written atomically, read back safely and with clear errors (never a silent restart).

A checkpoint is one `torch.save` file holding the format tag, the `TrainConfig` (as a dict), the
step, the training set's classes (count and names), the model, the criterion (ArcFace
prototypes and UITracker), the optimiser, the scheduler, every RNG state (Python, NumPy, torch
CPU and CUDA, the trainer's generator) and the sampler position: enough to continue a run
bitwise as if it had never stopped.

Everything in it is a tensor or a plain Python value (dict, list, tuple, str, int, float, bool,
None), so `load` reads it with `torch.load(weights_only=True)`: a file that holds any other
Python object is refused before that object is built, since unpickling an arbitrary object can
run arbitrary code (checkpoints come from users: `ree eval/quality/export --checkpoint`)."""
from __future__ import annotations

import os
import pickle
import random
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, NamedTuple, Optional, Sequence

import numpy as np
import torch

from .errors import UserError

FORMAT = "ree-checkpoint"
VERSION = 2  # 2: plain values only (the NumPy RNG state as a tensor), and the training set's classes
REQUIRED = ("format", "version", "config", "step", "num_classes", "class_names", "model", "criterion", "optimizer",
            "scheduler", "rng", "sampler")


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used: unreadable, corrupt, not ours, or for another run."""


def save_atomic(payload: Dict[str, Any], path: str | Path) -> None:
    """Writes `payload` to `path` so that a reader sees the old file or the new one, never a
    torn one: a temporary file in the same directory, fsync, os.replace, fsync the directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(path: str | Path, map_location: str | torch.device = "cpu",
         required: Iterable[str] = REQUIRED) -> Dict[str, Any]:
    """Reads a checkpoint written by `save_atomic` with `torch.load(weights_only=True)`: only
    tensors and plain Python values are built (see the module doc).

    Raises:
        CheckpointError (naming `path`): missing, corrupt, holding any other Python object
            (refused unread), not a ree checkpoint, of another format version, or lacking any
            of `required`."""
    path = Path(path)
    if path.is_dir():
        inside = f" ({path / 'last.pt'} is one)" if (path / "last.pt").is_file() else ""
        raise CheckpointError(f"checkpoint {path} is a folder, not a checkpoint file{inside}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch words every weights-only failure as advice to retry unsafely; the cause says what it was
        reason = str(err.__context__ or err)
        unsafe = re.search(r"GLOBAL (\S+)", reason)
        if unsafe is not None:
            older = " (format version 1 of ree stored NumPy objects: retrain)" if "numpy" in unsafe.group(1) else ""
            raise CheckpointError(
                f"checkpoint {path} refused: it holds a Python object ({unsafe.group(1)}), and ree checkpoints "
                f"hold only tensors and plain values; unpickling it could run arbitrary code, so it was not "
                f"loaded{older}") from None
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable (not a torch.save file of tensors "
                              f"and plain values: {reason})") from None
    except Exception as err:  # torch raises several types for a truncated or foreign file
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({type(err).__name__}: {err})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a ree checkpoint (no '{FORMAT}' format tag)")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {payload.get('version')!r}; "
                              f"this ree reads version {VERSION}")
    missing = [key for key in required if key not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    return payload


def check_classes(state: Dict[str, Any], num_classes: int, class_names: Optional[Sequence[str]],
                  path: str | Path, shown: int = 5) -> None:
    """That checkpoint `state` was trained on the classes of this training set: the same count
    and, where both name them, the same names in the same order (renamed or re-sorted identity
    folders would permute the labels under the trained prototypes).

    Raises:
        CheckpointError (naming `path`): the count differs, or the names do (the first `shown`
            differences are listed)."""
    saved_count, saved_names = state["num_classes"], state["class_names"]
    if saved_count != num_classes:
        raise CheckpointError(f"checkpoint {path} was trained on {saved_count} classes; this training set has "
                              f"{num_classes}")
    if saved_names is None or class_names is None:
        return
    saved_names, class_names = list(saved_names), list(class_names)
    if saved_names != class_names:
        diff = [f"label {k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in
                enumerate(zip(saved_names, class_names)) if a != b]
        more = f" (and {len(diff) - shown} more)" if len(diff) > shown else ""
        raise CheckpointError(f"checkpoint {path} was trained on other classes (renamed or reordered identity "
                              f"folders would permute the labels): {'; '.join(diff[:shown])}{more}")


def load_state(module: torch.nn.Module, state: Dict[str, torch.Tensor], what: str, path: str | Path) -> None:
    """`module.load_state_dict(state)` strictly, as a CheckpointError naming the mismatch."""
    try:
        module.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path} does not fit this {what}: {err}") from err


def rng_state(generator: torch.Generator) -> Dict[str, Any]:
    """Every RNG the training loop draws from, as tensors and plain values."""
    kind, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),  # (version, tuple of ints, None)
        "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any], generator: torch.Generator) -> None:
    """Restores what `rng_state` captured (the CUDA states only where CUDA is available)."""
    numpy_state = state["numpy"]
    random.setstate(state["python"])
    np.random.set_state((numpy_state["kind"], numpy_state["key"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainedModel(NamedTuple):
    """A model rebuilt from a checkpoint for inference: the `REEModel` (eval mode), its
    `TrainConfig`, the UI centre ū (None if no UI was seen: the baseline) and the step."""

    model: Any
    config: Any
    ui_center: Optional[torch.Tensor]
    step: int


def load_model(path: str | Path, device: str | torch.device = "cpu") -> TrainedModel:
    """Rebuilds the trained model of a checkpoint (CheckpointError if it cannot)."""
    from .config import TrainConfig
    from .models.ree_model import REEModel

    state = load(path, map_location=device, required=("config", "model", "criterion", "step"))
    try:
        config = TrainConfig.from_dict(state["config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} holds an invalid config: {err}") from err
    model = REEModel(config.model_config()).to(device)
    load_state(model, state["model"], "model", path)
    criterion = state["criterion"]
    initialized = criterion.get("tracker.initialized")
    center = criterion["tracker.center"].float() if initialized is not None and bool(initialized) else None
    return TrainedModel(model.eval(), config, center, int(state["step"]))
