"""Time an image of fusion, ours (`ensemble`) against the reference (`ensemble_boxes`).

3 models x 100 and x 1,000 boxes an image, 80 categories, clustered synthetic detections
(`ensemble.synthetic`) on 640 x 480 images. For Soft-NMS (Gaussian, linear), NMS and WBF:
median and minimum time an image of each side, the two sides alternating over the repeats,
their ratios, and the largest difference of the outputs (boxes in pixels and scores; the
outputs must also have the same labels in the same order, else "MISMATCH").

Then, for information, ours batched as the pipeline runs it: `fuse` on the same 3 x 1,000
images in one call (detections tables), time an image.

Last line, for the 3 x 1,000 case: softnms_speedup (the smaller of the Gaussian and linear
median ratios), wbf_speedup (median ratio) and max_abs_diff (over all four methods), all
from the per-image calls.

    .venv/bin/python benchmarks/fusion_speed.py [--repeats 7] [--images 4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from twopass.ensemble import fuse, nms, soft_nms, weighted_boxes_fusion
from twopass.ensemble.synthetic import detections
from twopass.pipeline.tables import detections_table

IMAGE_SIZE = (480.0, 640.0)
METHODS = {
    "soft-nms gaussian": (soft_nms, dict(method="gaussian")),
    "soft-nms linear": (soft_nms, dict(method="linear")),
    "nms": (nms, {}),
    "wbf": (weighted_boxes_fusion, {}),
}


def run(fn, kwargs, images, backend):
    return [fn(*image, IMAGE_SIZE, backend=backend, **kwargs) for image in images]


def time_per_image(fn, kwargs, images, backend):
    start = time.perf_counter()
    run(fn, kwargs, images, backend)
    return (time.perf_counter() - start) / len(images)


def max_diff(ours, ref) -> float:
    worst = 0.0
    for (b, s, lab), (rb, rs, rlab) in zip(ours, ref):
        if b.shape != rb.shape or not np.array_equal(lab, rlab):
            return float("inf")
        if len(b):
            worst = max(worst, float(np.abs(b - rb).max()), float(np.abs(s - rs).max()))
    return worst


def as_tables(images) -> list:
    """One detections table per model, image i of `images` as image_id i."""
    tables = []
    for m in range(len(images[0][0])):
        ids = np.concatenate([np.full(len(boxes[m]), i) for i, (boxes, _, _) in enumerate(images)])
        labels = np.concatenate([lab[m] for _, _, lab in images])
        scores = np.concatenate([s[m] for _, s, _ in images])
        boxes = np.concatenate([b[m] for b, _, _ in images])
        tables.append(detections_table(ids, labels, scores, boxes, f"model{m}"))
    return tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of each side")
    parser.add_argument("--images", type=int, default=4, help="different images per run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rng = np.random.default_rng(args.seed)

    head = ("ours med", "ours min", "ref med", "ref min")
    print(f"{'case':<28}" + "".join(f"{h:>10}" for h in head) + f"{'x med':>8}{'x min':>8}{'max diff':>11}")
    summary: dict[str, tuple[float, float, float]] = {}
    for n_boxes in (100, 1000):
        images = [detections(rng, 3, n_boxes, 80, IMAGE_SIZE) for _ in range(args.images)]
        for name, (fn, kwargs) in METHODS.items():
            ours_out = run(fn, kwargs, images, "vectorised")  # also warms up (numba JIT in the reference's NMS)
            ref_out = run(fn, kwargs, images, "ensemble_boxes")
            diff = max_diff(ours_out, ref_out)
            ours_t, ref_t = [], []
            for _ in range(args.repeats):
                ours_t.append(time_per_image(fn, kwargs, images, "vectorised"))
                ref_t.append(time_per_image(fn, kwargs, images, "ensemble_boxes"))
            om, rm = statistics.median(ours_t), statistics.median(ref_t)
            ratio_med, ratio_min = rm / om, min(ref_t) / min(ours_t)
            case = f"3x{n_boxes} {name}"
            shown = "MISMATCH" if diff == float("inf") else f"{diff:.1e}"
            print(
                f"{case:<28}{om * 1e3:>8.2f}ms{min(ours_t) * 1e3:>8.2f}ms{rm * 1e3:>8.2f}ms{min(ref_t) * 1e3:>8.2f}ms"
                f"{ratio_med:>7.1f}x{ratio_min:>7.1f}x{shown:>11}",
                flush=True,
            )
            if n_boxes == 1000:
                summary[name] = (ratio_med, diff, rm)
    # Batched: every image in one fuse() call, as `twopass fuse` runs.
    tables = as_tables(images)
    sizes = {i: IMAGE_SIZE for i in range(len(images))}
    batched = {
        "soft-nms gaussian": dict(method="soft-nms", decay="gaussian"),
        "soft-nms linear": dict(method="soft-nms", decay="linear"),
        "nms": dict(method="nms"),
        "wbf": dict(method="wbf"),
    }
    print(f"batched: fuse() on the {len(images)} images of 3x1000 in one call, time an image (ours)")
    for name, kwargs in batched.items():
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fuse(tables, image_sizes=sizes, max_per_image=None, **kwargs)
            times.append((time.perf_counter() - start) / len(images))
        med = statistics.median(times)
        ratio = summary[name][2] / med
        print(f"  {name:<26}{med * 1e3:>8.2f}ms{min(times) * 1e3:>8.2f}ms  {ratio:>6.1f}x the reference per image")
    soft = min(summary["soft-nms gaussian"][0], summary["soft-nms linear"][0])
    diff = max(d for _, d, _ in summary.values())
    print(f"softnms_speedup={soft:.1f} wbf_speedup={summary['wbf'][0]:.1f} max_abs_diff={diff:.3g}")


if __name__ == "__main__":
    main()
