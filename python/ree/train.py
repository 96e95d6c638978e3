"""The trainer: one loop for REE and the ArcFace baseline, resumable bitwise.

`Trainer(config).fit()` trains `config.steps` optimiser steps of `config.batch_size` images
(plus `config.uis_per_batch` synthesised UIs for REE), logs to CSV, TensorBoard and a tqdm bar
(`ree.logs`), and writes `last.pt` atomically every `save_every` steps and at the end.
`Trainer(config, resume=path)` continues a run exactly: the checkpoint restores every state the
loop reads (parameters, BN statistics, optimiser, scheduler, UI tracker, RNGs, sampler
position) after checking that it belongs to this run and this training set's classes.

Multi-process (torch.distributed initialised by the caller, e.g. `ree train --nproc N`): each
rank takes every N-th row of the global batch, the model runs under DDP, the prototypes are
sharded by class (`ShardedArcFaceHead`), and rank 0 logs and writes checkpoints in the
single-process layout (`ree.checkpoint_layout`), which resume at any number of processes
(docs/scaling.md).

The pieces live in their own modules (`ree.schedule`, `ree.sampler`, `ree.logs`,
`ree.checkpoint_layout`, `ree.devices`, `ree.data.sources`); their public names are importable
from here as well."""
from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional

import numpy as np
import torch

from . import checkpoint as ckpt
from . import checkpoint_layout, distributed
from .config import RESUME_MUTABLE, TrainConfig
from .data.arrays import fetch_batch
from .data.degrade import downsample, draw_uis, synthesize_uis
from .data.sources import build_dataset, class_names, num_classes
from .devices import autocast_dtype, check_backend, resolve_device
from .distributed import Ranks
from .logs import LOG_FIELDS, TrainLog
from .losses import LossOutput, REELoss
from .models.ree_model import REEModel
from .prefix_cache import PrefixCache, build_prefix_cache, imprinted_prototypes
from .pretrained import load_pretrained
from .sampler import EpochBatchSampler
from .schedule import WarmupSchedule

__all__ = ["Trainer", "build_dataset", "resolve_device", "autocast_dtype", "WarmupSchedule", "EpochBatchSampler",
           "LOG_FIELDS"]


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
        prefix_cache: with `config.cache_prefix`, the features to train from
            (`ree.prefix_cache`; default: built here from `dataset`, by `config.seed`); runs that
            share a dataset, a pretrained prefix and a cache seed may share one.

    When torch.distributed is initialised with several processes, every rank builds its
    Trainer with the same arguments and calls `fit` (docs/scaling.md, "Multi-process training").
    """

    def __init__(self, config: TrainConfig, dataset: Any = None, resume: Optional[str | Path] = None,
                 prefix_cache: Optional[PrefixCache] = None) -> None:
        self.config = config
        self.ranks = Ranks.current()
        config.check_world_size(self.ranks.world)
        self.device = resolve_device(config.device)
        check_backend(config.backend, self.device)
        self.amp_dtype = autocast_dtype(config.amp, self.device)
        self.dataset = build_dataset(config) if dataset is None else dataset
        self.num_classes = num_classes(self.dataset)
        self.class_names = class_names(self.dataset)
        self._seed_everything(config.seed)  # after the data, whose loading may draw random numbers
        model = REEModel(config.model_config())
        if config.init is not None and resume is None:  # a resumed run's checkpoint holds the weights
            load_pretrained(model, config.init)
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
            method=config.method, diversion_target=config.diversion_target, backend=config.backend, seed=config.seed,
            process_group=self.ranks.group, sample_rate=config.sample_rate,
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
        if config.sample_rate < 1.0:  # PartialFC's sparse update of the prototypes
            self.criterion.head.keep_unsampled_rows(self.optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, WarmupSchedule(
            config.steps, config.warmup_steps, config.schedule, config.milestones, config.gamma))
        # Flips and UIs: one stream on every rank, drawn for the global batch, each rank using
        # its rows' draws (see prepare_batch).
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.sampler = EpochBatchSampler(len(self.dataset), config.batch_size, config.seed)
        self.step = 0
        self.interrupted = False
        self.output_dir = Path(config.output_dir)
        if resume is not None:
            self.load_checkpoint(resume)
        # after a resume's weights: the cache is the (frozen) prefix of the run's own model
        self.prefix_cache = prefix_cache
        if config.cache_prefix and prefix_cache is None:
            self.prefix_cache = build_prefix_cache(
                self.model, self.dataset, seed=config.seed, min_resolution=config.min_resolution,
                uis=config.uis_per_batch > 0, ui_min_resolution=config.ui_min_resolution,
                ui_max_resolution=config.ui_max_resolution, progress=config.progress)
        if config.imprint and resume is None:
            with torch.no_grad():
                self.criterion.head.weight.copy_(imprinted_prototypes(self.model, self.prefix_cache, self.num_classes))

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
        parts = checkpoint_layout.gather(self.criterion, self.optimizer, self._head_index,
                                         ckpt.rng_state(self.generator), self.ranks)
        if parts is None:
            return None
        return {
            "format": ckpt.FORMAT, "version": ckpt.VERSION, "config": self.config.to_dict(), "step": self.step,
            "num_classes": self.num_classes, "class_names": self.class_names, "model": self.model.state_dict(),
            "scheduler": self.scheduler.state_dict(), "sampler": self.sampler.position(self.step), **parts,
        }

    def save_checkpoint(self, path: Optional[str | Path] = None) -> Path:
        """Writes the checkpoint atomically (rank 0; every rank returns once it is written)."""
        path = Path(path) if path is not None else self.output_dir / "last.pt"
        state = self.state_dict()
        distributed.write_on_leader(lambda: ckpt.save_atomic(state, path), self.ranks, f"checkpoint {path}")
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        """Continues from checkpoint `path` (see the class doc).

        Raises:
            CheckpointError (naming `path`): unreadable or unsafe, another run's, another
                training set's (classes or size), or a state that does not fit."""
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
        ckpt.check_classes(state, self.num_classes, self.class_names, path)
        expected = self.sampler.position(int(state["step"]))
        if state["sampler"] != expected:
            raise ckpt.CheckpointError(f"checkpoint {path} was taken on another training set or sampler: "
                                       f"{state['sampler']} vs {expected}")
        ckpt.load_state(self.model, state["model"], "model", path)
        mine = checkpoint_layout.scatter(state, self.criterion, self._head_index, self.ranks, path)
        ckpt.load_state(self.criterion, mine.criterion, "loss (prototypes / UI tracker)", path)
        try:
            self.optimizer.load_state_dict(mine.optimizer)
            self.scheduler.load_state_dict(state["scheduler"])
            if mine.rng is not None:
                ckpt.set_rng_state(mine.rng, self.generator)
            else:  # a rank the saved run did not have: the shared flip/UI stream, its own dropout stream
                ckpt.set_rng_state(state["rng"], self.generator)
                self._seed_everything(self.config.seed + self.ranks.rank)
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as err:
            raise ckpt.CheckpointError(
                f"checkpoint {path} has an unusable optimiser/scheduler/RNG state: {err}") from err
        self.step = int(state["step"])

    # ----------------------------------------------------------------------------------- loop

    def _batches(self, start: int, stop: int) -> Iterator[tuple]:
        if self.prefix_cache is not None:
            for indices in self.sampler.iterate(start, stop, self.ranks.rank, self.ranks.world):
                yield self.prefix_cache.rows(indices)
            return
        if self.config.workers == 0:
            for indices in self.sampler.iterate(start, stop, self.ranks.rank, self.ranks.world):
                yield fetch_batch(self.dataset, indices)
            return
        # its own generator: the loader's worker seeding must not draw from the global RNG (dropout's)
        batches = self.sampler.iterate(start, stop, self.ranks.rank, self.ranks.world)
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=batches,
                                             num_workers=self.config.workers,
                                             generator=torch.Generator().manual_seed(self.config.seed + start))
        for batch in loader:
            yield batch[0], batch[1].long()

    def prepare_batch(self, images: torch.Tensor, labels: torch.Tensor) -> tuple:
        """Random horizontal flips, VLR copies (`config.min_resolution`), then `uis_per_batch` UIs
        (docs/spec.md §1.10) synthesised from the
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
        draws = torch.rand(images.shape[0] * self.ranks.world, generator=self.generator, device=self.device)
        flip = (draws < 0.5)[mine]
        images = torch.where(flip[:, None, None, None], images.flip(3), images)
        if self.config.min_resolution:
            sides = torch.randint(self.config.min_resolution, size + 1, (images.shape[0] * self.ranks.world,),
                                  generator=self.generator, device=self.device)[mine]
            images = downsample(images, sides)
        is_ui = torch.zeros(images.shape[0], dtype=torch.bool, device=self.device)
        count = self.config.uis_per_batch // self.ranks.world
        if count:
            low, high = self.config.ui_min_resolution, self.config.ui_max_resolution
            draws = draw_uis(self.config.uis_per_batch, images.shape[1], self.generator, max_res=high).rows(mine)
            uis = synthesize_uis(images[:count], draws=draws, min_res=low, max_res=high)
            images = torch.cat([images, uis])
            labels = torch.cat([labels, labels[:count]])
            is_ui = torch.cat([is_ui, torch.ones(count, dtype=torch.bool, device=self.device)])
        return images.contiguous(memory_format=torch.channels_last), labels, is_ui

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, ui_features: Optional[torch.Tensor] = None
                   ) -> tuple:
        """One optimiser step on a raw batch (with `cache_prefix`: a batch of `PrefixCache.rows`,
        images being prefix features); -> (LossOutput, gradient norm before clipping)."""
        self.model.train()
        self.criterion.train()
        if self.prefix_cache is None:
            images, labels, is_ui = self.prepare_batch(images, labels)
            forward = self.model if self.ddp_model is None else self.ddp_model
        else:
            images, labels, is_ui = self.prefix_cache.batch(images, labels, ui_features, self.config.uis_per_batch,
                                                            self.device)
            forward = self.model.forward_from_prefix
        amp = self.amp_dtype is not None
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=amp):
            out = forward(images)
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

    def fit(self, stop_at: Optional[int] = None, stop_requested: Optional[Callable[[], bool]] = None) -> Path:
        """Trains up to `config.steps` (or `stop_at`, to interrupt a run on purpose) and returns
        the path of the checkpoint written at the end. Only rank 0 writes the log, TensorBoard
        and the checkpoints.

        `stop_requested` (e.g. `ree.runs.StopSignals`) is polled after each step; once it is
        true on any rank, every rank stops there and the checkpoint is written, so the run
        resumes exactly (`interrupted` is then True)."""
        self.interrupted = False
        stop = self.config.steps if stop_at is None else min(stop_at, self.config.steps)
        leader = self.ranks.leader
        if leader:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        sinks = TrainLog(self.output_dir, self.step, self.config.steps, log_csv=leader,
                         tensorboard=self.config.tensorboard and leader, progress=self.config.progress and leader,
                         desc=f"{self.config.method} {self.config.arch}")
        tick, seen = time.perf_counter(), 0
        with sinks:
            for batch in self._batches(self.step, stop):
                losses, grad_norm = self.train_step(*batch)
                seen += self.config.batch_size + self.config.uis_per_batch
                sinks.advance()
                self._check_finite(losses.total)
                if self.step % self.config.log_every == 0 or self.step == stop:
                    sinks.write(self._log_row(losses, grad_norm, seen / max(time.perf_counter() - tick, 1e-9)))
                    tick, seen = time.perf_counter(), 0
                # polled after the step, before the next batch is fetched (a DataLoader's workers
                # may have been stopped by the same Ctrl-C)
                asked = stop_requested is not None and self.step < stop
                if asked and distributed.any_rank(stop_requested(), self.ranks, self.device):
                    self.interrupted = True
                    break
                if self.step % self.config.save_every == 0 and self.step != stop:
                    self.save_checkpoint()
            return self.save_checkpoint()

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
