import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from twopass.pipeline.categories import Categories
from twopass.pipeline.tables import (
    DETECTIONS_SCHEMA,
    INSTANCES_SCHEMA,
    TableMeta,
    boxes_of,
    check_values,
    detections_table,
    empty_table,
    from_coco_results,
    instances_table,
    read_results,
    read_table,
    rles_of,
    to_coco_results,
    write_table,
)

CATS = Categories((1, 3, 7), ("a", "b", "c"))


def random_instances(n=50, h=60, w=80, seed=0):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 50, (n, 2))
    wh = rng.uniform(0.3, 30, (n, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    det = detections_table(
        rng.integers(1, 5, n), rng.choice(CATS.ids, n), rng.uniform(0, 1, n).astype(np.float32), boxes,
        [f"m{k % 3}" for k in range(n)],
    )
    masks = rng.random((n, h, w)) > 0.7
    rles = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in masks]
    return instances_table(det, rles), masks


def test_detections_schema_and_boxes():
    t = detections_table([1], [3], [0.5], np.array([[1, 2, 3, 4]]), "m")
    assert t.schema == DETECTIONS_SCHEMA
    np.testing.assert_array_equal(boxes_of(t), [[1, 2, 3, 4]])
    assert boxes_of(empty_table("detections")).shape == (0, 4)
    with pytest.raises(ValueError, match="'score' has 2 rows"):
        detections_table([1], [3], [0.5, 0.1], np.array([[1, 2, 3, 4]]), "m")


def test_parquet_round_trip_keeps_table_and_metadata(tmp_path):
    t, masks = random_instances()
    meta = TableMeta(kind="instances", producer="test", categories=CATS, config={"a": 1}, dataset="d")
    write_table(tmp_path / "x.parquet", t, meta)
    back, m = read_table(tmp_path / "x.parquet", "instances", CATS)
    assert back.equals(t) and back.schema == INSTANCES_SCHEMA
    assert m.producer == "test" and m.categories == CATS and m.config == {"a": 1} and m.config_hash == meta.config_hash
    decoded = mask_utils.decode(rles_of(back))
    np.testing.assert_array_equal(decoded.transpose(2, 0, 1), masks)
    # an instances file also reads as detections
    det, _ = read_table(tmp_path / "x.parquet", "detections")
    assert det.schema == DETECTIONS_SCHEMA


def test_empty_table_is_valid(tmp_path):
    write_table(tmp_path / "e.parquet", empty_table("detections"), TableMeta(kind="detections", producer="t"))
    t, _ = read_table(tmp_path / "e.parquet", "detections")
    assert t.num_rows == 0 and t.schema == DETECTIONS_SCHEMA
    assert to_coco_results(t) == []


def test_coco_json_round_trip_is_lossless_and_pycocotools_reads_it(tmp_path):
    t, masks = random_instances(seed=1)
    res = to_coco_results(t)
    (tmp_path / "r.json").write_text(json.dumps(res))
    back, meta = read_results(tmp_path / "r.json")
    assert meta.kind == "instances"
    assert back.equals(t)  # bit-exact floats, masks and sources
    # pycocotools accepts it as a results file against a matching ground truth
    gt = COCO()
    gt.dataset = {
        "images": [{"id": i, "height": 60, "width": 80} for i in range(1, 5)],
        "annotations": [],
        "categories": CATS.to_coco(),
    }
    gt.createIndex()
    dt = gt.loadRes(str(tmp_path / "r.json"))
    ann = dt.loadAnns(dt.getAnnIds())[0]
    np.testing.assert_array_equal(dt.annToMask(ann), masks[0])
    np.testing.assert_allclose(ann["bbox"], to_coco_results(t)[0]["bbox"])


def test_detections_json_round_trip(tmp_path):
    t, _ = random_instances(seed=2)
    det = t.select(DETECTIONS_SCHEMA.names)
    back = from_coco_results(json.loads(json.dumps(to_coco_results(det))), source="x")
    assert back.equals(det)


def test_reader_names_file_and_mismatch(tmp_path):
    t, _ = random_instances()
    p = tmp_path / "x.parquet"
    write_table(p, t, TableMeta(kind="instances", producer="t", categories=CATS))
    other = Categories((1, 3, 8), ("a", "b", "d"))
    with pytest.raises(ValueError, match=r"x\.parquet: category list does not match the expected one \(lacks ids \[8\]; has unexpected ids \[7\]\)"):
        read_table(p, "instances", other)
    with pytest.raises(ValueError, match=r"x\.parquet: holds a instances table, expected images"):
        read_table(p, "images")
    # wrong column type
    bad = t.set_column(t.schema.get_field_index("score"), "score", t.column("score").cast(pa.float64()))
    pq.write_table(bad.replace_schema_metadata({b"twopass": TableMeta(kind="instances", producer="t").to_json()}), p)
    with pytest.raises(ValueError, match=r"x\.parquet: column 'score' is double, expected float"):
        read_table(p, "instances")
    pq.write_table(t, tmp_path / "foreign.parquet")
    with pytest.raises(ValueError, match="foreign.parquet: no twopass metadata"):
        read_table(tmp_path / "foreign.parquet", "instances")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="junk.parquet: not a Parquet file"):
        read_table(tmp_path / "junk.parquet", "detections")
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        read_table(tmp_path / "missing.parquet", "detections")


def test_json_results_errors_name_the_entry(tmp_path):
    p = tmp_path / "r.json"
    p.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}]))
    with pytest.raises(ValueError, match=r"r\.json: entry 0 has no 'score'"):
        read_results(p)
    p.write_text(json.dumps([{"image_id": 1, "category_id": 5, "bbox": [0, 0, 1, 1], "score": 1}]))
    with pytest.raises(ValueError, match=r"r\.json: unknown category_id \[5\]"):
        read_results(p, CATS)


@pytest.mark.parametrize(
    "field,value,message",
    [("score", np.nan, "field 'score' is nan at row 1 \\(image_id 2\\)"),
     ("x2", np.inf, "field 'x2' is inf at row 1"),
     ("y2", -5.0, "y2 < y1"),
     ("score", 1.5, "outside \\[0, 1\\]")],
)
def test_check_values(field, value, message):
    t = detections_table([1, 2], [1, 1], [0.5, 0.5], np.array([[0, 0, 4, 4], [1, 1, 5, 5]]), "m")
    col = t.column(field).to_numpy().copy()
    col[1] = value
    t = t.set_column(t.schema.get_field_index(field), field, pa.array(col, pa.float32()))
    with pytest.raises(ValueError, match=message):
        check_values(t, "f.parquet", score_range=(0, 1))


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    p = tmp_path / "x.parquet"
    t, _ = random_instances(n=5)
    meta = TableMeta(kind="instances", producer="old")
    write_table(p, t, meta)

    def broken(table, where, **kw):
        with open(where, "wb") as f:
            f.write(b"PAR1 partial")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", broken)
    with pytest.raises(OSError, match="disk full"):
        write_table(p, t, TableMeta(kind="instances", producer="new"))
    assert [f.name for f in tmp_path.iterdir()] == ["x.parquet"]
    assert read_table(p, "instances")[1].producer == "old"


def test_write_killed_midway_leaves_old_file_intact(tmp_path):
    """SIGKILL a process in the middle of write_table: the old file stays whole and readable."""
    p = tmp_path / "x.parquet"
    t, _ = random_instances(n=5)
    write_table(p, t, TableMeta(kind="instances", producer="old"))
    script = textwrap.dedent(
        f"""
        import time, numpy as np, pyarrow.parquet as pq
        from twopass.pipeline.tables import TableMeta, detections_table, write_table
        real = pq.write_table
        def slow(table, where, **kw):
            with open(where, "wb") as f:
                f.write(b"PAR1 half written")
                f.flush()
                time.sleep(60)
        pq.write_table = slow
        t = detections_table([1], [1], [0.5], np.array([[0, 0, 1, 1]]), "m")
        write_table({str(p)!r}, t, TableMeta(kind="detections", producer="new"))
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=os.getcwd())
    try:
        for _ in range(600):
            if any(f.name.endswith(".tmp") and f.stat().st_size > 0 for f in tmp_path.iterdir()):
                break
            time.sleep(0.05)
        else:
            pytest.fail("the writer never started its temp file")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    table, meta = read_table(p, "instances")
    assert meta.producer == "old" and table.equals(t)


def _polygon_results():
    """Two results on images 1 (20x30) and 2 (40x10): a triangle, and a mask of two polygons."""
    return [
        {"image_id": 1, "category_id": 3, "score": 0.9, "bbox": [2, 3, 20, 12], "segmentation": [[2, 3, 22, 3, 12, 15]]},
        {"image_id": 2, "category_id": 7, "score": 0.4, "bbox": [1, 1, 8, 30],
         "segmentation": [[1, 1, 9, 1, 9, 10, 1, 10], [2.5, 20, 8, 20, 8, 31, 2.5, 31]]},
    ]  # fmt: skip


def test_polygon_masks_are_rasterised_at_the_image_size_as_pycocotools_does(tmp_path):
    res = _polygon_results()
    (tmp_path / "r.json").write_text(json.dumps(res))
    sizes = {1: (20, 30), 2: (40.0, 10.0), 9: (5, 5)}  # floats, as `twopass fuse --images` reads them
    table, meta = read_results(tmp_path / "r.json", image_sizes=sizes)
    assert meta.kind == "instances" and table.column("mask_height").to_pylist() == [20, 40]
    # pycocotools' own conversion of a result: COCO.loadRes + annToRLE (frPyObjects, then merge)
    gt = COCO()
    gt.dataset = {"images": [{"id": 1, "height": 20, "width": 30}, {"id": 2, "height": 40, "width": 10}], "annotations": [],
                  "categories": CATS.to_coco()}  # fmt: skip
    gt.createIndex()
    dt = gt.loadRes(res)
    expected = [dt.annToRLE(a) for a in dt.loadAnns(dt.getAnnIds())]
    got = rles_of(table)
    assert [r["counts"] for r in got] == [r["counts"] for r in expected] and [r["size"] for r in got] == [[20, 30], [40, 10]]
    assert [int(mask_utils.area(r)) for r in got] == [int(a) for a in mask_utils.area(expected)] and mask_utils.area(got[1]) > 0
    # a polygon result without a bbox takes the box of its mask
    del res[0]["bbox"]
    t = from_coco_results(res, "s", image_sizes=sizes)
    x, y, w, h = mask_utils.toBbox(expected[0])
    np.testing.assert_allclose(boxes_of(t)[0], [x, y, x + w, y + h])


def test_uncompressed_rle_results_are_compressed():
    m = np.zeros((6, 5), np.uint8)
    m[1:4, 2:4] = 1
    flat = m.ravel(order="F")
    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], change])).tolist()
    res = [{"image_id": 1, "category_id": 1, "score": 0.5, "bbox": [2, 1, 2, 3], "segmentation": {"size": [6, 5], "counts": counts}}]
    t = from_coco_results(res, "s")  # no sizes needed: the RLE has its own
    np.testing.assert_array_equal(mask_utils.decode(rles_of(t)[0]), m)


def test_polygon_masks_without_a_size_are_named():
    res = _polygon_results()
    with pytest.raises(ValueError) as e:
        from_coco_results(res, "s", what="r.json")
    assert str(e.value) == ("r.json: entry 0 (image_id 1): segmentation is a polygon, which needs its image's height and width, "
                            "and no image sizes are given (give the images' COCO annotations or images table)")  # fmt: skip
    with pytest.raises(ValueError, match=r"^r\.json: entry 1 \(image_id 2\): segmentation is a polygon, .* and image_id 2 is not "
                                         r"among the 1 images given$"):  # fmt: skip
        from_coco_results(res, "s", what="r.json", image_sizes={1: (20, 30)})
    res[1]["segmentation"] = [[1, 1, 9, 1]]  # two points: pycocotools would read it as a box
    with pytest.raises(ValueError, match=r"^r\.json: entry 1 \(image_id 2\): a polygon segmentation is a list of .* at least 3 points$"):
        from_coco_results(res, "s", what="r.json", image_sizes={1: (20, 30), 2: (40, 10)})
    res[1]["segmentation"] = "a mask"
    with pytest.raises(ValueError, match=r"^r\.json: entry 1 \(image_id 2\): segmentation must be RLE or polygons$"):
        from_coco_results(res, "s", what="r.json", image_sizes={1: (20, 30), 2: (40, 10)})
