"""COCO evaluation of detections and instances: box and mask AP, per category too.

Two backends give the same numbers (tests/pipeline/test_evaluate.py holds them to each other):
`pycocotools` (the reference) and `faster` (faster-coco-eval's C++ COCOeval, the default).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import io
from pathlib import Path
from typing import Literal, NamedTuple, Sequence

import numpy as np
import pyarrow as pa

from .categories import Categories
from .coco import CocoIndex
from .tables import check_arrays, check_values, coco_columns, read_results, to_coco_results

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


class _Columns(NamedTuple):
    """A results list or table as columns: what the checks and the evaluator read."""

    image_id: list
    category_id: list
    xywh: list  # [x, y, w, h] float lists, absolute pixels
    score: list
    segmentation: list | None  # RLE dicts, or None when any result has no mask


def _columns(results: pa.Table | list[dict], what: str) -> _Columns:
    """The columns of `results`, checked as every other stage checks them (finite, ordered
    boxes; scores in [0, 1])."""
    if isinstance(results, pa.Table):
        check_values(results, what, score_range=(0.0, 1.0))
        c = coco_columns(results)
        return _Columns(c["image_id"], c["category_id"], c["bbox"], c["score"], c.get("segmentation"))
    try:
        ids = [r["image_id"] for r in results]
        cats = [r["category_id"] for r in results]
        xywh = np.asarray([r["bbox"] for r in results], dtype=np.float64).reshape(len(results), 4)
        scores = np.asarray([r["score"] for r in results], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{what}: each result needs image_id, category_id, a 4-number bbox and a score ({e})") from None
    if results:
        x, y, w, h = xywh.T
        check_arrays(np.asarray(ids), {"score": scores, "x1": x, "y1": y, "x2": x + w, "y2": y + h}, what, score_range=(0.0, 1.0))
    segm = [r.get("segmentation") for r in results]
    return _Columns(ids, cats, [r["bbox"] for r in results], scores.tolist(), segm if results and None not in segm else None)


def _check_ids(cols: _Columns, gt_coco, what: str) -> None:
    image_ids = set(gt_coco.getImgIds())
    cat_ids = set(gt_coco.getCatIds())
    for i, (image_id, cat) in enumerate(zip(cols.image_id, cols.category_id)):
        if image_id not in image_ids:
            raise ValueError(f"{what}: result {i} is on image_id {image_id}, which the ground truth does not have")
        if cat not in cat_ids:
            raise ValueError(f"{what}: result {i} (image_id {image_id}) has unknown category_id {cat}")


def _results_coco(gt_coco, cols: _Columns, with_masks: bool):
    """What `gt_coco.loadRes(results)` returns, built in one pass over columns.

    loadRes copies every result and fills in its keys one dict at a time, in Python.
    Same fields as its bbox branch, which pycocotools takes whenever results carry boxes (ours
    always do): `area` is the box's area for masks too, ids count from 1, nothing is crowd.
    """
    from faster_coco_eval import COCO

    rows = zip(range(1, len(cols.score) + 1), cols.image_id, cols.category_id, cols.xywh, cols.score)
    anns = [{"id": i, "image_id": im, "category_id": c, "bbox": b, "score": s, "area": b[2] * b[3], "iscrowd": 0} for i, im, c, b, s in rows]
    if with_masks:
        for a, m in zip(anns, cols.segmentation):
            a["segmentation"] = m
    coco = COCO()
    coco.dataset = {"images": gt_coco.dataset["images"], "categories": gt_coco.dataset["categories"], "annotations": anns}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


@functools.cache
def _eval_class():
    """faster-coco-eval's COCOeval with a `_prepare` for this module's inputs.

    Its own `_prepare` looks every annotation up again by image and category, and decodes and
    re-encodes every result's compressed RLE in C++ to get the same string back (without both,
    benchmarks/io_eval.py's evaluation takes 2.20 s instead of 2.75 s). Here every image and
    category is evaluated (the ids were checked), so the annotation lists are taken whole, and
    compressed masks are used as they are; other mask formats go through the library's
    conversion. tests/pipeline/test_evaluate.py holds the numbers to pycocotools'.
    """
    from faster_coco_eval import COCOeval_faster
    from faster_coco_eval.core import mask as mask_api

    class Eval(COCOeval_faster):
        def _prepare(self) -> None:
            p = self.params
            self.gt_dataset.clean()
            self.dt_dataset.clean()
            gts, dts = self.cocoGt.dataset["annotations"], self.cocoDt.dataset["annotations"]
            for g in gts:
                g["ignore"] = int(g.get("iscrowd", 0))
            if p.compute_rle:
                sizes = {im["id"]: (im["height"], im["width"]) for im in self.cocoGt.dataset["images"]}
                args = (sizes, True, False, self.boundary_dilation_ratio, self.boundary_cpu_count)
                mask_api.calculateRleForAllAnnotations(gts, *args)
                if all(isinstance(d["segmentation"], dict) and isinstance(d["segmentation"]["counts"], (str, bytes)) for d in dts):
                    for d in dts:
                        size, counts = d["segmentation"]["size"], d["segmentation"]["counts"]
                        d["rle"] = {"size": size, "counts": counts if isinstance(counts, bytes) else counts.encode()}
                else:
                    mask_api.calculateRleForAllAnnotations(dts, *args)
            for g in gts:
                self.gt_dataset.append_ref(g["image_id"], g["category_id"], g)
            for d in dts:
                self.dt_dataset.append_ref(d["image_id"], d["category_id"], d)
            # (image, category) pairs with both ground truth and results: the only IoUs to compute
            key = (lambda a: (a["image_id"], a["category_id"])) if p.useCats else (lambda a: (a["image_id"], -1))
            self._nonempty_iou_pairs = set(map(key, gts)) & set(map(key, dts))

    return Eval


@contextlib.contextmanager
def _gc_paused():
    """Pause the cyclic garbage collector: an evaluation allocates hundreds of thousands of
    small dicts without cycles (reference counting frees them), and the collector's passes
    over them cost time for nothing (benchmarks/io_eval.py: 3.29 s with them, 2.75 s without)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@_gc_paused()
def evaluate(
    gt: str | Path | dict,
    results: pa.Table | str | Path | list[dict],
    iou_types: Sequence[str] = ("bbox", "segm"),
    backend: Backend = "faster",
    per_category: bool = True,
    class_agnostic: bool = False,
) -> dict:
    """COCO metrics of `results` against the ground-truth annotations `gt`.

    `results`: a detections/instances table, a Parquet or COCO results JSON path, or a results
    list. `segm` is skipped when the results carry no masks. Returns
    `{"bbox": {"AP": .., ...}, "segm": {...}, "per_category": {"bbox": {name: AP}, ...}}`.
    `class_agnostic`: COCOeval's `useCats=0`, a result may match ground truth of any category
    (how much of the AP that is lost is lost to the labels); no per-category table.
    """
    what = str(results) if isinstance(results, (str, Path)) else "results"
    gt_coco = _load_gt(gt, backend)
    categories = Categories.from_coco(gt_coco.dataset["categories"])
    if isinstance(results, (str, Path)):
        sizes = {int(im["id"]): (im["height"], im["width"]) for im in gt_coco.dataset["images"]}  # for polygon masks
        results, meta = read_results(results, image_sizes=sizes)
        if meta.categories is not None:
            categories.check_same(meta.categories, f"{what} against the ground truth")
    cols = _columns(results, what)
    _check_ids(cols, gt_coco, what)
    n = len(cols.score)
    if backend == "pycocotools" and isinstance(results, pa.Table):
        results = to_coco_results(results)  # the reference reads a results list
    out: dict = {"per_category": {}}
    for iou_type in iou_types:
        if iou_type == "segm" and n and cols.segmentation is None:
            continue
        if not n:  # pycocotools cannot load an empty result list; nothing found scores 0
            out[iou_type] = {k: 0.0 for k in STAT_NAMES}
            if per_category and not class_agnostic:
                out["per_category"][iou_type] = dict.fromkeys(categories.names, 0.0)
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            if backend == "faster":
                dt_coco = _results_coco(gt_coco, cols, with_masks=iou_type == "segm")
                ev = _eval_class()(gt_coco, dt_coco, iou_type, print_function=lambda *a, **k: None)
            else:  # the reference, as its README uses it: loadRes of a results list (it adds keys: copies)
                from pycocotools.cocoeval import COCOeval as Eval

                drop = ("segmentation",) if iou_type == "bbox" else ()
                dets = [{k: v for k, v in r.items() if k not in drop} for r in results]
                ev = Eval(gt_coco, gt_coco.loadRes(dets), iou_type)
            ev.params.useCats = int(not class_agnostic)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        out[iou_type] = {k: float(v) for k, v in zip(STAT_NAMES, ev.stats[: len(STAT_NAMES)])}
        if per_category and not class_agnostic:
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

