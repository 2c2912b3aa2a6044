"""The flows on a real (temporary) Prefect server: what a rerun skips, what a change reruns,
pass two alone, failed shards, parameter validation, artifacts, training, the Dask runner.

One `prefect_test_harness` for the module (about 10 s), then 1-2 s of overhead a flow.
What ran is counted from the run folder's ledger (one line per stage execution that computed)
and from the Prefect states of the task runs (`Cached`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import twopass.flows  # noqa: F401  (Prefect defaults before Prefect is imported)


SHARD_TASKS = ("detect-", "fuse-", "segment-")


def task_states(flow_state, shard_tasks: int) -> dict[str, str]:
    """{task run name: state name} of a flow run, once all its task runs are in final states and
    `shard_tasks` of them are shard tasks.

    The server records task-run states from events, asynchronously: read right after the flow
    returns, some task runs can be missing or still `Running`, so poll (up to 60 s, then return
    what is there and let the caller's assertion show it).
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_filter = FlowRunFilter(id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        for _ in range(300):
            runs = client.read_task_runs(flow_run_filter=flow_filter)
            shards = sum(r.name.startswith(SHARD_TASKS) for r in runs)
            if shards >= shard_tasks and all(r.state is not None and r.state.is_final() for r in runs):
                break
            time.sleep(0.2)
    return {r.name: r.state.name if r.state is not None else "None" for r in runs}


def test_rerun_skips_and_changes_rerun_only_what_they_touch(config, counts, ledger_len, harness, synth_small, ckpts, tmp_path):
    from prefect.artifacts import Artifact

    from twopass.flows.prefect_flows import artifact_key, segment_flow, two_pass_flow
    from twopass.pipeline.runfolder import read_ledger
    from twopass.pipeline.tables import read_table

    run = tmp_path / "run"
    cfg = config(synth_small, ckpts)
    result = two_pass_flow(cfg, str(run))
    # 2 detectors x 3 shards, then per shard a fusion and a segmentation.
    assert counts(run) == {"detect": 6, "fuse": 3, "segment": 3, "merge": 4, "evaluate": 1}
    assert [r["stage"] for r in result["table"]] == ["detector a", "detector b", "detector b + TTA", "fused", "final masks"]
    instances, _ = read_table(run / "outputs" / "instances.parquet", "instances")
    assert sorted(set(instances.column("image_id").to_pylist())) == list(range(1, 9))
    assert (run / "report.md").is_file() and (run / "pictures" / "1.png").is_file() and (run / "logs" / "prefect.log").is_file()
    key = artifact_key("test", run)  # unique per run folder
    table = Artifact.get(f"{key}-ap-per-stage")
    assert table is not None and "final masks" in table.data
    assert all(v is None or round(v, 3) == v for r in result["table"] for k, v in r.items() if "AP" in k)  # 3 decimals
    md = Artifact.get(f"{key}-report")
    assert md is not None and "data:image/jpeg;base64," in md.data

    # evaluate_flow alone on the same files: the cached metrics, the report written again.
    from twopass.flows.prefect_flows import evaluate_flow

    (run / "report.md").unlink()
    ev = evaluate_flow(cfg, result["detections"], result["fused"], result["instances"], run_dir=str(run))
    assert ev["metrics"] == result["metrics"] and ev["table"] == result["table"] and (run / "report.md").is_file()

    # 1. The same run again: nothing computes; every shard task is a Prefect cache hit.
    n = ledger_len(run)
    state = two_pass_flow(cfg, str(run), return_state=True)
    assert state.is_completed() and ledger_len(run) == n
    states = task_states(state, shard_tasks=12)
    shard_tasks = {k: v for k, v in states.items() if k.startswith(SHARD_TASKS)}
    assert len(shard_tasks) == 12 and set(shard_tasks.values()) == {"Cached"}, states

    # 2. Only the fusion settings change: fusion and segmentation rerun, detection does not.
    soft = config(synth_small, ckpts, fusion={"method": "soft-nms"})
    two_pass_flow(soft, str(run))
    assert counts(run, since=n) == {"fuse": 3, "segment": 3, "merge": 2, "evaluate": 1}

    # 3. A deleted output is recomputed (its Prefect record is dropped, not trusted), alone:
    # the same fused content gives the same segmentation key, so pass two is reused.
    n = ledger_len(run)
    fused_shard = Path([e for e in read_ledger(run) if e["stage"] == "fuse"][-1]["output"])  # one the soft-nms run made
    fused_shard.unlink()
    two_pass_flow(soft, str(run))
    assert counts(run, since=n) == {"fuse": 1} and fused_shard.is_file()

    # 4. Pass two alone on a new detections file (ground-truth boxes as a COCO results JSON):
    # only the segmentation stage runs.
    gt = json.loads((synth_small / "annotations.json").read_text())
    det = tmp_path / "new_boxes.json"
    det.write_text(json.dumps([{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
                               for a in gt["annotations"]]))  # fmt: skip
    n = ledger_len(run)
    two_pass_outputs = {p.name: p.read_bytes() for p in (run / "outputs").iterdir()}
    path = segment_flow(cfg, str(det), str(run))
    assert counts(run, since=n) == {"segment": 3, "merge": 1}
    assert read_table(path, "instances")[0].num_rows == len(gt["annotations"])
    # its own subfolder: outputs, evaluation and report; the two-pass run's outputs untouched
    (own,) = run.glob("segment-*")
    assert read_table(own / "outputs" / "instances.parquet", "instances")[0].num_rows == len(gt["annotations"])
    assert (own / "report.md").is_file() and "final masks" in (own / "report.md").read_text()
    assert {p.name: p.read_bytes() for p in (run / "outputs").iterdir()} == two_pass_outputs
    assert segment_flow(cfg, str(det), str(run)) == path and counts(run, since=n) == {"segment": 3, "merge": 1}


def test_corrupt_image_fails_its_shard_and_the_rest_finish(config, copy_data, counts, ledger_len, harness, synth_small, ckpts, tmp_path):
    from twopass.flows.prefect_flows import FlowFailed, two_pass_flow

    data = copy_data(synth_small, tmp_path / "data")
    images = json.loads((data / "annotations.json").read_text())["images"]
    bad = data / "images" / images[4]["file_name"]  # image 5: shard 2 of 3
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) // 3])  # truncated
    cfg = config(data, ckpts)
    run = tmp_path / "run"
    with pytest.raises(FlowFailed) as e:
        two_pass_flow(cfg, str(run))
    message = str(e.value)
    assert f"cannot read image file {bad}" in message
    assert "detect a shard 2/3" in message and "detect b shard 2/3" in message
    # Shards 1 and 3 went through every stage and kept their outputs.
    assert counts(run) == {"detect": 4, "fuse": 2, "segment": 2}
    # Repaired, the rerun computes only shard 2.
    bad.write_bytes(good)
    n = ledger_len(run)
    two_pass_flow(cfg, str(run))
    assert counts(run, since=n) == {"detect": 2, "fuse": 1, "segment": 1, "merge": 4, "evaluate": 1}


def test_prefect_validates_the_config_parameter(config, counts, harness, synth_small, ckpts, tmp_path):
    from prefect.exceptions import ParameterTypeError

    from twopass.flows.prefect_flows import two_pass_flow

    bad = config(synth_small, ckpts).to_dict()
    bad["fusion"]["method"] = "nmw"
    with pytest.raises(ParameterTypeError, match="fusion.method"):
        two_pass_flow(bad, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    good = config(synth_small, ckpts).to_dict()  # a plain mapping (as a deployment sends it) is fine
    good["data"]["shard_size"] = "8"  # coerced to 8: one shard
    from twopass.flows.prefect_flows import detect_flow

    out = detect_flow(good, str(tmp_path / "run"))
    assert set(out) == {"a", "b"} and counts(tmp_path / "run") == {"detect": 2, "merge": 2}


def test_train_flow_trains_once_then_two_pass_finds_the_models(config, counts, ledger_len, ckpts, harness, synth_small, tmp_path):
    from twopass.flows.prefect_flows import train_flow, two_pass_flow

    cfg = config(synth_small, None, shard_size=8, evaluation={"enabled": False, "overlays": 0})
    run = tmp_path / "run"
    ckpts = train_flow(cfg, str(run))
    assert set(ckpts) == {"a", "b", "seg"} and all(Path(p).name == "iter_0000001.json" for p in ckpts.values())
    assert counts(run) == {"train": 3}
    assert train_flow(cfg, str(run)) == ckpts and counts(run) == {"train": 3}
    result = two_pass_flow(cfg, str(run))
    assert counts(run) == {"train": 3, "detect": 2, "fuse": 1, "segment": 1, "merge": 4}
    assert result["table"] == [] and "Not evaluated: `evaluation.enabled` is false" in Path(result["report"]).read_text()
    # the segmenter's own boxes as a third member: only its detection, the fusion, pass two
    # and their merges run; the detectors' shards are reused
    n = ledger_len(run)
    own = config(synth_small, None, shard_size=8, evaluation={"enabled": False, "overlays": 0}, segmenter={"own_boxes": {}})
    result = two_pass_flow(own, str(run))
    assert set(result["detections"]) == {"a", "b", "seg"}
    assert counts(run, since=n) == {"detect": 1, "fuse": 1, "segment": 1, "merge": 3}


# each starts worker processes that import torch and Prefect: ~30-40 s more than threads
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dask", "processes"])
def test_other_task_runners_give_the_same_files(kind, config, counts, harness, synth_small, ckpts, tmp_path):
    if kind == "dask":
        pytest.importorskip("prefect_dask")
    from twopass.flows.prefect_flows import TaskRunnerSpec, detect_flow

    cfg = config(synth_small, ckpts)
    threads = detect_flow(cfg, str(tmp_path / "threads"))
    other = detect_flow(cfg, str(tmp_path / kind), task_runner=TaskRunnerSpec(kind=kind, workers=2))
    assert [Path(p).name for p in other.values()] == [Path(p).name for p in threads.values()]
    assert counts(tmp_path / kind) == {"detect": 6, "merge": 2}


def test_local_dask_workers_are_processes_that_report_to_this_api(harness):
    """Threads of the flow's process would share its interpreter lock (1.29x for 2 workers
    against 1.58x for processes, benchmarks/flow_scale.py); processes without PREFECT_API_URL
    would each start a Prefect server of their own."""
    pytest.importorskip("prefect_dask")
    from prefect.settings import PREFECT_API_URL

    from twopass.flows.prefect_flows import TaskRunnerSpec

    runner = TaskRunnerSpec(kind="dask", workers=2).build()
    kwargs = runner.cluster_kwargs
    assert (kwargs["n_workers"], kwargs["threads_per_worker"], kwargs["processes"]) == (2, 1, True)
    assert kwargs["env"]["PREFECT_API_URL"] == PREFECT_API_URL.value().rstrip("/")
    assert TaskRunnerSpec(kind="dask", dask_address="tcp://h:8786").build().address == "tcp://h:8786"


def test_task_runner_spec_is_checked():
    from pydantic import ValidationError

    from twopass.flows.prefect_flows import TaskRunnerSpec

    assert TaskRunnerSpec.model_validate({"kind": "threads", "workers": "2"}).workers == 2  # as a deployment parameter arrives
    for bad, msg in (({"kind": "gpu"}, "kind"), ({"workers": 0}, "workers"), ({"dask_address": "tcp://h:8786"}, "needs kind 'dask'"),
                     ({"kind": "dask", "dask_address": "h:8786"}, "expected tcp://HOST:PORT")):  # fmt: skip
        with pytest.raises(ValidationError, match=msg):
            TaskRunnerSpec.model_validate(bad)


def test_retries_are_for_failures_that_can_pass():
    """Prefect retries a task after an I/O error or a lost worker, never after a data error."""
    from prefect.states import Failed

    from twopass.flows.tasks import transient
    from twopass.pipeline.coco import DataError

    def state(e):
        return Failed(data=e)

    assert transient(None, None, state(OSError(5, "Input/output error", "x.parquet")))
    assert transient(None, None, state(RuntimeError("worker lost")))
    for e in (DataError("a.json: annotation 3 has bad bbox"), ValueError("bad"), FileNotFoundError(2, "missing", "x")):
        assert not transient(None, None, state(e))

def test_no_retry_for_failures_a_retry_repeats_and_a_failed_training_is_named():
    """A non-finite or diverging loss, out of memory, a full disk: deterministic, failed at once."""
    from types import SimpleNamespace

    from prefect.states import Failed

    from twopass.detector.train import TrainingFailed
    from twopass.flows.prefect_flows import FlowFailed, Shards, _finish
    from twopass.flows.tasks import transient

    loss = TrainingFailed("runs/x/models/a: iteration 2: loss is nan ({}); lower --lr")
    for e in (loss, FloatingPointError("nan"), MemoryError(), RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"),
              OSError(28, "No space left on device", "x.safetensors")):  # fmt: skip
        assert not transient(None, None, Failed(data=e)), e
    shards = Shards()
    shards.add("train a", SimpleNamespace(wait=lambda: None, state=Failed(data=loss)))
    with pytest.raises(FlowFailed) as e:
        _finish(shards, "train_flow", "training")
    assert str(e.value).startswith("train_flow: 1 training(s) failed (the other trainings finished")
    assert str(e.value).splitlines()[-1] == f"  train a: TrainingFailed: {loss}"

