"""Pass two's front door: masks for given boxes, from any source.

`twopass segment`, the run-folder stage (`segmenter.stage`) and the benchmarks call
`segment_images`; training and loading go through `detector.api` with the `SEGMENTER` kind.
`KINDS` is the one map of the model kinds by name (the pass-two package is the top of the
model stack, so it is the one that knows both).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from twopass.detector.api import DETECTOR, LoadedModel, ModelKind, check_categories, load_for_inference
from twopass.detector.checkpoint import read_meta
from twopass.detector.infer import View
from twopass.pipeline.categories import CategoryMap
from twopass.pipeline.coco import ImageSet
from twopass.pipeline.precision import check_precision
from twopass.pipeline.settings import SEGMENT, SegmentSettings
from twopass.pipeline.tables import TableMeta, check_values, read_results, write_table

from .config import load_segmenter_config, segmenter_config_from_dict
from .infer import SegmentReport, segment
from .model import KIND, build_segmenter

SEGMENTER = ModelKind(KIND, load_segmenter_config, segmenter_config_from_dict, build_segmenter)

# The model kinds by the name the pipeline config and checkpoints use.
KINDS: dict[str, ModelKind] = {DETECTOR.name: DETECTOR, SEGMENTER.name: SEGMENTER}


def kind_of(name: str) -> ModelKind:
    """The ModelKind called `name` (a checkpoint's `kind`, a config's model kind)."""
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown model kind {name!r}; expected {' or '.join(KINDS)}") from None


def load_any(checkpoint: str | Path, device: str = "cpu", fast: bool = True) -> LoadedModel:
    """`load_for_inference` of a detector or a segmenter (a full Mask R-CNN), by the checkpoint's kind."""
    return load_for_inference(kind_of(read_meta(checkpoint).kind), checkpoint, device, fast)


def segment_images(
    loaded: LoadedModel,
    image_set: ImageSet,
    detections: str | Path | pa.Table,
    views: Sequence[View],
    settings: SegmentSettings = SEGMENT,
    *,
    name: str | None = None,
    device: str = "cpu",
    image_ids: Sequence[int] | None = None,
    out: str | Path | None = None,
    extra: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
    category_map: str | Path | None = None,
) -> tuple[pa.Table, TableMeta, SegmentReport]:
    """Pass two: the segmenter's mask head (with mask TTA over `views`) on each row of
    `detections` (a table, or a detections or instances Parquet, or COCO results JSON; rows of `image_ids`
    only when given). Scores and boxes are kept; masks are pasted in original pixels.
    `category_map`: a map file (`CategoryMap.load`) from another tool's class indices, which the
    COCO results JSON `detections` holds, to category ids. Written to `out` when given; returns
    (instances, meta, report of skipped rows)."""
    check_categories(loaded, image_set)
    check_precision(settings.precision, device)
    name = name or loaded.name
    # Unknown categories of a COCO results JSON are left to `segment`, which names the row or
    # skips it (settings.skip_invalid); a Parquet file's category list must be the model's.
    if isinstance(detections, pa.Table):
        if category_map is not None:
            raise ValueError(f"detections table: holds category ids already; --category-map {category_map} is for COCO results JSON")
        table, what = detections, "detections table"
    else:
        cmap = None if category_map is None else CategoryMap.load(category_map, loaded.meta.categories)
        table, det_meta = read_results(detections, category_map=cmap, image_sizes=image_set.sizes())  # sizes: for polygon masks
        what = str(detections)
        if det_meta.categories is not None:
            loaded.meta.categories.check_same(det_meta.categories, f"{detections} against checkpoint {loaded.meta.path}")
    check_values(table, what, score_range=(0.0, 1.0))  # a score of 1.5 is named, not copied to the masks
    if image_ids is not None:
        table = table.filter(pc.is_in(table.column("image_id"), value_set=pa.array(list(map(int, image_ids)), pa.int64())))
    instances, report = segment(
        loaded.model, loaded.meta.categories, image_set, table, views, mask_thresh=settings.mask_thresh,
        skip_invalid=settings.skip_invalid, what=what, device=device, progress=progress, precision=settings.precision,
        torchvision_resize=loaded.torchvision_resize,
    )  # fmt: skip
    meta = TableMeta(
        kind="instances",
        producer=f"segmenter:{name}",
        categories=loaded.meta.categories,
        config=loaded.meta.config,
        dataset=image_set.source,
        extra={
            "checkpoint": str(loaded.meta.path),
            "detections": what,
            "category_map": None if category_map is None else str(category_map),
            "views": [v.source(name) for v in views],
            "mask_thresh": settings.mask_thresh,
            "skipped": dict(report.skipped),
            **({"precision": settings.precision} if settings.precision != "fp32" else {}),
            **(extra or {}),
        },
    )
    if out is not None:
        write_table(out, instances, meta)
    return instances, meta, report
