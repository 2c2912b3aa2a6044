"""Parquet I/O and COCO evaluation speed on 500 images x 100 instances with masks.

Reference: plain pycocotools (COCO, loadRes, COCOeval; bbox + segm) on the same results list.
Ours is `pipeline.evaluate.evaluate` with its input checks on (ground truth and results). The
two sides run alternately, `--repeats` times each; median and minimum are reported.

    python benchmarks/io_eval.py [--images 500] [--per-image 100] [--repeats 3]

Last line: eval_speedup=<pycocotools time / ours> parquet_write_s=<s> parquet_read_s=<s>
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from twopass.pipeline.coco import CocoIndex
from twopass.pipeline.evaluate import evaluate
from twopass.pipeline.synth import generate
from twopass.pipeline.tables import TableMeta, detections_table, instances_table, read_table, to_coco_results, write_table


def make_results(gt: dict, per_image: int, seed: int = 0):
    """`per_image` instances an image: jittered ground truth (its masks) plus false positives
    whose masks are their own boxes, so nearly every mask string is distinct as in real output."""
    rng = np.random.default_rng(seed)
    by_image: dict[int, list[dict]] = {}
    for a in gt["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    ids, cats, scores, boxes, rles = [], [], [], [], []
    for im in gt["images"]:
        anns = by_image.get(im["id"], [])
        for k in range(per_image):
            a = anns[k % len(anns)] if anns else None
            if a is None:
                continue
            x, y, w, h = a["bbox"]
            j = rng.normal(0, 1.0 + 3.0 * (k >= len(anns)), 4)
            x1, y1 = x + j[0], y + j[1]
            boxes.append([x1, y1, x1 + max(1.0, w + j[2]), y1 + max(1.0, h + j[3])])
            ids.append(im["id"])
            cats.append(a["category_id"] if k < len(anns) else int(rng.integers(1, 9)))
            scores.append(rng.random() * (1.0 if k < len(anns) else 0.6))
            if k < len(anns):
                rles.append(a["segmentation"])
            else:
                b = boxes[-1]
                xywh = np.array([[b[0], b[1], b[2] - b[0], b[3] - b[1]]], dtype=np.float64)
                rle = mask_utils.frPyObjects(xywh, im["height"], im["width"])[0]
                rles.append(rle)
    det = detections_table(ids, cats, scores, np.array(boxes), "bench")
    return instances_table(det, rles)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def plain_pycocotools(ann: Path, results: list[dict]) -> dict:
    """The reference: pycocotools as its README uses it (COCO, loadRes, COCOeval), no checks."""
    import contextlib
    import copy
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    out = {}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann))
        for iou_type in ("bbox", "segm"):
            dets = [{k: v for k, v in r.items() if k != "segmentation"} for r in results] if iou_type == "bbox" else copy.copy(results)
            ev = COCOeval(gt, gt.loadRes([dict(d) for d in dets]), iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            out[iou_type] = dict(zip(("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"), map(float, ev.stats)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--per-image", type=int, default=100)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t_gen, ann = timed(lambda: generate(tmp / "data", args.images, args.size, seed=123))
        gt = json.loads(ann.read_text())
        table = make_results(gt, args.per_image)
        print(f"data: {args.images} images of {args.size}px generated in {t_gen:.1f} s; {table.num_rows} instances")
        meta = TableMeta(kind="instances", producer="benchmarks/io_eval.py")

        writes, reads = [], []
        for _ in range(args.repeats):
            writes.append(timed(lambda: write_table(tmp / "inst.parquet", table, meta))[0])
            reads.append(timed(lambda: read_table(tmp / "inst.parquet", "instances"))[0])
        back, _ = read_table(tmp / "inst.parquet", "instances")
        assert back.equals(table), "Parquet round trip changed the table"
        size_mb = (tmp / "inst.parquet").stat().st_size / 1e6
        print(f"parquet write: median {statistics.median(writes):.3f} s, min {min(writes):.3f} s ({size_mb:.1f} MB)")
        print(f"parquet read:  median {statistics.median(reads):.3f} s, min {min(reads):.3f} s")

        results = to_coco_results(table)
        t_ours, t_ref, m_ours, m_ref = [], [], None, None
        for _ in range(args.repeats):  # alternate the two sides so machine noise hits both alike
            dt, m_ref = timed(lambda: plain_pycocotools(ann, results))
            t_ref.append(dt)
            CocoIndex.clear_cache()  # ours checks the ground truth every time, as a first call does
            dt, m_ours = timed(lambda: evaluate(ann, results, backend="faster", per_category=False))
            t_ours.append(dt)
        diff = max(abs(m_ours[t][k] - m_ref[t][k]) for t in ("bbox", "segm") for k in m_ref[t])
        print(f"evaluate (bbox+segm) pycocotools: median {statistics.median(t_ref):.2f} s, min {min(t_ref):.2f} s")
        print(f"evaluate (bbox+segm) ours:        median {statistics.median(t_ours):.2f} s, min {min(t_ours):.2f} s")
        speedup = statistics.median(t_ref) / statistics.median(t_ours)
        print(f"speedup (median) {speedup:.2f}x, (min) {min(t_ref) / min(t_ours):.2f}x; max metric difference {diff:.2e}")
        print(f"segm AP {m_ours['segm']['AP']:.4f}, bbox AP {m_ours['bbox']['AP']:.4f}")
        print(
            f"eval_speedup={speedup:.2f} parquet_write_s={statistics.median(writes):.3f} "
            f"parquet_read_s={statistics.median(reads):.3f}"
        )


if __name__ == "__main__":
    main()
