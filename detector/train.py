"""The training engine: trains any `nn.Module` that maps (images, targets) to a dict of losses
in train mode (the detector here, the segmenter of pass two), one process or several (DDP
under `torchrun`: gloo on CPU, NCCL on GPU).

`Trainer` is the loop (Detectron2's `SimpleTrainer`): `run_step` is one iteration (batch,
forward under autocast, finite-loss check, backward, clipping, optimizer step); everything
else a run does (LR schedule, metrics log, divergence rule, time budget, checkpoints,
validation) is a hook (`hooks.py`). `train` sets a run up (options, devices, resume, loader),
lists the default hooks, then the caller's, and runs them.

Determinism: the batch, the flips and the seed of every random draw inside the model (RPN and
RoI sampling, multi-scale size) of iteration i are functions of (seed, i, rank), and the
learning rate is a function of i. A run resumed from its checkpoint therefore retraces the
uninterrupted run exactly.
"""

from __future__ import annotations

import functools
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from twopass.pipeline.categories import Categories
from twopass.pipeline.devices import DeviceError, check_device
from twopass.pipeline.precision import autocast, check_precision, grad_scaler

from .backbone import convert_sync_batchnorm
from .checkpoint import CheckpointError, last_meta, load_optimizer, load_weights
from .config import TrainConfig
from .data import IterationBatches, mix_seed, to_device
from .hooks import (  # noqa: F401 (DIVERGE_WINDOW, diverged: the divergence rule, re-exported with its error)
    DIVERGE_WINDOW,
    Checkpointer,
    HookBase,
    LRSchedule,
    MetricsLog,
    StopAt,
    StopOnDivergence,
    StopTraining,
    TimeBudget,
    TrainingFailed,
    Validation,
    diverged,
)


@dataclass
class TrainOptions:
    """What a run does (the config says what the model is and its schedule shape)."""

    out: Path
    iters: int
    batch: int = 2  # images per process and iteration
    lr: float | None = None  # LR for TrainConfig.base_batch images (None: the config's base_lr)
    device: str = "cpu"
    resume: bool = False
    overwrite: bool = False  # without resume: replace a run already in `out` (else that is an error)
    checkpoint_every: int | None = None  # None: the config's
    val_every: int | None = None  # None: the config's; 0: only at the end
    seed: int | None = None  # None: the config's
    num_workers: int | None = None
    progress: bool = True
    sync_bn: bool = False  # convert trainable BatchNorm to synchronised BatchNorm under DDP
    stop_at: int | None = None  # stop after this iteration without saving, as a crash would
    time_budget_s: float | None = None  # stop (and save) once training has taken this long
    precision: str | None = None  # fp32 | bf16 | fp16 (None: the config's train.precision)


@dataclass
class TrainResult:
    iteration: int
    checkpoint: Path | None
    losses: dict[str, float]
    train_seconds: float  # time in training iterations (no validation, no checkpoint writes)
    seconds_per_iter: float  # median of this run's iterations
    val: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------- schedule


def effective_lr(lr: float | None, cfg: TrainConfig, total_batch: int) -> float:
    """Linear scaling (Goyal et al.): the LR given for `base_batch` images, times total_batch / base_batch."""
    base = cfg.base_lr if lr is None else lr
    return base * total_batch / cfg.base_batch


def lr_at(iteration: int, iters: int, peak: float, cfg: TrainConfig) -> float:
    """Linear warm-up from warmup_factor * peak, then step decay by gamma at steps * iters."""
    factor = 1.0
    if iteration < cfg.warmup_iters:
        a = iteration / cfg.warmup_iters
        factor = cfg.warmup_factor * (1 - a) + a
    decays = sum(1 for s in cfg.steps if iteration >= int(s * iters))
    return peak * factor * cfg.gamma**decays


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weights of convs and fcs; none on norm parameters and biases."""
    decay, no_decay = [], []
    for module in model.modules():
        is_norm = isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            (no_decay if is_norm or name == "bias" else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(groups: list[dict], lr: float, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(cfg.momentum, 0.999))
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)


# --------------------------------------------------------------------------- processes


@dataclass
class DistInfo:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def check_train_device(device: str) -> torch.device:
    """`check_device`, and under torchrun cpu or cuda only: each process takes the GPU of its
    LOCAL_RANK (an index would put them all on one), and MPS has no process-group backend."""
    dev = check_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and (dev.index is not None or dev.type == "mps"):
        raise DeviceError(f"--device {device}: under torchrun ({world} processes) give cpu or cuda (each process takes cuda:LOCAL_RANK)")
    return dev


def setup_distributed(device: str) -> DistInfo:
    """One process, or the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = check_train_device(device)
    if world <= 1:
        return DistInfo(0, 1, dev)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), dev)


def _identity(x):
    return x


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


# --------------------------------------------------------------------------- the loop


class Trainer:
    """The training loop (Detectron2's `SimpleTrainer`): `run_step` is one iteration, `train`
    runs iterations from `start_iter` to `max_iter` calling the hooks around each (`hooks.py`
    says when and with what).

    model: maps (images, targets) to a dict of losses in train mode (DDP-wrapped under torchrun).
    batches: (images, targets) per iteration, the first for iteration `start_iter`; a
        `data.IterationBatches` (or a DataLoader over one) keeps a run deterministic.
    seed: with the iteration and `dist.rank`, seeds every random draw of an iteration.
    clip_grad_norm: clip the gradients' total norm to this (None: no clipping).
    scaler: fp16's gradient scaler (`pipeline.precision.grad_scaler`; None: the one `precision` needs).
    where: starts the message of a non-finite loss (the run folder).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        batches: Iterable,
        *,
        max_iter: int,
        start_iter: int = 0,
        seed: int = 0,
        precision: str = "fp32",
        clip_grad_norm: float | None = None,
        scaler: torch.amp.GradScaler | None = None,
        dist: DistInfo | None = None,
        hooks: Sequence[HookBase] = (),
        where: str = "training",
    ):
        self.model, self.optimizer, self.batches = model, optimizer, batches
        self.max_iter, self.start_iter, self.iter = max_iter, start_iter, start_iter
        self.seed, self.precision, self.clip_grad_norm, self.where = seed, precision, clip_grad_norm, where
        self.dist = dist or DistInfo(0, 1, torch.device("cpu"))
        self.scaler = scaler if scaler is not None else grad_scaler(self.dist.device, precision)
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.record: dict[str, Any] | None = None  # the last iteration's metrics (MetricsLog writes them)
        self.history: list[dict[str, Any]] = []  # every record of this process's run
        self.losses: dict[str, float] = {}  # the last iteration's losses
        self.train_seconds = 0.0  # in iterations: steps and data loading
        self.error: BaseException | None = None  # why the run failed (in after_train)
        self.interrupted = False  # a hook raised StopTraining
        self._stop = False
        self._batch_iter = None
        self.hooks: list[HookBase] = []
        for h in hooks:
            h.trainer = self
            self.hooks.append(h)

    def stop(self) -> None:
        """End the run after this iteration; hooks still to run see it as the last (`last`)."""
        self._stop = True

    @property
    def last(self) -> bool:
        """Whether the iteration just done ends the run (the schedule's end, or `stop`)."""
        return self.iter >= self.max_iter or self._stop

    def train(self) -> None:
        """Iterations until `max_iter` or a stop, with the hooks; a failure is re-raised after
        every hook's after_train has seen it in `error`."""
        self.model.train()
        try:
            for h in self.hooks:
                h.before_train()
            while self.iter < self.max_iter and not self._stop:
                for h in self.hooks:
                    h.before_step()
                self.run_step()
                for h in self.hooks:
                    h.after_step()
        except StopTraining:
            self.interrupted = True
        except BaseException as e:
            self.error = e
            raise
        finally:
            for h in reversed(self.hooks):
                h.after_train()

    def run_step(self) -> dict[str, Any]:
        """Iteration `iter` (0-based), without hooks; counts it in `iter` and returns and keeps its
        record {iter (1-based), lr, loss (the total), each loss, time (the step's seconds: forward,
        backward, clipping, optimizer step), data_time, grad_norm (when clipping)}. Raises
        TrainingFailed (nothing stepped) when the loss is not finite."""
        t_data = time.perf_counter()
        if self._batch_iter is None:  # started here so a DataLoader's worker start counts as data time
            self._batch_iter = iter(self.batches)
        images, targets = to_device(*next(self._batch_iter), self.dist.device)
        data_time = time.perf_counter() - t_data
        t0 = time.perf_counter()
        seed_everything(mix_seed(self.seed, self.iter, self.dist.rank, 2))
        with autocast(self.dist.device, self.precision):
            losses = self.model(images, targets)
        total = sum(v.float() for v in losses.values())
        if not torch.isfinite(total):
            raise TrainingFailed(
                f"{self.where}: iteration {self.iter + 1}: loss is {total.item()} ({ {k: round(v.item(), 4) for k, v in losses.items()} }); "
                "lower --lr (or the config's train.base_lr) or check the data"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        grad_norm = None
        if self.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad_norm))
        self.scaler.step(self.optimizer)  # skips the step if fp16 gradients overflowed
        self.scaler.update()
        sec = time.perf_counter() - t0
        self.iter += 1
        self.train_seconds += sec + data_time
        self.losses = {k: float(v.detach()) for k, v in losses.items()}
        record = {"iter": self.iter, "lr": self.optimizer.param_groups[0]["lr"], "loss": float(total.detach()), **self.losses,
                  "time": sec, "data_time": data_time}  # fmt: skip
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        self.record = record
        self.history.append(record)
        return record


# --------------------------------------------------------------------------- a run


def train(
    model: nn.Module,
    dataset,
    options: TrainOptions,
    cfg: TrainConfig,
    *,
    kind: str,
    config: dict[str, Any],
    categories: Categories,
    validate: Callable[[nn.Module], dict[str, Any]] | None = None,
    hooks: Sequence[HookBase] = (),
) -> TrainResult:
    """Train `model` on `dataset` ((image, target) pairs) for `options.iters` iterations.

    kind, config, categories: recorded in every checkpoint so it can be rebuilt alone.
    validate(model) -> metrics: called on rank 0 with the model in eval mode every
    `val_every` iterations and at the end.
    hooks: the caller's, called after the default ones (metrics log, LR schedule, divergence
    rule, stop_at, time budget, checkpoints, validation: in that order), in theirs.
    """
    if getattr(dataset, "categories", None) is not None:
        categories.check_same(dataset.categories, f"training set {getattr(dataset, 'ann_file', '')}".strip())
    if len(dataset) == 0:
        raise ValueError("training set is empty")
    if options.iters < 1 or options.batch < 1:
        raise ValueError(f"--iters and --batch must be at least 1 (got {options.iters}, {options.batch})")
    di = setup_distributed(options.device)
    out = Path(options.out)
    seed = cfg.seed if options.seed is None else options.seed
    precision = options.precision or cfg.precision
    check_precision(precision, di.device)
    scaler = grad_scaler(di.device, precision)  # fp16 on CUDA only; else it passes through

    model.to(di.device)
    if di.world > 1 and options.sync_bn:
        model = convert_sync_batchnorm(model)
    peak = effective_lr(options.lr, cfg, options.batch * di.world)
    optimizer = make_optimizer(param_groups(model, cfg.weight_decay), peak, cfg)
    start = resume(out, model, optimizer, scaler, kind=kind, categories=categories) if options.resume else 0
    if start >= options.iters:
        raise ValueError(f"{out}: already trained to iteration {start} of {options.iters}; raise --iters to continue")
    if di.world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[di.device.index] if di.device.type == "cuda" else None)

    batches = IterationBatches(dataset, options.batch, start, options.iters, seed, cfg.hflip_prob, di.rank, di.world)
    workers = cfg.num_workers if options.num_workers is None else options.num_workers
    loader = torch.utils.data.DataLoader(
        batches, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_identity, persistent_workers=False
    )
    if di.main:
        out.mkdir(parents=True, exist_ok=True)
    di.barrier()

    def extra() -> dict[str, Any]:  # a checkpoint's: what a resume needs beside weights and optimizer
        return {"seed": seed, "world": di.world, "precision": precision, **({"grad_scaler": scaler.state_dict()} if scaler.is_enabled() else {})}

    log = MetricsLog(out / "metrics.jsonl", options.progress) if di.main else None
    ckpt_every = cfg.checkpoint_every if options.checkpoint_every is None else options.checkpoint_every
    val_every = cfg.val_every if options.val_every is None else options.val_every
    checkpointer = Checkpointer(out, ckpt_every, kind=kind, config=config, categories=categories, extra=extra)
    validation = Validation(validate, val_every, log) if validate is not None else None
    defaults = [
        log,
        LRSchedule(functools.partial(lr_at, iters=options.iters, peak=peak, cfg=cfg)),
        StopOnDivergence(str(out)),
        StopAt(options.stop_at) if options.stop_at is not None else None,
        TimeBudget(options.time_budget_s) if options.time_budget_s is not None else None,
        checkpointer,
        validation,
    ]
    trainer = Trainer(model, optimizer, loader, max_iter=options.iters, start_iter=start, seed=seed, precision=precision,
                      clip_grad_norm=cfg.clip_grad_norm, scaler=scaler, dist=di, where=str(out),
                      hooks=[h for h in defaults if h is not None] + list(hooks))  # fmt: skip
    trainer.train()
    val = None if trainer.interrupted or validation is None else validation.metrics  # a crash-like stop reports none
    return TrainResult(trainer.iter, checkpointer.path, trainer.losses, trainer.train_seconds,
                       _median([h["time"] for h in trainer.history]), val, trainer.history)  # fmt: skip


def resume(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, *, kind: str,
           categories: Categories) -> int:  # fmt: skip
    """Load the last checkpoint in run folder `out` into model, optimizer and scaler; returns its
    iteration (0: nothing saved yet, start from scratch)."""
    meta = last_meta(out)
    if meta is None:
        return 0
    if meta.kind != kind:
        raise CheckpointError(f"{meta.path}: a {meta.kind!r} checkpoint, this run trains a {kind!r}")
    categories.check_same(meta.categories, f"resume from {meta.path}")
    load_weights(model, meta)
    load_optimizer(optimizer, meta)
    if meta.extra.get("grad_scaler"):
        scaler.load_state_dict(meta.extra["grad_scaler"])
    return meta.iteration


def _median(xs: list[float]) -> float:
    return float(np.median(xs)) if xs else math.nan
