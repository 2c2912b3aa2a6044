"""The pipeline is described once (`flows.steps.SHARD_STEPS`): a step added there runs under
both executors, the plain one and the Prefect flow, with the same outputs and cache keys."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow.compute as pc

from twopass.flows import steps
from twopass.pipeline.runfolder import Planned, computed, data_hash, key_of, read_ledger
from twopass.pipeline.tables import read_table, write_table

MIN_SCORE = 0.05


def keep_plan(run_dir, instances: str, ids: list[int]) -> Planned:
    key = key_of("keep", instances=data_hash(instances), min_score=MIN_SCORE, ids=list(map(int, ids)))
    return Planned(key, Path(run_dir) / "kept" / f"{key}.parquet")


def keep_run(run_dir, instances: str, ids: list[int], plan: Planned | None = None, log=None) -> str:
    """A toy step after pass two: the shard's instances scoring at least MIN_SCORE."""
    plan = plan or keep_plan(run_dir, instances, ids)
    if plan.done(log):
        return str(plan.out)
    t0 = time.perf_counter()
    table, meta = read_table(instances, "instances")
    kept = table.filter(pc.greater_equal(table.column("score"), MIN_SCORE))
    write_table(plan.out, kept, meta)
    return computed(run_dir, plan, t0, log, f"kept {kept.num_rows} of {table.num_rows}", stage="keep", name="kept", rows=kept.num_rows)


KEEP = steps.Step(
    "keep", keep_run, keep_plan,
    args=lambda ctx, label, k: dict(run_dir=ctx.run_dir, instances=ctx.outputs["segment"][ctx.config.segmenter.name][k],
                                    ids=ctx.shard_ids[k]),
    labels=lambda ctx: ["kept"], stage="kept", publish=lambda label: "kept.parquet", task_name=lambda ctx, label: "keep",
)  # fmt: skip


def _keys(run: Path, stage: str) -> set[str]:
    return {e["key"] for e in read_ledger(run) if e["stage"] == stage}


def test_a_step_added_once_runs_in_the_plain_executor_and_in_the_flow(monkeypatch, config, harness, synth_small, ckpts, tmp_path):
    from twopass.flows.plain import two_pass_plain
    from twopass.flows.prefect_flows import two_pass_flow

    monkeypatch.setattr(steps, "SHARD_STEPS", [*steps.SHARD_STEPS, KEEP])  # the one place
    cfg = config(synth_small, ckpts)  # 8 images in 3 shards
    plain, flow = tmp_path / "plain", tmp_path / "flow"
    two_pass_plain(cfg, plain)
    result = two_pass_flow(cfg, str(flow))

    assert len(_keys(plain, "keep")) == 3 and _keys(plain, "keep") == _keys(flow, "keep")
    got, _ = read_table(flow / "outputs" / "kept.parquet", "instances")
    want, _ = read_table(plain / "outputs" / "kept.parquet", "instances")
    assert got.equals(want)
    instances, _ = read_table(flow / "outputs" / "instances.parquet", "instances")
    assert got.num_rows == pc.sum(pc.greater_equal(instances.column("score"), MIN_SCORE)).as_py()
    assert result["outputs"]["kept"] == str(flow / "outputs" / "kept.parquet")
    # A rerun of the flow finds the step's outputs (its cache key) and computes nothing.
    n = len(read_ledger(flow))
    two_pass_flow(cfg, str(flow))
    assert [e["stage"] for e in read_ledger(flow)[n:]] == []


def test_steps_and_the_plain_executor_import_no_prefect():
    import subprocess
    import sys

    code = "import sys, twopass.flows.plain, twopass.flows.steps; print('prefect' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr[-2000:]

