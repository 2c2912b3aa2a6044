"""What needs a GPU, checked in one run: mixed-precision training steps, inference speed against
torchvision, and the torchvision import's exactness on CUDA.

1. Training with the project's engine (`TrainOptions(device="cuda", precision=...)`) on
   synthetic data, for each demo model and for ResNet-50-FPN Mask R-CNN at 512 px: fp32, fp16
   (autocast + gradient scaler) and bf16; every loss finite, median s/iteration and the speedup
   over fp32.
2. Inference: torchvision's `maskrcnn_resnet50_fpn` (random weights, nothing downloaded) against
   the same weights imported by `twopass import-torchvision` and run by `detect_images`, fp32,
   alternating, s/image; ours in fp16 and bf16 too.
3. Exactness on CUDA: those two models' boxes (max |difference| px), scores and labels on the
   same images at the test size, and pass two's masks (`segment_images`) on torchvision's boxes
   against torchvision's own masks (fraction of identical pixels).

    python benchmarks/gpu_check.py [--iters 30] [--out DIR]

Last line: gpu=<name> fp16_train_speedup=<> bf16_train_speedup=<> infer_speedup_vs_torchvision=<>
fp16_infer_speedup=<> import_max_box_diff=<px> import_max_score_diff=<> mask_pixel_agreement=<>
(train speedups: the models' summed fp32 step time over the summed fp16 / bf16 time).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import torch
from PIL import Image

from twopass.detector.api import DETECTOR, detect_images, train_model, views_of
from twopass.segmenter.api import load_any
from twopass.detector.importer import ARCHS, import_torchvision
from twopass.detector.train import TrainOptions
from twopass.flows.demo import R18_FPN, SEGMENTER, SHUFFLE_LSD
from twopass.pipeline.coco import ImageSet
from twopass.pipeline.settings import DetectSettings, SegmentSettings
from twopass.pipeline.synth import generate
from twopass.pipeline.tables import boxes_of, detections_table, rles_of
from twopass.segmenter.api import SEGMENTER as SEGMENTER_KIND
from twopass.segmenter.api import segment_images

R50 = {  # Mask R-CNN ResNet-50-FPN, torchvision's heads, at 512 px: a GPU-sized model
    "name": "r50_fpn_mask",
    "backbone": {"name": "resnet50", "trainable_stages": 5},
    "norm": {"backbone": "bn"},
    "mask_head": {"enabled": True},
    "input": {"train_sizes": [512], "test_size": 512, "max_size": 512},
    "train": {"warmup_iters": 5, "base_lr": 0.01},
}
MODELS = (("r18_fpn", DETECTOR, R18_FPN, 4), ("shufflev2_lsd", DETECTOR, SHUFFLE_LSD, 4),
          ("r18_lsh_seg", SEGMENTER_KIND, SEGMENTER, 4), ("r50_fpn_mask@512", DETECTOR, R50, 8))  # fmt: skip


DEVICE = "cuda"  # --device cpu: a dry run of this script where no GPU is (bf16 only, small)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def train_check(work: Path, data: dict[int, Path], iters: int) -> dict[str, float]:
    step = {"fp32": 0.0, "fp16": 0.0, "bf16": 0.0} if DEVICE == "cuda" else {"fp32": 0.0, "bf16": 0.0}
    for name, kind, spec, batch in MODELS:
        size = 512 if "512" in name else 128
        d = data[size]
        line = []
        for precision in step:
            opts = TrainOptions(out=work / "train" / f"{name}_{precision}", iters=iters, batch=batch, device=DEVICE, seed=0,
                                progress=False, checkpoint_every=10**9, precision=precision, overwrite=True)  # fmt: skip
            r = train_model(kind, kind.config(spec), d / "annotations.json", d / "images", opts)
            losses = [h["loss"] for h in r.history]
            finite = all(math.isfinite(x) for x in losses)
            sec = statistics.median(h["time"] for h in r.history[len(r.history) // 3 :])  # after warm-up
            step[precision] += sec
            line.append(f"{precision} {sec * 1000:.1f} ms/iter, loss {losses[0]:.3f} -> {losses[-1]:.3f}{'' if finite else ' NOT FINITE'}")
            if not finite:
                raise SystemExit(f"{name} {precision}: non-finite loss {losses}")
        print(f"train {name} (batch {batch}): " + "; ".join(line), flush=True)
    return {p: step["fp32"] / step.get(p, math.nan) for p in ("fp16", "bf16")}


def import_check(work: Path, rounds: int, size: int) -> dict[str, float]:
    root = work / "images"
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(3)
    for k in range(8):
        Image.fromarray((torch.rand(size, size + 64 * (k % 2), 3, generator=g) * 255).to(torch.uint8).numpy()).save(root / f"{k:02d}.png")
    image_set = ImageSet.from_folder(root)
    torch.manual_seed(0)
    # torchvision's own thresholds and sizes as its builder's arguments (pass one's score threshold)
    tv = ARCHS["maskrcnn_resnet50_fpn"].torchvision_model(
        91, min_size=size, max_size=1333, box_score_thresh=DetectSettings().score_thresh).eval()
    torch.save(tv.state_dict(), work / "tv.pth")
    (work / "cats.json").write_text(json.dumps([{"id": i, "name": f"c{i}"} for i in range(1, 91)]))
    import_torchvision("maskrcnn_resnet50_fpn", work / "tv.pth", work / "run", str(work / "cats.json"), overwrite=True)
    tv = tv.to(DEVICE)
    loaded = load_any(work / "run", DEVICE, fast=False)
    views = views_of(loaded.meta.path, [size], False)
    ids = image_set.image_ids
    images = [image_set.read(i).float().to(DEVICE) / 255 for i in ids]

    def run_tv():
        with torch.inference_mode():
            out = []
            for k in range(0, len(images), 2):
                out += tv(images[k : k + 2])
        sync()
        return out

    def run_ours(precision: str):
        t, _ = detect_images(loaded, image_set, views, DetectSettings(precision=precision), device=DEVICE, with_masks=True)
        sync()
        return t

    times: dict[str, list[float]] = {"torchvision": [], "fp32": [], "bf16": []}
    if DEVICE == "cuda":
        times["fp16"] = []
    run_tv(), run_ours("fp32")  # warm-up
    for _ in range(rounds):
        for side in times:
            t0 = time.perf_counter()
            result = run_tv() if side == "torchvision" else run_ours(side)
            times[side].append((time.perf_counter() - t0) / len(ids))
            if side == "torchvision":
                tv_out = result
            elif side == "fp32":
                ours = result
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"inference s/image (8 images of {size} px, batch 2, with masks): " + ", ".join(f"{k} {v * 1000:.1f} ms (min {min(times[k]) * 1000:.1f})" for k, v in med.items()))
    # exactness: each of torchvision's detections against ours (same label, nearest box)
    box_diff = score_diff = 0.0
    tv_rows = []
    ours_ids = ours.column("image_id").to_numpy()
    for image_id, o in zip(ids, tv_out):
        mine = ours.filter(ours_ids == image_id)
        b, s, lab = boxes_of(mine), mine.column("score").to_numpy(), mine.column("category_id").to_numpy()
        for box, score, label in zip(o["boxes"].cpu().numpy(), o["scores"].cpu().numpy(), o["labels"].cpu().numpy()):
            d = np.abs(b - box).max(1) + np.where(lab == label, 0, np.inf)
            k = int(d.argmin())
            box_diff, score_diff = max(box_diff, float(d[k])), max(score_diff, abs(float(s[k]) - float(score)))
        n = len(o["boxes"])
        tv_rows.append((np.full(n, image_id), o["labels"].cpu().numpy(), o["scores"].cpu().numpy(), o["boxes"].cpu().numpy(), o["masks"].cpu()))
    # pass two on torchvision's boxes against torchvision's own masks
    given = detections_table(np.concatenate([r[0] for r in tv_rows]), np.concatenate([r[1] for r in tv_rows]).astype(np.int32),
                             np.concatenate([r[2] for r in tv_rows]).astype(np.float32), np.concatenate([r[3] for r in tv_rows]).astype(np.float32), "tv")  # fmt: skip
    seg = load_any(work / "run", DEVICE, fast=False)
    inst, _, _ = segment_images(seg, image_set, given, views, SegmentSettings(), device=DEVICE)
    same = total = 0
    rles = rles_of(inst)
    k = 0
    for r in tv_rows:
        for m in r[4]:
            want = (m[0] > 0.5).numpy()
            got = mask_util.decode(rles[k]).astype(bool)
            same += int((want == got).sum())
            total += want.size
            k += 1
    return {"infer_speedup_vs_torchvision": med["torchvision"] / med["fp32"], "fp16_infer_speedup": med["fp32"] / med.get("fp16", math.nan),
            "bf16_infer_speedup": med["fp32"] / med["bf16"], "import_max_box_diff": box_diff, "import_max_score_diff": score_diff,
            "mask_pixel_agreement": same / max(total, 1), "detections": len(given)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=30, help="training iterations of each model and precision")
    ap.add_argument("--rounds", type=int, default=3, help="inference rounds, each side")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of the script")
    ap.add_argument("--size", type=int, default=512, help="image size of the inference and exactness check")
    ap.add_argument("--skip-train", action="store_true")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here")
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    print(f"{gpu}; torch {torch.__version__}; bf16 supported: {DEVICE != 'cuda' or torch.cuda.is_bf16_supported()}", flush=True)
    work = Path(args.out or tempfile.mkdtemp(prefix="gpu_check_"))
    data = {}
    for size, n in ((128, 64), (512, 32)):
        data[size] = work / f"synth{size}"
        if not (data[size] / "annotations.json").exists():
            generate(data[size], n, size, 0, difficulty="easy")
    t = {"fp16": math.nan, "bf16": math.nan} if args.skip_train else train_check(work, data, args.iters)
    i = import_check(work, args.rounds, args.size)
    print(f"exactness on CUDA: {i['detections']} detections, max box difference {i['import_max_box_diff']:.4f} px, "
          f"max score difference {i['import_max_score_diff']:.2e}, mask pixels identical {i['mask_pixel_agreement']:.6f}")
    print(f"gpu={gpu.replace(' ', '_')} fp16_train_speedup={t['fp16']:.3f} bf16_train_speedup={t['bf16']:.3f} "
          f"infer_speedup_vs_torchvision={i['infer_speedup_vs_torchvision']:.3f} fp16_infer_speedup={i['fp16_infer_speedup']:.3f} "
          f"import_max_box_diff={i['import_max_box_diff']:.4f} import_max_score_diff={i['import_max_score_diff']:.2e} "
          f"mask_pixel_agreement={i['mask_pixel_agreement']:.6f}")


if __name__ == "__main__":
    main()
