"""Fusion in a run folder: one shard of images at a time, the output named by its content key
(`pipeline.runfolder`). No Prefect here."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from twopass.pipeline.config import DataConfig
from twopass.pipeline.runfolder import Log, Planned, computed, data_hash, dataset_label, key_of, open_images, say, shard_label
from twopass.pipeline.settings import FuseSettings

from .api import fuse_files


def fuse_plan(run_dir, fusion: FuseSettings, inputs: Sequence[str | Path], weights: Sequence[float], data: DataConfig,
              ids: Sequence[int]) -> Planned:  # fmt: skip
    image_set = open_images(data)
    key = key_of(
        "fuse",
        inputs=[data_hash(p) for p in inputs],
        weights=list(map(float, weights)),
        fusion=fusion.resolved(),
        ids=list(map(int, ids)),
        sizes=[list(image_set.size(i)) for i in ids],
    )
    return Planned(key, Path(run_dir) / "fused" / f"{key}.parquet")


def fuse_shard(run_dir, fusion: FuseSettings, inputs: Sequence[str | Path], weights: Sequence[float], data: DataConfig,
               ids: Sequence[int], plan: Planned | None = None, log: Log = None) -> str:  # fmt: skip
    """Fuse the rows of one shard of images from several detections files (detectors, each with
    all its views) into one detections file."""
    plan = plan or fuse_plan(run_dir, fusion, inputs, weights, data, ids)
    if plan.done(log):
        say(log, f"fuse {shard_label(ids)}: reused {plan.out.name}")
        return str(plan.out)
    t0 = time.perf_counter()
    image_set = open_images(data)
    # every image's size: a COCO results JSON input's polygon masks are rasterised before the shard's rows are taken
    fused, meta = fuse_files(
        inputs, fusion, weights=weights, image_sizes=image_set.sizes(), image_ids=ids,
        source=f"fused:{fusion.method}", dataset=dataset_label(data), out=plan.out,
        extra={"image_ids": list(map(int, ids)), "key": plan.key},
    )  # fmt: skip
    return computed(run_dir, plan, t0, log, f"fuse {shard_label(ids)}: {meta.extra['boxes_in']} boxes -> {fused.num_rows}",
                    stage="fuse", name=fusion.method, images=len(ids), rows=fused.num_rows)  # fmt: skip
