"""Hostile inputs through the `twopass` command line: does each one get a clear error?

Every case generates its inputs (a small synthetic set, random-weight checkpoints, damaged
copies of annotations and results), runs one `twopass` command in a subprocess, and is scored:

- clear error: a non-zero exit and one `twopass: error:` line, no traceback; or, for a case
  whose expected class is a message (a warning for what cannot be checked, the notice of a
  failed run that is restarted), a zero exit that prints it;
- traceback: Python's traceback reached the user;
- silent: exit 0 on an input that should have been refused (or without the expected message);
- data loss: a file that was an input changed (compared byte for byte afterwards);
- unexpected: a case whose expected class is a message failed instead.

    python benchmarks/bad_inputs.py [--keep DIR] [--only TEXT]

Last line: cases=<n> clear_errors=<n> tracebacks=<n> silent=<n> data_loss=<n> unexpected=<n>
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
    """A synthetic set, a detector and a segmenter with random weights, results files, an images
    table, a PNG over the decompression-bomb limit, a partial torchvision state dict."""
    import torch
    import yaml
    from PIL import Image

    from twopass.detector.checkpoint import save_checkpoint
    from twopass.pipeline.coco import CocoIndex, ImageSet
    from twopass.pipeline.synth import generate
    from twopass.segmenter.api import KINDS

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
    out["images_table"] = ImageSet.from_folder(out["images"]).write(root / "images.parquet")
    (root / "huge").mkdir()
    Image.new("1", (14000, 14000)).save(root / "huge" / "huge.png")  # 196 Mpx, 24 kB: over PIL's bomb limit
    out["torchvision"] = root / "part.pth"  # enough of a torchvision state dict to reach the categories
    torch.save({"roi_heads.box_predictor.cls_score.weight": torch.zeros(91, 1024)}, out["torchvision"])
    return out


def variant(root: Path, name: str, data, edit: Callable) -> Path:
    """A copy of JSON `data` changed by `edit`, written to root/name."""
    d = copy.deepcopy(data)
    edit(d)
    path = root / name
    path.write_text(json.dumps(d))
    return path


def cases(root: Path, f: dict[str, Path]) -> list[tuple]:
    """(case, twopass arguments, files that must not change[, expected message]): without an
    expected message the case must be refused; with one, it must run and print it."""
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
    image1, image2 = sorted(f["images"].iterdir())[:2]
    det_weights = f["det"].with_suffix(".safetensors")
    dup_yaml = root / "dup.yaml"
    dup_yaml.write_text("".join(f"{i}: {i + 1}\n" for i in range(8)) + "0: 6\n")
    dup_json = root / "dup.json"
    dup_json.write_text("{" + ", ".join(f'"{i}": {i + 1}' for i in range(8)) + ', "0": 6}')
    zero_based = variant(root, "zero_based.json", res, lambda d: [r.__setitem__("category_id", r["category_id"] - 1) for r in d])
    failed = root / "failed_run"  # a training that failed before its first checkpoint
    failed.mkdir()
    (failed / "metrics.jsonl").write_text('{"iter": 1, "loss": 3.9}\n{"iter": 2, "error": "TrainingFailed: loss is nan"}\n')
    bad_id = root / "bad_id.json"
    bad_id.write_text(json.dumps([{"id": "x", "name": "cat"}]))
    train = ["--train-ann", f["ann"], "--train-images", f["images"], "--no-progress"]
    flow = ["flow", "run", "--config", root / "no_config.yaml", "--out", root / "flow_run"]
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
        # issue 25
        ("detect --out is an input image", ["detect", "--checkpoint", f["det"], *data, "--out", image1], [image1]),
        ("segment --coco-json is an input image", ["segment", "--checkpoint", f["seg"], "--detections", f["results"], *data,
                                                   "--out", root / "i4.parquet", "--coco-json", image2], [image2]),
        ("detect --out is the checkpoint in use", ["detect", "--checkpoint", f["det"].parent.parent, *data, "--out", f["det"]],
         [f["det"], det_weights]),
        ("train --overwrite onto the --init run", ["train-detector", "--init", f["det"].parent.parent, *train, "--out",
                                                   f["det"].parent.parent, "--overwrite", "--iters", "1"], [f["det"], det_weights]),
        ("category map: key twice (YAML)", ["fuse", zero_based, "--images", f["ann"], "--category-map", dup_yaml,
                                            "--out", root / "f3.parquet"], []),
        ("category map: key twice (JSON)", ["fuse", zero_based, "--images", f["ann"], "--category-map", dup_json,
                                            "--out", root / "f4.parquet"], []),
        ("fuse JSON: unknown image, images table", ["fuse", root / "i999.json", "--images", f["images_table"],
                                                    "--out", root / "f5.parquet"], []),
        ("fuse JSON only, no --images", ["fuse", root / "c77.json", root / "i999.json", "--out", root / "f6.parquet"], [],
         "twopass: warning:"),
        ("train: loss NaN (--lr 1e30)", ["train-detector", "--config", f["tiny"], *train, "--out", root / "r3", "--iters", "5",
                                         "--lr", "1e30"], []),
        ("config: base_lr 1e6 (diverges)", ["train-detector", "--config", variant(root, "big_lr.yaml", TINY,
                                            lambda d: d.__setitem__("train", {"base_lr": 1e6, "warmup_iters": 0})),
                                            *train, "--out", root / "r4", "--iters", "60"], []),
        ("train: rerun of a failed run", ["train-detector", "--config", f["tiny"], *train, "--out", failed, "--iters", "1"], [],
         "starting again"),
        ("image over the decompression-bomb limit", ["images", root / "huge", "--out", root / "huge.parquet"], []),
        ("--init a segmenter into train-detector", ["train-detector", "--init", f["seg"], *train, "--out", root / "r5",
                                                    "--iters", "1"], []),
        ("import-torchvision: category id 'x'", ["import-torchvision", "--arch", "fasterrcnn_resnet50_fpn", "--weights",
                                                 f["torchvision"], "--categories", bad_id, "--out", root / "tv1"], []),
        ("flow --task-runner gpu", [*flow, "--task-runner", "gpu"], []),
        ("flow --workers -3", [*flow, "--workers", "-3"], []),
        ("flow --workers 0", [*flow, "--workers", "0"], []),
        ("flow --dask-address foo", [*flow, "--task-runner", "dask", "--dask-address", "foo"], []),
    ]  # fmt: skip


def digest(paths: list[Path]) -> list[str | None]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None for p in paths]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (default: a temp folder)")
    ap.add_argument("--only", action="append", default=None, help="run the cases whose name holds this text (repeatable)")
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
        counts = {"clear_errors": 0, "tracebacks": 0, "silent": 0, "data_loss": 0, "unexpected": 0}
        rows = [c for c in cases(root, f) if args.only is None or any(text in c[0] for text in args.only)]
        width = max(len(c[0]) for c in rows)
        print(f"{'case':<{width}}  rc  first line of the message")
        for case, argv, keep, *expected in rows:
            before = digest(keep)
            r = subprocess.run([*twopass, *map(str, argv)], capture_output=True, text=True, env=env)
            lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
            if digest(keep) != before:
                verdict = "data_loss"
            elif "Traceback" in r.stderr:
                verdict = "tracebacks"
            elif expected and r.returncode != 0:
                verdict = "unexpected"
            elif r.returncode == 0:
                verdict = "clear_errors" if expected and expected[0] in r.stdout + r.stderr else "silent"
            else:
                verdict = "clear_errors"
            counts[verdict] += 1
            said = [ln for ln in (r.stdout + r.stderr).splitlines() if expected and expected[0] in ln]
            first = said[0] if said else next((ln for ln in lines if ln.startswith("twopass")), lines[-1] if lines else "")
            print(f"{case:<{width}}  {r.returncode:>2}  {first[:150]}" + ("" if verdict == "clear_errors" else f"   <- {verdict}"))
        print(f"cases={len(rows)} " + " ".join(f"{k}={v}" for k, v in counts.items()))
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
