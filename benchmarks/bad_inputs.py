"""Hostile inputs through the `twopass` command line: does each one get a clear error?

Every case generates its inputs (a small synthetic set, random-weight checkpoints, damaged
copies of annotations and results), runs one `twopass` command in a subprocess, and is scored:

- clear error: a non-zero exit and one `twopass: error:` line, no traceback;
- traceback: Python's traceback reached the user;
- silent: exit 0 on an input that should have been refused;
- data loss: a file that was an input changed (compared byte for byte afterwards).

    python benchmarks/bad_inputs.py [--keep DIR]

Last line: cases=<n> clear_errors=<n> tracebacks=<n> silent=<n> data_loss=<n>
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

TINY = {
    "name": "tiny",
    "backbone": {"name": "shufflenet_v2_x0_5", "fpn_channels": 16, "trainable_stages": 5},
    "norm": {"backbone": "bn"},
    "rpn": {"anchors": {"sizes": [16, 32, 64, 128]}, "pre_nms_top_n_test": 64, "post_nms_top_n_test": 24},
    "box_head": {"type": "two_fc", "fc_dim": 32},
    "input": {"train_sizes": [64], "test_size": 64, "max_size": 96},
}


def make_inputs(root: Path) -> dict[str, Path]:
    """A synthetic set, a detector and a segmenter with random weights, results files."""
    import torch
    import yaml

    from twopass.detector.checkpoint import save_checkpoint
    from twopass.pipeline.coco import CocoIndex
    from twopass.pipeline.synth import generate
    from twopass.segmenter.two_pass import KINDS

    ann = generate(root / "data", 6, 128, seed=0)
    cats = CocoIndex.load(ann).categories
    out = {"ann": ann, "images": root / "data" / "images"}
    for name, kind, model in (("det", "detector", TINY), ("seg", "segmenter", {**TINY, "mask_head": {"conv_dim": 8, "num_convs": 1}})):
        cfg = KINDS[kind].config(model)
        torch.manual_seed(0)
        out[name] = save_checkpoint(root / name, KINDS[kind].build(cfg, cats.num_classes), kind=kind, config=cfg.to_dict(),
                                    categories=cats, iteration=0)  # fmt: skip
    gt = json.loads(ann.read_text())
    boxes = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9} for a in gt["annotations"]]
    out["results"] = root / "results.json"
    out["results"].write_text(json.dumps(boxes))
    out["tiny"] = root / "tiny.yaml"
    out["tiny"].write_text(yaml.safe_dump(TINY))
    return out


def variant(root: Path, name: str, data, edit: Callable) -> Path:
    """A copy of JSON `data` changed by `edit`, written to root/name."""
    d = copy.deepcopy(data)
    edit(d)
    path = root / name
    path.write_text(json.dumps(d))
    return path


def cases(root: Path, f: dict[str, Path]) -> list[tuple[str, list, list[Path]]]:
    """(case, twopass arguments, files that must not change)."""
    gt = json.loads(f["ann"].read_text())
    res = json.loads(f["results"].read_text())

    def ann0(key, value):
        return lambda d: d["annotations"][0].__setitem__(key, value)

    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"iteration": 5}\n')
    outside = root / "outside"
    (outside / "checkpoints").mkdir(parents=True)
    (outside / "checkpoints" / "last.json").write_text(json.dumps({"checkpoint": "../../../../etc/passwd"}))
    folder = root / "a_folder"
    folder.mkdir()
    other_cats = variant(root, "other_cats.json", gt, lambda d: d["categories"][0].__setitem__("name", "renamed"))
    data = ["--images", f["images"], "--ann", f["ann"]]
    return [
        ("detect --out is the annotations", ["detect", "--checkpoint", f["det"], *data, "--out", f["ann"]], [f["ann"]]),
        ("evaluate --out is the annotations", ["evaluate", "--ann", f["ann"], "--results", f["results"], "--out", f["ann"]], [f["ann"]]),
        ("segment --coco-json is the annotations", ["segment", "--checkpoint", f["seg"], "--detections", f["results"], *data,
                                                     "--out", root / "i.parquet", "--coco-json", f["ann"]], [f["ann"]]),
        ("fuse --out is an input", ["fuse", f["results"], "--out", f["results"]], [f["results"]]),
        ("train into a folder with another run", ["train-detector", "--config", f["tiny"], "--train-ann", f["ann"], "--train-images",
                                                   f["images"], "--out", run, "--iters", "1"], [run / "metrics.jsonl"]),
        ("detect --out is a folder", ["detect", "--checkpoint", f["det"], *data, "--out", folder], []),
        ("evaluate: ground truth with a NaN box", ["evaluate", "--ann", variant(root, "nan.json", gt, ann0("bbox", [float("nan"), 1, 2, 2])),
                                                   "--results", f["results"]], []),
        ("evaluate: negative box", ["evaluate", "--ann", variant(root, "neg.json", gt, ann0("bbox", [1, 1, -3, 2])), "--results", f["results"]], []),
        ("evaluate: box outside the image", ["evaluate", "--ann", variant(root, "out.json", gt, ann0("bbox", [120, 120, 50, 50])),
                                             "--results", f["results"]], []),
        ("evaluate: 2-point polygon", ["evaluate", "--ann", variant(root, "poly.json", gt, ann0("segmentation", [[1, 1, 5, 5]])),
                                       "--results", f["results"]], []),
        ("evaluate: score 1.5", ["evaluate", "--ann", f["ann"], "--results",
                                 variant(root, "s15.json", res, lambda d: d[0].__setitem__("score", 1.5))], []),
        ("evaluate: other category list", ["evaluate", "--ann", other_cats, "--results", root / "dets.parquet"], []),
        ("evaluate: annotations {}", ["evaluate", "--ann", variant(root, "empty.json", {}, lambda d: None), "--results", f["results"]], []),
        ("segment: score 1.5", ["segment", "--checkpoint", f["seg"], "--detections",
                                variant(root, "s15b.json", res, lambda d: d[0].__setitem__("score", 1.5)), *data,
                                "--out", root / "i2.parquet"], []),
        ("segment --mask-thresh 5", ["segment", "--checkpoint", f["seg"], "--detections", f["results"], *data,
                                     "--out", root / "i3.parquet", "--mask-thresh", "5"], []),
        ("fuse JSON: unknown category", ["fuse", variant(root, "c77.json", res, lambda d: d[0].__setitem__("category_id", 77)),
                                         "--images", f["ann"], "--out", root / "f1.parquet"], []),
        ("fuse JSON: unknown image", ["fuse", variant(root, "i999.json", res, lambda d: d[0].__setitem__("image_id", 999)),
                                      "--images", f["ann"], "--out", root / "f2.parquet"], []),
        ("config: negative test_size", ["train-detector", "--config", variant(root, "neg_size.yaml", TINY, lambda d: d["input"].__setitem__("test_size", -5)),
                                        "--train-ann", f["ann"], "--train-images", f["images"], "--out", root / "r1", "--iters", "1"], []),
        ("config: negative LR", ["train-detector", "--config", variant(root, "neg_lr.yaml", TINY, lambda d: d.__setitem__("train", {"base_lr": -0.1})),
                                 "--train-ann", f["ann"], "--train-images", f["images"], "--out", root / "r2", "--iters", "1"], []),
        ("checkpoint pointer outside its folder", ["detect", "--checkpoint", outside, *data, "--out", root / "d.parquet"], []),
    ]  # fmt: skip


def digest(paths: list[Path]) -> list[str | None]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None for p in paths]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (default: a temp folder)")
    args = ap.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="bad_inputs_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        f = make_inputs(root)
        twopass = [sys.executable, "-m", "twopass.pipeline.cli"]
        # a detections Parquet for the category-list case
        subprocess.run([*twopass, "detect", "--checkpoint", f["det"], "--images", f["images"], "--ann", f["ann"],
                        "--out", root / "dets.parquet", "--no-fast"], check=True, capture_output=True)  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        counts = {"clear_errors": 0, "tracebacks": 0, "silent": 0, "data_loss": 0}
        rows = cases(root, f)
        width = max(len(c) for c, _, _ in rows)
        print(f"{'case':<{width}}  rc  first line of the message")
        for case, argv, keep in rows:
            before = digest(keep)
            r = subprocess.run([*twopass, *map(str, argv)], capture_output=True, text=True, env=env)
            lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
            if digest(keep) != before:
                verdict = "data_loss"
            elif "Traceback" in r.stderr:
                verdict = "tracebacks"
            elif r.returncode == 0:
                verdict = "silent"
            else:
                verdict = "clear_errors"
            counts[verdict] += 1
            first = next((ln for ln in lines if ln.startswith("twopass")), lines[-1] if lines else "")
            print(f"{case:<{width}}  {r.returncode:>2}  {first[:150]}" + ("" if verdict == "clear_errors" else f"   <- {verdict}"))
        print(f"cases={len(rows)} " + " ".join(f"{k}={v}" for k, v in counts.items()))
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
