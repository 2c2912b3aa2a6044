"""`twopass convert`: YOLO, LabelMe and VOC examples written here by hand, read back as COCO and
checked against the boxes and masks drawn; malformed lines named with nothing written; COCO ->
YOLO -> COCO keeping boxes and masks."""

import base64
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from twopass.pipeline.cli import app
from twopass.pipeline.coco import CocoIndex, DataError, annotation_mask
from twopass.pipeline.convert import convert, mask_polygons

H, W = 10, 20  # every image here: 10 rows, 20 columns (upright)


def _image(path, h=H, w=W, orientation=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", (w, h), (90, 120, 30))
    if orientation is None:
        im.save(path)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        im.save(path, exif=exif)
    return path


def _rect(x0, y0, x1, y1, h=H, w=W):
    """UInt8[h, w] with the pixels x0..x1-1, y0..y1-1 set."""
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def _masks(coco):
    size = {im["id"]: (im["height"], im["width"]) for im in coco["images"]}
    return [annotation_mask(a, *size[a["image_id"]], "test") for a in coco["annotations"]]


def _names(coco, anns=None):
    names = {c["id"]: c["name"] for c in coco["categories"]}
    return [names[a["category_id"]] for a in (anns or coco["annotations"])]


def _no_files_but(folder, *keep):
    return sorted(p.name for p in folder.iterdir()) == sorted(keep)


# --------------------------------------------------------------------------- YOLO


def _yolo(tmp_path, lines_a, lines_b=None):
    root = tmp_path / "yolo"
    (root / "data.yaml").parent.mkdir(parents=True)
    (root / "data.yaml").write_text("train: images/train\nval: images/val\nnames:\n  0: cat\n  1: dog\n")
    _image(root / "images/train/a.png")
    # stored 10 wide, 20 high, turned a quarter by its EXIF tag: upright 20 wide, 10 high
    _image(root / "images/train/b.jpg", h=W, w=H, orientation=6)
    _image(root / "images/train/c.png")  # no label file: an image without objects
    (root / "labels/train").mkdir(parents=True)
    (root / "labels/train/a.txt").write_text("\n".join(lines_a) + "\n")
    if lines_b is not None:
        (root / "labels/train/b.txt").write_text("\n".join(lines_b) + "\n")
    return root


@pytest.mark.parametrize("masks", ["rle", "polygon"])
def test_yolo_detect_and_segment_lines(tmp_path, masks):
    root = _yolo(tmp_path, ["0 0.5 0.5 0.5 0.4", "1 0.1 0.2 0.4 0.2 0.4 0.8 0.1 0.8"], ["0 0.5 0.5 1 1"])
    out = tmp_path / "coco.json"
    done = convert(root / "data.yaml", "yolo", out, masks=masks)
    coco = json.loads(out.read_text())
    CocoIndex.from_dict(coco, out)
    assert (done.images, done.annotations, done.categories, done.image_root) == (3, 3, 2, root)
    assert coco["categories"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    # sizes from the files, upright: b.jpg is stored 10 wide, 20 high, with orientation 6
    assert [(i["file_name"], i["height"], i["width"]) for i in coco["images"]] == [
        ("images/train/a.png", H, W), ("images/train/b.jpg", H, W), ("images/train/c.png", H, W)]  # fmt: skip
    a_box, a_poly, b_box = coco["annotations"]
    assert _names(coco) == ["cat", "dog", "cat"]
    assert a_box["bbox"] == [5.0, 3.0, 10.0, 4.0] and "segmentation" not in a_box and a_box["area"] == 40.0
    # the polygon is the square x 2..8, y 2..8 (pixel edges): the pixels 2..7 both ways
    assert a_poly["bbox"] == [2.0, 2.0, 6.0, 6.0] and a_poly["area"] == 36.0
    assert (annotation_mask(a_poly, H, W, "") == _rect(2, 2, 8, 8)).all()
    if masks == "polygon":
        assert a_poly["segmentation"] == [[2.0, 2.0, 8.0, 2.0, 8.0, 8.0, 2.0, 8.0]]
    else:
        assert set(a_poly["segmentation"]) == {"size", "counts"} and isinstance(a_poly["segmentation"]["counts"], str)
    assert b_box["image_id"] == 2 and b_box["bbox"] == [0.0, 0.0, float(W), float(H)]


def test_yolo_every_malformed_line_named_nothing_written(tmp_path):
    root = _yolo(tmp_path, ["0 0.5 0.5 0.5 0.4", "5 0.5 0.5 0.1 0.1", "0 0.5 0.5 0.1", "", "1 0.1 0.1 0.2 zero 0.3 0.3"],
                 ["0 1.5 0.5 0.1 0.1"])  # fmt: skip
    out = tmp_path / "coco.json"
    with pytest.raises(DataError) as e:
        convert(root / "data.yaml", "yolo", out)
    msg = str(e.value)
    a, b = root / "labels/train/a.txt", root / "labels/train/b.txt"
    assert "\n" not in msg and msg.startswith("4 malformed entries, nothing written: ")
    assert f"{a}:2: class 5 is not among data.yaml's 2 names (0..1)" in msg
    assert f"{a}:3: 4 values; a line is 'class cx cy w h' (5)" in msg
    assert f"{a}:5: not a number among" in msg
    assert f"{b}:1: coordinates are fractions of the image size, 0..1" in msg
    assert f"{a}:1" not in msg and f"{a}:4" not in msg
    assert _no_files_but(tmp_path, "yolo")  # no output, no temp file


def test_yolo_yaml_refusals(tmp_path):
    root = _yolo(tmp_path, ["0 0.5 0.5 0.5 0.4"])
    with pytest.raises(DataError, match=r"no 'test' entry \(it has train, val\); choose one with --split"):
        convert(root / "data.yaml", "yolo", tmp_path / "o.json", split="test")
    (root / "data.yaml").write_text("train: images/train\nnames: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(DataError, match=r"data.yaml: not valid YAML \(could not determine a constructor"):
        convert(root / "data.yaml", "yolo", tmp_path / "o.json")
    (root / "data.yaml").write_text("train: images/train\nnames: [cat]\nnames: [dog]\n")
    with pytest.raises(DataError, match=r"key 'names' appears twice \(lines 2 and 3\)"):
        convert(root / "data.yaml", "yolo", tmp_path / "o.json")
    assert not (tmp_path / "o.json").exists()


# --------------------------------------------------------------------------- LabelMe


def _png_b64(m):
    buf = io.BytesIO()
    Image.fromarray(m.astype(np.uint8) * 255).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _labelme(tmp_path, shapes, **extra):
    folder = tmp_path / "lm"
    _image(folder / "pics" / "one.png")
    folder.joinpath("one.json").write_text(json.dumps({"version": "5.4.1", "flags": {}, "shapes": shapes, "imagePath": "pics\\one.png",
                                                       "imageData": None, "imageHeight": H, "imageWidth": W, **extra}))  # fmt: skip
    return folder


def _shape(label, points, kind="polygon", group_id=None, **extra):
    return {"label": label, "points": points, "group_id": group_id, "shape_type": kind, "flags": {}, **extra}


@pytest.mark.parametrize("masks", ["rle", "polygon"])
def test_labelme_shapes(tmp_path, masks):
    part = np.array([[1, 0, 1], [1, 1, 0]])  # 2 rows x 3 columns at x 15..17, y 6..7
    folder = _labelme(tmp_path, [
        _shape("dog", [[10, 1], [14, 5]], "rectangle"),
        _shape("cat", [[2, 2], [8, 2], [8, 8], [2, 8]]),
        _shape("cat", [[0, 0], [2, 0], [2, 1], [0, 1]], group_id=4),  # two shapes, one object
        _shape("cat", [[18, 0], [20, 0], [20, 2], [18, 2]], group_id=4),
        _shape("dog", [[15, 6], [17, 7]], "mask", mask=_png_b64(part)),
    ])  # fmt: skip
    out = tmp_path / "coco.json"
    done = convert(folder, "labelme", out, masks=masks)
    coco = json.loads(out.read_text())
    assert done.image_root == folder and coco["images"] == [{"id": 1, "file_name": "pics/one.png", "height": H, "width": W}]
    assert coco["categories"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    assert _names(coco) == ["dog", "cat", "cat", "dog"]
    assert [a["bbox"] for a in coco["annotations"]] == [[10, 1, 4, 4], [2, 2, 6, 6], [0, 0, 20, 2], [15, 6, 3, 2]]
    grouped = _rect(0, 0, 2, 1) | _rect(18, 0, 20, 2)
    blob = np.zeros((H, W), np.uint8)
    blob[6:8, 15:18] = part
    expected = [_rect(10, 1, 14, 5), _rect(2, 2, 8, 8), grouped, blob]
    for got, want in zip(_masks(coco), expected):
        assert (got == want).all()
    assert [a["area"] for a in coco["annotations"]] == [16, 36, 6, 4]


def test_labelme_malformed_shapes_named(tmp_path):
    folder = _labelme(tmp_path, [
        _shape("cat", [[2, 2], [8, 2], [8, 8]]),
        _shape("cat", [[2, 2], [8, 2]]),
        _shape("dog", [[1, 1], [5, 5]], "line"),
        _shape("", [[2, 2], [8, 2], [8, 8]]),
        _shape("dog", [[2, 2], [40, 2], [40, 8]]),
    ])  # fmt: skip
    out = tmp_path / "coco.json"
    with pytest.raises(DataError) as e:
        convert(folder, "labelme", out)
    f = folder / "one.json"
    assert str(e.value) == (
        f"4 malformed entries, nothing written: {f}: shapes[1] ('cat'): a polygon has at least 3 points, got 2; "
        f"{f}: shapes[2] ('dog'): shape_type 'line' outlines no object (polygon, rectangle, circle or mask); delete the shape or redraw it; "
        f"{f}: shapes[3] (''): has no label; "
        f"{f}: shapes[4] ('dog'): box (2, 2, 40, 8) (XYXY pixels) lies outside the 20x10 image"
    )  # fmt: skip
    assert not out.exists()


def test_labelme_size_differs_from_image(tmp_path):
    folder = _labelme(tmp_path, [_shape("cat", [[2, 2], [8, 2], [8, 8]])], imageHeight=W, imageWidth=H)
    with pytest.raises(DataError, match=r"one.json: imageHeight x imageWidth 20x10, but image file .*one.png is 10x20 \(upright\)"):
        convert(folder, "labelme", tmp_path / "coco.json")


# --------------------------------------------------------------------------- Pascal VOC

_VOC_XML = """<annotation>
  <folder>VOC2012</folder>
  <filename>x.jpg</filename>
  <size><width>20</width><height>10</height><depth>3</depth></size>
  <object>
    <name>person</name>
    <difficult>0</difficult>
    <bndbox><xmin>3</xmin><ymin>2</ymin><xmax>8</xmax><ymax>6</ymax></bndbox>
  </object>
  <object>
    <name>bicycle</name>
    <bndbox><xmin>{xmin}</xmin><ymin>3</ymin><xmax>15</xmax><ymax>9</ymax></bndbox>
  </object>
</annotation>
"""


def _voc(tmp_path, xmin=10, pngs=True, class_of_bicycle=2):
    root = tmp_path / "VOC"
    _image(root / "JPEGImages" / "x.jpg")
    (root / "Annotations").mkdir()
    (root / "Annotations" / "x.xml").write_text(_VOC_XML.format(xmin=xmin))
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "val.txt").write_text("x\n")
    if pngs:
        obj = np.zeros((H, W), np.uint8)
        obj[2:6, 3:7] = 1  # person: 4 x 4 with a void border column
        obj[2:6, 7] = 255
        obj[3:9, 10:15] = 2  # bicycle, with a notch
        obj[3, 14] = 0
        cls = np.where(obj == 1, 15, np.where(obj == 2, class_of_bicycle, obj)).astype(np.uint8)
        for name, a in (("SegmentationObject", obj), ("SegmentationClass", cls)):
            (root / name).mkdir()
            png = Image.fromarray(a, mode="L").convert("P")
            png.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
            png.save(root / name / "x.png")
    return root


@pytest.mark.parametrize("masks", ["rle", "polygon"])
def test_voc_boxes_and_instance_pngs(tmp_path, masks):
    root = _voc(tmp_path)
    out = tmp_path / "coco.json"
    done = convert(root, "voc", out, masks=masks, split="val")
    coco = json.loads(out.read_text())
    assert done.image_root == root / "JPEGImages"
    assert coco["images"] == [{"id": 1, "file_name": "x.jpg", "height": H, "width": W}]
    assert coco["categories"] == [{"id": 1, "name": "bicycle"}, {"id": 2, "name": "person"}]
    assert _names(coco) == ["person", "bicycle"]
    # 1-based inclusive boxes: (xmin - 1, ymin - 1, xmax, ymax)
    assert [a["bbox"] for a in coco["annotations"]] == [[2, 1, 6, 5], [9, 2, 6, 7]]
    person, bicycle = _masks(coco)
    assert (person == _rect(3, 2, 7, 6)).all()
    notched = _rect(10, 3, 15, 9)
    notched[3, 14] = 0
    assert (bicycle == notched).all() and coco["annotations"][1]["area"] == 29
    if masks == "polygon":
        assert coco["annotations"][0]["segmentation"] == [[3.0, 2.0, 7.0, 2.0, 7.0, 6.0, 3.0, 6.0]]


def test_voc_boxes_only(tmp_path):
    root = _voc(tmp_path, pngs=False)
    coco = json.loads((convert(root, "voc", tmp_path / "c.json").out).read_text())
    assert [a["bbox"] for a in coco["annotations"]] == [[2, 1, 6, 5], [9, 2, 6, 7]]
    assert all("segmentation" not in a for a in coco["annotations"])


def test_voc_malformed_named_with_line(tmp_path):
    root = _voc(tmp_path, xmin=16)
    out = tmp_path / "coco.json"
    with pytest.raises(DataError) as e:
        convert(root, "voc", out)
    xml = root / "Annotations" / "x.xml"
    assert str(e.value) == (f"1 malformed entry, nothing written: {xml}:12: object 2 ('bicycle'): box (15, 2, 15, 9) "
                            "(XYXY pixels) has no area (from 1-based xmin 16, ymin 3, xmax 15, ymax 9)")  # fmt: skip
    assert not out.exists()


def test_voc_class_png_disagrees(tmp_path):
    root = _voc(tmp_path, class_of_bicycle=15)  # the person's class value
    with pytest.raises(DataError, match=r"SegmentationClass/x.png: object 2 is 'bicycle' in its XML but has class value 15, "
                                        r"which is 'person' in .*x.png"):  # fmt: skip
        convert(root, "voc", tmp_path / "coco.json")


# --------------------------------------------------------------------------- masks to polygons; COCO -> YOLO -> COCO


def test_mask_polygons_fill_the_mask():
    ring = _rect(1, 1, 9, 8)
    ring[3:6, 3:7] = 0  # a hole, with an island in it
    ring[4, 4] = 1
    diag = np.zeros((H, W), np.uint8)
    diag[1, 11] = diag[2, 12] = 1  # two pixels touching at a corner: two parts
    polys = mask_polygons(ring | diag)
    assert len(polys) == 3
    filled = _rect(1, 1, 9, 8) | diag
    assert (mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, H, W))) == filled).all()


def test_coco_to_yolo_to_coco_round_trip(tmp_path):
    images = tmp_path / "imgs"
    _image(images / "sub" / "p.png")
    _image(images / "q.jpg", h=W, w=H, orientation=8)  # upright 20 wide, 10 high
    two_parts = _rect(1, 1, 4, 5) | _rect(12, 2, 19, 9)
    two_parts[2, 18] = 0  # a notch at a corner (a hole would be filled: YOLO polygons hold none)
    rle = mask_utils.encode(np.asfortranarray(two_parts))
    el = [1, 1, 9, 1, 9, 3, 4, 3, 4, 8, 1, 8]  # an L on pixel edges
    anns = [
        {"id": 1, "image_id": 5, "category_id": 7, "bbox": [1, 1, 8, 7], "segmentation": [el], "iscrowd": 0},
        {"id": 2, "image_id": 5, "category_id": 3, "bbox": [1, 1, 18, 8], "iscrowd": 0,
         "segmentation": {"size": [H, W], "counts": rle["counts"].decode()}},
        {"id": 3, "image_id": 9, "category_id": 3, "bbox": [2.5, 1.25, 10, 6.5], "iscrowd": 0},
        {"id": 4, "image_id": 9, "category_id": 7, "bbox": [0, 0, 5, 5], "iscrowd": 1,
         "segmentation": {"size": [H, W], "counts": mask_utils.encode(np.asfortranarray(_rect(0, 0, 5, 5)))["counts"].decode()}},
    ]  # fmt: skip
    src = {"images": [{"id": 5, "file_name": "sub/p.png", "height": H, "width": W}, {"id": 9, "file_name": "q.jpg", "height": H, "width": W}],
           "annotations": anns, "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}]}  # fmt: skip
    (tmp_path / "src.json").write_text(json.dumps(src))
    done = convert(tmp_path / "src.json", "coco", tmp_path / "yolo", images=images)
    assert (done.images, done.annotations, done.skipped) == (2, 3, 1)
    assert (tmp_path / "yolo" / "labels" / "train" / "sub" / "p.txt").read_text().count("\n") == 2
    back = json.loads(convert(tmp_path / "yolo" / "data.yaml", "yolo", tmp_path / "back.json").out.read_text())
    assert [i["file_name"] for i in back["images"]] == ["images/train/q.jpg", "images/train/sub/p.png"]
    kept = [a for a in anns if not a["iscrowd"]]
    by_file = {"images/train/sub/p.png": kept[:2], "images/train/q.jpg": kept[2:]}
    file_of = {i["id"]: i["file_name"] for i in back["images"]}
    expected = [a for f in sorted(by_file) for a in by_file[f]]
    got = sorted(back["annotations"], key=lambda a: (file_of[a["image_id"]], a["id"]))
    assert _names(back, got) == [{3: "a", 7: "b"}[a["category_id"]] for a in expected]
    for g, e in zip(got, expected):
        assert np.abs(np.subtract(g["bbox"], e["bbox"])).max() < 0.01  # to a hundredth of a pixel
        if "segmentation" in e:
            assert (annotation_mask(g, H, W, "") == annotation_mask(e, H, W, "")).all()
        else:
            assert "segmentation" not in g


def test_yolo_export_refuses_a_used_folder(tmp_path):
    images = tmp_path / "imgs"
    _image(images / "p.png")
    (tmp_path / "src.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "p.png", "height": H, "width": W}],
                                                   "annotations": [], "categories": [{"id": 1, "name": "a"}]}))  # fmt: skip
    (tmp_path / "yolo").mkdir()
    (tmp_path / "yolo" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"--out .*yolo: folder is not empty; give a new folder"):
        convert(tmp_path / "src.json", "coco", tmp_path / "yolo", images=images)
    with pytest.raises(ValueError, match=r"lies inside the input --images"):
        convert(tmp_path / "src.json", "coco", images / "yolo", images=images)
    assert _no_files_but(images, "p.png") and _no_files_but(tmp_path / "yolo", "keep.txt")


# --------------------------------------------------------------------------- the command


def test_cli_convert_and_refusals(tmp_path):
    root = _yolo(tmp_path, ["0 0.5 0.5 0.5 0.4"])
    runner = CliRunner()
    r = runner.invoke(app, ["convert", "yolo", str(root / "data.yaml"), "--out", str(tmp_path / "c.json"), "--masks", "polygon"])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == f"wrote {tmp_path / 'c.json'}: 3 images, 1 annotations, 2 categories; image root {root}"
    r = runner.invoke(app, ["convert", "yolo", str(root / "data.yaml"), "--out", str(root / "data.yaml")])
    assert "refusing to overwrite an input" in str(r.exception)
    r = runner.invoke(app, ["convert", "cvat", str(root / "data.yaml"), "--out", str(tmp_path / "d.json")])
    assert str(r.exception) == "format must be one of yolo, labelme, voc, coco, got 'cvat'"
    r = runner.invoke(app, ["convert", "yolo", str(root / "data.yaml"), "--out", str(tmp_path / "d.json"), "--masks", "bitmap"])
    assert str(r.exception) == "--masks must be one of rle, polygon, got 'bitmap'"
    assert not (tmp_path / "d.json").exists()
    r = subprocess.run([sys.executable, "-m", "twopass.pipeline.cli", "--help"], capture_output=True, text=True)
    assert "convert" in r.stdout
