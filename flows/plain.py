"""The two-pass pipeline as a plain loop over the stage functions, without Prefect.

The same calls, in the same order, as `flows.prefect_flows.two_pass_flow` with one worker; used as
the reference of an uninterrupted run in the tests and as the baseline of
`benchmarks/flow_overhead.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig, safe_name

from . import report, stages


def two_pass_plain(config: PipelineConfig, run_dir: str | Path, checkpoints: dict[str, str] | None = None) -> dict[str, Any]:
    run_dir = str(Path(run_dir).resolve())
    ck = dict(checkpoints or {})
    for i, d in enumerate(config.detectors):
        ck.setdefault(d.name, str(stages.resolve_model(run_dir, "detector", d, f"detectors[{i}]", config.data, config.device)))
    s = config.segmenter
    ck.setdefault(s.name, str(stages.resolve_model(run_dir, "segmenter", s, "segmenter", config.data, config.device)))
    shard_ids = stages.shards(config.data)
    members = config.pass_one()
    det = {
        d.name: [stages.detect_shard(run_dir, d, ck[d.name], config.data, ids, config.device, kind=kind) for ids in shard_ids]
        for kind, d in members
    }
    weights = [d.weight for _, d in members]
    fused, inst = [], []
    for k, ids in enumerate(shard_ids):
        f = stages.fuse_shard(run_dir, config.fusion, [det[d.name][k] for _, d in members], weights, config.data, ids)
        fused.append(f)
        inst.append(stages.segment_shard(run_dir, s, ck[s.name], f, config.data, ids, config.device))
    merged = {name: stages.merge(run_dir, "detections", name, parts) for name, parts in det.items()}
    fused_all = stages.merge(run_dir, "fused", "fused", fused)
    inst_all = stages.merge(run_dir, "instances", s.name, inst)
    for name, path in merged.items():
        stages.publish(run_dir, path, f"detections_{safe_name(name)}.parquet")
    stages.publish(run_dir, fused_all, "fused.parquet")
    stages.publish(run_dir, inst_all, "instances.parquet")
    stages.write_coco_json(run_dir, inst_all, "instances.json")
    metrics = None
    if config.data.ann is not None and config.evaluation.enabled:
        metrics = stages.evaluate_stage(run_dir, config.data, config.fusion, merged, fused_all, inst_all)
    pictures = report.render_pictures(run_dir, config, fused_all, inst_all)
    outputs = {**{f"detections of {k}": v for k, v in merged.items()}, "fused boxes": fused_all, "instances": inst_all}
    path = report.write_report(run_dir, report.build_report(run_dir, config, metrics, outputs, pictures))
    return {"detections": merged, "fused": fused_all, "instances": inst_all, "metrics": metrics, "report": str(path)}
