"""Detector inference latency on a CPU: this project's resnet50 + two_fc detector against
torchvision's `fasterrcnn_resnet50_fpn`, in one process, 2 threads, one 800x1216 image.

Both sides have the same weights: torchvision's randomly initialised model is built first and
its state dict is loaded into ours (the architectures are the same: ResNet-50 body, FPN
P2..P6, RPN of 3 anchors a position, two fc of 1024, class-specific boxes), so both produce
the same proposals (1000) and the same detections (up to float rounding; checked and printed).
Ours then runs `detector.speed.optimize_for_inference`: BatchNorm folded into the convs,
body + FPN + RPN head channels-last; and its transform skips the no-op resize torchvision
still performs at 800x1216.

The two sides alternate, round after round; median and minimum of each are reported. Then the
achieved GFLOP/s of our model (FLOPs counted by torch.utils.flop_counter over one forward,
divided by our median latency) against a plain float32 matmul's GFLOP/s on the same threads.

A third side runs ours under bf16 autocast (`--precision bf16`), in the same rounds; it gains
only on a CPU with native bfloat16 (AVX512-BF16 or AMX), and the first line says whether this
one has it. (The AP change of bf16 inference on trained models: benchmarks/precision.py.)

    python benchmarks/detector_speed.py [--rounds 5] [--threads 2]

Last line: latency_ratio=<ours / torchvision> gflops_fraction=<model / matmul> bf16_latency_ratio=<ours bf16 / torchvision fp32>
The machine is shared: the sides alternate so both see the same load, but absolute times move.
"""

from __future__ import annotations

import os

# Threads that sleep instead of spinning at OpenMP barriers: on a shared 2-core machine a
# spinning runtime competing with another process slows every op by up to 20x (measured).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from twopass.detector.config import load_config  # noqa: E402
from twopass.detector.model import build_detector  # noqa: E402
from twopass.detector.speed import optimize_for_inference  # noqa: E402
from twopass.pipeline.precision import autocast, cpu_bf16_native  # noqa: E402

H, W = 800, 1216


def torchvision_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision FasterRCNN key names -> this project's (only the box head and predictor move)."""
    out = {}
    for k, v in state.items():
        k = k.replace("roi_heads.box_head.", "roi_heads.box_heads.0.").replace("roi_heads.box_predictor.", "roi_heads.box_predictors.0.")
        out[k] = v
    return out


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.rand(n, n), torch.rand(n, n)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--config", default="r50_fpn", help="our resnet50 + two_fc config")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    torch.manual_seed(0)
    tv = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval()
    cfg = load_config(args.config)
    if cfg.backbone.name != "resnet50" or cfg.box_head.type != "two_fc" or cfg.box_head.cascade_stages != 1:
        raise SystemExit(f"{args.config}: this benchmark compares a resnet50 + two_fc single-stage detector")
    ours = build_detector(cfg, num_classes=90)  # torchvision's 91 outputs include background
    ours.load_state_dict(torchvision_to_ours(tv.state_dict()))
    ours.eval()
    with torch.inference_mode():
        x = [torch.rand(3, H, W, generator=torch.Generator().manual_seed(1))]
        fc = FlopCounterMode(display=False)
        with fc:
            ours(x)
        flops = fc.get_total_flops()
        optimize_for_inference(ours)

        print(f"input 1x3x{H}x{W}, threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
              f"CPU native bf16: {cpu_bf16_native()}")
        print(f"proposals a side: torchvision {tv.rpn.post_nms_top_n()}, ours {ours.rpn.post_nms_top_n()}; "
              f"detections at most {tv.roi_heads.detections_per_img} / {ours.roi_heads.detections_per_img}")
        t_tv, t_ours, t_bf16 = [], [], []

        def bf16():
            with autocast("cpu", "bf16"):
                return ours(x)

        for r in range(args.rounds + 1):  # round 0 warms them up
            a = _timed(lambda: tv(x))
            b = _timed(lambda: ours(x))
            c = _timed(bf16)
            if r > 0:
                t_tv.append(a)
                t_ours.append(b)
                t_bf16.append(c)
            print(f"  round {r}: torchvision {a:.3f} s, ours {b:.3f} s, ratio {b / a:.3f}; ours bf16 {c:.3f} s", flush=True)
        out_tv, out_ours, out_bf16 = tv(x)[0], ours(x)[0], bf16()[0]
    n_tv, n_ours = len(out_tv["boxes"]), len(out_ours["boxes"])
    same = n_tv == n_ours and torch.allclose(out_tv["boxes"], out_ours["boxes"], atol=0.5) and torch.equal(out_tv["labels"], out_ours["labels"])
    diff = (out_tv["boxes"] - out_ours["boxes"]).abs().max().item() if n_tv == n_ours and n_tv else float("nan")
    print(f"detections: torchvision {n_tv}, ours {n_ours}; same boxes and labels: {same} (max box difference {diff:.2e} px)")
    med_tv, med_ours = statistics.median(t_tv), statistics.median(t_ours)
    print(f"torchvision fasterrcnn_resnet50_fpn: median {med_tv:.3f} s, min {min(t_tv):.3f} s")
    print(f"ours ({cfg.name}, folded BN, channels-last): median {med_ours:.3f} s, min {min(t_ours):.3f} s")
    print(f"ratio ours/torchvision: median {med_ours / med_tv:.3f}, min-to-min {min(t_ours) / min(t_tv):.3f}")
    med_bf16 = statistics.median(t_bf16)
    k = min(len(out_bf16["boxes"]), n_ours, 10)
    top = (out_bf16["scores"][:k] - out_ours["scores"][:k]).abs().max().item() if k else float("nan")
    print(f"ours bf16 autocast: median {med_bf16:.3f} s, min {min(t_bf16):.3f} s; ratio to torchvision fp32 {med_bf16 / med_tv:.3f}, "
          f"to ours fp32 {med_bf16 / med_ours:.3f}; {len(out_bf16['boxes'])} detections, top-{k} scores within {top:.1e} of fp32")
    model_gflops = flops / med_ours / 1e9
    mm = matmul_gflops()
    print(f"model: {flops / 1e9:.1f} GFLOP a forward, {model_gflops:.1f} GFLOP/s achieved; plain 2048^2 matmul: {mm:.1f} GFLOP/s")
    print(f"latency_ratio={med_ours / med_tv:.3f} gflops_fraction={model_gflops / mm:.3f} bf16_latency_ratio={med_bf16 / med_tv:.3f}")


if __name__ == "__main__":
    main()
