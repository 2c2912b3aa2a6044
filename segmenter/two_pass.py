"""The whole two-pass pipeline without Prefect: the evaluation of every stage, and the plain loop.

`two_pass_plain` makes the same calls, in the same order, as `flows.prefect_flows.two_pass_flow`
with one worker; it is the reference of an uninterrupted run in the tests and the baseline of
`benchmarks/flow_overhead.py`. The segmenter's package holds it because pass two is the top of
the model stack: it imports the detectors (`detector`) and the fusion (`ensemble`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from twopass.detector.api import DETECTOR, ModelKind
from twopass.detector.stage import detect_shard, resolve_model
from twopass.ensemble import fuse
from twopass.ensemble.stage import fuse_shard
from twopass.pipeline import report
from twopass.pipeline.coco import CocoIndex
from twopass.pipeline.config import DataConfig, PipelineConfig, safe_name
from twopass.pipeline.evaluate import evaluate
from twopass.pipeline.fileio import write_json
from twopass.pipeline.runfolder import Log, Planned, computed, content_hash, data_hash, key_of, merge, open_images, publish, shards, write_coco_json
from twopass.pipeline.settings import FuseSettings
from twopass.pipeline.tables import read_results

from .api import SEGMENTER
from .stage import segment_shard

# The model kinds by the name the pipeline config and checkpoints use.
KINDS: dict[str, ModelKind] = {"detector": DETECTOR, "segmenter": SEGMENTER}


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
    RUN/evaluation/metrics-<key>.json; returns its path."""
    plan = plan or evaluation_plan(run_dir, data, fusion, detectors, fused, instances)
    if plan.done(log):
        return str(plan.out)
    t0 = time.perf_counter()
    gt = CocoIndex.cached(data.ann).raw
    image_set = open_images(data)
    rows = []
    kwargs = fusion.resolved()
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
            tta = fuse([table], image_sizes=sizes, source=f"{name}:tta", **kwargs)
            rows.append(_row(f"detector {name} + TTA", f"{len(views)} views, {kwargs['method']}", path, evaluate(gt, tta, iou_types=("bbox",))))
    if fused:
        rows.append(_row("fused", f"{len(detectors)} detectors, {kwargs['method']}", fused, evaluate(gt, fused, iou_types=("bbox",))))
    if instances:
        rows.append(_row("final masks", "segmenter on the fused boxes", instances, evaluate(gt, instances, iou_types=("bbox", "segm"))))
    write_json(plan.out, {"ann": str(data.ann), "images": len(image_set), "stages": rows}, indent=1)
    return computed(run_dir, plan, t0, log, f"evaluated {len(rows)} stages", stage="evaluate", name="metrics")


# --------------------------------------------------------------------------- the plain loop


def checkpoints(config: PipelineConfig, run_dir: str | Path, given: dict[str, str] | None = None) -> dict[str, str]:
    """{model name: checkpoint} of every model of the run: `given`, else the configured one,
    else the one train_flow made in this run folder."""
    out = dict(given or {})
    for d in config.detectors:
        out.setdefault(d.name, str(resolve_model(run_dir, DETECTOR, d, config.data, config.device)))
    s = config.segmenter
    out.setdefault(s.name, str(resolve_model(run_dir, SEGMENTER, s, config.data, config.device)))
    return out


def two_pass_plain(config: PipelineConfig, run_dir: str | Path, given: dict[str, str] | None = None) -> dict[str, Any]:
    """Pass one, fusion and pass two, shard by shard, then merge, publish, evaluate and report."""
    run_dir = str(Path(run_dir).resolve())
    ck = checkpoints(config, run_dir, given)
    shard_ids = shards(config.data)
    members = config.pass_one()
    det = {
        d.name: [detect_shard(run_dir, KINDS[kind], d, ck[d.name], config.data, ids, config.device) for ids in shard_ids]
        for kind, d in members
    }
    weights = [d.weight for _, d in members]
    s = config.segmenter
    fused, inst = [], []
    for k, ids in enumerate(shard_ids):
        f = fuse_shard(run_dir, config.fusion, [det[d.name][k] for _, d in members], weights, config.data, ids)
        fused.append(f)
        inst.append(segment_shard(run_dir, s, ck[s.name], f, config.data, ids, config.device))
    merged = {name: merge(run_dir, "detections", name, parts) for name, parts in det.items()}
    fused_all = merge(run_dir, "fused", "fused", fused)
    inst_all = merge(run_dir, "instances", s.name, inst)
    for name, path in merged.items():
        publish(run_dir, path, f"detections_{safe_name(name)}.parquet")
    publish(run_dir, fused_all, "fused.parquet")
    publish(run_dir, inst_all, "instances.parquet")
    write_coco_json(run_dir, inst_all, "instances.json")
    metrics = None
    if config.data.ann is not None and config.evaluation.enabled:
        metrics = evaluate_stage(run_dir, config.data, config.fusion, merged, fused_all, inst_all)
    pictures = report.render_pictures(run_dir, config, fused_all, inst_all)
    outputs = {**{f"detections of {k}": v for k, v in merged.items()}, "fused boxes": fused_all, "instances": inst_all}
    path = report.write_report(run_dir, report.build_report(run_dir, config, metrics, outputs, pictures))
    return {"detections": merged, "fused": fused_all, "instances": inst_all, "metrics": metrics, "report": str(path)}
