"""`twopass train-segmenter` and `twopass segment` (pass two alone, on boxes from any source)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from detector.cli import _parse_scales, make_train_command


def _load_segmenter_builders():
    from .config import load_segmenter_config
    from .model import build_segmenter

    return load_segmenter_config, build_segmenter


train_segmenter = make_train_command("segmenter", _load_segmenter_builders)


def segment(
    checkpoint: Annotated[Path, typer.Option(help="Segmenter checkpoint JSON, or its run folder.")],
    detections: Annotated[Path, typer.Option(help="Detections Parquet or COCO results JSON, from any detector.")],
    images: Annotated[Path, typer.Option(help="Image folder.")],
    out: Annotated[Path, typer.Option(help="Instances Parquet to write.")],
    ann: Annotated[Optional[Path], typer.Option(help="COCO annotations naming the images (ids, sizes); else every image in the folder, ids by sorted name.")] = None,
    coco_json: Annotated[Optional[Path], typer.Option(help="Also write the instances as a COCO results JSON.")] = None,
    tta_scales: Annotated[Optional[str], typer.Option(help="Comma-separated shorter sides (default: the config's test size).")] = None,
    tta_flip: Annotated[bool, typer.Option(help="Add a mirrored view of every scale.")] = False,
    mask_thresh: Annotated[float, typer.Option(help="Pixels whose averaged probability exceeds this are in the mask.")] = 0.5,
    skip_invalid: Annotated[bool, typer.Option(help="Drop (and count in the output's metadata) rows that cannot be segmented, instead of failing.")] = False,
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    fast: Annotated[bool, typer.Option(help="Fold frozen BatchNorm into convolutions, channels-last on CPU.")] = True,
) -> None:
    """Masks for given boxes: the segmenter's backbone and mask head on each box, with mask TTA."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from detector.infer import make_views
    from detector.speed import optimize_for_inference
    from pipeline.coco import CocoIndex, ImageSet
    from pipeline.fileio import write_json
    from pipeline.tables import TableMeta, read_results, to_coco_results, write_table

    from .infer import segment as run_segment
    from .model import load_segmenter

    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {device!r}")
    scales = _parse_scales(tta_scales)
    model, meta = load_segmenter(checkpoint, device)
    if fast:
        model = optimize_for_inference(model)
    if ann is not None:
        index = CocoIndex.load(ann)
        meta.categories.check_same(index.categories, f"{ann} against checkpoint {meta.path}")
        image_set = index.image_set(images)
    else:
        image_set = ImageSet.from_folder(images)
    table, det_meta = read_results(detections)
    if det_meta.categories is not None:
        meta.categories.check_same(det_meta.categories, f"{detections} against checkpoint {meta.path}")
    views = make_views(scales or [model.config.input.test_size], tta_flip)
    n_images = len(set(table.column("image_id").to_pylist()))
    with Progress(TextColumn("segment"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()) as bar:
        task = bar.add_task("segment", total=n_images)
        instances, report = run_segment(
            model,
            meta.categories,
            image_set,
            table,
            views,
            mask_thresh=mask_thresh,
            skip_invalid=skip_invalid,
            what=str(detections),
            device=device,
            progress=lambda k: bar.update(task, completed=k),
        )
    tmeta = TableMeta(
        kind="instances",
        producer=f"segmenter:{model.config.name}",
        categories=meta.categories,
        config=meta.config,
        dataset=str(ann or images),
        extra={
            "checkpoint": str(meta.path),
            "detections": str(detections),
            "views": [v.source(model.config.name) for v in views],
            "mask_thresh": mask_thresh,
            "skipped": dict(report.skipped),
        },
    )
    write_table(out, instances, tmeta)
    if coco_json is not None:
        write_json(coco_json, to_coco_results(instances))
    skipped = sum(report.skipped.values())
    typer.echo(f"wrote {out}: {instances.num_rows} instances" + (f", skipped {skipped} rows: {dict(report.skipped)}" if skipped else ""))


def register(app: typer.Typer) -> None:
    app.command("train-segmenter")(train_segmenter)
    app.command("segment")(segment)
