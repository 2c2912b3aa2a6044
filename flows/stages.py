"""The stages of the pipeline as plain functions over files: no Prefect here.

Each stage function reads its input files, calls the plain function of its package
(`detector.infer.detect`, `ensemble.fuse`, `segmenter.infer.segment`, ...), writes its output
atomically under the run folder and returns the output path. The output's name is a key:
a hash of the content of its input files, the stage's settings and the shard's image ids
(`*_key` functions), so

- a finished shard is found by its file alone, even if the process that wrote it was killed
  before anything else was recorded (the stage returns at once, computing nothing);
- a cached result (Prefect's, keyed on the same key) can never point at another run's file.

Input tables are identified by their rows (`data_hash`), not their file metadata, so a stage's
key does not depend on where its inputs were written.

Every execution that actually computes appends one line to `RUN/ledger.jsonl` (stage, name,
key, output, seconds), so what ran can be counted.

Run folder layout:

    RUN/ledger.jsonl                       one line per stage execution that computed
    RUN/models/<name>-<key>/               training runs (checkpoints/, metrics.jsonl, done.json)
    RUN/detections/<detector>/<key>.parquet    one per shard (all views of that detector)
    RUN/fused/<key>.parquet                one per shard
    RUN/instances/<segmenter>/<key>.parquet    one per shard
    RUN/<stage>/...-all-<key>.parquet      shards merged
    RUN/evaluation/metrics-<key>.json      AP per stage
    RUN/outputs/                           the latest merged files under plain names
    RUN/report.md, RUN/pictures/*.png      the report
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from pipeline.config import DataConfig, DetectorSpec, FusionConfig, PipelineConfig, SegmenterSpec, safe_name
from pipeline.fileio import atomic_path, file_hash, read_json, stable_hash, write_json

# Bump when a stage's output for the same inputs changes meaning: old files are then not reused.
STAGE_VERSION = 1

Log = Callable[[str], None] | None


class ShardError(RuntimeError):
    """A shard's stage failed; the message names the stage, the shard and the cause."""


# --------------------------------------------------------------------------- hashing


_HASHES: dict[tuple, str] = {}
_HASH_LOCK = threading.Lock()


def content_hash(path: str | Path) -> str:
    """Content hash of a file, remembered per (path, size, mtime) within the process."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    with _HASH_LOCK:
        hit = _HASHES.get(key)
    if hit is None:
        hit = file_hash(p)
        with _HASH_LOCK:
            _HASHES[key] = hit
    return hit


def data_hash(path: str | Path) -> str:
    """Identity of a table file: the hash of its rows for Parquet (its metadata, which records
    paths of the run that wrote it, left out), of its bytes otherwise (COCO results JSON).
    Remembered per (path, size, mtime) within the process."""
    p = Path(path)
    if p.suffix.lower() != ".parquet":
        return content_hash(p)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns, "rows")
    with _HASH_LOCK:
        hit = _HASHES.get(key)  # type: ignore[call-overload]
    if hit is None:
        import hashlib

        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(p).replace_schema_metadata(None)
        except (pa.ArrowInvalid, OSError) as e:
            raise ValueError(f"{p}: not a readable Parquet file ({e})") from None
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table.combine_chunks())
        hit = hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()[:16]
        with _HASH_LOCK:
            _HASHES[key] = hit  # type: ignore[index]
    return hit


def checkpoint_hash(checkpoint_json: Path) -> str:
    """A checkpoint's identity: its JSON and its weights file, by content."""
    weights = checkpoint_json.with_suffix(".safetensors")
    return stable_hash([content_hash(checkpoint_json), content_hash(weights) if weights.is_file() else None])


def key_of(stage: str, /, **parts: Any) -> str:
    return stable_hash({"stage": stage, "version": STAGE_VERSION, **parts})


# --------------------------------------------------------------------------- ledger


_LEDGER_LOCK = threading.Lock()


def ledger_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "ledger.jsonl"


def record(run_dir: str | Path, **entry: Any) -> None:
    """Append one line to the ledger (one write call in append mode: lines from threads and
    processes do not interleave)."""
    path = ledger_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"time": round(time.time(), 3), "pid": os.getpid(), **entry}, default=str) + "\n"
    with _LEDGER_LOCK:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def read_ledger(run_dir: str | Path) -> list[dict]:
    path = ledger_path(run_dir)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut by a kill
    return out


# --------------------------------------------------------------------------- data


_INDEX_CACHE: dict[tuple, Any] = {}
_INDEX_LOCK = threading.Lock()


def _coco_index(ann: Path):
    from pipeline.coco import CocoIndex

    st = ann.stat()
    key = ("coco", str(ann.resolve()), st.st_size, st.st_mtime_ns)
    with _INDEX_LOCK:
        hit = _INDEX_CACHE.get(key)
    if hit is None:
        hit = CocoIndex.load(ann)
        with _INDEX_LOCK:
            if len(_INDEX_CACHE) > 8:
                _INDEX_CACHE.clear()
            _INDEX_CACHE[key] = hit
    return hit


def open_images(data: DataConfig):
    """The image set of `data`: from its COCO annotations, its images table, or the folder."""
    from pipeline.coco import ImageSet

    if data.ann is not None:
        return _coco_index(Path(data.ann)).image_set(data.images)
    if data.images_table is not None:
        return ImageSet.from_table(data.images_table, data.images)
    return ImageSet.from_folder(data.images)


def data_categories(data: DataConfig):
    return _coco_index(Path(data.ann)).categories if data.ann is not None else None


def shards(data: DataConfig) -> list[list[int]]:
    """The image ids, sorted, in shards of `data.shard_size`."""
    ids = sorted(open_images(data).image_ids)
    n = data.shard_size
    return [ids[i : i + n] for i in range(0, len(ids), n)]


def images_digest(image_set, ids: Sequence[int]) -> str:
    """Hash of the shard's images: id, declared size and file content (a missing file hashes as
    missing, so it fails in the stage, which names it)."""
    items = []
    for i in ids:
        path = image_set.path(i)
        items.append([int(i), list(image_set.size(i)), content_hash(path) if path.is_file() else "missing"])
    return stable_hash(items)


def shard_label(ids: Sequence[int]) -> str:
    return f"images {ids[0]}..{ids[-1]} ({len(ids)})" if ids else "no images"


# --------------------------------------------------------------------------- training


def train_key(kind: str, spec: DetectorSpec | SegmenterSpec, where: str, data: DataConfig, device: str) -> str:
    from pipeline.coco import safe_image_path

    from .models import model_config

    if data.train_ann is None or data.train_images is None:
        raise ValueError(f"{where}: no checkpoint given and data.train_ann / data.train_images are not set; cannot train")
    cfg = model_config(kind, spec, where)  # type: ignore[arg-type]
    ann = Path(data.train_ann)
    if not ann.is_file():
        raise FileNotFoundError(f"data.train_ann: {ann}: no such file")
    index = _coco_index(ann)
    root = Path(data.train_images)
    listing = []
    for im in index.images:  # file names and sizes: cheap, and changes when the images do
        p = safe_image_path(root, str(im["file_name"]), str(ann))
        listing.append([str(im["file_name"]), p.stat().st_size if p.is_file() else -1])
    return key_of(
        "train",
        kind=kind,
        model=cfg.to_dict(),
        train=spec.train.model_dump(mode="json", exclude={"backbone_weights"}),
        backbone_weights=content_hash(spec.train.backbone_weights) if spec.train.backbone_weights else None,
        ann=content_hash(ann),
        images=stable_hash(listing),
        device=device,
    )


def train_dir(run_dir: str | Path, spec: DetectorSpec | SegmenterSpec, key: str) -> Path:
    return Path(run_dir) / "models" / f"{safe_name(spec.name)}-{key}"


def trained_checkpoint(run_dir: str | Path, kind: str, spec, where: str, data: DataConfig, device: str) -> Path | None:
    """The checkpoint train_flow made for `spec` in this run folder, or None."""
    done = train_dir(run_dir, spec, train_key(kind, spec, where, data, device)) / "done.json"
    if not done.is_file():
        return None
    path = done.parent / read_json(done)["checkpoint"]
    return path if path.is_file() else None


def train_stage(
    run_dir: str | Path, kind: str, spec, where: str, data: DataConfig, device: str = "cpu", progress: bool = True, log: Log = None
) -> str:
    """Train a detector or the segmenter into RUN/models/<name>-<key>; returns its checkpoint.

    `spec.checkpoint` given: nothing to train, that checkpoint is returned. Finished before
    (done.json): returned at once. Killed mid-way: resumed from its last checkpoint.
    """
    from .models import resolve_checkpoint, train_model

    if spec.checkpoint is not None:
        return str(resolve_checkpoint(spec.checkpoint))
    key = train_key(kind, spec, where, data, device)
    out = train_dir(run_dir, spec, key)
    done = out / "done.json"
    if done.is_file():
        ckpt = out / read_json(done)["checkpoint"]
        if ckpt.is_file():
            _say(log, f"train {spec.name}: reused {ckpt}")
            return str(ckpt)
    t0 = time.perf_counter()
    ckpt, iteration = train_model(kind, spec, where, Path(data.train_ann), Path(data.train_images), out, device, progress)  # type: ignore[arg-type]
    seconds = time.perf_counter() - t0
    write_json(done, {"checkpoint": str(Path(ckpt).relative_to(out)), "iteration": iteration, "seconds": seconds}, indent=1)
    record(run_dir, stage="train", name=spec.name, kind=kind, key=key, output=str(ckpt), iteration=iteration, seconds=round(seconds, 3))
    _say(log, f"train {spec.name}: trained to iteration {iteration} in {seconds:.0f} s: {ckpt}")
    return str(ckpt)


def resolve_model(run_dir: str | Path, kind: str, spec, where: str, data: DataConfig, device: str) -> Path:
    """The checkpoint a detection or segmentation stage uses: the configured one, else the one
    train_flow made in this run folder."""
    from .models import resolve_checkpoint

    if spec.checkpoint is not None:
        return resolve_checkpoint(spec.checkpoint)
    found = trained_checkpoint(run_dir, kind, spec, where, data, device)
    if found is None:
        raise FileNotFoundError(
            f"{where}: no checkpoint: set {where}.checkpoint, or run train_flow (`twopass flow train`) "
            f"with this config and run folder {run_dir} first"
        )
    return found


def views_of(spec: DetectorSpec | SegmenterSpec, checkpoint: Path) -> list:
    """The test-time views of a model: the configured scales, else the model's test size."""
    from detector.infer import make_views

    scales = spec.tta.scales
    if not scales:
        scales = [int(read_json(checkpoint)["config"]["input"]["test_size"])]
    return make_views(scales, spec.tta.flip)


# --------------------------------------------------------------------------- detection


@dataclass(frozen=True)
class Planned:
    key: str
    out: Path


def detect_plan(
    run_dir, spec: DetectorSpec, checkpoint: str | Path, data: DataConfig, ids: Sequence[int], device: str, kind: str = "detector"
) -> Planned:
    from .models import resolve_checkpoint

    ckpt = resolve_checkpoint(checkpoint)
    views = views_of(spec, ckpt)
    key = key_of(
        "detect" if kind == "detector" else f"detect-{kind}",
        checkpoint=checkpoint_hash(ckpt),
        name=spec.name,
        views=[(v.scale, v.flip) for v in views],
        score_thresh=spec.score_thresh,
        max_per_image=spec.max_per_image,
        ids=list(map(int, ids)),
        images=images_digest(open_images(data), ids),
        device=device,
    )
    return Planned(key, Path(run_dir) / "detections" / safe_name(spec.name) / f"{key}.parquet")


def detect_shard(
    run_dir,
    spec: DetectorSpec,
    checkpoint: str | Path,
    data: DataConfig,
    ids: Sequence[int],
    device: str = "cpu",
    log: Log = None,
    kind: str = "detector",
) -> str:
    """Detections of one model of pass one (all its views) on one shard of images. A
    segmenter (kind "segmenter", `segmenter.own_boxes`) writes its own masks too: an
    instances table, whose boxes fuse like any detector's."""
    from detector.infer import detect
    from pipeline.tables import TableMeta, write_table

    from .models import get_model, resolve_checkpoint

    plan = detect_plan(run_dir, spec, checkpoint, data, ids, device, kind)
    if plan.out.is_file():
        _say(log, f"detect {spec.name} {shard_label(ids)}: reused {plan.out.name}")
        return str(plan.out)
    t0 = time.perf_counter()
    ckpt = resolve_checkpoint(checkpoint)
    image_set = open_images(data)
    loaded = get_model(kind, ckpt, checkpoint_hash(ckpt), device)  # type: ignore[arg-type]
    categories = loaded.meta.categories
    expected = data_categories(data)
    if expected is not None:
        categories.check_same(expected, f"detector {spec.name} checkpoint {ckpt} against {data.ann}")
    views = views_of(spec, ckpt)
    with loaded.lock:
        table = detect(
            loaded.model,
            image_set,
            categories,
            model_name=spec.name,
            views=views,
            batch=spec.batch,
            device=device,
            score_thresh=spec.score_thresh,
            max_per_image=spec.max_per_image,
            image_ids=list(ids),
            with_masks=kind == "segmenter",
        )
    meta = TableMeta(
        kind="detections" if kind == "detector" else "instances",
        producer=f"{kind}:{spec.name}",
        categories=categories,
        config=loaded.meta.config,
        dataset=str(data.ann or data.images_table or data.images),
        extra={"checkpoint": str(ckpt), "views": [v.source(spec.name) for v in views], "image_ids": list(map(int, ids)), "key": plan.key},
    )
    write_table(plan.out, table, meta)
    seconds = time.perf_counter() - t0
    record(run_dir, stage="detect", name=spec.name, key=plan.key, output=str(plan.out), images=len(ids), rows=table.num_rows, seconds=round(seconds, 3))
    _say(log, f"detect {spec.name} {shard_label(ids)}: {table.num_rows} boxes in {seconds:.1f} s")
    return str(plan.out)


# --------------------------------------------------------------------------- fusion


def fuse_plan(run_dir, fusion: FusionConfig, inputs: Sequence[str | Path], weights: Sequence[float], data: DataConfig, ids: Sequence[int]) -> Planned:
    image_set = open_images(data)
    key = key_of(
        "fuse",
        inputs=[data_hash(p) for p in inputs],
        weights=list(map(float, weights)),
        fusion=fusion.fuse_kwargs(),
        ids=list(map(int, ids)),
        sizes=[list(image_set.size(i)) for i in ids],
    )
    return Planned(key, Path(run_dir) / "fused" / f"{key}.parquet")


def fuse_shard(
    run_dir,
    fusion: FusionConfig,
    inputs: Sequence[str | Path],
    weights: Sequence[float],
    data: DataConfig,
    ids: Sequence[int],
    log: Log = None,
) -> str:
    """Fuse the rows of one shard of images from several detections files (detectors, each with
    all its views) into one detections file."""
    from ensemble import fuse
    from pipeline.tables import TableMeta, read_results, write_table

    plan = fuse_plan(run_dir, fusion, inputs, weights, data, ids)
    if plan.out.is_file():
        _say(log, f"fuse {shard_label(ids)}: reused {plan.out.name}")
        return str(plan.out)
    t0 = time.perf_counter()
    import pyarrow as pa
    import pyarrow.compute as pc

    wanted = pa.array(list(map(int, ids)), pa.int64())
    tables, categories = [], None
    for p in inputs:
        t, meta = read_results(p, categories)
        if categories is None and meta.categories is not None:
            categories = meta.categories
        tables.append(t.filter(pc.is_in(t.column("image_id"), value_set=wanted)))
    image_set = open_images(data)
    kwargs = fusion.fuse_kwargs()
    fused = fuse(
        tables,
        weights=list(weights),
        names=[str(p) for p in inputs],
        image_sizes={int(i): image_set.size(i) for i in ids},
        source=f"fused:{kwargs['method']}",
        **kwargs,
    )
    meta = TableMeta(
        kind="detections",
        producer="fuse",
        categories=categories,
        config=dict(kwargs, weights=list(weights)),
        dataset=str(data.ann or data.images_table or data.images),
        extra={"inputs": [str(p) for p in inputs], "image_ids": list(map(int, ids)), "key": plan.key},
    )
    write_table(plan.out, fused, meta)
    seconds = time.perf_counter() - t0
    record(run_dir, stage="fuse", name=kwargs["method"], key=plan.key, output=str(plan.out), images=len(ids), rows=fused.num_rows, seconds=round(seconds, 3))
    _say(log, f"fuse {shard_label(ids)}: {sum(t.num_rows for t in tables)} boxes -> {fused.num_rows} in {seconds:.2f} s")
    return str(plan.out)


# --------------------------------------------------------------------------- segmentation


def segment_plan(run_dir, spec: SegmenterSpec, checkpoint: str | Path, detections: str | Path, data: DataConfig, ids: Sequence[int], device: str) -> Planned:
    from .models import resolve_checkpoint

    ckpt = resolve_checkpoint(checkpoint)
    views = views_of(spec, ckpt)
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
        ids=list(map(int, ids)),
        images=images_digest(open_images(data), ids),
        device=device,
    )
    return Planned(key, Path(run_dir) / "instances" / safe_name(spec.name) / f"{key}.parquet")


def segment_shard(
    run_dir,
    spec: SegmenterSpec,
    checkpoint: str | Path,
    detections: str | Path,
    data: DataConfig,
    ids: Sequence[int],
    device: str = "cpu",
    log: Log = None,
) -> str:
    """Pass two on one shard: masks for the rows of `detections` (a detections Parquet or COCO
    results JSON, from any source) on the shard's images."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.tables import TableMeta, read_results, write_table
    from segmenter.infer import segment

    from .models import get_model, resolve_checkpoint

    plan = segment_plan(run_dir, spec, checkpoint, detections, data, ids, device)
    if plan.out.is_file():
        _say(log, f"segment {shard_label(ids)}: reused {plan.out.name}")
        return str(plan.out)
    t0 = time.perf_counter()
    ckpt = resolve_checkpoint(checkpoint)
    image_set = open_images(data)
    loaded = get_model("segmenter", ckpt, checkpoint_hash(ckpt), device)
    categories = loaded.meta.categories
    expected = data_categories(data)
    if expected is not None:
        categories.check_same(expected, f"segmenter checkpoint {ckpt} against {data.ann}")
    table, det_meta = read_results(detections, categories)
    table = table.filter(pc.is_in(table.column("image_id"), value_set=pa.array(list(map(int, ids)), pa.int64())))
    views = views_of(spec, ckpt)
    with loaded.lock:
        instances, report = segment(
            loaded.model,
            categories,
            image_set,
            table,
            views,
            mask_thresh=spec.mask_thresh,
            skip_invalid=spec.skip_invalid,
            what=str(detections),
            device=device,
        )
    meta = TableMeta(
        kind="instances",
        producer=f"segmenter:{spec.name}",
        categories=categories,
        config=loaded.meta.config,
        dataset=str(data.ann or data.images_table or data.images),
        extra={
            "checkpoint": str(ckpt),
            "detections": str(detections),
            "views": [v.source(spec.name) for v in views],
            "mask_thresh": spec.mask_thresh,
            "skipped": dict(report.skipped),
            "image_ids": list(map(int, ids)),
            "key": plan.key,
        },
    )
    write_table(plan.out, instances, meta)
    seconds = time.perf_counter() - t0
    record(run_dir, stage="segment", name=spec.name, key=plan.key, output=str(plan.out), images=len(ids), rows=instances.num_rows,
           skipped=dict(report.skipped), seconds=round(seconds, 3))  # fmt: skip
    skipped = sum(report.skipped.values())
    _say(log, f"segment {shard_label(ids)}: {instances.num_rows} masks in {seconds:.1f} s" + (f", skipped {dict(report.skipped)}" if skipped else ""))
    return str(plan.out)


# --------------------------------------------------------------------------- merging and outputs


def merge_plan(run_dir, stage: str, label: str, parts: Sequence[str | Path]) -> Planned:
    # Parts are named by their content keys, so their names identify them.
    key = key_of("merge", of=stage, label=label, parts=[Path(p).name for p in parts])
    return Planned(key, Path(run_dir) / stage / f"{safe_name(label)}-all-{key}.parquet")


def merge(run_dir, stage: str, label: str, parts: Sequence[str | Path], log: Log = None) -> str:
    """Concatenate the shards of one stage into one file (`RUN/<stage>/<label>-all-<key>.parquet`)."""
    import pyarrow as pa

    from pipeline.tables import TableMeta, read_meta, read_table, write_table

    if not parts:
        raise ValueError(f"merge {stage} {label}: no shards to merge")
    plan = merge_plan(run_dir, stage, label, parts)
    if plan.out.is_file():
        return str(plan.out)
    first = read_meta(parts[0])
    tables = [read_table(p, first.kind, first.categories)[0] for p in parts]
    table = pa.concat_tables(tables)
    meta = TableMeta(
        kind=first.kind,
        producer=first.producer,
        categories=first.categories,
        config=first.config,
        dataset=first.dataset,
        extra={"shards": [str(p) for p in parts], "key": plan.key},
    )
    write_table(plan.out, table, meta)
    record(run_dir, stage="merge", name=f"{stage}/{label}", key=plan.key, output=str(plan.out), rows=table.num_rows, seconds=0)
    _say(log, f"merged {len(parts)} shards of {stage} {label}: {plan.out}")
    return str(plan.out)


def publish(run_dir, path: str | Path, name: str) -> Path:
    """Give an output file a plain name under RUN/outputs (a hard link, else a copy), atomically."""
    import shutil

    dest = Path(run_dir) / "outputs" / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        tmp.unlink()
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)
    return dest


def write_coco_json(run_dir, path: str | Path, name: str) -> Path:
    from pipeline.tables import read_results, to_coco_results

    table, _ = read_results(path)
    dest = Path(run_dir) / "outputs" / name
    write_json(dest, to_coco_results(table))
    return dest


# --------------------------------------------------------------------------- evaluation


def evaluation_plan(run_dir, data: DataConfig, fusion: FusionConfig, detectors: dict[str, str], fused: str | None, instances: str | None) -> Planned:
    if data.ann is None:
        raise ValueError("evaluation needs data.ann (ground-truth annotations)")
    key = key_of(
        "evaluate",
        gt=content_hash(data.ann),
        detectors={k: data_hash(v) for k, v in detectors.items()},
        fused=data_hash(fused) if fused else None,
        instances=data_hash(instances) if instances else None,
        fusion=fusion.fuse_kwargs(),
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
    run_dir, data: DataConfig, fusion: FusionConfig, detectors: dict[str, str], fused: str | None, instances: str | None, log: Log = None
) -> str:
    """COCO AP of every stage: each detector (its first view alone and, with test-time
    augmentation, its views fused), the fused boxes, the final masks. Writes
    RUN/evaluation/metrics-<key>.json; returns its path."""
    import pyarrow.compute as pc

    from ensemble import fuse
    from pipeline.evaluate import evaluate
    from pipeline.tables import read_results

    plan = evaluation_plan(run_dir, data, fusion, detectors, fused, instances)
    if plan.out.is_file():
        return str(plan.out)
    t0 = time.perf_counter()
    gt = _coco_index(Path(data.ann)).raw
    image_set = open_images(data)
    rows = []
    kwargs = fusion.fuse_kwargs()
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
    seconds = time.perf_counter() - t0
    record(run_dir, stage="evaluate", name="metrics", key=plan.key, output=str(plan.out), seconds=round(seconds, 3))
    _say(log, f"evaluated {len(rows)} stages in {seconds:.1f} s")
    return str(plan.out)


def ap_table(metrics: dict) -> list[dict]:
    """Rows of the AP-per-stage table (what the artifact and the report show)."""
    out = []
    for r in metrics["stages"]:
        b, s = r.get("bbox", {}), r.get("segm", {})
        fmt = lambda d, k: round(d[k], 4) if k in d and d[k] >= 0 else None  # noqa: E731
        out.append({
            "stage": r["stage"], "what": r["what"],
            "box AP": fmt(b, "AP"), "box AP50": fmt(b, "AP50"), "box AP75": fmt(b, "AP75"),
            "mask AP": fmt(s, "AP"), "mask AP50": fmt(s, "AP50"), "mask AP75": fmt(s, "AP75"),
        })  # fmt: skip
    return out


def format_ap_table(rows: list[dict]) -> str:
    cols = ("box AP", "box AP50", "box AP75", "mask AP", "mask AP50")
    width = max([len("stage")] + [len(r["stage"]) for r in rows])
    lines = [f"{'stage':<{width}}" + "".join(f"{c:>10}" for c in cols)]
    for r in rows:
        lines.append(f"{r['stage']:<{width}}" + "".join(f"{r[c]:10.3f}" if r[c] is not None else f"{'-':>10}" for c in cols))
    return "\n".join(lines)


# --------------------------------------------------------------------------- helpers


def _say(log: Log, message: str) -> None:
    if log is not None:
        log(message)


def config_summary(config: PipelineConfig) -> dict[str, Any]:
    return {
        "detectors": [d.name for d in config.detectors],
        "fusion": config.fusion.fuse_kwargs(),
        "segmenter": config.segmenter.name,
        "shard_size": config.data.shard_size,
    }


def stage_counts(entries: Iterable[dict]) -> dict[str, int]:
    """How many executions of each stage computed (from ledger lines)."""
    counts: dict[str, int] = {}
    for e in entries:
        counts[e["stage"]] = counts.get(e["stage"], 0) + 1
    return counts
