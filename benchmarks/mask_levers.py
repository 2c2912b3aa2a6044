"""Why the demo's masks lag its boxes, lever by lever: the demo's segmenter (full Location
Sensitive Header) and variants of its mask branch, each trained for the demo's segmenter time
budget on the demo's data, on each seed; then scored class-agnostic (labels ignored, so the
masks are compared with their own boxes): box AP, mask AP and their ratio.

Training levers (one model each): 28x28 masks (RoI pool 14 instead of 7), a wider mask head
(64 channels instead of 32), more training positives an image (32 instead of 16).
Inference levers, on the demo's segmenter: the mask threshold (0.3, 0.4, 0.6 against 0.5), mask
TTA (a mirrored view averaged in), and both. Masks come from pass two (`segment_images`) on the model's
own boxes, so box AP is the same within a model and only the masks change.

    python benchmarks/mask_levers.py --data RUN/data [--seeds 0,1] [--budget 216] [--only base,m28]

Resumable: a trained variant (RUN/done.json) is reused. Last line:
base_ratio=<mask/box AP, mean over seeds> best=<lever> best_ratio=<> plus one `<lever>_ratio=` each.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")  # a lone job on a quiet machine (benchmarks/wait_policy.py)

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from twopass.detector.api import detect_images, load_for_inference, train_model, views_of  # noqa: E402
from twopass.detector.infer import make_views  # noqa: E402
from twopass.detector.train import TrainOptions  # noqa: E402
from twopass.flows.demo import SEGMENTER, SHARES  # noqa: E402
from twopass.pipeline.coco import CocoIndex  # noqa: E402
from twopass.pipeline.evaluate import evaluate  # noqa: E402
from twopass.pipeline.settings import DetectSettings, SegmentSettings  # noqa: E402
from twopass.segmenter.api import SEGMENTER as KIND  # noqa: E402
from twopass.segmenter.api import segment_images  # noqa: E402


def variant(**mask) -> dict:
    spec = copy.deepcopy(SEGMENTER)
    spec["mask_head"].update(mask)
    return spec


TRAINED = {"base": variant(), "m28": variant(pool_size=14), "wide64": variant(conv_dim=64), "pos32": variant(max_positives_per_image=32)}
# inference levers on the base model: (mask threshold, flip view)
INFERRED = {"thresh0.3": (0.3, False), "thresh0.4": (0.4, False), "thresh0.6": (0.6, False), "flip_tta": (0.5, True),
            "thresh0.4_flip": (0.4, True)}


def scores(gt: dict, table) -> dict[str, float]:
    m = evaluate(gt, table, per_category=False, class_agnostic=True)
    return {"box": m["bbox"]["AP"], "mask": m["segm"]["AP"], "mask75": m["segm"]["AP75"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="a demo run's data folder (train/, val/)")
    ap.add_argument("--out", type=Path, default=Path("runs/mask_levers"))
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--budget", type=float, default=round(540 * SHARES["r18_lsh_seg"], 1), help="training seconds a model (the demo's)")
    ap.add_argument("--only", default=None, help="comma-separated trained levers (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.only.split(",") if args.only else list(TRAINED)
    train, val = args.data / "train", args.data / "val"
    index = CocoIndex.load(val / "annotations.json")
    image_set = index.image_set(val / "images")
    rows: dict[str, list[dict]] = {}
    for seed in seeds:
        for name in names:
            out = args.out / f"{name}_s{seed}"
            done = out / "done.json"
            if not done.is_file():
                opts = TrainOptions(out=out, iters=100000, batch=4, seed=seed, progress=False, checkpoint_every=10**9,
                                    time_budget_s=args.budget, overwrite=True)  # fmt: skip
                r = train_model(KIND, KIND.config(TRAINED[name]), train / "annotations.json", train / "images", opts)
                done.write_text(json.dumps({"checkpoint": str(r.checkpoint), "iteration": r.iteration, "s_per_iter": r.seconds_per_iter}))
            info = json.loads(done.read_text())
            loaded = load_for_inference(KIND, info["checkpoint"])
            own, _ = detect_images(loaded, image_set, views_of(info["checkpoint"], None, False), DetectSettings())
            test_size = loaded.model.config.input.test_size
            levers = {name: (0.5, False)} | ({k: v for k, v in INFERRED.items()} if name == "base" else {})
            for lever, (thresh, flip) in levers.items():
                inst, _, _ = segment_images(loaded, image_set, own, make_views([test_size], flip), SegmentSettings(mask_thresh=thresh))
                s = scores(index.raw, inst)
                s["iters"] = info["iteration"]
                rows.setdefault(lever, []).append(s)
                print(f"seed {seed} {lever:10s}: {info['iteration']} iters, class-agnostic box AP {s['box']:.3f}, mask AP {s['mask']:.3f} "
                      f"(AP75 {s['mask75']:.3f}), ratio {s['mask'] / max(s['box'], 1e-9):.2f}", flush=True)  # fmt: skip
    print(f"\n{'lever':10s} {'iters':>6s} {'box AP':>8s} {'mask AP':>8s} {'ratio':>6s}  (mean over seeds {seeds}; per seed)")
    ratio = {}
    for lever, rs in rows.items():
        ratio[lever] = statistics.mean(r["mask"] / max(r["box"], 1e-9) for r in rs)
        per = " / ".join(f"{r['mask']:.3f}:{r['box']:.3f}" for r in rs)
        print(f"{lever:10s} {statistics.mean(r['iters'] for r in rs):6.0f} {statistics.mean(r['box'] for r in rs):8.3f} "
              f"{statistics.mean(r['mask'] for r in rs):8.3f} {ratio[lever]:6.2f}  {per}")
    best = max(ratio, key=ratio.get)
    print(" ".join([f"base_ratio={ratio.get('base', float('nan')):.3f}", f"best={best}", f"best_ratio={ratio[best]:.3f}",
                    *(f"{k}_ratio={v:.3f}" for k, v in ratio.items())]))  # fmt: skip


if __name__ == "__main__":
    main()
