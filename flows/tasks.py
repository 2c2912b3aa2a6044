"""Prefect tasks: one per stage execution (one shard, one model), each a call of the plain
stage function in `flows.stages`.

Caching has two layers with one key (`stages.*_plan(...).key`: a hash of the input files'
content, the stage's settings and the shard's image ids):
1. the stage function returns at once when its output file (named by the key) exists;
2. Prefect's cache (`cache_key_fn` on the same key, results stored under
   `RUN/prefect/results`) skips the task run itself (state `Cached`).
A Prefect record whose output file has since been deleted is dropped when the key is computed,
so the task runs again instead of returning a path to nothing.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import flows  # noqa: F401  (Prefect defaults set before Prefect is imported)
from prefect import task
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

from . import stages


def _log():
    try:
        logger = get_run_logger()
    except MissingContextError:
        return None
    return logger.info


def _key(plan):
    """A Prefect cache_key_fn from a stage's plan function (same parameters as the task).

    The output file is the truth: when it is missing (deleted, or never written), a Prefect
    cache record under the same key is stale and is removed, so the task runs again.
    """

    def cache_key_fn(context, parameters: dict[str, Any]) -> str:
        params = {k: v for k, v in parameters.items() if k not in ("shard", "progress", "log")}
        planned = plan(**params)
        if not planned.out.is_file():
            _drop_record(params["run_dir"], planned.key)
        return planned.key

    return cache_key_fn


def _drop_record(run_dir: str | Path, key: str) -> None:
    (results_dir(run_dir) / key).unlink(missing_ok=True)


def _train_key(context, p: dict[str, Any]) -> str | None:
    spec = p["spec"]
    if spec.checkpoint is not None:
        return None  # nothing to train: nothing worth caching
    key = stages.train_key(p["kind"], spec, p["where"], p["data"], p["device"])
    if not (stages.train_dir(p["run_dir"], spec, key) / "done.json").is_file():
        _drop_record(p["run_dir"], key)
    return key


@task(name="train-model", cache_key_fn=_train_key, persist_result=True, task_run_name="train-{spec.name}")
def train_model(run_dir: str, kind: str, spec, where: str, data, device: str = "cpu", progress: bool = True) -> str:
    return stages.train_stage(run_dir, kind, spec, where, data, device, progress, log=_log())


@task(name="detect-shard", cache_key_fn=_key(stages.detect_plan), persist_result=True, task_run_name="detect-{spec.name}-{shard}")
def detect_shard(run_dir: str, spec, checkpoint: str, data, ids: list[int], device: str = "cpu", shard: str = "", kind: str = "detector") -> str:
    return stages.detect_shard(run_dir, spec, checkpoint, data, ids, device, log=_log(), kind=kind)


@task(name="fuse-shard", cache_key_fn=_key(stages.fuse_plan), persist_result=True, task_run_name="fuse-{shard}")
def fuse_shard(run_dir: str, fusion, inputs: list[str], weights: list[float], data, ids: list[int], shard: str = "") -> str:
    return stages.fuse_shard(run_dir, fusion, inputs, weights, data, ids, log=_log())


@task(name="segment-shard", cache_key_fn=_key(stages.segment_plan), persist_result=True, task_run_name="segment-{spec.name}-{shard}")
def segment_shard(run_dir: str, spec, checkpoint: str, detections: str, data, ids: list[int], device: str = "cpu", shard: str = "") -> str:
    return stages.segment_shard(run_dir, spec, checkpoint, detections, data, ids, device, log=_log())


@task(name="merge", cache_key_fn=_key(stages.merge_plan), persist_result=True, task_run_name="merge-{stage}-{label}")
def merge(run_dir: str, stage: str, label: str, parts: list[str]) -> str:
    return stages.merge(run_dir, stage, label, parts, log=_log())


@task(name="evaluate", cache_key_fn=_key(stages.evaluation_plan), persist_result=True)
def evaluate(run_dir: str, data, fusion, detectors: dict[str, str], fused: str | None, instances: str | None) -> str:
    return stages.evaluate_stage(run_dir, data, fusion, detectors, fused, instances, log=_log())


ALL = ("train_model", "detect_shard", "fuse_shard", "segment_shard", "merge", "evaluate")


def results_dir(run_dir: str | Path) -> Path:
    return Path(run_dir).resolve() / "prefect" / "results"


def bound(run_dir: str | Path) -> SimpleNamespace:
    """The tasks with their Prefect results (and cache records) stored under the run folder."""
    storage = results_dir(run_dir)
    storage.mkdir(parents=True, exist_ok=True)
    return SimpleNamespace(**{name: globals()[name].with_options(result_storage=storage) for name in ALL})
