"""The training engine: trains any `nn.Module` that maps (images, targets) to a dict of losses
in train mode (the detector here, the segmenter of pass two), one process or several (DDP
under `torchrun`: gloo on CPU, NCCL on GPU).

Determinism: the batch, the flips and the seed of every random draw inside the model (RPN and
RoI sampling, multi-scale size) of iteration i are functions of (seed, i, rank), and the
learning rate is a function of i. A run resumed from its checkpoint therefore retraces the
uninterrupted run exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from twopass.pipeline.categories import Categories
from twopass.pipeline.devices import DeviceError, check_device
from twopass.pipeline.precision import autocast, check_precision, grad_scaler

from .backbone import convert_sync_batchnorm
from .checkpoint import CheckpointError, last_meta, load_optimizer, load_weights, save_checkpoint, unwrap
from .config import TrainConfig
from .data import IterationBatches, mix_seed, to_device


class TrainingFailed(FloatingPointError, ValueError):
    """The loss is not finite, or has diverged (`diverged`): the learning rate or the data, not a
    fault a retry fixes. A ValueError, so the CLI prints it as one line and flows never retry it."""


# A loss diverges when the mean of its last DIVERGE_WINDOW iterations exceeds DIVERGE_FACTOR
# times the mean of the run's first DIVERGE_WINDOW. The start is the reference, warm-up
# included: a healthy run's loss is highest there (warm-up starts at a tiny LR), and a run that
# diverges while its LR warms up is caught within 2 * DIVERGE_WINDOW iterations.
DIVERGE_WINDOW = 20
DIVERGE_FACTOR = 100.0


def diverged(losses: list[float], window: int = DIVERGE_WINDOW, factor: float = DIVERGE_FACTOR) -> str | None:
    """Why the total losses of a run's iterations (in order, first of this process first) have
    diverged, in words; None while they have not (or fewer than 2 * window are known)."""
    if len(losses) < 2 * window:
        return None
    first, last = float(np.mean(losses[:window])), float(np.mean(losses[-window:]))
    if last <= factor * first:
        return None
    n = len(losses)
    return (f"loss diverged: mean {last:.4g} over the last {window} iterations, above {factor:g}x the mean {first:.4g} "
            f"of the first {window} (of {n})")


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


# --------------------------------------------------------------------------- logging


class _Log:
    """Progress bar (rank 0, when asked) and the JSONL of per-iteration metrics."""

    def __init__(self, path: Path, start: int, iters: int, show: bool):
        self.path = path
        if path.exists():  # resumed: drop what the lost iterations after the checkpoint wrote
            kept = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l).get("iter", 0) <= start]
            path.write_text("".join(l + "\n" for l in kept))
        self.file = path.open("a")
        self.progress = None
        if show:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.3f}"),
                TextColumn("{task.fields[speed]}"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=iters, completed=start, loss=float("nan"), speed="")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def step(self, it: int, loss: float, sec: float) -> None:
        if self.progress is not None:
            speed = f"{1 / sec:.2f} it/s" if sec < 1 else f"{sec:.2f} s/it"
            self.progress.update(self.task, completed=it, loss=loss, speed=speed)

    def print(self, msg: str) -> None:
        if self.progress is not None:
            self.progress.console.print(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        self.file.close()


# --------------------------------------------------------------------------- engine


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
) -> TrainResult:
    """Train `model` on `dataset` ((image, target) pairs) for `options.iters` iterations.

    kind, config, categories: recorded in every checkpoint so it can be rebuilt alone.
    validate(model) -> metrics: called on rank 0 with the model in eval mode every
    `val_every` iterations and at the end.
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
    ckpt_every = cfg.checkpoint_every if options.checkpoint_every is None else options.checkpoint_every
    val_every = cfg.val_every if options.val_every is None else options.val_every
    workers = cfg.num_workers if options.num_workers is None else options.num_workers
    precision = options.precision or cfg.precision
    check_precision(precision, di.device)
    scaler = grad_scaler(di.device, precision)  # fp16 on CUDA only; else it passes through

    model.to(di.device)
    if di.world > 1 and options.sync_bn:
        model = convert_sync_batchnorm(model)
    groups = param_groups(model, cfg.weight_decay)
    peak = effective_lr(options.lr, cfg, options.batch * di.world)
    optimizer = make_optimizer(groups, peak, cfg)

    start = 0
    if options.resume:
        meta = last_meta(out)  # None: nothing saved yet, start from scratch
        if meta is not None:
            if meta.kind != kind:
                raise CheckpointError(f"{meta.path}: a {meta.kind!r} checkpoint, this run trains a {kind!r}")
            categories.check_same(meta.categories, f"resume from {meta.path}")
            load_weights(model, meta)
            load_optimizer(optimizer, meta)
            if meta.extra.get("grad_scaler"):
                scaler.load_state_dict(meta.extra["grad_scaler"])
            start = meta.iteration
    if start >= options.iters:
        raise ValueError(f"{out}: already trained to iteration {start} of {options.iters}; raise --iters to continue")

    params = [p for g in groups for p in g["params"]]
    ddp = model
    if di.world > 1:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[di.device.index] if di.device.type == "cuda" else None)

    batches = IterationBatches(dataset, options.batch, start, options.iters, seed, cfg.hflip_prob, di.rank, di.world)
    loader = torch.utils.data.DataLoader(
        batches, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_identity, persistent_workers=False
    )
    if di.main:
        out.mkdir(parents=True, exist_ok=True)
    di.barrier()
    log = _Log(out / "metrics.jsonl", start, options.iters, options.progress and di.main) if di.main else None

    def checkpoint(it: int) -> Path | None:
        path = None
        if di.main:
            path = save_checkpoint(out, model, kind=kind, config=config, categories=categories, iteration=it, optimizer=optimizer, extra={"seed": seed, "world": di.world, "precision": precision,
                                   **({"grad_scaler": scaler.state_dict()} if scaler.is_enabled() else {})})  # fmt: skip
        di.barrier()
        return path

    def run_validation(it: int) -> dict[str, Any] | None:
        metrics = None
        if di.main and validate is not None:
            core = unwrap(ddp)
            core.eval()
            metrics = validate(core)
            core.train()
            log.write({"iter": it, "val": metrics})
            log.print(f"iter {it}: val {_short(metrics)}")
        di.barrier()
        return metrics

    ddp.train()
    it = start
    last_ckpt: Path | None = None
    last_losses: dict[str, float] = {}
    val_metrics = None
    times: list[float] = []
    history: list[dict[str, Any]] = []
    totals: list[float] = []  # total loss per iteration, for `diverged`
    train_seconds = 0.0
    t_data = time.perf_counter()
    try:
        for images, targets in loader:
            images, targets = to_device(images, targets, di.device)
            data_time = time.perf_counter() - t_data
            t0 = time.perf_counter()
            seed_everything(mix_seed(seed, it, di.rank, 2))
            lr = lr_at(it, options.iters, peak, cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr
            with autocast(di.device, precision):
                losses = ddp(images, targets)
            total = sum(v.float() for v in losses.values())
            if not torch.isfinite(total):
                raise TrainingFailed(
                    f"{out}: iteration {it + 1}: loss is {total.item()} ({ {k: round(v.item(), 4) for k, v in losses.items()} }); "
                    "lower --lr (or the config's train.base_lr) or check the data"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            grad_norm = None
            if cfg.clip_grad_norm is not None:
                scaler.unscale_(optimizer)  # clip the true gradients
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm))
            scaler.step(optimizer)  # skips the step if fp16 gradients overflowed
            scaler.update()
            it += 1
            sec = time.perf_counter() - t0
            times.append(sec)
            train_seconds += sec + data_time
            last_losses = {k: float(v.detach()) for k, v in losses.items()}
            record = {"iter": it, "lr": lr, "loss": float(total.detach()), **last_losses, "time": sec, "data_time": data_time}
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            history.append(record)
            if log is not None:
                log.write(record)
                log.step(it, record["loss"], sec)
            totals.append(record["loss"])
            if (why := diverged(totals)) is not None:
                raise TrainingFailed(f"{out}: iteration {it}: {why}; lower --lr (or the config's train.base_lr) or check the data")
            if options.stop_at is not None and it >= options.stop_at:
                return TrainResult(it, last_ckpt, last_losses, train_seconds, _median(times), None, history)
            out_of_time = options.time_budget_s is not None and train_seconds >= options.time_budget_s
            if it == options.iters or out_of_time or (ckpt_every and it % ckpt_every == 0):
                last_ckpt = checkpoint(it)
            if validate is not None and (it == options.iters or out_of_time or (val_every and it % val_every == 0)):
                val_metrics = run_validation(it)
            if out_of_time:
                break
            t_data = time.perf_counter()
    except BaseException as e:
        # the run's record says why it stopped; a run that failed before its first checkpoint
        # is then restarted by the same command (`api.claim_run_folder`)
        if log is not None:
            with contextlib.suppress(OSError, ValueError):  # a full disk: the error itself is what counts
                log.write({"iter": it + 1, "error": f"{type(e).__name__}: {e}"})
        raise
    finally:
        if log is not None:
            log.close()
    return TrainResult(it, last_ckpt, last_losses, train_seconds, _median(times), val_metrics, history)


def _median(xs: list[float]) -> float:
    return float(np.median(xs)) if xs else math.nan


def _short(metrics: dict[str, Any]) -> str:
    parts = []
    for t in ("bbox", "segm"):
        if isinstance(metrics.get(t), dict):
            parts.append(f"{t} AP {metrics[t]['AP']:.3f} AP50 {metrics[t]['AP50']:.3f}")
    return ", ".join(parts) or str({k: v for k, v in metrics.items() if not isinstance(v, dict)})
