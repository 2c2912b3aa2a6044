"""Pass two: masks for given boxes (from any detector, fused or not), with mask test-time augmentation.

For each image and view (scale, flip) the model's `masks_for_boxes` runs the backbone once and
the mask branch on the given boxes, mapped into that view's input frame, taking the map of each
box's own category. The 28 x 28 probabilities are averaged over views (flip undone) and pasted
into the original image only inside each box. Score = the box's score.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor, nn

from twopass.detector.infer import View, eval_mode, flip_boxes, make_view_image, to_view
from twopass.pipeline.categories import Categories
from twopass.pipeline.coco import ImageSet
from twopass.pipeline.masks import paste_and_encode
from twopass.pipeline.precision import autocast
from twopass.pipeline.settings import SEGMENT
from twopass.pipeline.tables import boxes_of, empty_table, instances_table


@torch.inference_mode()
def mask_probs(
    model: nn.Module,
    image: Tensor,
    boxes: Tensor,
    labels: Tensor,
    views: Sequence[View],
    precision: str = "fp32",
    torchvision_resize: bool = False,
) -> Tensor:
    """Averaged soft masks FloatTensor[N, M, M] of each box's own class, in each box's frame.

    image: FloatTensor[3, H, W] in [0, 1]; boxes: FloatTensor[N, 4] XYXY original pixels;
    labels: Int64Tensor[N] contiguous 1..K. `model` is a detector with a mask branch, in eval
    mode. Views resize and mirror the image exactly as the detector's test-time augmentation
    does (`torchvision_resize`: as `detector.infer.view_inputs`, for imported torchvision models).
    `precision`: autocast of the backbone and the mask head (the probabilities are float32).
    """
    orig_hw = (image.shape[-2], image.shape[-1])
    max_size = model.config.input.max_size
    total: Tensor | None = None
    for v in views:
        with eval_mode(model), autocast(image.device, precision):
            if torchvision_resize:
                im, b = (image.flip(-1), flip_boxes(boxes, orig_hw[1])) if v.flip else (image, boxes)
                p = model.masks_for_boxes([im], [b], [labels], size=v.scale)[0]
            else:
                view_image = make_view_image(image, v, max_size)
                b = to_view(boxes, orig_hw, tuple(view_image.shape[-2:]), v.flip)
                p = model.masks_for_boxes([view_image], [b], [labels])[0]
        if v.flip:
            p = p.flip(-1)
        total = p if total is None else total + p
    assert total is not None
    return total / len(views)


@dataclass
class SegmentReport:
    """What a segmentation pass did: rows written and rows skipped, by reason."""

    written: int = 0
    skipped: Counter = field(default_factory=Counter)


def check_detections(
    detections: pa.Table, image_set: ImageSet, categories: Categories, what: str, skip_invalid: bool, report: SegmentReport
) -> pa.Table:
    """Refuse (or, with `skip_invalid`, drop and count) rows the segmenter cannot take.

    Bad rows: image not in the image set, category the segmenter was not trained on,
    non-finite or degenerate box.
    """
    if detections.num_rows == 0:
        return detections
    ids = detections.column("image_id").to_numpy()
    cats = detections.column("category_id").to_numpy()
    boxes = boxes_of(detections)
    scores = detections.column("score").to_numpy()
    known_cats = np.isin(cats, np.asarray(categories.ids))
    problems = {
        "image not in the image set": ~np.fromiter((int(i) in image_set for i in ids), bool, len(ids)),
        "category the segmenter was not trained on": ~known_cats,
        "non-finite box or score": ~(np.isfinite(boxes).all(1) & np.isfinite(scores)),
        "degenerate box (x2 <= x1 or y2 <= y1)": ~((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])),
    }
    bad = np.zeros(len(ids), bool)
    for reason, rows in problems.items():
        rows &= ~bad  # count each row once, under its first problem
        if rows.any():
            i = int(np.flatnonzero(rows)[0])
            if not skip_invalid:
                raise ValueError(
                    f"{what}: row {i} (image_id {ids[i]}, category_id {cats[i]}, box {boxes[i].tolist()}): {reason}; "
                    f"{int(rows.sum())} such rows (use skip_invalid to drop them)"
                )
            report.skipped[reason] += int(rows.sum())
            bad |= rows
    return detections.filter(pa.array(~bad)) if bad.any() else detections


def segment(
    model: nn.Module,
    categories: Categories,
    image_set: ImageSet,
    detections: pa.Table,
    views: Sequence[View],
    mask_thresh: float = SEGMENT.mask_thresh,
    skip_invalid: bool = False,
    what: str = "detections",
    device: str | torch.device = "cpu",
    progress: Callable[[int], None] | None = None,
    precision: str = "fp32",
    torchvision_resize: bool = False,
) -> tuple[pa.Table, SegmentReport]:
    """Instances table for `detections` (boxes in original pixels, COCO category ids).

    Output rows are grouped by image id (ascending), in input order within an image.
    `torchvision_resize`: see `mask_probs`.
    """
    report = SegmentReport()
    if not views:
        raise ValueError("segment: at least one view (scale) is needed")
    detections = check_detections(detections, image_set, categories, what, skip_invalid, report)
    if detections.num_rows == 0:
        return empty_table("instances"), report
    device = torch.device(device)
    ids = detections.column("image_id").to_numpy()
    order = np.argsort(ids, kind="stable")
    detections = detections.take(pa.array(order))
    image_ids, starts = np.unique(ids[order], return_index=True)
    bounds = np.append(starts, len(ids))
    out_det, out_rles = [], []
    for k, image_id in enumerate(image_ids.tolist()):
        rows = detections.slice(bounds[k], bounds[k + 1] - bounds[k])
        image = image_set.read(image_id).to(device).float().div_(255.0)
        boxes = torch.from_numpy(boxes_of(rows)).to(device)
        labels = torch.from_numpy(categories.to_labels(rows.column("category_id").to_numpy())).to(device)
        probs = mask_probs(model, image, boxes, labels, views, precision, torchvision_resize)
        out_rles += paste_and_encode(probs, boxes, image_set.size(image_id), mask_thresh)
        out_det.append(rows)
        if progress is not None:
            progress(k + 1)
    table = instances_table(pa.concat_tables(out_det), out_rles)
    report.written = table.num_rows
    return table, report
