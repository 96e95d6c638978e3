"""Checkpoints: written atomically, read back with clear errors (never a silent restart).

A checkpoint is one `torch.save` file holding the format tag, the `TrainConfig`, the step, the
model, the criterion (ArcFace prototypes and UITracker), the optimiser, the scheduler, every
RNG state (Python, NumPy, torch CPU and CUDA, the trainer's generator) and the sampler
position: enough to continue a run bitwise as if it had never stopped."""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, NamedTuple, Optional

import numpy as np
import torch

FORMAT = "ree-checkpoint"
VERSION = 1
REQUIRED = ("format", "version", "config", "step", "model", "criterion", "optimizer", "scheduler", "rng", "sampler")


class CheckpointError(ValueError):
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


def load(path: str | Path, map_location: str | torch.device = "cpu", required: Iterable[str] = REQUIRED) -> Dict[str, Any]:
    """Reads a checkpoint written by `save_atomic`; CheckpointError if it is missing, corrupt,
    not a ree checkpoint, of another version, or lacks any of `required`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
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


def load_state(module: torch.nn.Module, state: Dict[str, torch.Tensor], what: str, path: str | Path) -> None:
    """`module.load_state_dict(state)` strictly, as a CheckpointError naming the mismatch."""
    try:
        module.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path} does not fit this {what}: {err}") from err


def rng_state(generator: torch.Generator) -> Dict[str, Any]:
    """Every RNG the training loop draws from."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any], generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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
