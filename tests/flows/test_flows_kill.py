"""A run killed mid-way (SIGKILL to the `twopass flow run` process and its embedded server)
and rerun: the same outputs as an uninterrupted run, and only the unfinished shards computed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from twopass.pipeline.runfolder import read_ledger


def _shard_keys(entries) -> set[tuple[str, str, str]]:
    return {(e["stage"], e["name"], e["key"]) for e in entries if e["stage"] in ("detect", "fuse", "segment")}


def test_sigkill_mid_run_then_rerun_equals_uninterrupted(config, synth_small, ckpts, tmp_path):
    from twopass.pipeline.config import write_pipeline_config
    from twopass.pipeline.tables import read_table

    from twopass.flows.plain import two_pass_plain

    cfg = config(synth_small, ckpts, shard_size=1)  # 8 shards: 16 detections, 8 fusions, 8 segmentations
    cfg_path = write_pipeline_config(tmp_path / "pipeline.yaml", cfg)
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # the embedded server
    env["PREFECT_HOME"] = str(tmp_path / "prefect_home")
    cmd = [sys.executable, "-m", "twopass.pipeline.cli", "flow", "run", "--config", str(cfg_path), "--out", str(run)]
    log = (tmp_path / "killed.log").open("w")
    # Its own process group, so the kill reaches the embedded server's process too.
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=Path.cwd())
    while proc.poll() is None and sum(e["stage"] == "detect" for e in read_ledger(run)) < 3:
        time.sleep(0.02)
    assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    with pytest.raises(ProcessLookupError):  # nothing of the killed run is left running
        for _ in range(100):
            os.killpg(proc.pid, 0)
            time.sleep(0.05)
    first = read_ledger(run)
    assert not (run / "outputs" / "instances.parquet").exists(), "the run finished before the kill"
    done = _shard_keys(first)
    assert 3 <= len(done) < 32

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    second = read_ledger(run)[len(first):]

    reference = tmp_path / "reference"
    two_pass_plain(cfg, reference)  # the same stages, uninterrupted, without Prefect
    expected = _shard_keys(read_ledger(reference))
    assert len(expected) == 32
    # Only the unfinished shards were computed, and together the two runs did exactly the work of one.
    assert done.isdisjoint(_shard_keys(second))
    assert done | _shard_keys(second) == expected
    for name in ("detections_a.parquet", "detections_b.parquet", "fused.parquet", "instances.parquet"):
        kind = "instances" if name.startswith("instances") else "detections"
        got, _ = read_table(run / "outputs" / name, kind)
        want, _ = read_table(reference / "outputs" / name, kind)
        assert got.equals(want), name
