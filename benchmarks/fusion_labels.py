"""Fusion per label against fusion with a label vote (`FuseSettings.labels`), on demo run folders.

For each run folder: the pass-one members' detections (RUN/outputs/detections_<name>.parquet,
the detectors and, with `segmenter.own_boxes`, the segmenter) are fused twice through
`ensemble.api.fuse_files`, with the run's `fusion:` settings and member weights, once with
`labels: per_label` and once with `labels: vote`. Each fused table gets box AP (and box AP with
labels ignored, COCOeval's class-agnostic mode: what is left to win by labels), then pass two
with the run's segmenter checkpoint (RUN/models/<segmenter>-*/done.json, the newest if several)
through `segmenter.api.segment_images`, and mask AP. Ground truth and images:
RUN/data/val/annotations.json and RUN/data/val/images (the demo's layout).

    .venv/bin/python benchmarks/fusion_labels.py --runs RUN1 [RUN2 ...] [--device cpu] [--threads 2]

A run made with `twopass demo --out RUN` has all of these. The per_label row re-derives the
run's own fusion; "reproduces RUN/outputs/fused.parquet" checks that the settings were read
right (when the run fused per label).

Last line: per_label_box_ap=<mean over runs> vote_box_ap=<> per_label_mask_ap=<> vote_mask_ap=<> runs=<n>
"""

from __future__ import annotations

import os

# Sleeping OpenMP threads: this runs beside other work on small machines (pipeline/threads.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

MODES = ("per_label", "vote")


def segmenter_checkpoint(run: Path, config) -> Path:
    """The segmenter the run used: its configured checkpoint, else the newest it trained."""
    from twopass.detector.checkpoint import resolve
    from twopass.pipeline.config import safe_name
    from twopass.pipeline.fileio import read_json

    spec = config.segmenter
    if spec.checkpoint is not None:
        return resolve(spec.checkpoint)
    done = sorted((run / "models").glob(f"{safe_name(spec.name)}-*/done.json"), key=lambda p: p.stat().st_mtime)
    if not done:
        raise FileNotFoundError(f"{run}/models/{safe_name(spec.name)}-*/done.json: no trained segmenter in the run folder")
    return done[-1].parent / read_json(done[-1])["checkpoint"]


def measure(run: Path, device: str) -> dict[str, dict]:
    """{mode: {rows, box_ap, box_ap_agnostic, mask_ap, mask_ap_agnostic, ...}} for one run folder."""
    from twopass.detector.api import load_for_inference, views_of
    from twopass.ensemble.api import fuse_files
    from twopass.pipeline.coco import CocoIndex
    from twopass.pipeline.config import load_pipeline_config, safe_name
    from twopass.pipeline.evaluate import evaluate
    from twopass.pipeline.tables import read_results
    from twopass.segmenter.api import SEGMENTER, segment_images

    config = load_pipeline_config(run / "pipeline.yaml")
    members = [d for _, d in config.pass_one()]
    inputs = [run / "outputs" / f"detections_{safe_name(d.name)}.parquet" for d in members]
    weights = [d.weight for d in members]
    ann = run / "data" / "val" / "annotations.json"
    gt = CocoIndex.load(ann)
    image_set = gt.image_set(run / "data" / "val" / "images")
    sizes = {int(i): image_set.size(i) for i in image_set.image_ids}
    spec = config.segmenter
    loaded = load_for_inference(SEGMENTER, segmenter_checkpoint(run, config), device)
    views = views_of(loaded.meta.path, spec.tta.scales, spec.tta.flip)
    print(f"{run}: {len(image_set)} images; fusion {config.fusion.method} of {', '.join(d.name for d in members)} "
          f"(weights {weights}); pass two {spec.name} ({loaded.meta.path.name}, {len(views)} views)", flush=True)  # fmt: skip

    out: dict[str, dict] = {}
    for mode in MODES:
        settings = config.fusion.model_copy(update={"labels": mode})
        t0 = time.perf_counter()
        fused, _ = fuse_files(inputs, settings, weights=weights, image_sizes=sizes, source=f"fused:{settings.method}",
                              dataset=str(ann), categories=gt.categories)  # fmt: skip
        t_fuse = time.perf_counter() - t0
        box = evaluate(gt.raw, fused, iou_types=("bbox",), per_category=False)["bbox"]
        box_any = evaluate(gt.raw, fused, iou_types=("bbox",), class_agnostic=True)["bbox"]
        t0 = time.perf_counter()
        instances, _, report = segment_images(loaded, image_set, fused, views, spec, name=spec.name, device=device)
        t_seg = time.perf_counter() - t0
        mask = evaluate(gt.raw, instances, iou_types=("segm",), per_category=False)["segm"]
        mask_any = evaluate(gt.raw, instances, iou_types=("segm",), class_agnostic=True)["segm"]
        row = dict(rows=fused.num_rows, box_ap=box["AP"], box_ap50=box["AP50"], box_ap_agnostic=box_any["AP"],
                   mask_ap=mask["AP"], mask_ap50=mask["AP50"], mask_ap_agnostic=mask_any["AP"],
                   skipped=sum(report.skipped.values()), fuse_s=t_fuse, segment_s=t_seg)  # fmt: skip
        published = run / "outputs" / "fused.parquet"
        if mode == config.fusion.labels and published.is_file():
            cols = ["image_id", "category_id", "score", "x1", "y1", "x2", "y2"]
            row["reproduces_run"] = read_results(published)[0].select(cols).equals(fused.select(cols))
        out[mode] = row
    return out


def print_table(run: Path, result: dict[str, dict]) -> None:
    fields = [("boxes", "rows", "d"), ("box AP", "box_ap", ".4f"), ("box AP50", "box_ap50", ".4f"),
              ("box AP, labels ignored", "box_ap_agnostic", ".4f"), ("mask AP", "mask_ap", ".4f"),
              ("mask AP50", "mask_ap50", ".4f"), ("mask AP, labels ignored", "mask_ap_agnostic", ".4f"),
              ("rows pass two skipped", "skipped", "d"), ("fuse s", "fuse_s", ".2f"), ("pass two s", "segment_s", ".2f")]  # fmt: skip
    width = max(len(f[0]) for f in fields)
    print(f"\n{run}")
    print(f"  {'':<{width}}  {'per_label':>10}  {'vote':>10}  {'vote - per_label':>16}")
    for title, key, fmt in fields:
        a, b = result["per_label"][key], result["vote"][key]
        print(f"  {title:<{width}}  {a:>10{fmt}}  {b:>10{fmt}}  {b - a:>+16{fmt}}")
    for mode, row in result.items():
        if "reproduces_run" in row:
            print(f"  {mode} reproduces {run}/outputs/fused.parquet: {'yes' if row['reproduces_run'] else 'NO'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", type=Path, required=True, help="Demo run folders.")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    results = {run: measure(run, args.device) for run in args.runs}
    for run, result in results.items():
        print_table(run, result)

    def mean(mode: str, key: str) -> float:
        return statistics.fmean(r[mode][key] for r in results.values())

    print(f"per_label_box_ap={mean('per_label', 'box_ap'):.4f} vote_box_ap={mean('vote', 'box_ap'):.4f} "
          f"per_label_mask_ap={mean('per_label', 'mask_ap'):.4f} vote_mask_ap={mean('vote', 'mask_ap'):.4f} runs={len(results)}")  # fmt: skip


if __name__ == "__main__":
    main()
