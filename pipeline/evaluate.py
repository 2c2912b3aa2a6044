"""COCO evaluation of detections and instances: box and mask AP, per category too.

Two backends give the same numbers (tests/pipeline/test_evaluate.py holds them to each other):
`pycocotools` (the reference) and `faster` (faster-coco-eval's C++ COCOeval, the default).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pyarrow as pa

from .categories import Categories
from .coco import CocoIndex
from .tables import check_arrays, check_values, read_results, to_coco_results

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
Backend = Literal["faster", "pycocotools"]


def _load_gt(gt: str | Path | dict, backend: Backend):
    # the same checks as every other stage: a NaN, negative or out-of-image box, a 2-point
    # polygon, an annotation on an unknown image or category is named, never scored
    data = CocoIndex.cached(gt).raw if not isinstance(gt, dict) else CocoIndex.from_dict(gt, "ground truth").raw
    # COCOeval writes keys ('ignore', ...) into the ground-truth dicts: give it copies.
    data = {**data, "annotations": [dict(a) for a in data["annotations"]]}
    if backend == "faster":
        from faster_coco_eval import COCO
    else:
        from pycocotools.coco import COCO
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _check_result_values(results: list[dict], what: str) -> None:
    """The value checks of every other stage (finite, ordered boxes; scores in [0, 1]) on a
    COCO results list, through arrays rather than a table (no copy of the masks)."""
    if not results:
        return
    try:
        xywh = np.asarray([r["bbox"] for r in results], dtype=np.float64).reshape(len(results), 4)
        scores = np.asarray([r["score"] for r in results], dtype=np.float64)
        ids = np.asarray([r["image_id"] for r in results])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{what}: each result needs image_id, category_id, a 4-number bbox and a score ({e})") from None
    x, y, w, h = xywh.T
    check_arrays(ids, {"score": scores, "x1": x, "y1": y, "x2": x + w, "y2": y + h}, what, score_range=(0.0, 1.0))


def _check_results(results: list[dict], gt_coco, what: str) -> None:
    image_ids = set(gt_coco.getImgIds())
    cat_ids = set(gt_coco.getCatIds())
    for i, r in enumerate(results):
        if r["image_id"] not in image_ids:
            raise ValueError(f"{what}: result {i} is on image_id {r['image_id']}, which the ground truth does not have")
        if r["category_id"] not in cat_ids:
            raise ValueError(f"{what}: result {i} (image_id {r['image_id']}) has unknown category_id {r['category_id']}")


def evaluate(
    gt: str | Path | dict,
    results: pa.Table | str | Path | list[dict],
    iou_types: Sequence[str] = ("bbox", "segm"),
    backend: Backend = "faster",
    per_category: bool = True,
) -> dict:
    """COCO metrics of `results` against the ground-truth annotations `gt`.

    `results`: a detections/instances table, a Parquet or COCO results JSON path, or a results
    list. `segm` is skipped when the results carry no masks. Returns
    `{"bbox": {"AP": .., ...}, "segm": {...}, "per_category": {"bbox": {name: AP}, ...}}`.
    """
    what = str(results) if isinstance(results, (str, Path)) else "results"
    gt_coco = _load_gt(gt, backend)
    categories = Categories.from_coco(gt_coco.dataset["categories"])
    if isinstance(results, (str, Path)):
        results, meta = read_results(results)
        if meta.categories is not None:
            categories.check_same(meta.categories, f"{what} against the ground truth")
    owned = isinstance(results, pa.Table)  # the dicts made here may be handed to COCO unchanged
    if owned:
        check_values(results, what, score_range=(0.0, 1.0))
        results = to_coco_results(results)
    else:
        _check_result_values(results, what)
    _check_results(results, gt_coco, what)
    has_masks = bool(results) and all("segmentation" in r for r in results)
    out: dict = {"per_category": {}}
    for iou_type in iou_types:
        if iou_type == "segm" and results and not has_masks:
            continue
        if not results:  # pycocotools cannot load an empty result list; nothing found scores 0
            out[iou_type] = {k: 0.0 for k in STAT_NAMES}
            out["per_category"][iou_type] = {n: 0.0 for n in categories.names}
            continue
        # loadRes sets keys (area, id, bbox from masks) on its input: give each run shallow
        # copies (a deep copy cost three quarters of the evaluation time).
        if iou_type == "bbox":
            dets = [{k: v for k, v in d.items() if k != "segmentation"} for d in results]
        elif owned and iou_type == iou_types[-1]:
            dets = results  # made here, used for the last time: no copy
        else:
            dets = [dict(d) for d in results]
        with contextlib.redirect_stdout(io.StringIO()):
            dt_coco = gt_coco.loadRes(dets)
            if backend == "faster":
                from faster_coco_eval import COCOeval_faster as Eval

                ev = Eval(gt_coco, dt_coco, iou_type, print_function=lambda *a, **k: None)
            else:
                from pycocotools.cocoeval import COCOeval as Eval

                ev = Eval(gt_coco, dt_coco, iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        out[iou_type] = {k: float(v) for k, v in zip(STAT_NAMES, ev.stats[: len(STAT_NAMES)])}
        if per_category:
            # precision[T, R, K, A, M]: IoU thresholds, recall points, categories, area ranges, max dets
            prec = np.asarray(ev.eval["precision"])[:, :, :, 0, -1]
            cat_order = list(ev.params.catIds)
            table = {}
            for cid, name in zip(categories.ids, categories.names):
                p = prec[:, :, cat_order.index(cid)]
                p = p[p > -1]
                table[name] = float(p.mean()) if p.size else float("nan")
            out["per_category"][iou_type] = table
    return out

