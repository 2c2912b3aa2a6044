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


class Server:
    """A real Prefect server on a free loopback port, the project's work pool and deployments
    (`prefect deploy --all` from the repository), and helpers to run the Prefect CLI and start
    workers; every process it starts is stopped when the `with` block ends."""

    def __init__(self, tmp_path: Path):
        self.port = _free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        self.base.update(PREFECT_HOME=str(tmp_path / "prefect_home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
        self.env = dict(self.base, PREFECT_API_URL=self.api)
        self.logs = tmp_path / "logs"
        self.logs.mkdir()
        self.started: list[subprocess.Popen] = []

    def start(self, args: list[str], name: str, **kw) -> subprocess.Popen:
        out = (self.logs / f"{name}.log").open("w")
        p = subprocess.Popen([sys.executable, "-m", "prefect", *args], stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kw)
        self.started.append(p)
        return p

    def cli(self, *args: str, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("env", self.env)
        return subprocess.run([sys.executable, "-m", "prefect", *args], capture_output=True, text=True, **kw)

    def worker(self, name: str = "worker") -> subprocess.Popen:
        return self.start(["worker", "start", "--pool", "twopass"], name, env=dict(self.env, PREFECT_WORKER_QUERY_SECONDS="2"))

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text()[-3000:]

    def request(self, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.api}/{path}", data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req) as resp:
            return json.load(resp)

    def __enter__(self) -> "Server":
        try:
            server = self.start(["server", "start", "--host", "127.0.0.1", "--port", str(self.port)], "server", env=self.base)
            while True:
                assert server.poll() is None, self.log("server")
                try:
                    with urllib.request.urlopen(f"{self.api}/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    time.sleep(0.5)
            r = self.cli("work-pool", "create", "twopass", "--type", "process")
            assert r.returncode == 0, r.stdout + r.stderr
            self.deployed = self.cli("--no-prompt", "deploy", "--all", cwd=REPO, env=dict(self.env, PWD=str(REPO)))
            assert self.deployed.returncode == 0, self.deployed.stdout + self.deployed.stderr
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_) -> None:
        for p in reversed(self.started):
            _stop(p)


def _run_id(stdout: str) -> str:
    return re.search(r"UUID: ([0-9a-f-]{36})", stdout).group(1)


@pytest.mark.slow
def test_segment_flow_runs_by_deployment(config, counts, ckpts, synth_small, tmp_path):
    from twopass.pipeline.config import write_pipeline_config

    cfg_path = write_pipeline_config(tmp_path / "pipeline.yaml", config(synth_small, ckpts))
    gt = json.loads((synth_small / "annotations.json").read_text())
    det = tmp_path / "boxes.json"
    det.write_text(json.dumps([{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
                               for a in gt["annotations"]]))  # fmt: skip
    run = tmp_path / "run"

    with Server(tmp_path) as srv:
        cli = srv.cli
        for name in ("train/train", "two-pass/two-pass", "segment/segment", "two-pass/two-pass-dask"):
            assert name in srv.deployed.stdout, srv.deployed.stdout
        srv.worker()
        params = json.dumps({"config": str(cfg_path), "detections": str(det), "run_dir": str(run)})
        r = cli("deployment", "run", "segment/segment", "--params", params, "--watch")
        assert r.returncode == 0 and "Completed" in r.stdout, r.stdout + r.stderr + srv.log("worker")
        assert len(list(run.glob("segment-*/outputs/instances.parquet"))) == 1  # pass two alone: its own subfolder
        assert counts(run) == {"segment": 3, "merge": 1}
        # Every deployment has defaults (a Quick Run needs them), its run folder absolute.
        for name in ("train/train", "two-pass/two-pass", "segment/segment", "two-pass/two-pass-dask"):
            r = cli("deployment", "inspect", name)
            assert r.returncode == 0 and f"'run_dir': '{REPO / 'runs' / 'smoke'}'" in r.stdout, r.stdout
        # The task runner is a parameter: with 2 threads, two shards run at once.
        tp = json.dumps({"config": str(cfg_path), "run_dir": str(tmp_path / "tp"), "task_runner": {"kind": "threads", "workers": 2}})
        r = cli("deployment", "run", "two-pass/two-pass", "--params", tp, "--watch")
        assert r.returncode == 0 and "Completed" in r.stdout, r.stdout + r.stderr + srv.log("worker")
        task_runs = srv.request("task_runs/filter", {"flow_runs": {"id": {"any_": [_run_id(r.stdout)]}}})
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


@pytest.mark.slow
def test_killed_worker_marks_the_run_crashed_and_a_rerun_reuses_finished_shards(config, ckpts, synth_small, tmp_path):
    """`twopass flow crash-detection` on a real server: the worker and its flow run are killed
    mid-run, the run becomes Crashed (not `Running` forever); one finished shard file is then cut
    short, and a rerun computes it again (with a warning naming it) and the shards the killed run
    had not finished, nothing else."""
    import psutil

    from twopass.pipeline.config import write_pipeline_config
    from twopass.pipeline.runfolder import read_ledger

    cfg_path = write_pipeline_config(tmp_path / "pipeline.yaml", config(synth_small, ckpts, shard_size=1))  # 8 shards
    run = tmp_path / "run"
    params = json.dumps({"config": str(cfg_path), "run_dir": str(run)})
    shard_keys = lambda entries: {(e["stage"], e["name"], e["key"]) for e in entries if e["stage"] in ("detect", "fuse", "segment")}  # noqa: E731

    with Server(tmp_path) as srv:
        r = subprocess.run([sys.executable, "-m", "twopass.pipeline.cli", "flow", "crash-detection", "--silence", "60"],
                           env=srv.env, capture_output=True, text=True)  # fmt: skip
        assert r.returncode == 0 and "become Crashed" in r.stdout, r.stdout + r.stderr
        worker = srv.worker()
        r = srv.cli("deployment", "run", "two-pass/two-pass", "--params", params)
        assert r.returncode == 0, r.stdout + r.stderr
        flow_run = _run_id(r.stdout)
        deadline = time.time() + 300
        while sum(e["stage"] == "detect" for e in read_ledger(run)) < 3:
            assert time.time() < deadline and worker.poll() is None, srv.log("worker")
            time.sleep(0.05)
        for p in [*psutil.Process(worker.pid).children(recursive=True), psutil.Process(worker.pid)]:  # the flow run too
            p.kill()
        killed_at = time.time()
        first = read_ledger(run)
        assert not (run / "outputs" / "instances.parquet").exists(), "the run finished before the kill"
        state = None
        while time.time() - killed_at < 300 and state != "CRASHED":
            time.sleep(5)
            state = srv.request(f"flow_runs/{flow_run}")["state"]["type"]
        assert state == "CRASHED", f"{state} after {time.time() - killed_at:.0f} s"
        print(f"marked Crashed {time.time() - killed_at:.0f} s after the kill")

        # One finished shard file is cut short as a disk that filled would leave it.
        cut = next(e for e in first if e["stage"] == "detect")
        good = Path(cut["output"]).read_bytes()
        Path(cut["output"]).write_bytes(good[: len(good) // 2])

        srv.worker("worker2")
        r = srv.cli("deployment", "run", "two-pass/two-pass", "--params", params, "--watch")
        assert r.returncode == 0 and "Completed" in r.stdout, r.stdout + r.stderr + srv.log("worker2")
    done, second = shard_keys(first), shard_keys(read_ledger(run)[len(first):])
    cut_key = (cut["stage"], cut["name"], cut["key"])
    # the rerun computed the truncated shard again and every shard the killed run had not finished, nothing else
    assert cut_key in second and len(done - second) == len(done) - 1 and len(done | second) == 32
    assert Path(cut["output"]).read_bytes() == good and f"{cut['output']} is unreadable" in (run / "logs" / "prefect.log").read_text()
    assert (run / "outputs" / "instances.parquet").is_file()
