"""Training speed and accuracy on a CPU: torchvision's Mask R-CNN (resnet18-FPN, default heads)
against this project's `*_cpu` preset, on synthetic 128 px data, 2 threads.

Reference: torchvision `MaskRCNN(resnet_fpn_backbone("resnet18", norm_layer=BatchNorm2d,
trainable_layers=5), num_classes=9, min_size=128, max_size=128)`: default RPN and RoI heads,
trainable BatchNorm, images at their own 128 px (torchvision's default min_size=800 would
upsample them about 6x and make the reference several times slower still).

1. Seconds an iteration (batch 4): the two sides alternate, round after round (one reference
   iteration, then `--ours-per-round` of ours); median and minimum of each.
2. Accuracy in the same wall-clock budget: each side trains with this project's engine and the
   preset's recipe (same data order, flips and multi-scale sizes are the model's own; optimizer,
   LR scaled to the batch, clipping, a schedule 1.5x as long as its measured speed allows so
   the time budget ends it, warm-up at most a tenth of it) for `--budget-s` seconds of
   training, then the val mask AP (and box AP) of each on a separate synthetic set.

    python benchmarks/train_speed.py [--budget-s 600] [--preset r18_lsd_cpu] [--rounds 5]

Last line: train_speedup=<torchvision s/iter / ours> ours_mask_ap=<ap> torchvision_mask_ap=<ap>
The machine is shared: other processes change both sides' times; the sides alternate so they
see the same conditions, but single numbers still move by tens of percent between runs.
"""

from __future__ import annotations

import os

# Threads that sleep instead of spinning at OpenMP barriers: on a shared 2-core machine a
# spinning runtime competing with another process slows every op by up to 20x (measured).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from twopass.detector.config import load_config  # noqa: E402
from twopass.detector.data import IterationBatches  # noqa: E402
from twopass.detector.model import build_detector  # noqa: E402
from twopass.detector.train import Trainer, TrainOptions, effective_lr, make_optimizer, param_groups, train  # noqa: E402
from twopass.pipeline.coco import CocoDataset, CocoIndex  # noqa: E402
from twopass.pipeline.evaluate import evaluate  # noqa: E402
from twopass.pipeline.synth import generate  # noqa: E402
from twopass.pipeline.tables import detections_table, instances_table  # noqa: E402


def torchvision_reference(num_classes: int, **thresholds) -> torch.nn.Module:
    """torchvision's Mask R-CNN on ResNet-18 FPN at 128 px; `thresholds`: MaskRCNN's own
    keywords (box_score_thresh, box_detections_per_img, ...)."""
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.models.detection.mask_rcnn import MaskRCNN

    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=torch.nn.BatchNorm2d, trainable_layers=5)
    return MaskRCNN(backbone, num_classes=num_classes + 1, min_size=128, max_size=128, **thresholds)


def stepper(model, dataset, tcfg, batch: int = 4, seed: int = 123) -> Trainer:
    """The engine's training step on `model` with the preset's recipe (optimizer, LR scaled to
    the batch, gradient clipping) and no hooks: `run_step()["time"]` is one step's seconds
    (forward, backward, clipping, optimizer step; data loading not counted)."""
    opt = make_optimizer(param_groups(model, tcfg.weight_decay), effective_lr(None, tcfg, batch), tcfg)
    batches = IterationBatches(dataset, batch, 0, 10**6, seed=seed, hflip_prob=0.5)
    return Trainer(model.train(), opt, batches, max_iter=10**6, seed=seed, clip_grad_norm=tcfg.clip_grad_norm)


def measure_speed(ref, ours, dataset, rounds: int, ours_per_round: int, tcfg) -> tuple[list[float], list[float]]:
    """Alternate: one reference iteration, then `ours_per_round` of ours; after one warm-up each.
    Both sides run the engine's step with the preset's recipe."""
    ref_steps, ours_steps = stepper(ref, dataset, tcfg), stepper(ours, dataset, tcfg)
    t_ref, t_ours = [], []
    for r in range(rounds + 1):
        t = ref_steps.run_step()["time"]
        ts = [ours_steps.run_step()["time"] for _ in range(ours_per_round)]
        if r > 0:  # round 0 warms both up
            t_ref.append(t)
            t_ours.extend(ts)
        print(f"  round {r}: torchvision {t:.2f} s/iter, ours {statistics.median(ts):.3f} s/iter", flush=True)
    return t_ref, t_ours


@torch.inference_mode()
def mask_ap(model, ann: Path, images: Path, categories) -> dict:
    """COCO box and mask AP with each model's own eval path (resize, paste masks)."""
    from pycocotools import mask as mask_utils

    index = CocoIndex.load(ann)
    image_set = index.image_set(images)
    model.eval()
    rows, rles = [], []
    for image_id in image_set.image_ids:
        img = image_set.read(image_id).float().div_(255.0)
        out = model([img])[0]
        n = len(out["boxes"])
        if n == 0:
            continue
        masks = (out["masks"][:, 0] > 0.5).numpy().astype(np.uint8)
        rles.extend(mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0))))
        rows.append((np.full(n, image_id), categories.to_category_ids(out["labels"].numpy()), out["scores"].numpy(), out["boxes"].numpy()))
    model.train()
    if not rows:
        return {"segm": {"AP": 0.0}, "bbox": {"AP": 0.0}}
    table = detections_table(
        np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows]), np.concatenate([r[2] for r in rows]),
        np.concatenate([r[3] for r in rows]), "bench",
    )
    return evaluate(index.raw, instances_table(table, rles), per_category=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="r18_lsd_cpu", help="config name in configs/ (a *_cpu preset)")
    ap.add_argument("--budget-s", type=float, default=600.0, help="training seconds for each side (default 10 minutes)")
    ap.add_argument("--rounds", type=int, default=5, help="speed rounds (each: 1 reference iteration, N of ours)")
    ap.add_argument("--ours-per-round", type=int, default=5)
    ap.add_argument("--train-images", type=int, default=400)
    ap.add_argument("--val-images", type=int, default=100)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", type=Path, default=None, help="folder to keep the synthetic sets in (default: a temp folder)")
    ap.add_argument("--skip-ap", action="store_true", help="speed only")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    work = Path(args.data or tempfile.mkdtemp(prefix="train_speed_"))
    train_dir, val_dir = work / f"train{args.size}_{args.train_images}", work / f"val{args.size}_{args.val_images}"
    if not (train_dir / "annotations.json").exists():
        generate(train_dir, args.train_images, args.size, seed=0)
    if not (val_dir / "annotations.json").exists():
        generate(val_dir, args.val_images, args.size, seed=1)
    cfg = load_config(args.preset)
    dataset = CocoDataset(train_dir / "annotations.json", train_dir / "images", with_masks=True)
    cats = dataset.categories
    print(f"data: {len(dataset)} train / {args.val_images} val images of {args.size} px, {cats.num_classes} classes; "
          f"threads {torch.get_num_threads()}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")

    torch.manual_seed(0)
    ref = torchvision_reference(cats.num_classes)
    ours = build_detector(cfg, cats.num_classes)
    print(f"speed: batch 4, torchvision Mask R-CNN r18-FPN default heads vs {cfg.name}")
    t_ref, t_ours = measure_speed(ref, ours, dataset, args.rounds, args.ours_per_round, cfg.train)
    ref_med, ours_med = statistics.median(t_ref), statistics.median(t_ours)
    speedup = ref_med / ours_med
    print(f"torchvision: median {ref_med:.3f} s/iter, min {min(t_ref):.3f}   ({len(t_ref)} iterations)")
    print(f"ours ({cfg.name}): median {ours_med:.3f} s/iter, min {min(t_ours):.3f}   ({len(t_ours)} iterations)")
    print(f"ratio torchvision/ours: median {speedup:.1f}x, min-to-min {min(t_ref) / min(t_ours):.1f}x")

    results = {"ours": float("nan"), "torchvision": float("nan")}
    if not args.skip_ap:
        print(f"accuracy: {args.budget_s:.0f} s of training each, then val AP on {args.val_images} images")
        for name, sec in (("torchvision", ref_med), ("ours", ours_med)):
            torch.manual_seed(0)
            model = torchvision_reference(cats.num_classes) if name == "torchvision" else build_detector(cfg, cats.num_classes)
            # The schedule's length: 1.5x what the measured speed allows, so that the time
            # budget, not the iteration count, ends training even if the machine gets quieter.
            iters = max(int(args.budget_s / sec * 1.5), 10)
            tcfg = cfg.train.model_copy(update={"warmup_iters": min(cfg.train.warmup_iters, iters // 10)})
            opts = TrainOptions(out=work / f"run_{name}", iters=iters, batch=4, progress=False, checkpoint_every=10**9,
                                time_budget_s=args.budget_s, seed=0)
            t0 = time.perf_counter()
            result = train(model, dataset, opts, tcfg, kind=name, config={"name": name}, categories=cats)
            wall = time.perf_counter() - t0
            metrics = mask_ap(model, val_dir / "annotations.json", val_dir / "images", cats)
            results[name] = metrics["segm"]["AP"]
            print(f"  {name}: {result.iteration} iterations in {result.train_seconds:.0f} s training ({wall:.0f} s with checkpoint), "
                  f"final loss {sum(result.losses.values()):.3f}; val mask AP {metrics['segm']['AP']:.3f}, box AP {metrics['bbox']['AP']:.3f}", flush=True)
    print(f"train_speedup={speedup:.2f} ours_mask_ap={results['ours']:.4f} torchvision_mask_ap={results['torchvision']:.4f}")


if __name__ == "__main__":
    main()
