"""Pass one in a run folder: train a model once, detect shard by shard, each output named by its
content key (`pipeline.runfolder`), so a rerun skips what is finished. No Prefect here: the
flows' tasks and the plain loop (`flows.plain`) call these.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from twopass.pipeline.coco import CocoIndex, safe_image_path
from twopass.pipeline.config import DataConfig, DetectorSpec, SegmenterSpec, safe_name
from twopass.pipeline.fileio import read_json, stable_hash, write_json
from twopass.pipeline.runfolder import (
    Log,
    Planned,
    checkpoint_hash,
    computed,
    content_hash,
    images_digest,
    key_of,
    open_images,
    record,
    say,
    shard_label,
)

from .api import ModelKind, detect_images, load_for_inference, train_model, views_of
from .checkpoint import last_meta, resolve
from .train import TrainOptions


def label(kind: ModelKind, spec: DetectorSpec | SegmenterSpec) -> str:
    """How errors name a model of the pipeline config."""
    return f"{kind.name} {spec.name!r}"


# --------------------------------------------------------------------------- training


def train_key(kind: ModelKind, spec: DetectorSpec | SegmenterSpec, data: DataConfig, device: str) -> str:
    if data.train_ann is None or data.train_images is None:
        raise ValueError(f"{label(kind, spec)}: no checkpoint given and data.train_ann / data.train_images are not set; cannot train")
    cfg = kind.config(spec.model, f"{label(kind, spec)}: model")
    ann = Path(data.train_ann)
    if not ann.is_file():
        raise FileNotFoundError(f"data.train_ann: {ann}: no such file")
    index = CocoIndex.cached(ann)
    root = Path(data.train_images)
    listing = []
    for im in index.images:  # file names and sizes: cheap, and changes when the images do
        p = safe_image_path(root, str(im["file_name"]), str(ann))
        listing.append([str(im["file_name"]), p.stat().st_size if p.is_file() else -1])
    return key_of(
        "train",
        kind=kind.name,
        model=cfg.to_dict(),
        train=spec.train.model_dump(mode="json", exclude={"backbone_weights"}),
        backbone_weights=content_hash(spec.train.backbone_weights) if spec.train.backbone_weights else None,
        ann=content_hash(ann),
        images=stable_hash(listing),
        device=device,
    )


def train_dir(run_dir: str | Path, spec: DetectorSpec | SegmenterSpec, key: str) -> Path:
    return Path(run_dir) / "models" / f"{safe_name(spec.name)}-{key}"


def trained_checkpoint(run_dir: str | Path, kind: ModelKind, spec, data: DataConfig, device: str) -> Path | None:
    """The checkpoint train_stage made for `spec` in this run folder, or None."""
    done = train_dir(run_dir, spec, train_key(kind, spec, data, device)) / "done.json"
    if not done.is_file():
        return None
    path = done.parent / read_json(done)["checkpoint"]
    return path if path.is_file() else None


def train_stage(run_dir: str | Path, kind: ModelKind, spec, data: DataConfig, device: str = "cpu", progress: bool = True,
                log: Log = None) -> str:  # fmt: skip
    """Train a detector or the segmenter into RUN/models/<name>-<key>; returns its checkpoint.

    `spec.checkpoint` given: nothing to train, that checkpoint is returned. Finished before
    (done.json): returned at once. Killed mid-way: resumed from its last checkpoint (the engine
    retraces the uninterrupted run exactly, without a time budget).
    """
    if spec.checkpoint is not None:
        return str(resolve(spec.checkpoint))
    key = train_key(kind, spec, data, device)
    out = train_dir(run_dir, spec, key)
    done = out / "done.json"
    if done.is_file():
        ckpt = out / read_json(done)["checkpoint"]
        if ckpt.is_file():
            say(log, f"train {spec.name}: reused {ckpt}")
            return str(ckpt)
    t0 = time.perf_counter()
    t = spec.train
    meta = last_meta(out)
    if meta is not None and meta.iteration >= t.iters:  # killed after its last checkpoint, before done.json
        ckpt, iteration = meta.path, meta.iteration
    else:
        options = TrainOptions(out=out, iters=t.iters, batch=t.batch, lr=t.lr, device=device, resume=True,
                               checkpoint_every=t.checkpoint_every, seed=t.seed, progress=progress,
                               time_budget_s=t.time_budget_s, precision=t.precision)  # fmt: skip
        cfg = kind.config(spec.model, f"{label(kind, spec)}: model")
        result = train_model(kind, cfg, data.train_ann, data.train_images, options, backbone_weights=t.backbone_weights)
        if result.checkpoint is None:
            raise RuntimeError(f"{label(kind, spec)}: training into {out} ended without a checkpoint")
        ckpt, iteration = result.checkpoint, result.iteration
    seconds = time.perf_counter() - t0
    write_json(done, {"checkpoint": str(Path(ckpt).relative_to(out)), "iteration": iteration, "seconds": seconds}, indent=1)
    record(run_dir, stage="train", name=spec.name, kind=kind.name, key=key, output=str(ckpt), iteration=iteration, seconds=round(seconds, 3))
    say(log, f"train {spec.name}: trained to iteration {iteration} in {seconds:.0f} s: {ckpt}")
    return str(ckpt)


def resolve_model(run_dir: str | Path, kind: ModelKind, spec, data: DataConfig, device: str) -> Path:
    """The checkpoint a detection or segmentation stage uses: the configured one, else the one
    train_stage made in this run folder."""
    if spec.checkpoint is not None:
        return resolve(spec.checkpoint)
    found = trained_checkpoint(run_dir, kind, spec, data, device)
    if found is None:
        raise FileNotFoundError(
            f"{label(kind, spec)}: no checkpoint: set its checkpoint in the pipeline config, or run train_flow "
            f"(`twopass flow train`) with this config and run folder {run_dir} first"
        )
    return found


# --------------------------------------------------------------------------- detection


def detect_plan(run_dir, kind: ModelKind, spec: DetectorSpec, checkpoint: str | Path, data: DataConfig, ids: Sequence[int],
                device: str) -> Planned:  # fmt: skip
    ckpt = resolve(checkpoint)
    views = views_of(ckpt, spec.tta.scales, spec.tta.flip)
    key = key_of(
        "detect" if kind.name == "detector" else f"detect-{kind.name}",
        checkpoint=checkpoint_hash(ckpt),
        name=spec.name,
        views=[(v.scale, v.flip) for v in views],
        score_thresh=spec.score_thresh,
        max_per_image=spec.max_per_image,
        **({"precision": spec.precision} if spec.precision != "fp32" else {}),  # fp32 keys as before the setting
        **({"mask_thresh": spec.mask_thresh} if kind.name != "detector" and spec.mask_thresh != 0.5 else {}),  # likewise
        ids=list(map(int, ids)),
        images=images_digest(open_images(data), ids),
        device=device,
    )
    return Planned(key, Path(run_dir) / "detections" / safe_name(spec.name) / f"{key}.parquet")


def detect_shard(run_dir, kind: ModelKind, spec: DetectorSpec, checkpoint: str | Path, data: DataConfig, ids: Sequence[int],
                 device: str = "cpu", plan: Planned | None = None, log: Log = None) -> str:  # fmt: skip
    """Detections of one model of pass one (all its views) on one shard of images. A
    segmenter (`segmenter.own_boxes`) writes its own masks too: an instances table, whose boxes
    fuse like any detector's. `plan`: this call's `detect_plan`, when the caller has it."""
    plan = plan or detect_plan(run_dir, kind, spec, checkpoint, data, ids, device)
    if plan.done(log):
        say(log, f"detect {spec.name} {shard_label(ids)}: reused {plan.out.name}")
        return str(plan.out)
    t0 = time.perf_counter()
    loaded = load_for_inference(kind, checkpoint, device)
    table, _ = detect_images(
        loaded, open_images(data), views_of(loaded.meta.path, spec.tta.scales, spec.tta.flip), spec, name=spec.name,
        device=device, image_ids=ids, with_masks=kind.name == "segmenter", out=plan.out,
        extra={"image_ids": list(map(int, ids)), "key": plan.key},
    )  # fmt: skip
    return computed(run_dir, plan, t0, log, f"detect {spec.name} {shard_label(ids)}: {table.num_rows} boxes",
                    stage="detect", name=spec.name, images=len(ids), rows=table.num_rows)  # fmt: skip
