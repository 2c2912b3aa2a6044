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
