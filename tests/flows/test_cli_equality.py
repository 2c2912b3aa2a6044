"""The CLI and the flows give the same outputs for the same stage and settings: detect, fuse
with Soft-NMS, segment, each with its defaults left alone on both sides (so a default that
drifts between the command and the pipeline config fails here)."""

from __future__ import annotations

import pyarrow as pa
from typer.testing import CliRunner

import twopass.flows  # noqa: F401  (Prefect defaults before Prefect is imported)
from twopass.pipeline.tables import read_table


def cli(*args) -> None:
    from twopass.pipeline.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output


def assert_same_rows(a: pa.Table, b: pa.Table) -> None:
    assert a.num_rows > 0
    assert a.column_names == b.column_names
    for name in a.column_names:
        assert a.column(name).to_pylist() == b.column(name).to_pylist(), name


def test_cli_and_flows_agree(config, harness, synth_small, ckpts, tmp_path):
    from twopass.flows.prefect_flows import detect_flow, fuse_flow, segment_flow

    # one shard, so the flows' merged tables are the CLI's in the same order
    cfg = config(synth_small, ckpts, shard_size=100, fusion={"method": "soft-nms"})
    run = tmp_path / "run"
    data = ["--images", synth_small / "images", "--ann", synth_small / "annotations.json"]

    detections = detect_flow(cfg, str(run))
    cli_det = {}
    for d in cfg.detectors:
        cli_det[d.name] = tmp_path / f"det_{d.name}.parquet"
        tta = ["--tta-scales", ",".join(map(str, d.tta.scales))] if d.tta.scales else []
        cli("detect", "--checkpoint", ckpts[d.name], *data, *tta, *(["--tta-flip"] if d.tta.flip else []),
            "--max-per-image", d.max_per_image, "--name", d.name, "--out", cli_det[d.name])  # fmt: skip
        assert_same_rows(read_table(cli_det[d.name], "detections")[0], read_table(detections[d.name], "detections")[0])

    fused = fuse_flow(cfg, detections, str(run))
    cli_fused = tmp_path / "fused.parquet"
    cli("fuse", *cli_det.values(), "--method", "soft-nms", "--images", synth_small / "annotations.json",
        "--source", "fused:soft-nms", "--out", cli_fused)  # fmt: skip
    fused_table, meta = read_table(fused, "detections")
    assert meta.config["rescore"] is True  # the default of both: Soft-NMS writes the decayed scores
    assert_same_rows(read_table(cli_fused, "detections")[0], fused_table)

    instances = segment_flow(cfg, str(cli_fused), str(run))
    cli_inst = tmp_path / "inst.parquet"
    s = cfg.segmenter
    cli("segment", "--checkpoint", ckpts["seg"], "--detections", cli_fused, *data, "--tta-scales", ",".join(map(str, s.tta.scales)),
        "--tta-flip", "--out", cli_inst)  # fmt: skip
    assert_same_rows(read_table(cli_inst, "instances")[0], read_table(instances, "instances")[0])
