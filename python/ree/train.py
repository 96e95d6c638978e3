"""The trainer: one loop for REE and the ArcFace baseline, resumable bitwise.

`Trainer(config).fit()` trains `config.steps` optimiser steps of `config.batch_size` images
(plus `config.uis_per_batch` synthesised UIs for REE), logs to CSV, TensorBoard and a tqdm bar,
and writes `last.pt` atomically every `save_every` steps and at the end. `Trainer(config,
resume=path)` continues a run exactly: the checkpoint restores every state the loop reads
(parameters, BN statistics, optimiser, scheduler, UI tracker, RNGs, sampler position).

Multi-process (torch.distributed initialised by the caller, e.g. `ree train --nproc N`): each
rank takes every N-th row of the global batch, the model runs under DDP, the prototypes are
sharded by class (`ShardedArcFaceHead`), and rank 0 logs and writes checkpoints in the
single-process layout, which resume at any number of processes (docs/scaling.md)."""
from __future__ import annotations

import csv
import math
import random
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch

from ree_kernels.distributed import shard_state_dict

from . import checkpoint as ckpt
from . import distributed
from .data.arrays import to_tensor
from .data.degrade import downsample, draw_uis, synthesize_uis
from .config import RESUME_MUTABLE, TrainConfig
from .distributed import Ranks
from .losses import LossOutput, REELoss
from .models.ree_model import REEModel

LOG_FIELDS = ("step", "epoch", "lr", "loss", "cls", "l1", "id", "mse", "ri_mean", "cos_pos", "ui_mu",
              "grad_norm", "images_per_s")


def resolve_device(name: str) -> torch.device:
    """"auto": CUDA when available, else the CPU; CUDA means the current GPU (LOCAL_RANK's in a
    multi-process run)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but torch sees no CUDA device")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def autocast_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """bf16 autocast on CUDA by default ("auto"), off on the CPU unless amp="bf16"."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def build_dataset(config: TrainConfig):
    """The training set named by `config.data`: "synthetic" (ree.data.synthetic's train split,
    cached under `cache_dir`), a directory (ImageFolder) or a `.rec` file (RecordIO)."""
    size = config.model_config().resolved_input_size
    if config.data == "synthetic":
        from .data.synthetic import SyntheticConfig, generate
        return generate(SyntheticConfig(**{"image_size": size, **config.synthetic}), cache_dir=config.cache_dir).train
    path = Path(config.data)
    if path.is_dir():
        from .data.folders import ImageFolderDataset
        return ImageFolderDataset(path, image_size=size)
    if path.suffix == ".rec" and path.is_file():
        from .data.folders import RecordIODataset
        return RecordIODataset(path, image_size=size)
    raise ValueError(f"data must be 'synthetic', an ImageFolder directory or a .rec file; {config.data!r} is none")


class WarmupSchedule:
    """LR factor at a step: linear warm-up from 0, then cosine to 0 or step decay by `gamma`
    at `milestones` (fractions of the steps after warm-up). A class, so LambdaLR saves it."""

    def __init__(self, steps: int, warmup: int, kind: str, milestones: tuple, gamma: float) -> None:
        self.steps, self.warmup, self.kind = steps, min(warmup, steps), kind
        self.milestones, self.gamma = tuple(milestones), gamma

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(self.steps - self.warmup, 1)
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return self.gamma ** sum(progress >= m for m in self.milestones)


class EpochBatchSampler:
    """Batches of indices as a function of the global step: epoch e is a permutation seeded by
    (seed, e), cut into `len // batch_size` batches (the remainder is dropped). The sampler's
    position is therefore the step, and a resumed run draws the very same batches."""

    def __init__(self, num_samples: int, batch_size: int, seed: int) -> None:
        if num_samples < batch_size:
            raise ValueError(f"batch_size={batch_size} exceeds the {num_samples} training images")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.steps_per_epoch = num_samples // batch_size
        self._epoch, self._perm = -1, None

    def position(self, step: int) -> Dict[str, int]:
        epoch, offset = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "offset": offset, "seed": self.seed, "num_samples": self.num_samples,
                "batch_size": self.batch_size}

    def indices(self, step: int) -> torch.Tensor:
        epoch, offset = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.num_samples, generator=generator)
        return self._perm[offset * self.batch_size:(offset + 1) * self.batch_size]

    def iterate(self, start: int, stop: int, rank: int = 0, world: int = 1) -> Iterator[List[int]]:
        """The batches of steps [start, stop); with `world` processes, rank's share: every
        world-th index from the rank-th."""
        for step in range(start, stop):
            yield self.indices(step)[rank::world].tolist()


class Trainer:
    """Builds the model, the loss, the optimiser and the schedule from `config`, and trains.

    Args:
        config: the run.
        dataset: the training set (default: `build_dataset(config)`). Items are (image
            [3, S, S] normalised, label, ...); a set with `images` (uint8 [N, S, S, 3]) and
            `labels` arrays, like ree.data.FaceArrays, is batched without per-item Python.
        resume: a checkpoint path to continue from; its config must equal `config` except
            for RESUME_MUTABLE fields (CheckpointError otherwise). A checkpoint written by any
            number of processes resumes at any other.

    When torch.distributed is initialised with several processes, every rank builds its
    Trainer with the same arguments and calls `fit` (docs/scaling.md, "Multi-process training").
    """

    def __init__(self, config: TrainConfig, dataset: Any = None, resume: Optional[str | Path] = None) -> None:
        self.config = config
        self.ranks = Ranks.current()
        config.check_world_size(self.ranks.world)
        self.device = resolve_device(config.device)
        self.amp_dtype = autocast_dtype(config.amp, self.device)
        self.dataset = build_dataset(config) if dataset is None else dataset
        self.num_classes = _num_classes(self.dataset)
        self._seed_everything(config.seed)  # after the data, whose loading may draw random numbers
        model = REEModel(config.model_config())
        if config.sync_bn and self.ranks.world > 1:
            model = distributed.convert_sync_batchnorm(model, self.device, self.ranks.group)
        # channels_last: measured faster for these convolutions on the CPU (mkldnn), and the
        # layout cuDNN wants for bf16 convolutions
        self.model = model.to(self.device, memory_format=torch.channels_last)
        # The same prototypes (by seed) at any world size; with several ranks, this rank's classes.
        self.criterion = REELoss(
            self.model.embedding_size, self.num_classes, scale=config.scale, margin=config.margin,
            margin_mode=config.margin_mode, ri_form=config.ri_form, tau=config.tau, beta=config.beta,
            weights=(config.lambda_l1, config.lambda_id, config.lambda_mse), momentum=config.tracker_momentum,
            method=config.method, diversion_target=config.diversion_target, backend=config.backend, seed=config.seed, process_group=self.ranks.group,
        ).to(self.device)
        self.ddp_model: Optional[torch.nn.parallel.DistributedDataParallel] = None
        if self.ranks.world > 1:
            # The head stays out of DDP (its shards differ by rank). Parameters that no loss
            # reaches (PRM and PAM in the ArcFace baseline, PAM in CR-FIQA or without UIs) must be declared.
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=config.method != "ree" or config.uis_per_batch == 0)
            # Dropout masks differ by rank; rank 0 keeps the single-process stream.
            if self.ranks.rank > 0:
                self._seed_everything(config.seed + self.ranks.rank)
        params = [p for m in (self.model, self.criterion) for p in m.parameters() if p.requires_grad]
        self._head_index = next(i for i, p in enumerate(params) if p is self.criterion.head.weight)
        if config.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                                             weight_decay=config.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, WarmupSchedule(
            config.steps, config.warmup_steps, config.schedule, config.milestones, config.gamma))
        # Flips and UIs: one stream on every rank, drawn for the global batch, each rank using
        # its rows' draws (see prepare_batch).
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.sampler = EpochBatchSampler(len(self.dataset), config.batch_size, config.seed)
        self.step = 0
        self.output_dir = Path(config.output_dir)
        if resume is not None:
            self.load_checkpoint(resume)

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    # ---------------------------------------------------------------------------------- state

    def state_dict(self) -> Optional[Dict[str, Any]]:
        """The checkpoint, in the single-process layout at any world size (the whole head and
        its optimiser state; the model's BN statistics and global RNGs of rank 0, every rank's
        RNGs under "rank_rng"). With several ranks a collective, and None except on rank 0."""
        criterion, optimizer = self.criterion.state_dict(), self.optimizer.state_dict()
        rng, extra = ckpt.rng_state(self.generator), {}
        if self.ranks.world > 1:
            head = self.criterion.head
            full = head.gather_state_dict(dst=0)
            optimizer = distributed.gather_sharded_state(optimizer, self._head_index, head.weight, head.num_classes,
                                                         self.ranks)
            rank_rng = distributed.gather_objects(rng, self.ranks)
            if not self.ranks.leader:
                return None
            criterion = {k: full["weight"] if k == "head.weight" else v for k, v in criterion.items()
                         if k != "head._extra_state"}
            extra = {"world_size": self.ranks.world, "rank_rng": rank_rng}
        return {
            "format": ckpt.FORMAT, "version": ckpt.VERSION, "config": self.config.to_dict(), "step": self.step,
            "num_classes": self.num_classes, "model": self.model.state_dict(),
            "criterion": criterion, "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(), "rng": rng,
            "sampler": self.sampler.position(self.step), **extra,
        }

    def save_checkpoint(self, path: Optional[str | Path] = None) -> Path:
        """Writes the checkpoint atomically (rank 0; every rank returns once it is written)."""
        path = Path(path) if path is not None else self.output_dir / "last.pt"
        state = self.state_dict()
        distributed.write_on_leader(lambda: ckpt.save_atomic(state, path), self.ranks, f"checkpoint {path}")
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        # On the CPU: every rank reads the whole head and takes its rows; load_state_dict copies
        # them to the device.
        state = ckpt.load(path, map_location="cpu")
        try:
            saved = TrainConfig.from_dict(state["config"])
        except (TypeError, ValueError) as err:
            raise ckpt.CheckpointError(f"checkpoint {path} holds an invalid config: {err}") from err
        diff = saved.differences(self.config, ignore=RESUME_MUTABLE)
        if diff:
            listed = "; ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, a, b in ((k, *v) for k, v in diff.items()))
            raise ckpt.CheckpointError(f"checkpoint {path} belongs to a different run ({listed})")
        expected = self.sampler.position(int(state["step"]))
        if state["sampler"] != expected:
            raise ckpt.CheckpointError(f"checkpoint {path} was taken on another training set or sampler: "
                                       f"{state['sampler']} vs {expected}")
        ckpt.load_state(self.model, state["model"], "model", path)
        criterion, optimizer = state["criterion"], state["optimizer"]
        if self.ranks.world > 1:
            criterion, optimizer = self._shard_checkpoint(criterion, optimizer, path)
        ckpt.load_state(self.criterion, criterion, "loss (prototypes / UI tracker)", path)
        try:
            self.optimizer.load_state_dict(optimizer)
            self.scheduler.load_state_dict(state["scheduler"])
            self._set_rng_state(state)
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as err:
            raise ckpt.CheckpointError(f"checkpoint {path} has an unusable optimiser/scheduler/RNG state: {err}") from err
        self.step = int(state["step"])

    def _shard_checkpoint(self, criterion: Dict[str, Any], optimizer: Dict[str, Any], path: str | Path) -> tuple:
        """This rank's rows of the checkpoint's whole head and of its optimiser state."""
        head = self.criterion.head
        full = criterion.get("head.weight")
        expected = (head.num_classes, head.weight.shape[1])
        if not isinstance(full, torch.Tensor) or tuple(full.shape) != expected:
            raise ckpt.CheckpointError(f"checkpoint {path} does not fit this loss (prototypes / UI tracker): head.weight "
                                       f"is {tuple(getattr(full, 'shape', ()))}, expected {expected}")
        mine = shard_state_dict({"weight": full, "_extra_state": {"num_classes": expected[0], "class_start": 0,
                                                                  "class_stop": expected[0]}},
                                self.ranks.rank, self.ranks.world)
        criterion = {**{k: v for k, v in criterion.items() if k != "head.weight"},
                     "head.weight": mine["weight"], "head._extra_state": mine["_extra_state"]}
        try:
            optimizer = distributed.shard_state(optimizer, self._head_index, full.shape, self.ranks)
        except (KeyError, TypeError) as err:
            raise ckpt.CheckpointError(f"checkpoint {path} has an unusable optimiser state: {err!r}") from err
        return criterion, optimizer

    def _set_rng_state(self, state: Dict[str, Any]) -> None:
        """Rank r continues the streams rank r saved; a rank the saved run did not have takes
        the shared flip/UI stream and seeds its own dropout stream as a fresh run would."""
        saved = state.get("rank_rng") or [state["rng"]]
        if self.ranks.rank < len(saved):
            ckpt.set_rng_state(saved[self.ranks.rank], self.generator)
        else:
            ckpt.set_rng_state(state["rng"], self.generator)
            self._seed_everything(self.config.seed + self.ranks.rank)

    # ----------------------------------------------------------------------------------- loop

    def _fetch(self, indices: List[int]) -> tuple:
        images = getattr(self.dataset, "images", None)
        if isinstance(images, np.ndarray):
            batch = to_tensor(images[indices])
            labels = torch.as_tensor(np.asarray(self.dataset.labels)[indices], dtype=torch.int64)
            return batch, labels
        items = [self.dataset[i] for i in indices]
        return torch.stack([item[0] for item in items]), torch.as_tensor([int(item[1]) for item in items])

    def _batches(self, start: int, stop: int) -> Iterator[tuple]:
        if self.config.workers == 0:
            for indices in self.sampler.iterate(start, stop, self.ranks.rank, self.ranks.world):
                yield self._fetch(indices)
            return
        # its own generator: the loader's worker seeding must not draw from the global RNG (dropout's)
        batches = self.sampler.iterate(start, stop, self.ranks.rank, self.ranks.world)
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=batches,
                                             num_workers=self.config.workers,
                                             generator=torch.Generator().manual_seed(self.config.seed + start))
        for batch in loader:
            yield batch[0], batch[1].long()

    def prepare_batch(self, images: torch.Tensor, labels: torch.Tensor) -> tuple:
        """Random horizontal flips, VLR copies (`config.min_resolution`), then `uis_per_batch` UIs (docs/spec.md §1.10) synthesised from the
        batch's first images and appended with their labels. -> (images, labels, is_ui).

        With N ranks, `images` are this rank's rows of the global batch (every N-th from the
        rank-th): the flips and UI draws are made for the whole global batch and each rank
        keeps its rows' ones, and its first uis_per_batch / N images are its share of the
        global batch's first uis_per_batch. An image's flip and UI do not depend on N."""
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        size = self.model.input_size
        if images.shape[1:] != (3, size, size):
            raise ValueError(f"training images must be [3, {size}, {size}], got {tuple(images.shape[1:])}")
        mine = slice(self.ranks.rank, None, self.ranks.world)
        flip = (torch.rand(images.shape[0] * self.ranks.world, generator=self.generator, device=self.device) < 0.5)[mine]
        images = torch.where(flip[:, None, None, None], images.flip(3), images)
        if self.config.min_resolution:
            sides = torch.randint(self.config.min_resolution, size + 1, (images.shape[0] * self.ranks.world,),
                                  generator=self.generator, device=self.device)[mine]
            images = downsample(images, sides)
        is_ui = torch.zeros(images.shape[0], dtype=torch.bool, device=self.device)
        count = self.config.uis_per_batch // self.ranks.world
        if count:
            draws = draw_uis(self.config.uis_per_batch, images.shape[1], self.generator).rows(mine)
            uis = synthesize_uis(images[:count], draws=draws)
            images = torch.cat([images, uis])
            labels = torch.cat([labels, labels[:count]])
            is_ui = torch.cat([is_ui, torch.ones(count, dtype=torch.bool, device=self.device)])
        return images.contiguous(memory_format=torch.channels_last), labels, is_ui

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple:
        """One optimiser step on a raw batch; -> (LossOutput, gradient norm before clipping)."""
        self.model.train()
        self.criterion.train()
        images, labels, is_ui = self.prepare_batch(images, labels)
        model = self.model if self.ddp_model is None else self.ddp_model
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            out = model(images)
            losses = self.criterion(out.embedding, labels, out.quality, out.attn, is_ui)
        self.optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else math.inf
        if self.ranks.world == 1:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:  # the norm over every rank's prototype rows and the (all-reduced) rest
            head = self.criterion.head.weight
            grad_norm = distributed.clip_grad_norm([p for p in params if p is not head], [head], max_norm,
                                                   self.ranks.group)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return losses, grad_norm

    def fit(self, stop_at: Optional[int] = None) -> Path:
        """Trains up to `config.steps` (or `stop_at`, to interrupt a run on purpose) and returns
        the path of the checkpoint written at the end. Only rank 0 writes the log, TensorBoard
        and the checkpoints."""
        stop = self.config.steps if stop_at is None else min(stop_at, self.config.steps)
        leader = self.ranks.leader
        if leader:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        log = _CsvLog(self.output_dir / "log.csv", self.step) if leader else None
        writer = _tensorboard(self.output_dir / "tb", self.step) if self.config.tensorboard and leader else None
        bar = _progress(self.config.progress and leader, self.step, self.config.steps,
                        f"{self.config.method} {self.config.arch}")
        tick, seen = time.perf_counter(), 0
        try:
            for images, labels in self._batches(self.step, stop):
                losses, grad_norm = self.train_step(images, labels)
                seen += self.config.batch_size + self.config.uis_per_batch
                if bar is not None:
                    bar.update(1)
                self._check_finite(losses.total)
                if self.step % self.config.log_every == 0 or self.step == stop:
                    rate = seen / max(time.perf_counter() - tick, 1e-9)
                    row = self._log_row(losses, grad_norm, rate)
                    if log is not None:
                        log.write(row)
                    if writer is not None:
                        for key, value in row.items():
                            if key != "step":
                                writer.add_scalar(f"train/{key}", value, self.step)
                    if bar is not None:
                        bar.set_postfix(loss=f"{row['loss']:.3f}", cls=f"{row['cls']:.3f}", img_s=f"{rate:.0f}")
                    tick, seen = time.perf_counter(), 0
                if self.step % self.config.save_every == 0 and self.step != stop:
                    self.save_checkpoint()
            return self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()

    def _check_finite(self, total: torch.Tensor) -> None:
        """FloatingPointError on every rank when the loss of any rank is not finite."""
        bad = distributed.nonfinite_ranks(total, self.ranks)
        if not bad:
            return
        where = "" if self.ranks.world == 1 else f" on rank(s) {bad} (here {float(total.detach())})"
        raise FloatingPointError(f"the loss is {'not finite' if where else float(total.detach())} at step {self.step}"
                                 f"{where}; lower lr or check the data")

    def _log_row(self, losses: LossOutput, grad_norm: torch.Tensor, rate: float) -> Dict[str, float]:
        """The log row; the per-rank means (loss, aux parts, ri_mean, cos_pos) are averaged over
        the ranks (a collective), cls, grad_norm and ui_mu are global already."""
        def mean(x: torch.Tensor) -> float:
            finite = x.detach()[torch.isfinite(x)]
            return float(finite.mean()) if finite.numel() else math.nan

        loss, l1, id_, mse, ri_mean, cos_pos = distributed.mean_over_ranks(
            [float(losses.total.detach()), float(losses.l1), float(losses.id), float(losses.mse), mean(losses.ri),
             mean(losses.cos_pos)], self.ranks, self.device)
        return {
            "step": self.step, "epoch": (self.step - 1) / self.sampler.steps_per_epoch,
            "lr": self.optimizer.param_groups[0]["lr"], "loss": loss, "cls": float(losses.cls),
            "l1": l1, "id": id_, "mse": mse, "ri_mean": ri_mean, "cos_pos": cos_pos,
            "ui_mu": float(self.criterion.tracker.mu), "grad_norm": float(grad_norm), "images_per_s": rate,
        }


def _num_classes(dataset: Any) -> int:
    if hasattr(dataset, "num_classes"):
        return int(dataset.num_classes)
    labels = getattr(dataset, "labels", None)
    if labels is None:
        raise ValueError("the training set needs a num_classes or labels attribute")
    return int(np.max(np.asarray(labels))) + 1


class _CsvLog:
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


def _tensorboard(log_dir: Path, step: int):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(log_dir), purge_step=step if step > 0 else None)


def _progress(enabled: bool, start: int, total: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True, leave=False, disable=None)  # off without a TTY
