"""benchmarks/ablation.py: the row machinery on a tiny budget (2 rows, 2 iterations) and its
resumability: a rerun computes nothing, a deleted row is recomputed without retraining. The
tests that train and score rows are marked slow (`make test-slow`): they check a benchmark, and
the default suite had reached 10 min 11 s on 2 cores."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "ablation.py"


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("ablation_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_rows_selection_and_configs(ablation):
    names = [r.name for r in ablation.select_rows("baseline,tp_*")]
    assert names[0] == "baseline" and all(n.startswith("tp_") for n in names[1:]) and len(names) == 7
    with pytest.raises(SystemExit):
        ablation.select_rows("no_such_row")
    key = ablation.select_rows("key")  # the slides' key rows: 6 header steps, 9 models
    header = ["baseline", "lsd", "lsd_ms", "heavier", "edge", "lsh"]
    assert [r.name for r in key if r.group == "header"] == header
    assert [r.name for r in key if r.group == "header_gt"] == [f"gt_{n}" for n in header]
    assert [r.name for r in key if r.group == "header_bb"] == [f"bb_{n}" for n in header]
    assert {r.name for r in key if r.group == "detection"} >= {"det_ens_wbf", "det_ens_softnms", "det_ens_nms"}
    assert len({m for r in key for m in r.models}) == 9
    for row in ablation.ROWS:  # every reference and model exists
        assert row.ref is None or row.ref in ablation.ROW_BY_NAME
        assert all(m in ablation.MODELS for m in row.models)
    budget = ablation.BUDGETS["smoke"]
    base = ablation.model_config("seg_baseline", budget)[1].to_dict()
    lsd = ablation.model_config("seg_lsd", budget)[1].to_dict()
    # the rows differ by their switch (and the name) only
    diff = {k for k in base if base[k] != lsd[k]}
    assert diff == {"name", "box_head"}
    assert {k for k in base["box_head"] if base["box_head"][k] != lsd["box_head"][k]} == {"type"}
    # the Light-Head-width rows change the LSD's width and nothing else
    for narrow, wide in (("seg_lsd", "seg_lsd_m64a10"), ("seg_lsh", "seg_lsh_m64a10")):
        n, w = (ablation.model_config(m, budget)[1].to_dict() for m in (narrow, wide))
        assert {k for k in n if n[k] != w[k]} == {"name", "box_head"}
        assert {k: w["box_head"][k] for k in n["box_head"] if n["box_head"][k] != w["box_head"][k]} == {"mid_channels": 64, "alpha": 10}


@pytest.mark.slow  # 10-15 s: the default suite stays under 10 minutes
def test_two_rows_then_resume(ablation, tmp_path):
    budget = ablation.Budget("tiny", train_images=4, val_images=2, iters=2, batch=1, warmup_iters=1, checkpoint_every=2)
    rows = ablation.select_rows("baseline,lsd")
    logs: list[str] = []

    def run():
        return ablation.Ablation(tmp_path, budget, 1, rows, log=logs.append).run()

    first = run()
    assert first["stats"]["rows_computed"] == 2 and first["stats"]["models_trained"] == 2
    assert [r["row"] for r in first["rows"]] == ["baseline", "lsd"]
    lsd = first["rows"][1]
    assert lsd["ref"] == "baseline" and lsd["delta_segm"]["n"] == 1 and lsd["delta_bbox"]["n"] == 1
    assert (tmp_path / "results.md").read_text().count("(`lsd`)") == 1
    assert first["headline"]["baseline_mask_ap"] == first["rows"][0]["segm"]["mean"] / 100
    assert any(line.startswith("[2/2] seed 0 lsd:") and "ETA" in line for line in logs)
    row_files = sorted((tmp_path / "rows").glob("*/seed0.json"))
    stamps = [p.stat().st_mtime_ns for p in row_files]

    second = run()  # everything finished: nothing computed, nothing trained, files untouched
    assert second["stats"] == {"rows_computed": 0, "rows_skipped": 2, "models_trained": 0, "models_reused": 0}
    assert [p.stat().st_mtime_ns for p in row_files] == stamps
    assert second["rows"] == first["rows"]

    # a lost row file and a lost done.json (killed after the last checkpoint): the row is
    # recomputed from the finished checkpoint, nothing is trained again
    (tmp_path / "rows" / "lsd" / "seed0.json").unlink()
    next((tmp_path / "models" / "seed0").glob("seg_lsd-*/done.json")).unlink()
    third = run()
    assert third["stats"]["rows_computed"] == 1 and third["stats"]["models_trained"] == 0
    assert third["rows"][1]["segm"]["per_seed"] == first["rows"][1]["segm"]["per_seed"]


@pytest.mark.slow  # 10-15 s: the default suite stays under 10 minutes
def test_one_seed_of_two_and_the_comparison_picture(ablation, tmp_path):
    from PIL import Image

    budget = ablation.Budget("tiny", train_images=4, val_images=2, iters=2, batch=1, warmup_iters=1, checkpoint_every=2)
    summary = ablation.Ablation(tmp_path, budget, 2, ablation.select_rows("baseline,lsh"), log=lambda _: None, only_seed=1).run()
    assert summary["stats"]["rows_computed"] == 2
    assert [r["seeds"] for r in summary["rows"]] == [[1], [1]]
    assert not (tmp_path / "rows" / "baseline" / "seed0.json").exists()
    assert (tmp_path / "rows" / "lsh" / "seed1.parquet").is_file()
    with Image.open(tmp_path / "comparison.png") as im:  # ground truth | baseline | full header, 128 px enlarged
        assert im.width >= 3 * 4 * 128 and im.height > 4 * 128


@pytest.mark.slow  # 10-15 s: the default suite stays under 10 minutes
def test_baseline_boxes_rows_share_the_baseline_boxes(ablation, tmp_path):
    """header_bb rows: each segmenter's masks on the baseline segmenter's own boxes. The baseline's
    row on its own boxes reproduces its end-to-end masks; another segmenter keeps the boxes."""
    from twopass.pipeline.tables import read_table

    budget = ablation.Budget("tiny", train_images=4, val_images=2, iters=2, batch=1, warmup_iters=1, checkpoint_every=2)
    rows = ablation.select_rows("baseline,bb_baseline,bb_lsh")
    assert [r.name for r in rows] == ["baseline", "bb_baseline", "bb_lsh"]
    assert ablation.ROW_BY_NAME["bb_lsh"].models == ("seg_lsh", "seg_baseline")
    summary = ablation.Ablation(tmp_path, budget, 1, rows, log=lambda _: None).run()
    assert summary["stats"]["models_trained"] == 2 and summary["rows"][2]["ref"] == "bb_baseline"

    def table(row):
        t, _ = read_table(tmp_path / "rows" / row / "seed0.parquet", "instances")
        return t.sort_by([("image_id", "ascending"), ("score", "descending")])

    own, bb, lsh = table("baseline"), table("bb_baseline"), table("bb_lsh")
    assert own.num_rows > 0
    keys = ["image_id", "category_id", "x1", "y1", "x2", "y2", "score"]
    assert bb.select(keys).equals(own.select(keys)) and lsh.select(keys).equals(own.select(keys))
    assert bb.column("mask_counts").to_pylist() == own.column("mask_counts").to_pylist()
    assert lsh.column("mask_counts").to_pylist() != own.column("mask_counts").to_pylist()


def test_learning_curve_points_and_resume(ablation, tmp_path):
    """`--curve`: the baseline trained at a constant LR after warm-up, validated every `every`
    iterations; a rerun reads the finished curve and trains nothing."""
    import json

    budget = ablation.Budget("tiny", train_images=4, val_images=2, iters=2, batch=1, warmup_iters=1, checkpoint_every=2)
    abl = ablation.Ablation(tmp_path, budget, 1, [], log=lambda _: None)
    points = abl.curve("seg_baseline", 4, 2)
    assert [p["iter"] for p in points] == [2, 4]
    assert 0 < points[0]["train_seconds"] < points[1]["train_seconds"]
    run = next((tmp_path / "curves").iterdir())
    lrs = [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert lrs[1:] == [lrs[1]] * 3  # warm-up over, no step down
    stamp = (run / "metrics.jsonl").stat().st_mtime_ns
    curve_stamp = (run / "curve.json").stat().st_mtime_ns
    assert abl.curve("seg_baseline", 4, 2) == points
    assert [(run / f).stat().st_mtime_ns for f in ("metrics.jsonl", "curve.json")] == [stamp, curve_stamp]
