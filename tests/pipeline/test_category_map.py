"""`--category-map`: COCO results JSON whose `category_id`s are another tool's class indices
(Ultralytics, Detectron2, MMDetection) read through `fuse` and `segment`; an unmapped index, a
bad map or a map with nothing to apply to stops the run with one line, writing nothing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from twopass.pipeline import cli as pcli
from twopass.pipeline.categories import Categories, CategoryMap
from twopass.pipeline.tables import TableMeta, from_coco_results, read_table, write_table

CATS = Categories((1, 3, 7), ("cat", "dog", "cow"))


def run_main(monkeypatch, capsys, *args) -> tuple[int, str]:
    """`twopass ARGS` in this process: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["twopass", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        pcli.main()
    return e.value.code, capsys.readouterr().err


def results(ann: Path, shift: int = 0, n: int = 12) -> list[dict]:
    """The first `n` ground-truth boxes as COCO results, `category_id` lowered by `shift`
    (1: the 0-based index another tool writes for the synthetic set's ids 1..8)."""
    gt = json.loads(ann.read_text())
    return [{"image_id": a["image_id"], "category_id": a["category_id"] - shift, "bbox": a["bbox"], "score": 0.9}
            for a in gt["annotations"][:n]]  # fmt: skip


def write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


@pytest.fixture
def data(synth_small) -> dict[str, Path]:
    return {"ann": synth_small / "annotations.json", "images": synth_small / "images"}


@pytest.fixture
def zero_based(tmp_path) -> Path:
    """The synthetic set's map from 0-based indices: index i is category id i + 1."""
    return write(tmp_path / "map.yaml", "".join(f"{i}: {i + 1}\n" for i in range(8)))


# --------------------------------------------------------------------------- the map itself


def test_json_and_yaml_maps_load_alike(tmp_path):
    as_json = write(tmp_path / "m.json", {"0": 1, "1": "dog", "2": 7})
    as_yaml = write(tmp_path / "m.yaml", "0: 1\n'1': dog\n2: 7\n")
    assert CategoryMap.load(as_json, CATS).ids == CategoryMap.load(as_yaml, CATS).ids == {0: 1, 1: 3, 2: 7}
    assert CategoryMap.load(as_yaml, CATS).source == str(as_yaml)
    assert CategoryMap.load(write(tmp_path / "ids.yml", "5: 3\n")).ids == {5: 3}  # ids unchecked without categories


@pytest.mark.parametrize(
    "text, message",
    [
        ("0: 2\n", "class index 0: 2 is not a category id of the dataset; known ids are [1, 3, 7]"),
        ("0: horse\n", "class index 0: no category named 'horse'; known names are ['cat', 'dog', 'cow']"),
        ("0: 1.5\n", "class index 0: 1.5 is neither a category id nor a category name"),
        ("0: true\n", "class index 0: True is neither a category id nor a category name"),
        ("cat: 1\n", "key 'cat' is not a class index"),
        ("-1: 1\n", "key -1 is not a class index"),
        ("0: 1\n'0': 3\n", "class index 0 appears twice"),
        ("0: 1\n1: 3\n0: 7\n", "key 0 appears twice (lines 1 and 3)"),
        ("[1, 3, 7]\n", "a category map holds a mapping {class index: category id or name}, got list"),
        ("{}\n", "got an empty mapping"),
        ("0: [1\n", "not valid YAML"),
    ],
)
def test_bad_maps_are_named(tmp_path, text, message):
    path = write(tmp_path / "m.yaml", text)
    with pytest.raises(ValueError) as e:
        CategoryMap.load(path, CATS)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value) and "\n" not in str(e.value)


def test_a_key_given_twice_in_json_is_refused(tmp_path):
    path = write(tmp_path / "m.json", '{"0": 1, "1": 3, "0": 7}')
    with pytest.raises(ValueError) as e:
        CategoryMap.load(path, CATS)
    assert str(e.value) == f"{path}: key '0' appears twice; give each class index once"


def test_names_need_the_categories_and_json_must_parse(tmp_path):
    path = write(tmp_path / "m.json", {"0": "cat"})
    with pytest.raises(ValueError, match="names need the dataset's category list"):
        CategoryMap.load(path)
    with pytest.raises(ValueError, match="not valid JSON"):
        CategoryMap.load(write(tmp_path / "bad.json", "{0: 1}"))


def test_results_are_mapped_and_an_unmapped_index_is_named():
    cmap = CategoryMap({0: 1, 1: 3, 2: 7}, "map.yaml")
    rows = [{"image_id": k, "category_id": k % 3, "bbox": [0, 0, 4, 4], "score": 0.5} for k in range(6)]
    table = from_coco_results(rows, source="x", what="det.json", category_map=cmap)
    assert table.column("category_id").to_pylist() == [1, 3, 7, 1, 3, 7]
    rows[4]["category_id"], rows[5]["category_id"] = 9, "1"
    with pytest.raises(ValueError) as e:
        from_coco_results(rows, source="x", what="det.json", category_map=cmap)
    assert str(e.value) == "det.json: entry 4 (image_id 4): category_id 9 is not in --category-map map.yaml (keys 0..2); 2 such entries"


# --------------------------------------------------------------------------- twopass fuse


def test_fuse_maps_indices_to_the_dataset_ids(monkeypatch, capsys, data, zero_based, tmp_path):
    """A 0-based results file with its map fuses to the same table as the file with the dataset's ids."""
    foreign = write(tmp_path / "foreign" / "det.json", results(data["ann"], shift=1))
    native = write(tmp_path / "native" / "det.json", results(data["ann"]))
    for det, extra in ((foreign, ["--category-map", zero_based]), (native, [])):
        code, err = run_main(monkeypatch, capsys, "fuse", det, "--images", data["ann"], "--out", det.with_suffix(".parquet"), *extra)
        assert code == 0, err
    mapped, meta = read_table(foreign.with_suffix(".parquet"), "detections")
    assert mapped.equals(read_table(native.with_suffix(".parquet"), "detections")[0])
    assert meta.config["category_map"] == str(zero_based) and mapped.num_rows > 0


def test_fuse_maps_the_json_inputs_only(monkeypatch, capsys, data, zero_based, tmp_path):
    """Our own Parquet boxes fuse with a foreign JSON: the map applies to the JSON alone; a map
    with no JSON input to apply to is refused, naming the Parquet file."""
    ours = tmp_path / "ours.parquet"
    categories = Categories.from_coco(json.loads(data["ann"].read_text())["categories"])
    write_table(ours, from_coco_results(results(data["ann"]), source="ours"), TableMeta(kind="detections", producer="test", categories=categories))
    foreign = write(tmp_path / "yolo.json", results(data["ann"], shift=1))
    out = tmp_path / "fused.parquet"
    code, err = run_main(monkeypatch, capsys, "fuse", ours, foreign, "--category-map", zero_based, "--out", out)
    assert code == 0, err
    ids = set(read_table(out, "detections")[0].column("category_id").to_pylist())
    assert ids == {a["category_id"] for a in results(data["ann"])}

    out.unlink()
    code, err = run_main(monkeypatch, capsys, "fuse", ours, "--category-map", zero_based, "--out", out)
    assert code == 2 and err.startswith(f"twopass: error: {ours}: holds the dataset's category ids already") and not out.exists()


def test_fuse_refuses_an_unmapped_index_and_writes_nothing(monkeypatch, capsys, data, tmp_path):
    det = write(tmp_path / "det.json", results(data["ann"], shift=1))
    partial = write(tmp_path / "map.json", {str(i): i + 1 for i in range(3)})  # indices 0..2 only
    before = {p: p.read_bytes() for p in (det, partial)}
    out = tmp_path / "fused.parquet"
    code, err = run_main(monkeypatch, capsys, "fuse", det, "--images", data["ann"], "--category-map", partial, "--out", out)
    first = next(i for i, r in enumerate(results(data["ann"], shift=1)) if r["category_id"] > 2)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"twopass: error: {det}: entry {first} ") and f"is not in --category-map {partial} (keys 0..2)" in err
    assert not out.exists() and {p: p.read_bytes() for p in before} == before


def test_fuse_refuses_a_map_to_unknown_ids(monkeypatch, capsys, data, tmp_path):
    det = write(tmp_path / "det.json", results(data["ann"], shift=1))
    bad = write(tmp_path / "map.yaml", "0: 1\n1: 99\n")
    code, err = run_main(monkeypatch, capsys, "fuse", det, "--images", data["ann"], "--category-map", bad, "--out", tmp_path / "f.parquet")
    assert code == 2 and f"{bad}: class index 1: 99 is not a category id of the dataset" in err
    assert not (tmp_path / "f.parquet").exists()


# --------------------------------------------------------------------------- twopass segment


def segment_args(data, ckpts, det: Path, out: Path, *extra) -> list:
    return ["segment", "--checkpoint", ckpts["seg"], "--detections", det, "--images", data["images"], "--ann", data["ann"],
            "--out", out, *extra]  # fmt: skip


def test_segment_maps_indices_to_the_dataset_ids(monkeypatch, capsys, data, ckpts, tmp_path):
    names = write(tmp_path / "names.yaml", "".join(f"{c['id'] - 1}: {c['name']}\n" for c in json.loads(data["ann"].read_text())["categories"]))
    foreign = write(tmp_path / "foreign" / "det.json", results(data["ann"], shift=1, n=4))
    native = write(tmp_path / "native" / "det.json", results(data["ann"], n=4))
    for det, extra in ((foreign, ["--category-map", names]), (native, [])):
        code, err = run_main(monkeypatch, capsys, *segment_args(data, ckpts, det, det.with_suffix(".parquet"), *extra))
        assert code == 0, err
    mapped, meta = read_table(foreign.with_suffix(".parquet"), "instances")
    assert mapped.equals(read_table(native.with_suffix(".parquet"), "instances")[0]) and mapped.num_rows == 4
    assert meta.extra["category_map"] == str(names)


def test_segment_refuses_an_unmapped_index_a_bad_map_and_a_parquet_input(monkeypatch, capsys, data, ckpts, tmp_path):
    det = write(tmp_path / "det.json", results(data["ann"], shift=1))
    partial = write(tmp_path / "map.yaml", "0: 1\n")
    before = {p: p.read_bytes() for p in (det, partial)}
    out = tmp_path / "inst.parquet"
    code, err = run_main(monkeypatch, capsys, *segment_args(data, ckpts, det, out, "--category-map", partial))
    assert code == 2 and err.startswith(f"twopass: error: {det}: entry ") and f"not in --category-map {partial} (keys 0..0)" in err

    bad = write(tmp_path / "bad.yaml", "0: 42\n")
    code, err = run_main(monkeypatch, capsys, *segment_args(data, ckpts, det, out, "--category-map", bad))
    assert code == 2 and f"{bad}: class index 0: 42 is not a category id of the dataset" in err

    parquet = tmp_path / "ours.parquet"
    write_table(parquet, from_coco_results(results(data["ann"]), source="ours"), TableMeta(kind="detections", producer="test"))
    code, err = run_main(monkeypatch, capsys, *segment_args(data, ckpts, parquet, out, "--category-map", partial))
    assert code == 2 and err.startswith(f"twopass: error: {parquet}: a twopass Parquet file holds the dataset's category ids")
    assert not out.exists() and {p: p.read_bytes() for p in before} == before
