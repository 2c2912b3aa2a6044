"""The two-pass pipeline, described once: its shard steps (inputs, outputs, cache keys) and the
stages after them (merge, publish, evaluation). No Prefect here.

Two executors run this description: `flows.plain.two_pass_plain` (in process, plain calls) and
`flows.prefect_flows.two_pass_flow` (one Prefect task per step, shard and label). A step is a
`Step` record in `SHARD_STEPS`; both executors iterate that list, so a new step is one entry
there (its stage function and plan live in its own package, as `detector.stage` does).

A step runs once per shard of images and per label (`labels`: one per pass-one model for
detection, one otherwise). Its keyword arguments (`args`) come from the config and the earlier
steps' outputs of the same shard, which are paths in the plain executor and Prefect futures in
the flow (Prefect resolves them, and so orders the tasks). Its outputs are merged per label
into `RUN/<stage>/` and published under `RUN/outputs/`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow.compute as pc

from twopass.detector import stage as detector_stage
from twopass.ensemble.table_fusion import fuse_tables
from twopass.ensemble import stage as ensemble_stage
from twopass.pipeline.coco import CocoIndex
from twopass.pipeline.config import DataConfig, PipelineConfig, safe_name
from twopass.pipeline.evaluate import evaluate
from twopass.pipeline.fileio import write_json
from twopass.pipeline.runfolder import Log, Planned, computed, content_hash, data_hash, key_of, open_images
from twopass.pipeline.settings import FuseSettings
from twopass.pipeline.tables import read_results
from twopass.segmenter import stage as segmenter_stage
from twopass.segmenter.api import KINDS, SEGMENTER


# --------------------------------------------------------------------------- the description


@dataclass
class Context:
    """What a step's arguments are built from: the config, the run folder, each model's
    checkpoint, the shards' image ids, and `outputs[step][label][shard]` of the steps so far."""

    config: PipelineConfig
    run_dir: str
    checkpoints: dict[str, str]
    shard_ids: list[list[int]]
    outputs: dict[str, dict[str, list[Any]]] = field(default_factory=dict)

    def put(self, step: "Step", label: str, k: int, output: Any) -> None:
        """Record the output (a path, or a future) of `step` on shard `k` for `label`."""
        self.outputs.setdefault(step.name, {}).setdefault(label, [None] * len(self.shard_ids))[k] = output


@dataclass(frozen=True)
class Step:
    """One step of the per-shard chain.

    run(**args, plan=None, log=None) -> output file; plan(**args) -> `Planned` (the cache key and
    the output path; the run function returns at once when that file exists). Both take the
    same keyword arguments, `args(ctx, label, k)`: JSON-like values, pydantic records and frozen
    records of module-level functions such as `ModelKind` (the Prefect task's parameters, which
    a Dask runner pickles). `stage`: the run folder's subfolder of the merged outputs;
    `publish(label)`: the file name under RUN/outputs/, or None."""

    name: str
    run: Callable[..., str]
    plan: Callable[..., Planned]
    args: Callable[[Context, str, int], dict[str, Any]]
    labels: Callable[[Context], list[str]]
    stage: str
    publish: Callable[[str], str | None] = lambda label: None
    task_name: Callable[[Context, str], str] = lambda ctx, label: ""  # Prefect task-run name (before "-<shard>")


def _member(ctx: Context, name: str):
    return next((kind, d) for kind, d in ctx.config.pass_one() if d.name == name)


def _detect_args(ctx: Context, label: str, k: int) -> dict[str, Any]:
    kind, d = _member(ctx, label)
    return dict(run_dir=ctx.run_dir, kind=KINDS[kind], spec=d, checkpoint=ctx.checkpoints[d.name], data=ctx.config.data,
                ids=ctx.shard_ids[k], device=ctx.config.device)  # fmt: skip


def _fuse_args(ctx: Context, label: str, k: int) -> dict[str, Any]:
    weights = {d.name: d.weight for _, d in ctx.config.pass_one()}
    det = ctx.outputs["detect"]  # in pass one's order (fuse_flow: the order of the files given)
    return dict(run_dir=ctx.run_dir, fusion=ctx.config.fusion, inputs=[parts[k] for parts in det.values()],
                weights=[weights[name] for name in det], data=ctx.config.data, ids=ctx.shard_ids[k])  # fmt: skip


def _segment_args(ctx: Context, label: str, k: int) -> dict[str, Any]:
    s = ctx.config.segmenter
    return dict(run_dir=ctx.run_dir, spec=s, checkpoint=ctx.checkpoints[s.name], detections=ctx.outputs["fuse"]["fused"][k],
                data=ctx.config.data, ids=ctx.shard_ids[k], device=ctx.config.device)  # fmt: skip


DETECT = Step(
    "detect", detector_stage.detect_shard, detector_stage.detect_plan, _detect_args,
    labels=lambda ctx: [d.name for _, d in ctx.config.pass_one()], stage="detections",
    publish=lambda label: f"detections_{safe_name(label)}.parquet", task_name=lambda ctx, label: f"detect-{label}",
)  # fmt: skip
FUSE = Step(
    "fuse", ensemble_stage.fuse_shard, ensemble_stage.fuse_plan, _fuse_args,
    labels=lambda ctx: ["fused"], stage="fused", publish=lambda label: "fused.parquet", task_name=lambda ctx, label: "fuse",
)  # fmt: skip
SEGMENT = Step(
    "segment", segmenter_stage.segment_shard, segmenter_stage.segment_plan, _segment_args,
    labels=lambda ctx: [ctx.config.segmenter.name], stage="instances", publish=lambda label: "instances.parquet",
    task_name=lambda ctx, label: f"segment-{label}",
)  # fmt: skip

# The per-shard chain, in order; each step reads the outputs of the ones before it.
SHARD_STEPS: list[Step] = [DETECT, FUSE, SEGMENT]


def schedule(ctx: Context, chain: list[Step] | None = None) -> Iterator[tuple[Step, str, int]]:
    """(step, label, shard index) in the order the executors run or submit them: the first step
    of `chain` (default SHARD_STEPS) on every shard, model by model (pass one: each model loads
    once), then the rest of the chain shard by shard, so that under Prefect shard 1 can be
    segmented while shard 7 is still in detection."""
    first, *rest = chain if chain is not None else SHARD_STEPS
    n = len(ctx.shard_ids)
    for label in first.labels(ctx):
        for k in range(n):
            yield first, label, k
    for k in range(n):
        for step in rest:
            for label in step.labels(ctx):
                yield step, label, k


def step_named(name: str) -> Step:
    """The step of SHARD_STEPS called `name` (read at call time: a test may add one)."""
    return next(s for s in SHARD_STEPS if s.name == name)


def finals(merged: dict[str, dict[str, str]]) -> tuple[dict[str, str], str, str]:
    """(detections per model, fused boxes, instances): the merged files evaluation and the report take."""
    return merged["detect"], merged["fuse"]["fused"], next(iter(merged["segment"].values()))


# --------------------------------------------------------------------------- checkpoints


def checkpoints(config: PipelineConfig, run_dir: str | Path, given: dict[str, str] | None = None) -> dict[str, str]:
    """{model name: checkpoint} of every model of the run: `given`, else the configured one,
    else the one train_flow made in this run folder."""
    out = dict(given or {})
    for d in config.detectors:
        out.setdefault(d.name, str(detector_stage.resolve_model(run_dir, KINDS["detector"], d, config.data, config.device)))
    s = config.segmenter
    out.setdefault(s.name, str(detector_stage.resolve_model(run_dir, SEGMENTER, s, config.data, config.device)))
    return out


# --------------------------------------------------------------------------- evaluation


def evaluation_plan(run_dir, data: DataConfig, fusion: FuseSettings, detectors: dict[str, str], fused: str | None, instances: str | None) -> Planned:
    if data.ann is None:
        raise ValueError("evaluation needs data.ann (ground-truth annotations)")
    key = key_of(
        "evaluate",
        gt=content_hash(data.ann),
        detectors={k: data_hash(v) for k, v in detectors.items()},
        fused=data_hash(fused) if fused else None,
        instances=data_hash(instances) if instances else None,
        fusion=fusion.resolved(),
    )
    return Planned(key, Path(run_dir) / "evaluation" / f"metrics-{key}.json")


def _row(label: str, what: str, path: str | None, metrics: dict) -> dict:
    row: dict[str, Any] = {"stage": label, "what": what, "file": path}
    for t in ("bbox", "segm"):
        if t in metrics:
            row[t] = metrics[t]
    row["per_category"] = metrics.get("per_category", {})
    return row


def evaluate_stage(
    run_dir, data: DataConfig, fusion: FuseSettings, detectors: dict[str, str], fused: str | None, instances: str | None,
    plan: Planned | None = None, log: Log = None
) -> str:
    """COCO AP of every stage: each detector (its first view alone and, with test-time
    augmentation, its views fused), the fused boxes, the final masks. Writes
    RUN/evaluation/metrics-<key>.json; returns its path. It spans the stages (the TTA row
    fuses), hence here, above them."""
    plan = plan or evaluation_plan(run_dir, data, fusion, detectors, fused, instances)
    if plan.done(log):
        return str(plan.out)
    t0 = time.perf_counter()
    gt = CocoIndex.cached(data.ann).raw
    image_set = open_images(data)
    rows = []
    for name, path in detectors.items():
        table, meta = read_results(path)
        views = list((meta.extra or {}).get("views") or dict.fromkeys(table.column("source").to_pylist()))
        if views:
            first = table.filter(pc.equal(table.column("source"), views[0]))
            # a segmenter run end to end (segmenter.own_boxes) has its own masks: score them too
            types = ("bbox", "segm") if "mask_counts" in table.column_names else ("bbox",)
            rows.append(_row(f"detector {name}", f"one view ({views[0]})", path, evaluate(gt, first, iou_types=types)))
        if len(views) > 1:
            sizes = {int(i): image_set.size(i) for i in set(table.column("image_id").to_pylist())}
            tta = fuse_tables([table], fusion, image_sizes=sizes, source=f"{name}:tta")
            rows.append(_row(f"detector {name} + TTA", f"{len(views)} views, {fusion.method}", path, evaluate(gt, tta, iou_types=("bbox",))))
    if fused:
        rows.append(_row("fused", f"{len(detectors)} detectors, {fusion.method}", fused, evaluate(gt, fused, iou_types=("bbox",))))
    if instances:
        rows.append(_row("final masks", "segmenter on the fused boxes", instances, evaluate(gt, instances, iou_types=("bbox", "segm"))))
    write_json(plan.out, {"ann": str(data.ann), "images": len(image_set), "stages": rows}, indent=1)
    return computed(run_dir, plan, t0, log, f"evaluated {len(rows)} stages", stage="evaluate", name="metrics")
