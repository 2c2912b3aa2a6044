"""How the cost of a two-pass flow run grows with its size, and what a second Dask worker buys.

The two-pass flow (`two_pass_flow` on the embedded Prefect server, evaluation included) with
tiny models at random weights (two detectors with different heads and a segmenter, ShuffleNetV2
x0.5 with a 16-channel FPN at 96 px, one view each, 20 boxes an image from each detector and from
fusion, the segmenter's own boxes not fused: the growth with size is what matters here, not the
work per image) on synthetic 128 px images, shards of 64:
  1. on 100 and on 1,000 images (a thread task runner of 1 worker, the default), alternating;
  2. on the same 1,000 with a local Dask cluster of 2 single-threaded workers against 1
     (OMP_NUM_THREADS=1 on both sides), alternating.
Each run is a fresh child process with its own run folder and Prefect home, so nothing is
reused and memory starts from zero; the flow's time excludes the embedded server's start.
Peak resident memory is sampled every 0.1 s: of the flow process (where the task runner's
threads live), of the embedded server and of the largest local Dask worker (child processes).

    python benchmarks/flow_scale.py [--sizes 100,1000] [--rounds 2] [--keep DIR]

Last line: per_image_growth=<s/img at 1000 / s/img at 100> rss_growth=<peak flow RSS at 1000 /
at 100> dask_speedup=<1 worker / 2 workers> (medians over rounds).
Goals (issue): per_image_growth <= 1.1, rss_growth <= 1.2, dask_speedup >= 1.6 on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(case: dict) -> None:
    """One flow run (in a fresh process): prints {"seconds": flow time} as its last line."""
    from twopass.flows.env import configure

    configure(case["run_dir"])
    from twopass.flows.prefect_flows import TaskRunnerSpec, reach_api, two_pass_flow
    from twopass.pipeline.config import load_pipeline_config

    cfg = load_pipeline_config(case["config"])
    reach_api()  # the embedded server's start, not timed
    t = time.perf_counter()
    two_pass_flow(cfg, case["run_dir"], task_runner=TaskRunnerSpec(**case["task_runner"]))
    print(json.dumps({"seconds": time.perf_counter() - t}))


def run_case(name: str, config: Path, run_dir: Path, task_runner: dict, threads: int | None) -> dict:
    """Run one case in a child process; its time, and the peak RSS of the flow process, of the
    embedded server and of the largest Dask worker process (MiB)."""
    import psutil

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(run_dir / "prefect")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    case = {"config": str(config), "run_dir": str(run_dir), "task_runner": task_runner}
    proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(case)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    flow_peak = server_peak = worker_peak = 0
    ps = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            flow_peak = max(flow_peak, ps.memory_info().rss)
            for c in ps.children(recursive=True):
                rss = c.memory_info().rss
                if "uvicorn" in " ".join(c.cmdline()):  # the embedded Prefect server
                    server_peak = max(server_peak, rss)
                else:  # a Dask worker process (or its nanny)
                    worker_peak = max(worker_peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.1)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{name}: the flow run failed (rc {proc.returncode}):\n{err[-3000:]}")
    seconds = json.loads(out.strip().splitlines()[-1])["seconds"]
    return {"seconds": seconds, "flow_mib": flow_peak / 2**20, "server_mib": server_peak / 2**20, "worker_mib": worker_peak / 2**20}


def prepare(work: Path, sizes: list[int]) -> dict[int, Path]:
    """Synthetic val data of max(sizes) images, a subset annotations file per size, random-weight
    checkpoints of the demo's models, and a pipeline config per size."""
    from twopass.flows.demo import demo_config
    from twopass.pipeline.coco import CocoIndex
    from twopass.pipeline.config import TTAConfig, write_pipeline_config
    from twopass.pipeline.fileio import read_json, write_json
    from twopass.pipeline.synth import generate

    from flow_overhead import random_checkpoint  # this folder is on sys.path: a benchmark runs as a script

    data = work / "data"
    n = max(sizes)
    if not (data / "val" / "annotations.json").is_file():
        generate(data / "val", n, 128, seed=1)
    full = read_json(data / "val" / "annotations.json")
    categories = CocoIndex.load(data / "val" / "annotations.json").categories
    base = demo_config(data)
    models = {d.name: tiny_model(d.name, d.model["box_head"]["type"]) for d in base.detectors}
    models[base.segmenter.name] = tiny_model(base.segmenter.name, "location_sensitive", mask=True)
    ckpts = {}
    for kind, spec in [("detector", d) for d in base.detectors] + [("segmenter", base.segmenter)]:
        ckpts[spec.name] = str(random_checkpoint(work / "models" / spec.name, kind, models[spec.name], categories))
    configs = {}
    for size in sizes:
        ids = {im["id"] for im in full["images"][:size]}
        ann = data / f"val_{size}.json"
        write_json(ann, {**full, "images": [im for im in full["images"] if im["id"] in ids],
                         "annotations": [a for a in full["annotations"] if a["image_id"] in ids]})  # fmt: skip
        one_view = TTAConfig()
        cfg = base.model_copy(update={
            "data": base.data.model_copy(update={"ann": ann, "train_ann": None, "train_images": None, "shard_size": 64}),
            "detectors": [d.model_copy(update={"model": models[d.name], "checkpoint": ckpts[d.name], "tta": one_view, "max_per_image": 20})
                          for d in base.detectors],
            "fusion": base.fusion.model_copy(update={"max_per_image": 20}),
            "segmenter": base.segmenter.model_copy(update={"model": models[base.segmenter.name], "checkpoint": ckpts[base.segmenter.name],
                                                           "tta": one_view, "own_boxes": None}),
        })  # fmt: skip
        configs[size] = write_pipeline_config(work / f"pipeline_{size}.yaml", cfg)
    return configs


def tiny_model(name: str, head: str, mask: bool = False) -> dict:
    """A tiny model config: ShuffleNetV2 x0.5, 16-channel FPN, 96 px, 32-wide heads."""
    box = {"type": head, "fc_dim": 32, "batch_size_per_image": 16}
    if head == "location_sensitive":
        box.update(kernel_size=3, mid_channels=8, alpha=2)
    return {
        "name": name,
        "backbone": {"name": "shufflenet_v2_x0_5", "fpn_channels": 16, "trainable_stages": 5},
        "norm": {"backbone": "bn"},
        "rpn": {"anchors": {"sizes": [16, 32, 64, 128]}, "pre_nms_top_n_test": 100, "post_nms_top_n_test": 50},
        "box_head": box,
        "input": {"train_sizes": [96], "test_size": 96, "max_size": 128},
        **({"mask_head": {"conv_dim": 16, "num_convs": 2}} if mask else {}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="100,1000", help="two image counts, small,large")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--keep", type=Path, default=None, help="Work in this folder and keep it (default: a temp folder).")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(json.loads(args.child))
    small, large = (int(s) for s in args.sizes.split(","))
    work = args.keep or Path(tempfile.mkdtemp(prefix="flow_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    configs = prepare(work, [small, large])
    print(f"two_pass_flow, tiny models at random weights, one view each, shards of 64, {os.cpu_count()} cores; "
          f"sizes {small} and {large} images, {args.rounds} rounds, sides alternating")  # fmt: skip

    threads1 = {"kind": "threads", "workers": 1}
    cases = {
        f"{small} images": (configs[small], threads1, None),
        f"{large} images": (configs[large], threads1, None),
        f"{large}, dask 1 worker": (configs[large], {"kind": "dask", "workers": 1}, 1),
        f"{large}, dask 2 workers": (configs[large], {"kind": "dask", "workers": 2}, 1),
    }
    results: dict[str, list[dict]] = {name: [] for name in cases}
    for r in range(args.rounds):
        for name, (config, runner, threads) in cases.items():
            run_dir = work / "runs" / f"{name.replace(' ', '_').replace(',', '')}_{r}"
            shutil.rmtree(run_dir, ignore_errors=True)
            res = run_case(name, config, run_dir, runner, threads)
            results[name].append(res)
            n = small if name.startswith(f"{small} ") else large
            print(f"round {r + 1} {name:>22}: {res['seconds']:7.1f} s ({res['seconds'] / n * 1000:6.1f} ms an image), "
                  f"peak RSS flow {res['flow_mib']:6.0f} MiB, server {res['server_mib']:5.0f} MiB, "
                  f"Dask worker {res['worker_mib']:5.0f} MiB", flush=True)  # fmt: skip
            shutil.rmtree(run_dir, ignore_errors=True)

    med = statistics.median

    def stat(name: str, key: str, per: int = 1) -> tuple[float, float]:
        vals = [x[key] / per for x in results[name]]
        return med(vals), min(vals)

    print()
    for name in cases:
        n = small if name.startswith(f"{small} ") else large
        (s_med, s_min), (f_med, _), (v_med, _) = stat(name, "seconds", n), stat(name, "flow_mib"), stat(name, "server_mib")
        w_med = stat(name, "worker_mib")[0]
        print(f"{name:>22}: {s_med * 1000:6.1f} ms an image (min {s_min * 1000:6.1f}), peak RSS flow {f_med:6.0f} MiB, "
              f"server {v_med:5.0f} MiB" + (f", Dask worker {w_med:5.0f} MiB" if w_med else ""))  # fmt: skip
    growth = stat(f"{large} images", "seconds", large)[0] / stat(f"{small} images", "seconds", small)[0]
    rss = stat(f"{large} images", "flow_mib")[0] / stat(f"{small} images", "flow_mib")[0]
    d1, d2 = results[f"{large}, dask 1 worker"], results[f"{large}, dask 2 workers"]
    pairs = sorted(a["seconds"] / b["seconds"] for a, b in zip(d1, d2))
    speedup = stat(f"{large}, dask 1 worker", "seconds")[0] / stat(f"{large}, dask 2 workers", "seconds")[0]
    print(f"dask 1 worker / 2 workers per round: {', '.join(f'{p:.2f}' for p in pairs)}")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    print(f"per_image_growth={growth:.3f} rss_growth={rss:.3f} dask_speedup={speedup:.3f}")


if __name__ == "__main__":
    main()
