"""`twopass train-segmenter` and `twopass segment` (pass two alone, on boxes from any source)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from twopass.detector.cli import make_train_command, parse_scales
from twopass.pipeline.devices import DEVICE_HELP
from twopass.pipeline.settings import SEGMENT, SegmentSettings, help_of


def _segmenter_kind():
    from .api import SEGMENTER

    return SEGMENTER


train_segmenter = make_train_command("segmenter", _segmenter_kind)


def segment(
    checkpoint: Annotated[Path, typer.Option(help="Segmenter checkpoint JSON, or its run folder.")],
    detections: Annotated[Path, typer.Option(help="Detections Parquet or COCO results JSON, from any detector.")],
    images: Annotated[Path, typer.Option(help="Image folder.")],
    out: Annotated[Path, typer.Option(help="Instances Parquet to write.")],
    ann: Annotated[Optional[Path], typer.Option(help="COCO annotations naming the images (ids, sizes); else every image in the folder, ids by sorted name.")] = None,
    category_map: Annotated[Optional[Path], typer.Option(help="JSON or YAML map from another tool's class indices to category ids (or names), "
                                                              "for COCO results JSON detections; see the README.")] = None,
    coco_json: Annotated[Optional[Path], typer.Option(help="Also write the instances as a COCO results JSON.")] = None,
    tta_scales: Annotated[Optional[str], typer.Option(help="Comma-separated shorter sides (default: the config's test size).")] = None,
    tta_flip: Annotated[bool, typer.Option(help="Add a mirrored view of every scale.")] = False,
    mask_thresh: Annotated[float, typer.Option(help=help_of(SegmentSettings, "mask_thresh"))] = SEGMENT.mask_thresh,
    skip_invalid: Annotated[bool, typer.Option(help=help_of(SegmentSettings, "skip_invalid"))] = SEGMENT.skip_invalid,
    precision: Annotated[str, typer.Option(help=help_of(SegmentSettings, "precision"))] = SEGMENT.precision,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "cpu",
    fast: Annotated[bool, typer.Option(help="Fold frozen BatchNorm into convolutions, channels-last on CPU.")] = True,
) -> None:
    """Masks for given boxes: the segmenter's backbone and mask head on each box, with mask TTA."""
    from twopass.detector.api import load_for_inference, views_of
    from twopass.detector.checkpoint import files_in_use
    from twopass.pipeline.console import progress_bar
    from twopass.pipeline.coco import ImageSet
    from twopass.pipeline.config import validate_mapping
    from twopass.pipeline.fileio import check_outputs
    from twopass.pipeline.tables import write_results

    from .api import SEGMENTER, segment_images

    settings = validate_mapping(SegmentSettings, dict(mask_thresh=mask_thresh, skip_invalid=skip_invalid, precision=precision),
                                "twopass segment",
                                ValueError, "setting")  # fmt: skip
    scales = parse_scales(tta_scales)
    check_outputs({"--out": out, "--coco-json": coco_json}, {"--detections": detections, "--ann": ann, "--images": images,
                                                               "--checkpoint": files_in_use(checkpoint), "--category-map": category_map})
    loaded = load_for_inference(SEGMENTER, checkpoint, device, fast)
    image_set = ImageSet.open(images, ann=ann)
    views = views_of(loaded.meta.path, scales, tta_flip)
    with progress_bar() as bar:
        task = bar.add_task("segment", total=None)
        instances, meta, report = segment_images(loaded, image_set, detections, views, settings, device=device,
                                                 category_map=category_map, progress=lambda k: bar.update(task, completed=k))  # fmt: skip
    write_results(out, instances, meta, coco_json)  # both outputs or neither
    skipped = sum(report.skipped.values())
    typer.echo(f"wrote {out}: {instances.num_rows} instances" + (f", skipped {skipped} rows: {dict(report.skipped)}" if skipped else ""))


def register(app: typer.Typer) -> None:
    app.command("train-segmenter")(train_segmenter)
    app.command("segment")(segment)
