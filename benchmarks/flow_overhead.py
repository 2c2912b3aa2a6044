"""What Prefect costs: two_pass_flow on the embedded server versus the same stage functions
called directly (`flows.plain.two_pass_plain`), on the same small data and models.

Synthetic 128 px images, the demo's two detectors (2 scales x flip each) and segmenter with
random weights (no training: the work per shard is what matters here). Each variant runs in
a fresh run folder, so everything is computed; they alternate, round after round, and each
round's difference counts (median and minimum over --repeats rounds). The embedded server's
start is timed on its own (`get_client()` starts it).

    python benchmarks/flow_overhead.py [--images 48] [--shard-size 16] [--repeats 5]

Last line: overhead_fraction=<median over rounds of (flow - plain) / median plain>, i.e. the
flows' own cost beyond the one-time embedded server start, as a fraction of the plain run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--shard-size", type=int, default=16, help="images a shard (default: the demo's)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--keep", type=Path, default=None, help="Work in this folder and keep it (default: a temp folder).")
    args = ap.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="flow_overhead_"))
    work.mkdir(parents=True, exist_ok=True)
    from twopass.flows.env import configure

    configure(work)  # Prefect's home in the work folder (a new database), passive OpenMP waits

    from twopass.flows.demo import demo_config
    from twopass.pipeline.coco import CocoIndex
    from twopass.pipeline.synth import generate

    # The demo's config on random-weight checkpoints.
    data = work / "data"
    if not (data / "val" / "annotations.json").is_file():
        generate(data / "val", args.images, 128, seed=1)
    categories = CocoIndex.load(data / "val" / "annotations.json").categories
    base = demo_config(data, shard_size=args.shard_size)
    ckpts = {}
    for kind, spec in [("detector", d) for d in base.detectors] + [("segmenter", base.segmenter)]:
        ckpts[spec.name] = str(random_checkpoint(work / "models" / spec.name, kind, spec.model, categories))
    cfg = base.model_copy(update={
        "data": base.data.model_copy(update={"train_ann": None, "train_images": None}),
        "detectors": [d.model_copy(update={"checkpoint": ckpts[d.name]}) for d in base.detectors],
        "segmenter": base.segmenter.model_copy(update={"checkpoint": ckpts[base.segmenter.name]}),
    })  # fmt: skip

    from twopass.detector.api import clear_cache
    from twopass.pipeline.runfolder import read_ledger, shards, stage_counts
    from twopass.flows.plain import two_pass_plain

    n_shards = len(shards(cfg.data))
    members = len(cfg.pass_one())
    n_tasks = n_shards * (members + 2)  # detect per member of pass one, fuse, segment
    print(f"{args.images} images of 128 px in {n_shards} shards of {args.shard_size}: {n_tasks} shard tasks, "
          f"{members + 2} merges, 1 evaluation; {members} models x 4 views in pass one, segmenter x 2 views")  # fmt: skip
    print(f"torch threads: {_torch_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")

    # Warm-up (imports, first-call costs of torch and the models), not timed.
    two_pass_plain(cfg, work / "warmup")

    t = time.perf_counter()
    from twopass.flows.prefect_flows import reach_api, two_pass_flow

    import_s = time.perf_counter() - t
    t = time.perf_counter()
    reach_api()  # starts the embedded server
    server_s = time.perf_counter() - t
    print(f"prefect import (with the flows): {import_s:.1f} s; embedded server start: {server_s:.1f} s")

    plain_times, flow_times = [], []
    for r in range(args.repeats):
        clear_cache()
        t = time.perf_counter()
        two_pass_plain(cfg, work / f"plain{r}")
        plain_times.append(time.perf_counter() - t)
        clear_cache()
        t = time.perf_counter()
        two_pass_flow(cfg, str(work / f"flow{r}"))
        flow_times.append(time.perf_counter() - t)
        print(f"round {r + 1}: plain {plain_times[-1]:.2f} s, flow {flow_times[-1]:.2f} s")
        assert stage_counts(read_ledger(work / f"flow{r}")) == stage_counts(read_ledger(work / f"plain{r}"))

    # Paired per round (the two sides of a round see about the same load), then the median and
    # the minimum over rounds: a shared machine's noise is of the order of the overhead itself.
    paired = sorted(f - p for f, p in zip(flow_times, plain_times))
    med = statistics.median
    plain_med, overhead_med, overhead_min = med(plain_times), med(paired), paired[0]
    print(f"flow - plain per round: {', '.join(f'{d:.2f}' for d in paired)} s")
    print(f"plain functions:            median {plain_med:8.2f} s, min {min(plain_times):8.2f} s")
    print(f"two_pass_flow (embedded):   median {med(flow_times):8.2f} s, min {min(flow_times):8.2f} s  (+ server start {server_s:.2f} s once)")
    print(f"flow overhead beyond start: median {overhead_med:8.2f} s, min {overhead_min:8.2f} s  "
          f"({overhead_med / n_tasks * 1000:.0f} ms per shard task, {overhead_med / n_shards * 1000:.0f} ms per shard; median)")  # fmt: skip
    print(f"overhead fraction: median {overhead_med / plain_med:.4f}, min {overhead_min / plain_med:.4f}")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    print(f"overhead_fraction={overhead_med / plain_med:.4f}")


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def random_checkpoint(folder: Path, kind: str, model: dict, categories) -> Path:
    """A checkpoint of `model` at random weights (seed 0), written once into `folder`."""
    import torch

    from twopass.detector.checkpoint import save_checkpoint
    from twopass.segmenter.api import KINDS

    last = folder / "checkpoints" / "iter_0000000.json"
    if last.is_file():
        return last
    cfg = KINDS[kind].config(model)
    torch.manual_seed(0)
    return save_checkpoint(folder, KINDS[kind].build(cfg, categories.num_classes), kind=kind, config=cfg.to_dict(), categories=categories, iteration=0)


if __name__ == "__main__":
    main()
