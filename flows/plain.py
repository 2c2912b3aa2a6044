"""The two-pass pipeline without Prefect: `flows.steps` run by plain calls, in process.

`two_pass_plain` runs the steps `flows.prefect_flows.two_pass_flow` runs, on the same
description (`steps.SHARD_STEPS`), with one worker; it is the reference of an uninterrupted run
in the tests and the baseline of `benchmarks/flow_overhead.py`. No Prefect here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twopass.pipeline import report
from twopass.pipeline.runfolder import merge, publish, shards, write_coco_json

from . import steps


def two_pass_plain(config, run_dir: str | Path, given: dict[str, str] | None = None) -> dict[str, Any]:
    """Pass one, fusion and pass two, shard by shard, then merge, publish, evaluate and report."""
    run_dir = str(Path(run_dir).resolve())
    ctx = steps.Context(config, run_dir, steps.checkpoints(config, run_dir, given), shards(config.data))
    for step, label, k in steps.schedule(ctx):
        ctx.put(step, label, k, step.run(**step.args(ctx, label, k)))
    merged = {step.name: {label: merge(run_dir, step.stage, label, parts) for label, parts in ctx.outputs[step.name].items()}
              for step in steps.SHARD_STEPS}  # fmt: skip
    for step in steps.SHARD_STEPS:
        for label, path in merged[step.name].items():
            if step.publish(label):
                publish(run_dir, path, step.publish(label))
    detections, fused_all, inst_all = steps.finals(merged)
    write_coco_json(run_dir, inst_all, "instances.json")
    metrics = None
    if config.data.ann is not None and config.evaluation.enabled:
        metrics = steps.evaluate_stage(run_dir, config.data, config.fusion, detections, fused_all, inst_all)
    pictures = report.render_pictures(run_dir, config, fused_all, inst_all)
    outputs = {**{f"detections of {k}": v for k, v in detections.items()}, "fused boxes": fused_all, "instances": inst_all}
    path = report.write_report(run_dir, report.build_report(run_dir, config, metrics, outputs, pictures))
    return {"detections": detections, "fused": fused_all, "instances": inst_all, "metrics": metrics, "report": str(path),
            "merged": merged}  # fmt: skip
