"""Prefect flows: train, detect, fuse, segment (pass two alone), evaluate, and the two-pass
flow composing detect -> fuse -> segment -> evaluate.

Every flow takes the pipeline config (`pipeline.config.PipelineConfig`, validated by Prefect)
and the run folder. Work is one task per shard of images (never per box); within the
two-pass flow each shard flows through its stages on its own (shard 3 may be segmented while
shard 7 is still in detection). A failed shard does not stop the others: they finish and keep
their outputs, and the flow then fails with a message naming each failed shard's cause. A
rerun recomputes only what is missing.

With no `PREFECT_API_URL` the flows run on Prefect's embedded (ephemeral) server.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Iterator

import twopass.flows  # noqa: F401  (Prefect defaults set before Prefect is imported)
from prefect import flow, tags
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.logging import get_run_logger
from prefect.context import FlowRunContext

from twopass.detector.stage import resolve_model
from twopass.flows import tasks  # absolute: Prefect loads this file by path (prefect.yaml entrypoints)
from twopass.flows.runners import TaskRunnerSpec
from twopass.pipeline import report
from twopass.pipeline.config import PipelineConfig, safe_name
from twopass.pipeline.fileio import read_json, stable_hash, sweep_temp_files
from twopass.pipeline.runfolder import ap_table, data_hash, format_ap_table, publish, read_ledger, shard_label, shards, stage_counts, write_coco_json
from twopass.flows import steps
from twopass.segmenter.api import SEGMENTER

DEFAULT_RUN_DIR = "runs/twopass"


class FlowFailed(RuntimeError):
    """Some shards failed; the message names each one and its cause. The others finished."""


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def run_log(run_dir: str | Path) -> Iterator[Path]:
    """Copy Prefect's flow and task logs into RUN/logs/prefect.log while a flow runs."""
    path = Path(run_dir) / "logs" / "prefect.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("prefect")
    if any(getattr(h, "baseFilename", None) == str(path.resolve()) for h in logger.handlers):
        yield path  # a subflow of a flow that already logs here
        return
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield path
    finally:
        logger.removeHandler(handler)
        handler.close()


class Shards:
    """Futures of shard tasks, with a report of the failed ones."""

    def __init__(self) -> None:
        self.items: list[tuple[str, Any]] = []  # (label, future)

    def add(self, label: str, future) -> Any:
        self.items.append((label, future))
        return future

    def failures(self) -> list[str]:
        """Root causes ("detect r18 shard 2/4 (...): DataError ..."); later stages that did not
        run because of them are counted, not repeated."""
        roots, blocked = [], 0
        for label, fut in self.items:
            fut.wait()
            state = fut.state
            if state.is_completed():
                continue
            if state.name == "NotReady" or "Upstream task run" in (state.message or ""):
                blocked += 1
                continue
            roots.append(f"{label}: {_cause(state)}")
        if blocked:
            roots.append(f"{blocked} later stage task(s) of those shards did not run")
        return roots


def _cause(state) -> str:
    try:
        state.result(raise_on_failure=True)
    except Exception as e:  # noqa: BLE001 - reported, not handled
        return f"{type(e).__name__}: {e}"
    return state.message or state.name


def _finish(shards: Shards, what: str, unit: str = "shard") -> None:
    """Raise FlowFailed naming each failed task (`unit`: what one task is, "shard" or "training")."""
    failed = shards.failures()
    if failed:
        n = len(failed) - (1 if failed[-1].endswith("did not run") else 0)
        tasks_ = "shard task(s)" if unit == "shard" else f"{unit}(s)"
        raise FlowFailed(f"{what}: {n} {tasks_} failed (the other {unit}s finished and kept their outputs; rerun to retry "
                         "only these):\n  " + "\n  ".join(failed))  # fmt: skip


def _ran_since(run_dir: str | Path, t0: float) -> dict[str, int]:
    return stage_counts(e for e in read_ledger(run_dir) if e.get("time", 0) >= t0 - 1e-3)


def artifact_key(name: str, run_dir: str | Path) -> str:
    """The prefix of a run's artifact keys: the config's name and its run folder's hash, so two
    runs of one config in two folders keep their own reports (Prefect allows a-z, 0-9, dashes)."""
    return f"{safe_name(name)}-{stable_hash(str(Path(run_dir).resolve()))[:8]}".lower().replace("_", "-").replace(".", "-")


def _prepare(config: PipelineConfig | str, run_dir: str) -> tuple[PipelineConfig, str]:
    """The config (a YAML path is loaded: a deployment may be given one) and the run folder,
    with the config written to RUN/pipeline.yaml."""
    from twopass.pipeline.config import load_pipeline_config, write_pipeline_config

    if isinstance(config, (str, Path)):
        config = load_pipeline_config(config)
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    for p in sweep_temp_files(run):
        get_run_logger().warning(f"removed {p}, left by a writer that was killed")
    write_pipeline_config(run / "pipeline.yaml", config)
    return config, str(run.resolve())


def _shard_name(k: int, n: int) -> str:
    return f"{k + 1}of{n}"


# --------------------------------------------------------------------------- task runners


@contextlib.contextmanager
def tasks_on(spec: TaskRunnerSpec) -> Iterator[None]:
    """Submit this flow run's tasks to `spec`'s task runner. A flow's own runner is fixed when
    the flow is defined; a deployment can only pass parameters, so the runner the parameter
    names is swapped into the flow run's context for the body of the flow."""
    ctx = FlowRunContext.get()
    with spec.build() as runner, ctx.model_copy(update={"task_runner": runner}):
        yield


# --------------------------------------------------------------------------- flows


@flow(name="train")
def train_flow(config: PipelineConfig | str, run_dir: str = DEFAULT_RUN_DIR, parallel: bool = False,
               task_runner: TaskRunnerSpec = TaskRunnerSpec()) -> dict[str, str]:  # fmt: skip
    """Train the configured detectors and the segmenter (one task each) unless their config
    names a checkpoint; finished trainings are reused, killed ones resume. Returns
    {model name: checkpoint JSON}. `parallel`: submit all at once (no progress bars)."""
    config, run_dir = _prepare(config, run_dir)
    T = tasks.bound(run_dir)
    with run_log(run_dir), tasks_on(task_runner):
        log = get_run_logger()
        jobs = [("detector", d) for d in config.detectors] + [("segmenter", config.segmenter)]
        shards = Shards()
        out = {}
        for kind, spec in jobs:
            with tags(spec.name):
                fut = shards.add(f"train {spec.name}", T.train_model.submit(
                    run_dir=run_dir, kind=kind, spec=spec, data=config.data, device=config.device, progress=not parallel))
            if not parallel:
                fut.wait()
                if not fut.state.is_completed():
                    break
        _finish(shards, "train_flow", "training")
        for (kind, spec), (_, fut) in zip(jobs, shards.items):
            out[spec.name] = fut.result()
            log.info(f"{kind} {spec.name}: {out[spec.name]}")
        return out


@flow(name="detect")
def detect_flow(config: PipelineConfig | str, run_dir: str = DEFAULT_RUN_DIR, checkpoints: dict[str, str] | None = None,
                task_runner: TaskRunnerSpec = TaskRunnerSpec()) -> dict[str, str]:  # fmt: skip
    """Pass one without fusion: each detector (all its views) on each shard of images; returns
    {detector name: merged detections Parquet}."""
    config, run_dir = _prepare(config, run_dir)
    T = tasks.bound(run_dir)
    with run_log(run_dir), tasks_on(task_runner):
        ctx = steps.Context(config, run_dir, steps.checkpoints(config, run_dir, checkpoints), shards(config.data))
        submitted = Shards()
        _submit(T, ctx, [steps.DETECT], submitted)
        _finish(submitted, "detect_flow")
        return _merge_and_publish(T, steps.DETECT, ctx)[0]


def _submit(T, ctx: steps.Context, chain: list[steps.Step], submitted: Shards) -> None:
    """Submit the steps of `chain` on every shard and label (`steps.schedule`); their futures go
    to ctx.outputs, where the later steps' arguments take them (Prefect waits on them)."""
    n = len(ctx.shard_ids)
    for step, label, k in steps.schedule(ctx, chain):
        many = len(step.labels(ctx)) > 1
        with tags(label):  # with the task's own (twopass, <step>): concurrency limits per model
            ctx.put(step, label, k, submitted.add(
                f"{step.name}{f' {label}' if many else ''} shard {k + 1}/{n} ({shard_label(ctx.shard_ids[k])})",
                T.steps[step.name].submit(step=step.name, name=step.task_name(ctx, label), shard=_shard_name(k, n),
                                          run_dir=ctx.run_dir, args=step.args(ctx, label, k))))  # fmt: skip


def _merge_and_publish(T, step: steps.Step, ctx: steps.Context) -> tuple[dict[str, str], dict[str, Path]]:
    """({label: merged file}, {output name: published file}) of a submitted step."""
    merged, published = {}, {}
    for label, futs in ctx.outputs[step.name].items():
        merged[label] = T.merge.submit(run_dir=ctx.run_dir, stage=step.stage, label=label, parts=[f.result() for f in futs]).result()
        name = step.publish(label)
        if name:
            published[name.removesuffix(".parquet")] = publish(ctx.run_dir, merged[label], name)
    return merged, published


@flow(name="fuse")
def fuse_flow(config: PipelineConfig | str, detections: dict[str, str], run_dir: str = DEFAULT_RUN_DIR,
              task_runner: TaskRunnerSpec = TaskRunnerSpec()) -> str:  # fmt: skip
    """Fuse the detections files of the detectors (names as in the config, for their weights),
    shard by shard; returns the merged fused Parquet."""
    config, run_dir = _prepare(config, run_dir)
    T = tasks.bound(run_dir)
    weights = {d.name: d.weight for _, d in config.pass_one()}
    unknown = sorted(set(detections) - set(weights))
    if unknown:
        raise ValueError(f"fuse_flow: detections for {unknown}, which the config does not name (pass one: {sorted(weights)})")
    with run_log(run_dir), tasks_on(task_runner):
        submitted = Shards()
        shard_ids = shards(config.data)
        # the given files stand for pass one's outputs on every shard (the stage takes each shard's rows)
        ctx = steps.Context(config, run_dir, {}, shard_ids, {"detect": {name: [path] * len(shard_ids) for name, path in detections.items()}})
        _submit(T, ctx, [steps.FUSE], submitted)
        _finish(submitted, "fuse_flow")
        return _merge_and_publish(T, steps.FUSE, ctx)[0]["fused"]


@flow(name="segment")
def segment_flow(config: PipelineConfig | str, detections: str, run_dir: str = DEFAULT_RUN_DIR, checkpoint: str | None = None,
                 task_runner: TaskRunnerSpec = TaskRunnerSpec()) -> str:  # fmt: skip
    """Pass two alone: masks for the boxes of `detections` (a detections Parquet or COCO results
    JSON from any source), shard by shard; returns the merged instances Parquet. The rerun path
    when new detections arrive: only these shards' segmentation runs. Its outputs, evaluation
    (with annotations) and report go to RUN/segment-<detections' content key>/, beside a two-pass
    run's in the same folder, never over them."""
    t0 = time.time()
    config, run_dir = _prepare(config, run_dir)
    T = tasks.bound(run_dir)
    det = Path(detections)
    if not det.is_file():
        raise FileNotFoundError(f"segment_flow: detections {det}: no such file")
    with run_log(run_dir), tasks_on(task_runner):
        s = config.segmenter
        ckpt = checkpoint or str(resolve_model(run_dir, SEGMENTER, s, config.data, config.device))
        submitted = Shards()
        shard_ids = shards(config.data)
        ctx = steps.Context(config, run_dir, {s.name: ckpt}, shard_ids, {"fuse": {"fused": [str(det.resolve())] * len(shard_ids)}})
        _submit(T, ctx, [steps.SEGMENT], submitted)
        _finish(submitted, "segment_flow")
        merged = T.merge.submit(run_dir=run_dir, stage=steps.SEGMENT.stage, label=s.name,
                                parts=[f.result() for f in ctx.outputs["segment"][s.name]]).result()  # fmt: skip
        own = Path(run_dir) / f"segment-{data_hash(det)[:12]}"
        publish(own, merged, "instances.parquet")
        write_coco_json(own, merged, "instances.json")
        _evaluate_and_report(tasks.bound(own), config, str(own), {}, None, merged, _ran_since(run_dir, t0))
        return merged


@flow(name="evaluate")
def evaluate_flow(
    config: PipelineConfig | str,
    detections: dict[str, str],
    fused: str | None = None,
    instances: str | None = None,
    run_dir: str = DEFAULT_RUN_DIR,
    ran: dict[str, int] | None = None,
    task_runner: TaskRunnerSpec = TaskRunnerSpec(),
) -> dict[str, Any]:
    """AP of each stage (each detector, the fused boxes, the final masks): a Prefect table
    artifact, a markdown artifact with overlay pictures, and RUN/report.md with RUN/pictures/.
    Returns {"metrics": path or None, "report": path, "table": rows}."""
    config, run_dir = _prepare(config, run_dir)
    with run_log(run_dir), tasks_on(task_runner):
        return _evaluate_and_report(tasks.bound(run_dir), config, run_dir, detections, fused, instances, ran)


def _evaluate_and_report(T, config: PipelineConfig, run_dir: str, detections: dict[str, str], fused: str | None,
                         instances: str | None, ran: dict[str, int] | None) -> dict[str, Any]:  # fmt: skip
    """evaluate_flow's body (two_pass_flow runs it inline: a subflow costs about a second)."""
    log = get_run_logger()
    metrics_path, rows = None, []
    if config.data.ann is not None and config.evaluation.enabled:
        metrics_path = T.evaluate.submit(run_dir=run_dir, data=config.data, fusion=config.fusion, detectors=detections,
                                         fused=fused, instances=instances).result()  # fmt: skip
        rows = ap_table(read_json(metrics_path))
    outputs = {f"detections of {k}": v for k, v in detections.items()}
    if fused:
        outputs["fused boxes"] = fused
    if instances:
        outputs["instances"] = instances
    if metrics_path:
        outputs["metrics"] = metrics_path
    pictures = report.render_pictures(run_dir, config, fused, instances)
    path = report.write_report(run_dir, report.build_report(run_dir, config, metrics_path, outputs, pictures, ran))
    key = artifact_key(config.name, run_dir)
    if rows:
        create_table_artifact(key=f"{key}-ap-per-stage", table=rows, description=f"AP per stage, {config.name} ({run_dir})")
        log.info("AP per stage:\n" + format_ap_table(rows))
    create_markdown_artifact(
        key=f"{key}-report",
        markdown=report.build_report(run_dir, config, metrics_path, outputs, pictures, ran, inline_pictures=True),
        description=f"twopass report, {config.name} ({run_dir})",
    )
    log.info(f"report: {path}")
    return {"metrics": metrics_path, "report": str(path), "table": rows}


@flow(name="two-pass")
def two_pass_flow(config: PipelineConfig | str, run_dir: str = DEFAULT_RUN_DIR, checkpoints: dict[str, str] | None = None,
                  task_runner: TaskRunnerSpec = TaskRunnerSpec()) -> dict[str, Any]:  # fmt: skip
    """Pass one (every detector and view on every shard, fused per shard), pass two (the
    segmenter on each shard's fused boxes), then evaluation and the report. Returns the output
    paths and the AP table."""
    t0 = time.time()
    config, run_dir = _prepare(config, run_dir)
    T = tasks.bound(run_dir)
    with run_log(run_dir), tasks_on(task_runner):
        log = get_run_logger()
        ctx = steps.Context(config, run_dir, steps.checkpoints(config, run_dir, checkpoints), shards(config.data))
        n = len(ctx.shard_ids)
        log.info(f"{len(config.detectors)} detectors, {sum(map(len, ctx.shard_ids))} images in {n} shards of up to {config.data.shard_size}")
        submitted = Shards()
        _submit(T, ctx, steps.SHARD_STEPS, submitted)
        _finish(submitted, "two_pass_flow")
        merged, outputs = {}, {}
        for step in steps.SHARD_STEPS:
            merged[step.name], published = _merge_and_publish(T, step, ctx)
            outputs.update(published)
        merged_det, fused, instances = steps.finals(merged)
        outputs["instances_json"] = write_coco_json(run_dir, instances, "instances.json")
        ran = _ran_since(run_dir, t0)
        log.info(f"computed this run: {ran or 'nothing (all reused)'}")
        ev = _evaluate_and_report(T, config, run_dir, merged_det, fused, instances, ran)
        return {
            "run_dir": run_dir,
            "detections": merged_det,
            "fused": fused,
            "instances": instances,
            "outputs": {k: str(v) for k, v in outputs.items()},
            "report": ev["report"],
            "metrics": ev["metrics"],
            "table": ev["table"],
            "ran": ran,
        }


def reach_api() -> None:
    """Reach the Prefect API now (starting the embedded server when no PREFECT_API_URL is set),
    so that the first flow does not pay for it."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.api_healthcheck()


FLOWS = {
    "train": train_flow,
    "detect": detect_flow,
    "fuse": fuse_flow,
    "segment": segment_flow,
    "evaluate": evaluate_flow,
    "two-pass": two_pass_flow,
}
