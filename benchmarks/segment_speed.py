"""Pass-two speed: (a) paste + RLE of 100 masks, (b) the whole segmentation pass on 100 given boxes.

References, run in the same process, alternating with ours, 2 threads, random weights,
one 800 x 1216 image:
  (a) torchvision's `paste_masks_in_image` + `> 0.5` + `pycocotools.mask.encode`
      vs `segmenter.paste.paste_and_encode` (outputs must be identical);
  (b) torchvision's full `maskrcnn_resnet50_fpn` (box_score_thresh 0, so its mask head also
      runs on 100 boxes, and its masks pasted and encoded the same way)
      vs our `resnet50` standard-head segmenter's pass on 100 given boxes (`segmenter.infer`).

Then (c) ours again under bf16 autocast beside ours in fp32 (gains only where the CPU has
native bfloat16), with the largest mask-probability difference.

    python benchmarks/segment_speed.py [--repeats 5]

Last line: paste_speedup=<x> segment_pass_ratio=<ours / torchvision> bf16_segment_pass_ratio=<ours bf16 / torchvision fp32>
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torchvision
from pycocotools import mask as mask_utils
from torchvision.models.detection.roi_heads import paste_masks_in_image

from twopass.detector.infer import View
from twopass.detector.speed import optimize_for_inference
from twopass.pipeline.masks import paste_and_encode
from twopass.segmenter.config import SegmenterConfig
from twopass.segmenter.infer import mask_probs
from twopass.segmenter.model import build_segmenter

H, W, N = 800, 1216, 100


def reference_paste(probs: torch.Tensor, boxes: torch.Tensor) -> list[dict]:
    full = paste_masks_in_image(probs[:, None], boxes, (H, W))[:, 0] > 0.5
    return mask_utils.encode(np.asfortranarray(full.permute(1, 2, 0).numpy().astype(np.uint8)))


def alternate(fa, fb, repeats: int) -> tuple[list[float], list[float]]:
    ta, tb = [], []
    for _ in range(repeats):
        for f, t in ((fa, ta), (fb, tb)):
            s = time.perf_counter()
            f()
            t.append(time.perf_counter() - s)
    return ta, tb


def fmt(name: str, t: list[float]) -> str:
    return f"{name:<44} median {statistics.median(t) * 1000:8.1f} ms   min {min(t) * 1000:8.1f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)

    image = torch.rand(3, H, W, generator=g)
    xy = torch.rand(N, 2, generator=g) * torch.tensor([W - 60.0, H - 60.0])
    boxes = torch.cat([xy, xy + 20 + torch.rand(N, 2, generator=g) * 300], 1).clamp(max=torch.tensor([W, H, W, H]))
    labels = torch.randint(1, 81, (N,), generator=g)

    # (a) paste + encode
    probs = torch.nn.functional.avg_pool2d(torch.rand(N, 1, 28, 28, generator=g), 5, 1, 2)[:, 0]
    ta_ref, ta_ours = alternate(lambda: reference_paste(probs, boxes), lambda: paste_and_encode(probs, boxes, (H, W)), args.repeats)
    same = [r["counts"] for r in reference_paste(probs, boxes)] == [r["counts"] for r in paste_and_encode(probs, boxes, (H, W))]
    paste_speedup = statistics.median(ta_ref) / statistics.median(ta_ours)
    print("(a) paste and RLE-encode 100 masks on 800x1216")
    print(fmt("torchvision paste_masks_in_image + encode", ta_ref))
    print(fmt("ours paste_and_encode", ta_ours))
    print(f"    speedup median {paste_speedup:.2f}x, min {min(ta_ref) / min(ta_ours):.2f}x; identical RLE: {same}")

    # (b) the whole pass
    tv = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=81, box_score_thresh=0.0, box_detections_per_img=N,
        min_size=H, max_size=W,
    ).eval()
    cfg = SegmenterConfig.model_validate(
        dict(name="r50_seg", backbone=dict(name="resnet50"), input=dict(test_size=H, max_size=W))
    )
    ours = optimize_for_inference(build_segmenter(cfg, num_classes=80))

    def run_tv():
        with torch.inference_mode():
            out = tv([image])[0]
        m = out["masks"][:, 0] > 0.5  # torchvision already pasted into the full image
        return mask_utils.encode(np.asfortranarray(m.permute(1, 2, 0).numpy().astype(np.uint8)))

    def run_ours(precision: str = "fp32"):
        p = mask_probs(ours, image, boxes, labels, [View(H)], precision)
        return paste_and_encode(p, boxes, (H, W))

    run_tv(), run_ours()  # warm-up: allocator, lazy inits
    n_tv = len(run_tv())
    tb_tv, tb_ours = alternate(run_tv, run_ours, args.repeats)
    ratio = statistics.median(tb_ours) / statistics.median(tb_tv)
    print(f"(b) segmentation pass, 800x1216, 100 boxes, 2 threads (torchvision made {n_tv} masks)")
    print(fmt("torchvision maskrcnn_resnet50_fpn + encode", tb_tv))
    print(fmt("ours r50 standard head on given boxes", tb_ours))
    print(f"    ratio ours/torchvision median {ratio:.3f}, min {min(tb_ours) / min(tb_tv):.3f}")
    run_ours("bf16")
    tc_ours, tc_bf16 = alternate(run_ours, lambda: run_ours("bf16"), args.repeats)
    diff = (mask_probs(ours, image, boxes, labels, [View(H)], "bf16") - mask_probs(ours, image, boxes, labels, [View(H)])).abs().max().item()
    bf16_ratio = statistics.median(tc_bf16) / statistics.median(tb_tv)
    print("(c) ours in bf16 autocast against fp32")
    print(fmt("ours fp32", tc_ours))
    print(fmt("ours bf16", tc_bf16))
    print(f"    bf16/fp32 median {statistics.median(tc_bf16) / statistics.median(tc_ours):.3f}; bf16 / torchvision fp32 {bf16_ratio:.3f}; "
          f"largest mask probability difference {diff:.3f}")
    print(f"paste_speedup={paste_speedup:.2f} segment_pass_ratio={ratio:.3f} bf16_segment_pass_ratio={bf16_ratio:.3f}")


if __name__ == "__main__":
    main()
