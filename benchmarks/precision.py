"""Mixed precision on this CPU: fp32 against bf16 autocast for the demo's three models, training
and inference, both sides in one run.

1. Training speed: the same batches (batch 4, the demo's data), one fp32 step then one bf16
   step, round after round, on one model each side built from the same seed; median and
   minimum s/iteration of each.
2. Accuracy after the same iterations: each model trained `--iters` iterations in fp32 and in
   bf16 (the project's engine, `TrainOptions.precision`) on each seed, then scored on the val
   set in fp32 (box AP; mask AP for the segmenter, end to end).
3. Inference: the fp32-trained model of seed 0 run over the val set by `detect_images` with
   fp32 and with bf16 (alternating, `--infer-rounds` each), the s/image of each and the AP
   change.

    python benchmarks/precision.py [--difficulty easy] [--iters 150] [--seeds 0,1]

Last line: bf16_train_speedup=<sum of the 3 models' fp32 median step times / their bf16 sum>
fp32_mask_ap=<segmenter, mean over seeds> bf16_mask_ap=<same, trained in bf16>
bf16_infer_speedup=<sum of fp32 s/image over the 3 models / bf16 sum>.
bf16 gains only where the CPU computes bfloat16 natively (AVX512-BF16, AMX); the first line
says whether this one does.
"""

from __future__ import annotations

import os

# A lone benchmark on a quiet machine: spinning OpenMP threads are the faster policy there
# (docs/results.md, "Threads"); set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from twopass.detector.api import DETECTOR, detect_images, load_for_inference, train_model, views_of  # noqa: E402
from twopass.detector.data import IterationBatches  # noqa: E402
from twopass.detector.train import Trainer, TrainOptions  # noqa: E402
from twopass.flows.demo import R18_FPN, SEGMENTER, SHUFFLE_LSD, SIZE  # noqa: E402
from twopass.pipeline.coco import CocoDataset, CocoIndex  # noqa: E402
from twopass.pipeline.evaluate import evaluate  # noqa: E402
from twopass.pipeline.precision import cpu_bf16_native  # noqa: E402
from twopass.pipeline.settings import DetectSettings  # noqa: E402
from twopass.pipeline.synth import generate  # noqa: E402
from twopass.segmenter.api import SEGMENTER as SEGMENTER_KIND  # noqa: E402

MODELS = (("r18_fpn", DETECTOR, R18_FPN), ("shufflev2_lsd", DETECTOR, SHUFFLE_LSD), ("r18_lsh_seg", SEGMENTER_KIND, SEGMENTER))


def step_times(kind, spec, dataset, rounds: int) -> dict[str, list[float]]:
    """s/iteration of fp32 and bf16 training steps on the same batches, alternating: one model
    and optimizer stepped by two of the engine's trainers (no hooks), one a precision, each
    reading the same batch stream (round r: batch r in both)."""
    cfg = kind.config(spec)
    torch.manual_seed(0)
    model = kind.build(cfg, dataset.categories.num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    steps = {p: Trainer(model.train(), opt, IterationBatches(dataset, 4, 0, 10**6, seed=123, hflip_prob=0.5), max_iter=10**6,
                        seed=123, precision=p) for p in ("fp32", "bf16")}  # fmt: skip
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for r in range(rounds + 1):
        for precision, trainer in steps.items():
            t = trainer.run_step()["time"]
            if r > 0:  # round 0 warms both up
                times[precision].append(t)
    return times


def score(table, index, with_masks: bool) -> dict[str, float]:
    m = evaluate(index.raw, table, iou_types=("bbox", "segm") if with_masks else ("bbox",), per_category=False)
    return {"box": m["bbox"]["AP"], "mask": m["segm"]["AP"] if with_masks else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--difficulty", default="easy", help="synthetic level of the data (the demo's default: easy)")
    ap.add_argument("--iters", type=int, default=150, help="training iterations of each model, precision and seed")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--rounds", type=int, default=8, help="speed rounds (one fp32 and one bf16 step each)")
    ap.add_argument("--infer-rounds", type=int, default=2, help="inference passes over the val set, each precision")
    ap.add_argument("--train-images", type=int, default=400)
    ap.add_argument("--val-images", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None, help="folder for data and runs (default: a temp folder)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message=".*no native bfloat16.*")  # said once, on the first line
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    work = Path(args.work or tempfile.mkdtemp(prefix="precision_"))
    train_dir, val_dir = work / f"train_{args.difficulty}", work / f"val_{args.difficulty}"
    for d, n, seed in ((train_dir, args.train_images, 0), (val_dir, args.val_images, 1)):
        if not (d / "annotations.json").exists():
            generate(d, n, SIZE, seed, difficulty=args.difficulty)
    dataset = CocoDataset(train_dir / "annotations.json", train_dir / "images", with_masks=True)
    index = CocoIndex.load(val_dir / "annotations.json")
    image_set = index.image_set(val_dir / "images")
    print(f"CPU native bf16: {cpu_bf16_native()}; threads {torch.get_num_threads()}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; "
          f"{args.difficulty} data, {len(dataset)} train / {len(image_set)} val images of {SIZE} px", flush=True)

    step = {"fp32": 0.0, "bf16": 0.0}
    infer = {"fp32": 0.0, "bf16": 0.0}
    mask_ap = {"fp32": [], "bf16": []}
    rows = []
    for name, kind, spec in MODELS:
        t = step_times(kind, spec, dataset, args.rounds)
        med = {p: statistics.median(v) for p, v in t.items()}
        for p in step:
            step[p] += med[p]
        print(f"{name}: train step fp32 median {med['fp32']:.3f} s (min {min(t['fp32']):.3f}), bf16 median {med['bf16']:.3f} s "
              f"(min {min(t['bf16']):.3f}): bf16 {med['fp32'] / med['bf16']:.2f}x", flush=True)
        with_masks = kind is SEGMENTER_KIND
        ap_rows = {}
        for seed in seeds:
            for precision in ("fp32", "bf16"):
                out = work / "runs" / f"{name}_{precision}_s{seed}"
                opts = TrainOptions(out=out, iters=args.iters, batch=4, seed=seed, progress=False, checkpoint_every=10**9,
                                    precision=precision, overwrite=True)  # fmt: skip
                result = train_model(kind, kind.config(spec), train_dir / "annotations.json", train_dir / "images", opts)
                loaded = load_for_inference(kind, result.checkpoint)
                table, _ = detect_images(loaded, image_set, views_of(result.checkpoint, None, False), DetectSettings(),
                                         with_masks=with_masks)  # fmt: skip
                s = score(table, index, with_masks)
                ap_rows[(seed, precision)] = s
                if with_masks:
                    mask_ap[precision].append(s["mask"])
                print(f"  seed {seed} {precision}: {result.iteration} iterations, {result.seconds_per_iter:.3f} s/iter; "
                      f"box AP {s['box']:.3f}" + (f", mask AP {s['mask']:.3f}" if with_masks else ""), flush=True)
        # inference: the fp32-trained model of the first seed, fp32 against bf16 autocast
        loaded = load_for_inference(kind, work / "runs" / f"{name}_fp32_s{seeds[0]}")
        views = views_of(loaded.meta.path, None, False)
        it: dict[str, list[float]] = {"fp32": [], "bf16": []}
        inf_ap = {}
        for _ in range(args.infer_rounds):
            for precision in ("fp32", "bf16"):
                t0 = time.perf_counter()
                table, _ = detect_images(loaded, image_set, views, DetectSettings(precision=precision), with_masks=with_masks)
                it[precision].append((time.perf_counter() - t0) / len(image_set))
                inf_ap[precision] = score(table, index, with_masks)
        for p in infer:
            infer[p] += statistics.median(it[p])
        print(f"  inference s/image fp32 {statistics.median(it['fp32']):.4f}, bf16 {statistics.median(it['bf16']):.4f} "
              f"({statistics.median(it['fp32']) / statistics.median(it['bf16']):.2f}x); box AP fp32 {inf_ap['fp32']['box']:.3f} "
              f"bf16 {inf_ap['bf16']['box']:.3f}" + (f"; mask AP {inf_ap['fp32']['mask']:.3f} / {inf_ap['bf16']['mask']:.3f}" if with_masks else ""),
              flush=True)  # fmt: skip
        rows.append((name, med, ap_rows))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(f"bf16_train_speedup={step['fp32'] / step['bf16']:.3f} fp32_mask_ap={mean(mask_ap['fp32']):.4f} "
          f"bf16_mask_ap={mean(mask_ap['bf16']):.4f} bf16_infer_speedup={infer['fp32'] / infer['bf16']:.3f}")


if __name__ == "__main__":
    main()
