"""`twopass flow example-config`: the demo's config, and a smoke-test variant for a first run."""

from __future__ import annotations

from typer.testing import CliRunner


def test_example_config_and_its_smoke_variant(tmp_path):
    from twopass.pipeline.cli import app
    from twopass.pipeline.config import load_pipeline_config

    for extra, name in (([], "demo"), (["--smoke"], "smoke")):
        out = tmp_path / f"{name}.yaml"
        r = CliRunner().invoke(app, ["flow", "example-config", str(out), "--data", str(tmp_path / "data"), *extra])
        assert r.exit_code == 0, r.output
        cfg = load_pipeline_config(out)
        assert cfg.name == name and cfg.data.ann == (tmp_path / "data" / "val" / "annotations.json").resolve()
    models = [*cfg.detectors, cfg.segmenter]
    assert all(m.train.iters == 10 and m.train.time_budget_s is None and m.tta.scales is None and not m.tta.flip for m in models)


def test_task_runner_options_are_named_before_anything_is_written(monkeypatch, capsys, tmp_path):
    import sys

    import pytest

    from twopass.pipeline import cli as pcli

    out = tmp_path / "run"
    for args, message in (
        (["--task-runner", "gpu"], "--task-runner 'gpu': Input should be 'threads', 'processes' or 'dask'"),
        (["--workers", "-3"], "--workers -3: Input should be greater than or equal to 1"),
        (["--workers", "0"], "--workers 0: Input should be greater than or equal to 1"),
        (["--task-runner", "dask", "--dask-address", "foo"], "--dask-address 'foo': expected tcp://HOST:PORT, got 'foo'"),
        (["--dask-address", "tcp://h:8786"], "--task-runner 'threads' with --dask-address 'tcp://h:8786': dask_address needs kind 'dask'"),
    ):
        for command in (["flow", "run"], ["flow", "train"], ["flow", "detect"]):
            monkeypatch.setattr(sys, "argv", ["twopass", *command, "--config", str(tmp_path / "none.yaml"), "--out", str(out), *args])
            with pytest.raises(SystemExit) as e:
                pcli.main()
            assert e.value.code == 2 and capsys.readouterr().err == f"twopass: error: {message}\n"
            assert not out.exists()  # no OUT/prefect/ left behind
