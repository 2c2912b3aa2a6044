"""Deployments (prefect.yaml) on a real server: `prefect server start` on 127.0.0.1, a process
work pool, `prefect deploy --all`, a worker, then `segment_flow` and `two_pass_flow` (on 2
threads: shards overlap) run by their deployments to completion. Every process the test starts is stopped (by process group) at the end."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest

import twopass.flows

REPO = Path(twopass.flows.__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group (a Prefect worker may need a second one), then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=10)
            break
        except subprocess.TimeoutExpired:
            continue
    proc.wait()
    for _ in range(100):  # children of the group (uvicorn, flow runs) gone too
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_segment_flow_runs_by_deployment(config, counts, ckpts, synth_small, tmp_path):
    from twopass.pipeline.config import write_pipeline_config

    cfg_path = write_pipeline_config(tmp_path / "pipeline.yaml", config(synth_small, ckpts))
    gt = json.loads((synth_small / "annotations.json").read_text())
    det = tmp_path / "boxes.json"
    det.write_text(json.dumps([{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
                               for a in gt["annotations"]]))  # fmt: skip
    run = tmp_path / "run"

    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    base.update(PREFECT_HOME=str(tmp_path / "prefect_home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env = dict(base, PREFECT_API_URL=api)
    prefect = [sys.executable, "-m", "prefect"]
    logs = tmp_path / "logs"
    logs.mkdir()
    started: list[subprocess.Popen] = []

    def start(args: list[str], name: str, **kw) -> subprocess.Popen:
        out = (logs / f"{name}.log").open("w")
        p = subprocess.Popen(prefect + args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kw)
        started.append(p)
        return p

    def cli(*args: str, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("env", env)
        return subprocess.run(prefect + list(args), capture_output=True, text=True, **kw)

    try:
        server = start(["server", "start", "--host", "127.0.0.1", "--port", str(port)], "server", env=base)
        while True:
            assert server.poll() is None, (logs / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        r = cli("work-pool", "create", "twopass", "--type", "process")
        assert r.returncode == 0, r.stdout + r.stderr
        r = cli("--no-prompt", "deploy", "--all", cwd=REPO, env=dict(env, PWD=str(REPO)))
        assert r.returncode == 0, r.stdout + r.stderr
        for name in ("train/train", "two-pass/two-pass", "segment/segment", "two-pass/two-pass-dask"):
            assert name in r.stdout, r.stdout
        start(["worker", "start", "--pool", "twopass"], "worker", env=dict(env, PREFECT_WORKER_QUERY_SECONDS="2"))
        params = json.dumps({"config": str(cfg_path), "detections": str(det), "run_dir": str(run)})
        r = cli("deployment", "run", "segment/segment", "--params", params, "--watch")
        assert r.returncode == 0 and "Completed" in r.stdout, r.stdout + r.stderr + (logs / "worker.log").read_text()[-3000:]
        assert len(list(run.glob("segment-*/outputs/instances.parquet"))) == 1  # pass two alone: its own subfolder
        assert counts(run) == {"segment": 3, "merge": 1}
        # Every deployment has defaults (a Quick Run needs them), its run folder absolute.
        for name in ("train/train", "two-pass/two-pass", "segment/segment", "two-pass/two-pass-dask"):
            r = cli("deployment", "inspect", name)
            assert r.returncode == 0 and f"'run_dir': '{REPO / 'runs' / 'smoke'}'" in r.stdout, r.stdout
        # The task runner is a parameter: with 2 threads, two shards run at once.
        tp = json.dumps({"config": str(cfg_path), "run_dir": str(tmp_path / "tp"), "task_runner": {"kind": "threads", "workers": 2}})
        r = cli("deployment", "run", "two-pass/two-pass", "--params", tp, "--watch")
        assert r.returncode == 0 and "Completed" in r.stdout, r.stdout + r.stderr + (logs / "worker.log").read_text()[-3000:]
        flow_run = re.search(r"UUID: ([0-9a-f-]{36})", r.stdout).group(1)
        query = json.dumps({"flow_runs": {"id": {"any_": [flow_run]}}}).encode()
        req = urllib.request.Request(f"{api}/task_runs/filter", data=query, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req) as resp:
            task_runs = json.load(resp)
        spans = sorted((datetime.fromisoformat(t["start_time"]), datetime.fromisoformat(t["end_time"]))
                       for t in task_runs if "detect" in t["tags"] and t["start_time"])  # fmt: skip
        assert len(spans) == 6  # 2 detectors x 3 shards
        assert any(b[0] < a[1] for i, a in enumerate(spans) for b in spans[i + 1 :]), spans
        # A bad parameter is refused before any run is created.
        bad = json.loads(params)
        bad["config"] = {"data": {"images": "x"}}
        r = cli("deployment", "run", "segment/segment", "--params", json.dumps(bad))
        assert r.returncode != 0 and "Validation failed for field 'config'" in (r.stdout + r.stderr)
        bad = json.loads(tp)
        bad["task_runner"] = {"kind": "gpu"}
        r = cli("deployment", "run", "two-pass/two-pass", "--params", json.dumps(bad))
        assert r.returncode != 0 and "Validation failed for field 'task_runner" in (r.stdout + r.stderr), r.stdout + r.stderr
    finally:
        for p in reversed(started):
            _stop(p)


@pytest.mark.slow
def test_demo_command_end_to_end_on_a_tiny_budget(tmp_path):
    """`twopass demo` as the README runs it, with a few seconds of training per model."""
    out = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    r = subprocess.run(
        [sys.executable, "-m", "twopass.pipeline.cli", "demo", "--out", str(out), "--train-images", "16", "--val-images", "8", "--budget", "5"],
        capture_output=True, text=True, env=env, cwd=REPO,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for stage in ("detector r18_fpn", "detector shufflev2_lsd", "fused", "final masks"):
        assert stage in r.stdout
    assert f"everything is under {out}" in r.stdout
    assert (out / "report.md").is_file() and (out / "outputs" / "instances.parquet").is_file()
    assert len(list((out / "pictures").glob("*.png"))) == 4
    assert (out / "prefect" / "prefect.db").is_file()  # Prefect's home stayed in the run folder
