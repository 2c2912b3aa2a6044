"""The CLI and the pipeline config refuse the same setting values, each naming the field."""

from __future__ import annotations

import sys

import pytest

from twopass.pipeline.config import PipelineConfigError, pipeline_config_from_dict
from twopass.pipeline.settings import FuseSettings, settings_from_options

BASE = {
    "data": {"images": "data/images", "ann": "data/annotations.json"},
    "detectors": [{"name": "a", "model": "r18_fpn_cpu"}],
    "segmenter": {"model": "r18_fpn_cpu"},
}

# (field, its place in the pipeline config, the command, its option, a bad value)
CASES = [
    *[("iou_thr", ("fusion",), "fuse", "--iou-thr", v) for v in ("1.0", "0.0", "-0.2", "nan")],
    *[("skip_box_thr", ("fusion",), "fuse", "--skip-box-thr", v) for v in ("1.5", "-0.1")],
    *[("thresh", ("fusion",), "fuse", "--thresh", v) for v in ("1.01", "-1")],
    *[("sigma", ("fusion",), "fuse", "--sigma", v) for v in ("0", "inf")],
    ("max_per_image", ("fusion",), "fuse", "--max-per-image", "0"),
    *[("score_thresh", ("detectors", 0), "detect", "--score-thresh", v) for v in ("1.5", "-0.01")],
    *[("mask_thresh", ("segmenter",), "segment", "--mask-thresh", v) for v in ("1.0", "0", "5")],
    ("mask_thresh", ("detectors", 0), "detect", "--mask-thresh", "1.0"),  # a segmenter end to end
]

# Every other required option of each command: files that do not exist, since a bad setting
# is refused before any file is looked at.
REQUIRED = {
    "fuse": ["missing.parquet"],
    "detect": ["--checkpoint", "missing.json", "--images", "missing"],
    "segment": ["--checkpoint", "missing.json", "--detections", "missing.parquet", "--images", "missing"],
}


def _yaml_side(where: tuple, field: str, value: float) -> dict:
    d = {k: (list(map(dict, v)) if isinstance(v, list) else dict(v)) for k, v in BASE.items()}
    d.setdefault("fusion", {})
    target = d[where[0]] if len(where) == 1 else d[where[0]][where[1]]
    target[field] = value
    return d


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """`twopass ARGS` through the console entry point, in this process: (exit code, stderr)."""
    from twopass.pipeline import cli

    monkeypatch.setattr(sys, "argv", ["twopass", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("field, where, command, option, bad", CASES, ids=[f"{c[0]}={c[4]}" for c in CASES])
def test_cli_and_pipeline_config_refuse_the_same_values(monkeypatch, capsys, tmp_path, field, where, command, option, bad):
    value = int(bad) if field == "max_per_image" else float(bad)
    with pytest.raises(PipelineConfigError) as e:
        pipeline_config_from_dict(_yaml_side(where, field, value), "pipe.yaml")
    place = ".".join(map(str, where)).replace(".0", "[0]")
    assert f"pipe.yaml: field '{place}.{field}'" in str(e.value)

    out = tmp_path / "out.parquet"
    code, err = run_main(monkeypatch, capsys, command, *REQUIRED[command], "--out", str(out), option, bad)
    assert code == 2, err
    assert err.startswith("twopass: error: ") and len(err.strip().splitlines()) == 1
    assert field in err  # the field's name, as in the pipeline config
    assert "missing" not in err  # refused before any file was looked at
    assert not out.exists()


def test_fuse_settings_from_options_name_each_field_and_choices():
    with pytest.raises(ValueError) as e:
        settings_from_options(FuseSettings, {"method": "mean", "iou_thr": 1.0, "labels": "agnostic"})
    assert str(e.value) == (
        "method: 'mean', expected one of ('wbf', 'soft-nms', 'nms'); iou_thr: 1.0: Input should be less than 1; "
        "labels: 'agnostic', expected one of ('per_label', 'vote')"
    )
    # the values both sides take
    ok = {"method": "soft-nms", "iou_thr": 0.99, "skip_box_thr": 1.0, "thresh": 0.0, "sigma": 0.01}
    assert settings_from_options(FuseSettings, ok) == pipeline_config_from_dict({**BASE, "fusion": ok}).fusion
