"""Prefect tasks: one per stage execution (one shard, one model), each a call of the plain stage
function of its package: the shard steps of `flows.steps` (one task, `shard_step`, named after
each step), training (`detector.stage`), merging (`pipeline.runfolder`) and the evaluation
(`flows.steps`).

Caching has two layers with one key (the stage's plan: a hash of the input files' content, the
stage's settings and the shard's image ids):
1. the stage function returns at once when its output file (named by the key) exists;
2. Prefect's cache (`cache_key_fn` on the same key, results stored under
   `RUN/prefect/results`) skips the task run itself (state `Cached`).
A Prefect record whose output file has since been deleted is dropped when the key is computed,
so the task runs again instead of returning a path to nothing. The plan the key function built
is handed to the task body, so each shard's plan is built once.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import twopass.flows  # noqa: F401  (Prefect defaults set before Prefect is imported)
from prefect import task
from prefect.context import TaskRunContext
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

from twopass.detector import stage as detector_stage
from twopass.flows import steps  # absolute, as prefect_flows: Prefect may load these files by path
from twopass.pipeline import runfolder
from twopass.pipeline.fileio import is_disk_full
from twopass.pipeline.runfolder import Planned
from twopass.segmenter.api import KINDS


def _log(level: str = "info"):
    """The run logger's method of `level`, or None outside a flow or task run."""
    try:
        return getattr(get_run_logger(), level)
    except MissingContextError:
        return None


# Retries: only failures that can pass (I/O, a lost Dask worker); a DataError, a config or
# checkpoint error, a missing file, a non-finite or diverging loss (`detector.train.TrainingFailed`),
# running out of memory or disk fails at once, naming its input.
RETRIES = dict(retries=2, retry_delay_seconds=[10, 60])


def transient(task, task_run, state) -> bool:
    """Prefect retry condition: retry the task unless its failure is one a retry repeats."""
    try:
        state.result(raise_on_failure=True)
    except (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, KeyError, TypeError,
            ArithmeticError, MemoryError):  # fmt: skip
        return False
    except Exception as e:  # noqa: BLE001 - anything else (OSError, a lost worker) may pass
        return not (_out_of_memory(e) or is_disk_full(e))
    return False


def _out_of_memory(e: BaseException) -> bool:
    """torch's (CUDA) out-of-memory error: a RuntimeError whose retry would run out again."""
    return type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower()


# --------------------------------------------------------------------------- cache keys

# task run id -> the plan its cache key function built (a task that comes back Cached never
# takes its plan: the oldest are dropped beyond a bound)
_PLANS: "OrderedDict[str, Planned]" = OrderedDict()
_PLANS_KEPT = 1024


def _key(plan: Callable[[dict[str, Any]], Planned]):
    """A Prefect cache_key_fn from a stage's plan (given the task's parameters).

    The output file is the truth: when it is missing (deleted, or never written), a Prefect
    cache record under the same key is stale and is removed, so the task runs again.
    """

    def cache_key_fn(context, parameters: dict[str, Any]) -> str:
        planned = plan(parameters)
        if not planned.done(_log("warning")):
            _drop_record(parameters["run_dir"], planned.key)
        _PLANS[str(context.task_run.id)] = planned
        while len(_PLANS) > _PLANS_KEPT:
            _PLANS.popitem(last=False)
        return planned.key

    return cache_key_fn


def _plan() -> Planned | None:
    """The plan of the running task, built by its cache key function."""
    ctx = TaskRunContext.get()
    return _PLANS.pop(str(ctx.task_run.id), None) if ctx is not None else None


def _drop_record(run_dir: str | Path, key: str) -> None:
    (results_dir(run_dir) / key).unlink(missing_ok=True)


def _train_key(context, p: dict[str, Any]) -> str | None:
    spec = p["spec"]
    if spec.checkpoint is not None:
        return None  # nothing to train: nothing worth caching
    key = detector_stage.train_key(KINDS[p["kind"]], spec, p["data"], p["device"])
    if not (detector_stage.train_dir(p["run_dir"], spec, key) / "done.json").is_file():
        _drop_record(p["run_dir"], key)
    return key


# --------------------------------------------------------------------------- tasks


@task(name="train-model", cache_key_fn=_train_key, persist_result=True, task_run_name="train-{spec.name}", tags=["twopass", "train"],
      retry_condition_fn=transient, **RETRIES)
def train_model(run_dir: str, kind: str, spec, data, device: str = "cpu", progress: bool = True) -> str:
    return detector_stage.train_stage(run_dir, KINDS[kind], spec, data, device, progress, log=_log())


def _step_plan(p: dict[str, Any]) -> Planned:
    return steps.step_named(p["step"]).plan(**p["args"])


@task(name="shard-step", persist_result=True, task_run_name="{name}-{shard}", tags=["twopass"], retry_condition_fn=transient,
      **RETRIES, cache_key_fn=_key(_step_plan))  # fmt: skip
def shard_step(step: str, name: str, shard: str, run_dir: str, args: dict[str, Any]) -> str:
    """One execution of a step of `flows.steps.SHARD_STEPS` (its stage function) on one shard;
    `name`: the task run's name before the shard ("detect-<model>", "fuse", ...)."""
    return steps.step_named(step).run(**args, plan=_plan(), log=_log())


@task(name="merge", persist_result=True, task_run_name="merge-{stage}-{label}", tags=["twopass", "merge"],
      retry_condition_fn=transient, **RETRIES,
      cache_key_fn=_key(lambda p: runfolder.merge_plan(p["run_dir"], p["stage"], p["label"], p["parts"])))  # fmt: skip
def merge(run_dir: str, stage: str, label: str, parts: list[str]) -> str:
    return runfolder.merge(run_dir, stage, label, parts, plan=_plan(), log=_log())


@task(name="evaluate", persist_result=True, tags=["twopass", "evaluate"], retry_condition_fn=transient, **RETRIES,
      cache_key_fn=_key(lambda p: steps.evaluation_plan(p["run_dir"], p["data"], p["fusion"], p["detectors"], p["fused"], p["instances"])))  # fmt: skip
def evaluate(run_dir: str, data, fusion, detectors: dict[str, str], fused: str | None, instances: str | None) -> str:
    return steps.evaluate_stage(run_dir, data, fusion, detectors, fused, instances, plan=_plan(), log=_log())


def results_dir(run_dir: str | Path) -> Path:
    return Path(run_dir).resolve() / "prefect" / "results"


def bound(run_dir: str | Path) -> SimpleNamespace:
    """The tasks with their Prefect results (and cache records) stored under the run folder;
    `.steps[name]`: the task of each shard step, named and tagged after it."""
    storage = results_dir(run_dir)
    storage.mkdir(parents=True, exist_ok=True)
    tasks = (train_model, merge, evaluate)
    bound_steps = {s.name: shard_step.with_options(name=f"{s.name}-shard", tags={"twopass", s.name}, result_storage=storage)
                   for s in steps.SHARD_STEPS}  # fmt: skip
    return SimpleNamespace(steps=bound_steps, **{t.fn.__name__: t.with_options(result_storage=storage) for t in tasks})
