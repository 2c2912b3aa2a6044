"""OpenMP's wait policy for training on a CPU: ACTIVE (threads spin between parallel regions)
against PASSIVE (they sleep), alone on the machine and with two trainings side by side (as two
parallel flow tasks run), on the demo's models and data.

Each measurement is a fresh process (the policy is read when torch loads) that times `--steps`
training steps of one demo model, batch 4, `--threads` threads, after 2 warm-up steps; "pair"
runs two such processes at once and reports each one's median. The policies alternate round
by round; median and minimum over rounds of each process's median step time.

    python benchmarks/wait_policy.py [--model shufflev2_lsd] [--rounds 2]

Last line: active_alone_speedup=<PASSIVE/ACTIVE alone> active_pair_speedup=<PASSIVE/ACTIVE side by side>
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import statistics, sys, time, torch
from twopass.detector.api import DETECTOR
from twopass.detector.data import IterationBatches
from twopass.flows import demo
from twopass.pipeline.coco import CocoDataset
from twopass.segmenter.api import SEGMENTER
name, data, steps, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
spec = {"r18_fpn": demo.R18_FPN, "shufflev2_lsd": demo.SHUFFLE_LSD, "r18_lsh_seg": demo.SEGMENTER}[name]
kind = SEGMENTER if name == "r18_lsh_seg" else DETECTOR
ds = CocoDataset(f"{data}/annotations.json", f"{data}/images", with_masks=True)
torch.manual_seed(0)
model = kind.build(kind.config(spec), ds.categories.num_classes)
model.train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
batches = IterationBatches(ds, 4, 0, 10**6, seed=1, hflip_prob=0.5)
times = []
for i in range(steps + 2):
    images, targets = batches[i]
    t = time.perf_counter()
    loss = sum(model(images, targets).values())
    opt.zero_grad(); loss.backward(); opt.step()
    times.append(time.perf_counter() - t)
print(statistics.median(times[2:]))
"""


def run(policy: str, n: int, args, data: Path) -> list[float]:
    """n processes at once under `policy`; each one's median step time."""
    env = {**os.environ, "OMP_WAIT_POLICY": policy}
    cmd = [sys.executable, "-c", CHILD, args.model, str(data), str(args.steps), str(args.threads)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(n)]
    return [float(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shufflev2_lsd", choices=["r18_fpn", "shufflev2_lsd", "r18_lsh_seg"])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--difficulty", default="easy")
    args = ap.parse_args()
    from twopass.pipeline.synth import generate

    data = Path(tempfile.mkdtemp(prefix="wait_policy_")) / "train"
    generate(data, 64, 128, 0, difficulty=args.difficulty)
    res: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        for setting, n in (("alone", 1), ("pair", 2)):
            for policy in (("ACTIVE", "PASSIVE") if r % 2 == 0 else ("PASSIVE", "ACTIVE")):
                times = run(policy, n, args, data)
                res.setdefault((setting, policy), []).extend(times)
                print(f"round {r} {setting} {policy}: " + ", ".join(f"{t * 1000:.0f} ms" for t in times), flush=True)
    print(f"{args.model}, batch 4, {args.threads} threads, {os.cpu_count()} cores: median (min) ms a training step")
    med = {}
    for setting in ("alone", "pair"):
        for policy in ("ACTIVE", "PASSIVE"):
            xs = res[(setting, policy)]
            med[(setting, policy)] = statistics.median(xs)
            print(f"  {setting:5s} {policy:7s} {statistics.median(xs) * 1000:7.0f} ({min(xs) * 1000:.0f})")
    a = med[("alone", "PASSIVE")] / med[("alone", "ACTIVE")]
    p = med[("pair", "PASSIVE")] / med[("pair", "ACTIVE")]
    print(f"active_alone_speedup={a:.3f} active_pair_speedup={p:.3f}")


if __name__ == "__main__":
    main()
