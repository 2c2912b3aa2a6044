"""Pass two in a run folder: one shard of images at a time, the output named by its content key
(`pipeline.runfolder`). No Prefect here."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from twopass.detector.api import load_for_inference, views_of
from twopass.detector.checkpoint import resolve
from twopass.pipeline.config import DataConfig, SegmenterSpec, safe_name
from twopass.pipeline.runfolder import Log, Planned, checkpoint_hash, computed, data_hash, images_digest, key_of, open_images, say, shard_label

from .api import SEGMENTER, segment_images


def segment_plan(run_dir, spec: SegmenterSpec, checkpoint: str | Path, detections: str | Path, data: DataConfig,
                 ids: Sequence[int], device: str) -> Planned:  # fmt: skip
    ckpt = resolve(checkpoint)
    views = views_of(ckpt, spec.tta.scales, spec.tta.flip)
    det = Path(detections)
    if not det.is_file():
        raise FileNotFoundError(f"detections {det}: no such file")
    key = key_of(
        "segment",
        checkpoint=checkpoint_hash(ckpt),
        detections=data_hash(det),
        views=[(v.scale, v.flip) for v in views],
        mask_thresh=spec.mask_thresh,
        skip_invalid=spec.skip_invalid,
        **({"precision": spec.precision} if spec.precision != "fp32" else {}),  # fp32 keys as before the setting
        ids=list(map(int, ids)),
        images=images_digest(open_images(data), ids),
        device=device,
    )
    return Planned(key, Path(run_dir) / "instances" / safe_name(spec.name) / f"{key}.parquet")


def segment_shard(run_dir, spec: SegmenterSpec, checkpoint: str | Path, detections: str | Path, data: DataConfig,
                  ids: Sequence[int], device: str = "cpu", plan: Planned | None = None, log: Log = None) -> str:  # fmt: skip
    """Pass two on one shard: masks for the rows of `detections` (a detections Parquet or COCO
    results JSON, from any source) on the shard's images."""
    plan = plan or segment_plan(run_dir, spec, checkpoint, detections, data, ids, device)
    if plan.done(log):
        say(log, f"segment {shard_label(ids)}: reused {plan.out.name}")
        return str(plan.out)
    t0 = time.perf_counter()
    loaded = load_for_inference(SEGMENTER, checkpoint, device)
    instances, _, report = segment_images(
        loaded, open_images(data), detections, views_of(loaded.meta.path, spec.tta.scales, spec.tta.flip), spec,
        name=spec.name, device=device, image_ids=ids, out=plan.out, extra={"image_ids": list(map(int, ids)), "key": plan.key},
    )  # fmt: skip
    skipped = f", skipped {dict(report.skipped)}" if sum(report.skipped.values()) else ""
    return computed(run_dir, plan, t0, log, f"segment {shard_label(ids)}: {instances.num_rows} masks{skipped}", stage="segment",
                    name=spec.name, images=len(ids), rows=instances.num_rows, skipped=dict(report.skipped))  # fmt: skip
