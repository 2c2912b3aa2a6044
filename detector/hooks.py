"""What a training run does around its iterations, as hooks (Detectron2's `HookBase`): the LR
schedule, the metrics log, the divergence rule, the crash point and the time budget,
checkpoints, validation. `train.Trainer` runs the step; `train.train` lists these hooks.

The trainer calls each hook, in the order they are listed:

    before_train()   once, before the first iteration
    before_step()    before each iteration; trainer.iter is the iterations done so far
                     (the 0-based index of the one about to run)
    after_step()     after it; trainer.iter counts it, trainer.record holds its metrics
    after_train()    once, in reverse order (the log closes last), also when the run failed:
                     trainer.error is the exception (None when the run ended well)

A hook reads and steers the run through `self.trainer` (a `train.Trainer`): iter, start_iter,
max_iter, record, history, train_seconds, losses, model, optimizer, dist (rank, world,
barrier), `stop()` (end after this iteration, saved and validated) and `last` (whether this
iteration ends the run). Raising `StopTraining` ends the run at once, as a crash would, but
without an error. Under DDP every process runs the hooks; a hook that calls `stop()` must do so
on every process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .checkpoint import save_checkpoint, unwrap


class TrainingFailed(FloatingPointError, ValueError):
    """The loss is not finite, or has diverged (`diverged`): the learning rate or the data, not a
    fault a retry fixes. A ValueError, so the CLI prints it as one line and flows never retry it."""


class StopTraining(Exception):
    """Raised by a hook: the run ends at once, as a crash would (nothing more is saved or
    validated), and `Trainer.train` returns without recording an error."""


class HookBase:
    """A training hook; the trainer sets `self.trainer` when the hook is registered."""

    trainer: Any = None

    def before_train(self) -> None:
        pass

    def after_train(self) -> None:
        pass

    def before_step(self) -> None:
        pass

    def after_step(self) -> None:
        pass


# --------------------------------------------------------------------------- the schedule


class LRSchedule(HookBase):
    """Sets every parameter group's LR to schedule(i) before iteration i (0-based)."""

    def __init__(self, schedule: Callable[[int], float]):
        self.schedule = schedule

    def before_step(self) -> None:
        lr = self.schedule(self.trainer.iter)
        for g in self.trainer.optimizer.param_groups:
            g["lr"] = lr


# --------------------------------------------------------------------------- the metrics log


class MetricsLog(HookBase):
    """RUN/metrics.jsonl: each iteration's record, validation records (`write`) and, when the run
    fails, an error record {"iter": the failing iteration, "error": "Type: message"} (so the same
    command can restart a run that failed before its first checkpoint, `api.claim_run_folder`);
    a progress bar when `show`. Registered on rank 0 only."""

    def __init__(self, path: Path, show: bool):
        self.path, self.show = Path(path), show
        self.file = self.progress = None

    def before_train(self) -> None:
        t = self.trainer
        if self.path.exists():  # resumed: drop what the lost iterations after the checkpoint wrote
            kept = [l for l in self.path.read_text().splitlines() if l.strip() and json.loads(l).get("iter", 0) <= t.start_iter]
            self.path.write_text("".join(l + "\n" for l in kept))
        self.file = self.path.open("a")
        if self.show:
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
            self.task = self.progress.add_task("train", total=t.max_iter, completed=t.start_iter, loss=float("nan"), speed="")

    def after_step(self) -> None:
        record = self.trainer.record
        self.write(record)
        if self.progress is not None:
            sec = record["time"]
            speed = f"{1 / sec:.2f} it/s" if sec < 1 else f"{sec:.2f} s/it"
            self.progress.update(self.task, completed=record["iter"], loss=record["loss"], speed=speed)

    def after_train(self) -> None:
        e = self.trainer.error
        if e is not None and self.file is not None:
            try:
                self.write({"iter": self.trainer.iter + 1, "error": f"{type(e).__name__}: {e}"})
            except (OSError, ValueError):  # a full disk: the error itself is what counts
                pass
        if self.progress is not None:
            self.progress.stop()
        if self.file is not None:
            self.file.close()

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def print(self, msg: str) -> None:
        if self.progress is not None:
            self.progress.console.print(msg)
        else:
            print(msg, flush=True)


# --------------------------------------------------------------------------- when to stop


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


class StopOnDivergence(HookBase):
    """Raises `TrainingFailed` once this process's losses have `diverged` (after the iteration's
    record is logged: list this hook after `MetricsLog`). `where` starts the message."""

    def __init__(self, where: str):
        self.where, self.totals = where, []

    def after_step(self) -> None:
        self.totals.append(self.trainer.record["loss"])
        if (why := diverged(self.totals)) is not None:
            raise TrainingFailed(f"{self.where}: iteration {self.trainer.iter}: {why}; lower --lr (or the config's train.base_lr) or check the data")


class StopAt(HookBase):
    """Ends the run after iteration `iteration` without saving, as a crash would (tests of resume)."""

    def __init__(self, iteration: int):
        self.iteration = iteration

    def after_step(self) -> None:
        if self.trainer.iter >= self.iteration:
            raise StopTraining(f"stopped after iteration {self.trainer.iter}")


class TimeBudget(HookBase):
    """Ends the run (saved and validated: list it before those hooks) once its iterations have
    taken `seconds` (steps and data loading; validation and checkpoint writes not counted)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def after_step(self) -> None:
        if self.trainer.train_seconds >= self.seconds:
            self.trainer.stop()


# --------------------------------------------------------------------------- checkpoints and validation


class Checkpointer(HookBase):
    """Saves RUN/checkpoints/iter_N (weights, optimizer, `extra()`) every `period` iterations
    (None or 0: only the last) and at the run's last iteration; rank 0 writes, every rank waits.
    A run that a later hook stopped is saved in after_train. `path`: the last checkpoint written."""

    def __init__(self, out: Path, period: int | None, *, kind: str, config: dict[str, Any], categories, extra: Callable[[], dict]):
        self.out, self.period = Path(out), period
        self.kind, self.config, self.categories, self.extra = kind, config, categories, extra
        self.path: Path | None = None
        self.saved_at: int | None = None

    def after_step(self) -> None:
        t = self.trainer
        if t.last or (self.period and t.iter % self.period == 0):
            self.save()

    def after_train(self) -> None:
        t = self.trainer
        if t.error is None and not t.interrupted and self.saved_at != t.iter and t.iter > t.start_iter:
            self.save()

    def save(self) -> None:
        t = self.trainer
        if t.dist.main:
            self.path = save_checkpoint(self.out, t.model, kind=self.kind, config=self.config, categories=self.categories,
                                        iteration=t.iter, optimizer=t.optimizer, extra=self.extra())  # fmt: skip
        self.saved_at = t.iter
        t.dist.barrier()


class Validation(HookBase):
    """validate(model) -> metrics on rank 0, the model in eval mode, every `period` iterations
    (None or 0: only the last) and at the run's last iteration; each result is written to `log`
    ({"iter", "val"}) and printed. `metrics`: the last result."""

    def __init__(self, validate: Callable[[Any], dict[str, Any]], period: int | None, log: MetricsLog | None):
        self.validate, self.period, self.log = validate, period, log
        self.metrics: dict[str, Any] | None = None
        self.done_at: int | None = None

    def after_step(self) -> None:
        t = self.trainer
        if t.last or (self.period and t.iter % self.period == 0):
            self.run()

    def after_train(self) -> None:
        t = self.trainer
        if t.error is None and not t.interrupted and self.done_at != t.iter and t.iter > t.start_iter:
            self.run()

    def run(self) -> None:
        t = self.trainer
        if t.dist.main:
            core = unwrap(t.model)
            core.eval()
            self.metrics = self.validate(core)
            core.train()
            if self.log is not None:
                self.log.write({"iter": t.iter, "val": self.metrics})
                self.log.print(f"iter {t.iter}: val {_short(self.metrics)}")
        self.done_at = t.iter
        t.dist.barrier()


def _short(metrics: dict[str, Any]) -> str:
    parts = []
    for t in ("bbox", "segm"):
        if isinstance(metrics.get(t), dict):
            parts.append(f"{t} AP {metrics[t]['AP']:.3f} AP50 {metrics[t]['AP50']:.3f}")
    return ", ".join(parts) or str({k: v for k, v in metrics.items() if not isinstance(v, dict)})
