"""A fusion method is one entry of `pipeline.settings.FUSION_METHODS`: a toy method registered
here runs from `twopass fuse` and from the plain two-pass executor, with no other change."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from twopass.ensemble import fusion
from twopass.pipeline.settings import FUSION_METHODS, FuseSettings, FusionMethod
from twopass.pipeline.tables import TableMeta, detections_table, read_table, write_table


def keep_all(flat: fusion.Flat, weights, settings: FuseSettings, by_label: bool = True, **_) -> fusion.Result:
    """The toy method: every box survives, scores times the member's weight."""
    w = np.ones(flat.n_models) if weights is None else weights
    return fusion.Result(flat.boxes, flat.scores * w[flat.model], flat.labels, flat.image, flat.scale)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(FUSION_METHODS, "keep_all", FusionMethod(kernel=keep_all, reference=None, default_iou=0.5, params=()))


def rows(t: pa.Table) -> Counter:
    """Each row as (image, category, score, box) rounded: a multiset to compare tables by."""
    cols = [t.column(c).to_pylist() for c in ("image_id", "category_id", "score", "x1", "y1", "x2", "y2")]
    return Counter((i, c, *(round(float(v), 4) for v in rest)) for i, c, *rest in zip(*cols))


def test_a_registered_method_runs_from_the_cli(toy, tmp_path):
    from twopass.pipeline.cli import app

    from twopass.pipeline.categories import Categories

    cats = Categories((1, 2), ("a", "b"))
    tables = [
        detections_table([1, 1, 2], [1, 2, 1], [0.9, 0.4, 0.7], np.array([[0, 0, 10, 10], [5, 5, 20, 20], [1, 2, 3, 4.0]]), "m0"),
        detections_table([1, 2], [1, 2], [0.8, 0.6], np.array([[0, 0, 11, 10], [2, 2, 8, 9.0]]), "m1"),
    ]
    paths = []
    for i, t in enumerate(tables):
        paths.append(tmp_path / f"m{i}.parquet")
        write_table(paths[-1], t, TableMeta(kind="detections", producer="test", categories=cats))
    out = tmp_path / "fused.parquet"
    r = CliRunner().invoke(app, ["fuse", *map(str, paths), "--method", "keep_all", "--weights", "1,0.5", "--out", str(out)])
    assert r.exit_code == 0, r.output
    fused, meta = read_table(out, "detections")
    assert meta.config["method"] == "keep_all" and meta.config["iou_thr"] == 0.5  # the entry's default IoU
    expected = rows(tables[0]) + rows(tables[1].set_column(2, "score", pa.array([0.4, 0.3], pa.float32())))
    assert rows(fused) == expected
    assert fused.column("source")[0].as_py() == "keep_all:m0+m1"

    r = CliRunner().invoke(app, ["fuse", str(paths[0]), "--method", "keep_al", "--out", str(tmp_path / "g.parquet")])
    assert r.exit_code == 2 and "method: 'keep_al', expected one of ('wbf', 'soft-nms', 'nms', 'keep_all')" in r.output


def test_a_registered_method_runs_from_the_plain_flow(toy, config, synth_small, ckpts, tmp_path):
    from twopass.flows.plain import two_pass_plain

    cfg = config(synth_small, ckpts, fusion={"method": "keep_all"})
    out = two_pass_plain(cfg, tmp_path / "run")
    fused, meta = read_table(out["fused"], "detections")
    assert meta.config["method"] == "keep_all"
    # every box of pass one survives (at most 20 + 40 an image: under the cap of 100)
    every = pa.concat_tables([read_table(p, "detections")[0].select(fused.column_names) for p in out["detections"].values()])
    assert fused.num_rows == every.num_rows > 0
    assert rows(fused) == rows(every)
