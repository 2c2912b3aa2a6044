"""Learning curves on a CPU: mask AP against training seconds, from random weights, on the
synthetic `standard` set (128 px), for three models trained one after another in one run:

- ours, full Location Sensitive Header: the segmenter preset `--ours` (r18_lsh_cpu_seg);
- ours, baseline: the Mask R-CNN layout at the same widths, `--baseline` (r18_cpu_seg);
- torchvision: `MaskRCNN(resnet_fpn_backbone("resnet18", trainable_layers=5, BatchNorm2d))`
  with its default heads and RPN, images at their own 128 px (benchmarks/train_speed.py).

Same data, same order, batch, threads and optimiser (the preset's recipe: AdamW, LR scaled
to the batch, warm-up, clipping) for every side. Each trains for `--budget-s` seconds of
training time (a schedule 1.5x what its measured speed allows, so the budget ends it; a
constant LR after warm-up), saving a checkpoint at a fixed iteration period chosen from a
short speed probe so that about `--points` checkpoints fall in the budget. Every checkpoint
is evaluated afterwards on the val set (COCO practice: scores down to 0.001, 100 an image,
each model's own eval path), so evaluation takes none of the training time.

    python benchmarks/learning_curve.py [--budget-s 600] [--points 6] [--out runs/learning_curve]

About an hour on 2 CPU cores at the defaults: 3 x 10 minutes of training, then evaluation,
slowest for torchvision's checkpoints (about 2 minutes each: its eval path pastes up to 100
masks an image at full size).

Writes OUT/curve.json (every point) and OUT/curve.png. Last line:
ours_mask_ap_at_600s=<> torchvision_mask_ap_at_600s=<> ours_s_per_iter=<> torchvision_s_per_iter=<>
(the AP of the checkpoint that ended training, at most one iteration past the budget; the
budget's seconds name the keys).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/train_speed.py

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import mask_ap, stepper, torchvision_reference  # noqa: E402

from twopass.detector.checkpoint import load_weights, read_meta  # noqa: E402
from twopass.detector.infer import EVAL_MAX_PER_IMAGE, EVAL_SCORE_THRESH  # noqa: E402
from twopass.detector.train import TrainOptions, train  # noqa: E402
from twopass.pipeline.coco import CocoDataset  # noqa: E402
from twopass.pipeline.synth import generate  # noqa: E402
from twopass.segmenter.config import load_segmenter_config  # noqa: E402
from twopass.segmenter.model import build_segmenter  # noqa: E402


def probe_speed(build, dataset, tcfg, batch: int, iters: int = 4) -> float:
    """Median seconds of a training iteration (after one warm-up), fresh weights."""
    torch.manual_seed(0)
    steps = stepper(build(), dataset, tcfg, batch, seed=321)
    times = [steps.run_step()["time"] for _ in range(iters + 1)]
    return statistics.median(times[1:])


def scored(cfg):
    """`cfg` with COCO practice's eval thresholds as the model's own (they do not touch training)."""
    box_head = cfg.box_head.model_copy(update={"score_thresh": EVAL_SCORE_THRESH, "detections_per_img": EVAL_MAX_PER_IMAGE})
    return cfg.model_copy(update={"box_head": box_head})


def draw_curves(curves: dict[str, list[dict]], path: Path, budget: float) -> None:
    """Mask AP against training seconds, one polyline per model (PIL: no plotting dependency)."""
    from PIL import Image, ImageDraw

    w, h, m = 640, 400, 50
    top = max([p["mask_ap"] for pts in curves.values() for p in pts] + [0.05])
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    d.rectangle([m, m // 2, w - m // 2, h - m], outline="black")

    def xy(s: float, ap: float) -> tuple[float, float]:
        return m + (w - 1.5 * m) * s / budget, (h - m) - (h - 1.5 * m) * ap / top

    for k in range(5):
        ap = top * k / 4
        d.text((4, xy(0, ap)[1] - 6), f"{ap:.3f}", fill="black")
        s = budget * k / 4
        d.text((xy(s, 0)[0] - 10, h - m + 6), f"{s:.0f}s", fill="black")
    colours = ["#d62728", "#1f77b4", "#7f7f7f"]
    for i, (name, pts) in enumerate(curves.items()):
        line = [xy(0, 0)] + [xy(p["seconds"], p["mask_ap"]) for p in pts]
        d.line(line, fill=colours[i % 3], width=3)
        d.text((m + 10, m // 2 + 8 + 16 * i), name, fill=colours[i % 3])
    d.text((w // 2 - 80, 4), "val mask AP vs training seconds", fill="black")
    im.save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ours", default="r18_lsh_cpu_seg", help="segmenter config with the full Location Sensitive Header")
    ap.add_argument("--baseline", default="r18_cpu_seg", help="baseline segmenter config (Mask R-CNN heads)")
    ap.add_argument("--budget-s", type=float, default=600.0, help="training seconds for each model")
    ap.add_argument("--points", type=int, default=6, help="checkpoints (evaluated) within the budget")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-images", type=int, default=1000)
    ap.add_argument("--val-images", type=int, default=100)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path("runs/learning_curve"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    out = args.out
    data = {}
    for split, n, seed in (("train", args.train_images, 0), ("val", args.val_images, 1)):
        folder = out / "data" / f"{split}{args.size}_{n}"
        if not (folder / "annotations.json").exists():
            generate(folder, n, args.size, seed=seed, difficulty="standard")
        data[split] = folder
    dataset = CocoDataset(data["train"] / "annotations.json", data["train"] / "images", with_masks=True)
    cats = dataset.categories
    ours_cfg, base_cfg = (scored(load_segmenter_config(c)) for c in (args.ours, args.baseline))
    tcfg = ours_cfg.train  # one recipe for every side
    sides = {  # key: (label, build); every model built with COCO practice's eval thresholds
        "ours": (f"ours, full header ({ours_cfg.name})", lambda: build_segmenter(ours_cfg, cats.num_classes)),
        "baseline": (f"ours, baseline ({base_cfg.name})", lambda: build_segmenter(base_cfg, cats.num_classes)),
        "torchvision": ("torchvision Mask R-CNN r18-FPN", lambda: torchvision_reference(
            cats.num_classes, box_score_thresh=EVAL_SCORE_THRESH, box_detections_per_img=EVAL_MAX_PER_IMAGE)),
    }
    print(f"data: {len(dataset)} train / {args.val_images} val standard images of {args.size} px; batch {args.batch}; "
          f"threads {torch.get_num_threads()}; {args.budget_s:.0f} s of training each")

    curves: dict[str, list[dict]] = {}
    speeds: dict[str, float] = {}
    for name, (label, build) in sides.items():
        probe = probe_speed(build, dataset, tcfg, args.batch)
        iters = max(int(args.budget_s / probe * 1.5), 10)
        period = max(1, round(args.budget_s / probe / args.points))
        run = out / "runs" / name
        shutil.rmtree(run, ignore_errors=True)  # a curve is one uninterrupted run
        torch.manual_seed(0)
        model = build()
        opts = TrainOptions(out=run, iters=iters, batch=args.batch, progress=False, checkpoint_every=period,
                            time_budget_s=args.budget_s, seed=0)
        cfg = tcfg.model_copy(update={"warmup_iters": min(tcfg.warmup_iters, iters // 10)})
        t0 = time.perf_counter()
        result = train(model, dataset, opts, cfg, kind="curve", config={"name": label}, categories=cats)
        speeds[name] = result.seconds_per_iter
        seconds, elapsed = {}, 0.0
        for rec in result.history:
            elapsed += rec["time"] + rec["data_time"]
            seconds[rec["iter"]] = elapsed
        print(f"{label}: {result.iteration} iterations, {result.seconds_per_iter:.3f} s/iter (median), "
              f"checkpoint every {period}; {time.perf_counter() - t0:.0f} s wall", flush=True)
        points = []
        for meta_path in sorted((run / "checkpoints").glob("iter_*[0-9].json")):
            meta = read_meta(meta_path)
            load_weights(model, meta)
            m = mask_ap(model, data["val"] / "annotations.json", data["val"] / "images", cats)
            points.append({"iter": meta.iteration, "seconds": round(seconds[meta.iteration], 1),
                           "mask_ap": round(m["segm"]["AP"], 4), "box_ap": round(m["bbox"]["AP"], 4)})
            print(f"  iter {meta.iteration:5d}  {seconds[meta.iteration]:6.0f} s  mask AP {m['segm']['AP']:.3f}  box AP {m['bbox']['AP']:.3f}", flush=True)
        curves[name] = points

    out.mkdir(parents=True, exist_ok=True)
    (out / "curve.json").write_text(json.dumps({"budget_s": args.budget_s, "s_per_iter": speeds, "curves": curves}, indent=1))
    draw_curves({sides[k][0]: v for k, v in curves.items()}, out / "curve.png", args.budget_s)
    print(f"wrote {out / 'curve.json'}, {out / 'curve.png'}")

    def at_budget(name: str) -> float:
        """The AP of the checkpoint that ended training: the first past the budget, by less than an iteration."""
        return curves[name][-1]["mask_ap"] if curves[name] else 0.0

    print(f"{'model':40s} s/iter   mask AP at {args.budget_s:.0f} s   vs torchvision")
    for name, (label, _) in sides.items():
        ref = at_budget("torchvision")
        ratio = f"{at_budget(name) / ref:.1f}x" if ref > 0 else "n/a (torchvision at 0)"
        print(f"{label:40s} {speeds[name]:6.3f}   {at_budget(name):.3f}   {ratio}")
    b = f"{args.budget_s:.0f}"
    print(f"ours_mask_ap_at_{b}s={at_budget('ours'):.4f} torchvision_mask_ap_at_{b}s={at_budget('torchvision'):.4f} "
          f"ours_s_per_iter={speeds['ours']:.3f} torchvision_s_per_iter={speeds['torchvision']:.3f}")


if __name__ == "__main__":
    main()
