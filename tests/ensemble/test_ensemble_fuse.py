"""`fuse` on detections tables and the `twopass fuse` command."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest
import typer
from typer.testing import CliRunner

from twopass.ensemble import fuse, nms, soft_nms, weighted_boxes_fusion
from twopass.ensemble.cli import register
from twopass.ensemble.synthetic import detections
from twopass.pipeline.categories import Categories
from twopass.pipeline.tables import (
    TableMeta,
    boxes_of,
    detections_table,
    images_table,
    instances_table,
    read_table,
    to_coco_results,
    write_table,
)

SIZES = {1: (480.0, 640.0), 2: (300.0, 200.0), 5: (480.0, 640.0), 9: (100.0, 100.0)}
CATEGORIES = Categories(tuple(range(1, 9)), tuple(f"c{i}" for i in range(1, 9)))


def model_tables(seed: int = 0, n_models: int = 3, n_boxes: int = 120) -> list[pa.Table]:
    """One table per model over the images of SIZES; model 2 finds nothing on image 9."""
    rng = np.random.default_rng(seed)
    parts: list[list] = [[] for _ in range(n_models)]
    for image_id, size in SIZES.items():
        boxes, scores, labels = detections(rng, n_models, n_boxes, len(CATEGORIES.ids), size)
        for m in range(n_models):
            keep = slice(0, 0) if (m == 2 and image_id == 9) else slice(None)
            parts[m].append((image_id, boxes[m][keep], scores[m][keep], labels[m][keep] + 1))
    return [
        detections_table(
            np.concatenate([np.full(len(b), i) for i, b, _, _ in p]),
            np.concatenate([lab for _, _, _, lab in p]),
            np.concatenate([s for _, _, s, _ in p]),
            np.concatenate([b for _, b, _, _ in p]),
            f"model{m}",
        )
        for m, p in enumerate(parts)
    ]


def columns(t: pa.Table) -> dict[str, np.ndarray]:
    return {c: t.column(c).to_numpy() for c in ("image_id", "category_id", "score", "x1", "y1", "x2", "y2")}


def assert_tables_equal(a: pa.Table, b: pa.Table, tol: float = 1e-4) -> None:
    ca, cb = columns(a), columns(b)
    assert a.num_rows == b.num_rows
    for c in ("image_id", "category_id"):
        np.testing.assert_array_equal(ca[c], cb[c])
    for c in ("score", "x1", "y1", "x2", "y2"):
        np.testing.assert_allclose(ca[c], cb[c], rtol=0, atol=tol)


# --------------------------------------------------------------------------- fuse


@pytest.mark.parametrize(
    "method, params",
    [
        ("wbf", {}),
        ("wbf", dict(conf_type="box_and_model_avg", weights=[2, 1, 1], iou_thr=0.6)),
        # ensemble_boxes returns the input scores: compared without the (default) rescoring
        ("soft-nms", dict(rescore=False)),
        ("soft-nms", dict(decay="linear", weights=[1, 2, 1], thresh=0.1, rescore=False)),
        ("nms", dict(iou_thr=0.4)),
    ],
)
def test_fuse_matches_reference_image_by_image(method, params):
    tables = model_tables()
    kwargs = dict(image_sizes=SIZES, max_per_image=None, **params)
    ours = fuse(tables, method, **kwargs)
    ref = fuse(tables, method, backend="ensemble_boxes", **kwargs)
    assert ours.num_rows > 100
    assert_tables_equal(ours, ref)


def test_fuse_is_the_per_image_function():
    """An image of the table fused alone by `weighted_boxes_fusion` gives the same rows."""
    tables = model_tables(seed=1)
    fused = fuse(tables, "wbf", image_sizes=SIZES, max_per_image=None)
    image = 2
    per_model = [t.filter(pa.compute.equal(t.column("image_id"), image)) for t in tables]
    b, s, lab = weighted_boxes_fusion(
        [boxes_of(t) for t in per_model],
        [t.column("score").to_numpy() for t in per_model],
        [t.column("category_id").to_numpy() for t in per_model],
        SIZES[image],
    )
    mine = fused.filter(pa.compute.equal(fused.column("image_id"), image))
    assert mine.num_rows == len(b) > 0
    np.testing.assert_allclose(mine.column("score").to_numpy(), s, atol=1e-6)
    np.testing.assert_array_equal(mine.column("category_id").to_numpy(), lab)
    np.testing.assert_allclose(boxes_of(mine), b, atol=1e-3)  # float32 table, pixels


def test_fuse_output_contract():
    tables = model_tables()
    fused = fuse(tables, "soft-nms", image_sizes=SIZES, max_per_image=7, rescore=True)
    ids = fused.column("image_id").to_numpy()
    scores = fused.column("score").to_numpy()
    assert sorted(set(ids.tolist())) == sorted(SIZES)
    assert np.bincount(ids).max() == 7
    assert (np.diff(ids) >= 0).all()
    for i in SIZES:  # score descending within an image
        assert (np.diff(scores[ids == i]) <= 0).all()
    assert set(fused.column("source").to_pylist()) == {"soft-nms:model0+model1+model2"}
    assert fuse(tables, "nms", source="ens").column("source")[0].as_py() == "ens"
    # Labels survive: every output category is an input category of the same image.
    cats_in = {pair for t in tables for pair in zip(t.column("image_id").to_pylist(), t.column("category_id").to_pylist())}
    assert set(zip(ids.tolist(), fused.column("category_id").to_pylist())) <= cats_in


def test_fuse_groups_by_source_not_by_table():
    """Two views of one model in one table are two members; split over tables, the same fusion."""
    a, b, c = model_tables(seed=2)
    b_as_view = b.set_column(b.schema.get_field_index("source"), "source", pa.array(["model0:flip"] * b.num_rows))
    together = fuse([pa.concat_tables([a, b_as_view]), c], "wbf", image_sizes=SIZES)
    apart = fuse([a, b_as_view, c], "wbf", image_sizes=SIZES)
    assert_tables_equal(together, apart, tol=0)
    assert together.column("source")[0].as_py() == "wbf:model0+model0:flip+model2"
    merged = fuse([pa.concat_tables([a, b])], "wbf", image_sizes=SIZES)  # same source: one member
    assert merged.column("source")[0].as_py() == "wbf:model0+model1"


def test_fuse_weights():
    tables = model_tables()
    by_table = fuse(tables, "wbf", weights=[3, 1, 1], image_sizes=SIZES)
    by_source = fuse(tables, "wbf", weights={"model0": 3, "model1": 1, "model2": 1}, image_sizes=SIZES)
    assert_tables_equal(by_table, by_source, tol=0)
    assert not np.allclose(fuse(tables, "wbf", image_sizes=SIZES).column("score").to_numpy()[:50],
                           by_table.column("score").to_numpy()[:50])  # fmt: skip
    with pytest.raises(ValueError, match="weights: 2 weights for 3 inputs"):
        fuse(tables, "wbf", weights=[1, 2])
    with pytest.raises(ValueError, match=r"no weight for sources \['model2'\]"):
        fuse(tables, "wbf", weights={"model0": 1, "model1": 1})
    with pytest.raises(ValueError, match="'model0' is in two inputs with different weights"):
        fuse([tables[0], tables[0]], "wbf", weights=[1, 2])


def test_fuse_image_sizes():
    tables = model_tables()
    sizes_table = images_table(list(SIZES), [f"{i}.png" for i in SIZES], [int(h) for h, _ in SIZES.values()],
                               [int(w) for _, w in SIZES.values()])  # fmt: skip
    assert_tables_equal(fuse(tables, "wbf", image_sizes=SIZES), fuse(tables, "wbf", image_sizes=sizes_table), tol=0)
    with pytest.raises(ValueError, match="no size for image_id 9"):
        fuse(tables, "wbf", image_sizes={k: v for k, v in SIZES.items() if k != 9})
    # Without sizes nothing is clipped at the right or bottom: a box beyond 640 px stays there.
    wide = detections_table([1, 1], [1, 1], [0.9, 0.8], np.array([[600, 10, 700, 50], [602, 11, 701, 52]]), "m")
    assert fuse([wide], "wbf").column("x2")[0].as_py() > 690
    assert fuse([wide], "wbf", image_sizes={1: (480, 640)}).column("x2")[0].as_py() == 640


def test_fuse_empty_inputs_give_empty_output():
    empty = detections_table([], [], [], np.zeros((0, 4)), "m")
    for method in ("wbf", "soft-nms", "nms"):
        out = fuse([empty, empty], method, weights=[1, 2])
        assert out.num_rows == 0 and out.schema.names[:3] == ["image_id", "category_id", "score"]


def test_fuse_takes_instances_tables():
    t = model_tables(n_models=1)[0].slice(0, 5)
    rle = {"size": [4, 4], "counts": "04"}
    inst = instances_table(t, [rle] * t.num_rows)
    assert_tables_equal(fuse([inst], "nms"), fuse([t], "nms"), tol=0)


@pytest.mark.parametrize(
    "column, value, method, message",
    [
        ("x2", np.nan, "nms", r"m1\.parquet: field 'x2' is nan at row 3 \(image_id 1\)"),
        ("score", np.inf, "wbf", r"m1\.parquet: field 'score' is inf at row 3"),
        ("score", 1.5, "soft-nms", r"m1\.parquet: field 'score' is 1.5 at row 3 .* outside \[0.0, 1.0\]"),
        ("x1", 1e4, "wbf", r"m1\.parquet: x2 < x1"),
    ],
)
def test_fuse_bad_values_name_file_and_field(column, value, method, message):
    tables = model_tables()
    col = tables[1].column(column).to_numpy().copy()
    col[3] = value
    bad = tables[1].set_column(tables[1].schema.get_field_index(column), column, pa.array(col, pa.float32()))
    with pytest.raises(ValueError, match=message):
        fuse([tables[0], bad, tables[2]], method, names=["m0.parquet", "m1.parquet", "m2.parquet"])


def test_fuse_nms_accepts_any_finite_scores():
    t = detections_table([1, 1], [1, 1], [2.5, -1.0], np.array([[0, 0, 10, 10], [50, 50, 60, 60]]), "m")
    assert fuse([t], "nms").column("score").to_pylist() == [2.5, -1.0]


def test_public_api_shapes():
    assert callable(soft_nms) and callable(nms)
    with pytest.raises(ValueError, match="method"):
        fuse(model_tables(), "mean")


# --------------------------------------------------------------------------- CLI


@pytest.fixture()
def cli():
    app = typer.Typer()
    register(app)

    @app.command("noop")  # a second command, so that `fuse` is a subcommand as in `twopass`
    def _noop() -> None: ...

    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def write_inputs(folder, tables, categories=CATEGORIES):
    paths = []
    for i, t in enumerate(tables):
        path = folder / f"m{i}.parquet"
        write_table(path, t, TableMeta(kind="detections", producer="test", categories=categories))
        paths.append(path)
    return paths


def test_cli_fuses_parquet_and_json(tmp_path, cli):
    tables = model_tables()
    p0, p1, _ = write_inputs(tmp_path, tables)
    j2 = tmp_path / "m2.json"
    j2.write_text(json.dumps(to_coco_results(tables[2])))
    images = tmp_path / "ann.json"
    images.write_text(json.dumps({"images": [{"id": i, "height": h, "width": w} for i, (h, w) in SIZES.items()]}))
    out = tmp_path / "fused.parquet"
    r = cli("fuse", p0, p1, j2, "--method", "wbf", "--weights", "2,1,1", "--iou-thr", "0.6",
            "--images", images, "--out", out)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output
    table, meta = read_table(out, "detections", CATEGORIES)
    assert meta.producer == "twopass fuse" and meta.categories == CATEGORIES
    assert meta.config["method"] == "wbf" and meta.config["weights"] == [2.0, 1.0, 1.0]
    assert meta.config["iou_thr"] == 0.6 and meta.config["inputs"] == [str(p0), str(p1), str(j2)]
    expected = fuse(tables, "wbf", weights=[2, 1, 1], iou_thr=0.6, image_sizes=SIZES)
    assert_tables_equal(table, expected, tol=1e-5)


@pytest.mark.parametrize("method", ["soft-nms", "nms"])
def test_cli_methods_and_defaults(tmp_path, cli, method):
    tables = model_tables()
    paths = write_inputs(tmp_path, tables)
    out = tmp_path / "f.parquet"
    r = cli("fuse", *paths, "--method", method, "--decay", "linear", "--sigma", "0.3", "--max-per-image", "20",
            "--out", out)  # fmt: skip
    assert r.exit_code == 0, r.output
    table, meta = read_table(out, "detections")
    assert meta.config["iou_thr"] == 0.5
    expected = fuse(tables, method, decay="linear", sigma=0.3, max_per_image=20)
    assert_tables_equal(table, expected, tol=0)


def test_cli_empty_inputs_give_empty_output(tmp_path, cli):
    empty = detections_table([], [], [], np.zeros((0, 4)), "m")
    paths = write_inputs(tmp_path, [empty, empty])
    (tmp_path / "e.json").write_text("[]")
    out = tmp_path / "f.parquet"
    r = cli("fuse", *paths, tmp_path / "e.json", "--out", out)
    assert r.exit_code == 0, r.output
    assert read_table(out, "detections")[0].num_rows == 0


def error_of(r) -> str:
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    return r.output.strip()


def test_cli_bad_inputs_are_one_line_errors(tmp_path, cli):
    tables = model_tables()
    p0, p1, p2 = write_inputs(tmp_path, tables)
    out = tmp_path / "f.parquet"

    msg = error_of(cli("fuse", p0, p1, p2, "--weights", "2,1", "--out", out))
    assert msg == "twopass: error: weights: 2 weights for 3 inputs; give one weight per input"
    assert "not a comma-separated list" in error_of(cli("fuse", p0, "--weights", "2;1", "--out", out))
    assert "method: 'soft'" in error_of(cli("fuse", p0, "--method", "soft", "--out", out))
    nope = tmp_path / "nope.parquet"
    assert f"{nope}: no such file" in error_of(cli("fuse", p0, nope, "--out", out))

    other = Categories((1, 2, 3), ("c1", "c2", "x3"))
    (odd,) = write_inputs(tmp_path / "odd", [tables[1]], categories=other)
    msg = error_of(cli("fuse", p0, odd, "--out", out))
    assert msg.startswith(f"twopass: error: {odd} (against {p0}): category list does not match")

    j = tmp_path / "unknown.json"
    j.write_text(json.dumps([{"image_id": 1, "category_id": 99, "bbox": [0, 0, 5, 5], "score": 0.5}]))
    assert f"{j}: unknown category_id [99]" in error_of(cli("fuse", p0, j, "--out", out))

    col = tables[2].column("y1").to_numpy().copy()
    col[5] = np.nan
    (nan_file,) = write_inputs(tmp_path / "nan", [tables[2].set_column(3 + 1, "y1", pa.array(col, pa.float32()))])
    msg = error_of(cli("fuse", p0, nan_file, "--out", out))
    assert msg.startswith(f"twopass: error: {nan_file}: field 'y1' is nan at row 5")
    assert not out.exists()


def test_cli_coco_json_is_the_parquet_as_coco_results(tmp_path, cli, monkeypatch):
    tables = model_tables()
    p0, p1, _ = write_inputs(tmp_path, tables)
    out, coco = tmp_path / "f.parquet", tmp_path / "f.json"
    r = cli("fuse", p0, p1, "--out", out, "--coco-json", coco)
    assert r.exit_code == 0, r.output
    table, _ = read_table(out, "detections", CATEGORIES)
    assert table.num_rows > 0 and json.loads(coco.read_text()) == to_coco_results(table)
    # guarded as --out is, and written both or neither
    before = p0.read_bytes()
    msg = error_of(cli("fuse", p0, p1, "--out", tmp_path / "g.parquet", "--coco-json", p0))
    assert msg == f"twopass: error: --coco-json {p0} is the input #1 {p0}: refusing to overwrite an input" and p0.read_bytes() == before
    same = tmp_path / "g.parquet"
    assert error_of(cli("fuse", p0, "--out", same, "--coco-json", same)) == f"twopass: error: --out and --coco-json are the same file {same}"
    from twopass.pipeline import tables as tables_module

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tables_module, "to_coco_results", full)
    msg = error_of(cli("fuse", p0, p1, "--out", tmp_path / "g.parquet", "--coco-json", tmp_path / "g.json"))
    assert msg.startswith(f"twopass: error: {tmp_path / 'g.json'}: No space left on device")
    assert not (tmp_path / "g.parquet").exists() and not (tmp_path / "g.json").exists()


def test_cli_fuses_json_with_polygon_masks(tmp_path, cli):
    tables = model_tables()
    p0, p1, _ = write_inputs(tmp_path, tables)
    results = to_coco_results(tables[2])
    for r in results:  # another tool's instances: each mask a polygon (its box's outline)
        x, y, w, h = r["bbox"]
        r["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    j2 = tmp_path / "m2.json"
    j2.write_text(json.dumps(results))
    images = tmp_path / "ann.json"
    images.write_text(json.dumps({"images": [{"id": i, "height": h, "width": w} for i, (h, w) in SIZES.items()]}))
    out = tmp_path / "fused.parquet"
    r = cli("fuse", p0, p1, j2, "--images", images, "--out", out)
    assert r.exit_code == 0, r.output
    table, _ = read_table(out, "detections", CATEGORIES)
    assert_tables_equal(table, fuse(tables, "wbf", image_sizes=SIZES), tol=1e-5)  # the masks are not fused
    # without --images a polygon has no size to be rasterised at
    msg = error_of(cli("fuse", p0, j2, "--out", tmp_path / "g.parquet"))
    assert msg.startswith(f"twopass: error: {j2}: entry 0 (image_id {results[0]['image_id']}): segmentation is a polygon, ")
    assert "no image sizes are given" in msg and not (tmp_path / "g.parquet").exists()


def test_project_cli_has_fuse():
    from twopass.pipeline.cli import app

    r = CliRunner().invoke(app, ["fuse", "--help"])
    assert r.exit_code == 0 and "--weights" in r.output


# --------------------------------------------------------------------------- labels: vote

# One object seen by two models with different labels (pixels of a 100 x 100 image).
OBJECT = np.array([[10.0, 10.0, 50.0, 50.0], [12.0, 11.0, 52.0, 49.0]])


def one_object(labels, scores, boxes=OBJECT, image_id=1) -> list[pa.Table]:
    """One table a member: member k's box k with labels[k] and scores[k]."""
    return [detections_table([image_id], [lab], [s], boxes[k : k + 1], f"m{k}") for k, (lab, s) in enumerate(zip(labels, scores))]


def test_wbf_vote_gives_one_box_with_the_winning_label():
    import ensemble_boxes

    tables = one_object([1, 2], [0.6, 0.8])
    per_label = fuse(tables, "wbf", image_sizes={1: (100.0, 100.0)})
    assert sorted(per_label.column("category_id").to_pylist()) == [1, 2]  # two boxes on one object
    vote = fuse(tables, "wbf", labels="vote", image_sizes={1: (100.0, 100.0)})
    assert vote.num_rows == 1 and vote.column("category_id").to_pylist() == [2]  # 0.8 > 0.6
    # Coordinates and score: the reference's WBF with both labels set equal.
    b, s, _ = ensemble_boxes.weighted_boxes_fusion([OBJECT[:1] / 100, OBJECT[1:] / 100], [[0.6], [0.8]], [[0], [0]])
    np.testing.assert_allclose(boxes_of(vote), b * 100, rtol=0, atol=1e-4)
    np.testing.assert_allclose(vote.column("score").to_numpy(), s, rtol=0, atol=1e-7)


@pytest.mark.parametrize(
    "labels, scores, weights, expected",
    [
        ([1, 2], [0.8, 0.6], None, 1),  # 0.8 > 0.6
        ([1, 2], [0.8, 0.6], [1, 2], 2),  # weight x score: 0.6 x 2 = 1.2 > 0.8
        ([1, 2, 2], [0.9, 0.6, 0.5], None, 2),  # summed: 0.6 + 0.5 = 1.1 > 0.9, though the best box says 1
        ([2, 1], [0.5, 0.5], None, 1),  # a tie: the smaller label
    ],
)
def test_wbf_vote_sums_score_times_weight_per_label(labels, scores, weights, expected):
    boxes = np.array([[10.0, 10.0, 50.0, 50.0], [12.0, 11.0, 52.0, 49.0], [11.0, 9.0, 51.0, 51.0]])
    vote = fuse(one_object(labels, scores, boxes), "wbf", weights, labels="vote", image_sizes={1: (100.0, 100.0)})
    assert vote.column("category_id").to_pylist() == [expected]


def test_vote_keeps_objects_and_images_apart():
    """Vote clusters across labels only: other objects and other images keep their boxes and
    labels. (Soft-NMS keeps the decayed box too: the next test.)"""
    far = np.array([[70.0, 70.0, 90.0, 90.0]])
    tables = one_object([1, 2], [0.6, 0.8]) + [
        detections_table([1], [3], [0.7], far, "m2"),  # another object of the same image
        detections_table([2], [1], [0.5], OBJECT[:1], "m3"),  # the same box on another image
    ]
    sizes = {1: (100.0, 100.0), 2: (100.0, 100.0)}
    for method in ("wbf", "nms"):
        vote = fuse(tables, method, labels="vote", image_sizes=sizes)
        rows = list(zip(vote.column("image_id").to_pylist(), vote.column("category_id").to_pylist()))
        assert rows == [(1, 2), (1, 3), (2, 1)], method


@pytest.mark.parametrize(
    "method, params",
    [
        ("wbf", {}),
        ("wbf", dict(conf_type="box_and_model_avg", weights=[2, 1, 1], iou_thr=0.6)),
        ("soft-nms", dict(rescore=False)),
        ("soft-nms", dict(decay="linear", weights=[1, 2, 1], thresh=0.1, rescore=False)),
        ("nms", dict(iou_thr=0.4)),
    ],
)
def test_vote_fuses_as_the_reference_with_one_label(method, params):
    """Boxes and scores of `labels="vote"` are ensemble_boxes' with every label set equal."""
    tables = model_tables()
    one = [t.set_column(t.schema.get_field_index("category_id"), "category_id", pa.array(np.ones(t.num_rows, np.int64)))
           for t in tables]  # fmt: skip
    kwargs = dict(image_sizes=SIZES, max_per_image=None, **params)
    vote = fuse(tables, method, labels="vote", **kwargs)
    ref = fuse(one, method, backend="ensemble_boxes", **kwargs)
    per_label = fuse(tables, method, **kwargs)
    assert 0 < vote.num_rows < per_label.num_rows
    ca, cb = columns(vote), columns(ref)
    np.testing.assert_array_equal(ca["image_id"], cb["image_id"])
    for c in ("score", "x1", "y1", "x2", "y2"):
        np.testing.assert_allclose(ca[c], cb[c], rtol=0, atol=1e-4)
    # Labels are the inputs' own: every output category is an input category of its image.
    cats_in = {pair for t in tables for pair in zip(t.column("image_id").to_pylist(), t.column("category_id").to_pylist())}
    assert set(zip(ca["image_id"].tolist(), ca["category_id"].tolist())) <= cats_in
    assert len(set(ca["category_id"].tolist())) > 1


# A 64 x 64 image: the boxes' IoU is 40 / 64 = 0.625 exactly once normalised.
SQUARE, LOWER = np.array([[0.0, 0.0, 8.0, 8.0]]), np.array([[0.0, 0.0, 8.0, 5.0]])


def test_nms_and_soft_nms_vote_suppress_across_labels():
    tables = [detections_table([1], [1], [0.9], SQUARE, "a"), detections_table([1], [2], [0.6], LOWER, "b")]
    sizes, iou = {1: (64.0, 64.0)}, 0.625

    def rows(t):
        return list(zip(t.column("category_id").to_pylist(), t.column("score").to_numpy().tolist()))

    # Per label the two boxes do not meet; voting, NMS keeps the better box with its own label.
    assert [c for c, _ in rows(fuse(tables, "nms", image_sizes=sizes))] == [1, 2]
    assert rows(fuse(tables, "nms", labels="vote", image_sizes=sizes)) == [(1, pytest.approx(0.9))]
    # Soft-NMS decays the label-2 box by its IoU with the label-1 box, whose label it does not take.
    assert rows(fuse(tables, "soft-nms", image_sizes=sizes)) == [(1, pytest.approx(0.9)), (2, pytest.approx(0.6))]
    gauss = rows(fuse(tables, "soft-nms", labels="vote", image_sizes=sizes))
    assert gauss == [(1, pytest.approx(0.9)), (2, pytest.approx(0.6 * math.exp(-(iou**2) / 0.5), rel=1e-6))]
    linear = rows(fuse(tables, "soft-nms", labels="vote", decay="linear", image_sizes=sizes))
    assert linear == [(1, pytest.approx(0.9)), (2, pytest.approx(0.6 * (1 - iou), rel=1e-6))]


def test_per_label_is_the_default_and_keys_stay():
    from twopass.ensemble.api import fuse_files
    from twopass.pipeline.settings import FuseSettings

    tables = model_tables()
    for method in ("wbf", "soft-nms", "nms"):
        assert_tables_equal(fuse(tables, method), fuse(tables, method, labels="per_label"), tol=0)
    # Settings made before `labels` existed resolve (content keys, metadata) as they did.
    assert "labels" not in FuseSettings().resolved() and "labels" not in FuseSettings(labels="per_label").resolved()
    assert FuseSettings(labels="vote").resolved()["labels"] == "vote"
    fused, meta = fuse_files(tables, FuseSettings(labels="vote"), image_sizes=SIZES)
    assert meta.config["labels"] == "vote"
    assert_tables_equal(fused, fuse(tables, labels="vote", image_sizes=SIZES), tol=0)
    with pytest.raises(ValueError, match=r"labels: 'agnostic', expected one of \('per_label', 'vote'\)"):
        fuse(tables, labels="agnostic")
    with pytest.raises(ValueError, match="labels: ensemble_boxes fuses per label only"):
        fuse(tables, labels="vote", backend="ensemble_boxes")


def test_cli_labels(tmp_path, cli):
    tables = model_tables()
    paths = write_inputs(tmp_path, tables)
    out = tmp_path / "f.parquet"
    r = cli("fuse", *paths, "--method", "nms", "--labels", "vote", "--out", out)
    assert r.exit_code == 0, r.output
    table, meta = read_table(out, "detections")
    assert meta.config["labels"] == "vote"
    assert_tables_equal(table, fuse(tables, "nms", labels="vote"), tol=0)
    assert table.num_rows < fuse(tables, "nms").num_rows
    msg = error_of(cli("fuse", *paths, "--labels", "agnostic", "--out", tmp_path / "g.parquet"))
    assert msg == "twopass: error: labels: 'agnostic', expected one of ('per_label', 'vote')"
    assert "--labels" in cli("fuse", "--help").output
