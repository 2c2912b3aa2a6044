import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image
from pycocotools import mask as mask_utils

from twopass.pipeline.coco import CocoDataset, DataError, ImageSet, collate


def write_coco(root, anns=None, images=None, cats=None, size=(20, 30)):
    """A tiny dataset: one 20x30 RGB image with a square and a polygon."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    h, w = size
    Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(root / "img" / "a.png")
    square = np.zeros((h, w), np.uint8)
    square[2:8, 3:10] = 1
    rle = mask_utils.encode(np.asfortranarray(square))
    data = {
        "images": images or [{"id": 5, "file_name": "a.png", "height": h, "width": w}],
        "annotations": anns
        if anns is not None
        else [
            {"id": 1, "image_id": 5, "category_id": 9, "bbox": [3, 2, 7, 6], "iscrowd": 0, "area": 42,
             "segmentation": {"size": [h, w], "counts": rle["counts"].decode()}},
            {"id": 2, "image_id": 5, "category_id": 4, "bbox": [10, 10, 10, 5], "iscrowd": 0, "area": 50,
             "segmentation": [[10, 10, 20, 10, 20, 15, 10, 15]]},
        ],
        "categories": cats or [{"id": 9, "name": "nine"}, {"id": 4, "name": "four"}],
    }
    (root / "ann.json").write_text(json.dumps(data))
    return root / "ann.json", root / "img"


def test_dataset_yields_torchvision_targets(tmp_path):
    ann, img = write_coco(tmp_path)
    ds = CocoDataset(ann, img)
    image, t = ds[0]
    assert image.shape == (3, 20, 30) and image.dtype == torch.float32 and 0.49 < image.mean() < 0.51
    torch.testing.assert_close(t["boxes"], torch.tensor([[3.0, 2, 10, 8], [10, 10, 20, 15]]))
    # categories sorted by id: 4 -> label 1, 9 -> label 2
    assert t["labels"].tolist() == [2, 1] and ds.categories.ids == (4, 9)
    assert t["masks"].shape == (2, 20, 30) and t["masks"].dtype == torch.uint8
    assert t["masks"][0].sum() == 42 and t["masks"][0][2:8, 3:10].all()
    assert t["masks"][1][11:14, 11:19].all() and not t["masks"][1][:9].any()  # polygon decoded
    assert t["iscrowd"].tolist() == [0, 0] and t["image_id"] == 5
    images, targets = collate([ds[0], ds[0]])
    assert len(images) == 2 and len(targets) == 2


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d: d["annotations"][0].update(image_id=77), r"ann\.json: annotation 1 points at unknown image_id 77"),
        (lambda d: d["annotations"][0].update(category_id=3), r"annotation 1 \(image_id 5\) has unknown category_id 3"),
        (lambda d: d["annotations"][1].update(bbox=[1, 1, 0, 4]), r"annotation 2 \(image_id 5\) has degenerate bbox"),
        (lambda d: d["annotations"][1].update(bbox=[25, 1, 10, 4]), r"annotation 2 \(image_id 5\) bbox .* lies outside the 30x20 image"),
        (lambda d: d["annotations"][1].update(bbox=[1, 1, float("nan"), 4]), r"annotation 2 \(image_id 5\) has bad bbox"),
        (lambda d: d["images"][0].update(file_name="../a.png"), r"image_id 5: file_name '\.\./a\.png' escapes the image root"),
        (lambda d: d["images"][0].update(file_name="/etc/passwd"), r"image_id 5: file_name '/etc/passwd' is an absolute path"),
        (lambda d: d["images"][0].update(file_name="gone.png"), r"image file .*gone\.png \(image_id 5\) is missing"),
        (lambda d: d["images"].append(dict(d["images"][0])), r"image id 5 appears twice"),
        (lambda d: d.pop("categories"), r"ann\.json: missing list 'categories'"),
    ],
)
def test_bad_annotations_name_file_and_id(tmp_path, mutate, message):
    ann, img = write_coco(tmp_path)
    data = json.loads(ann.read_text())
    mutate(data)
    ann.write_text(json.dumps(data))
    with pytest.raises(DataError, match=message):
        CocoDataset(ann, img)


def test_unreadable_and_resized_images(tmp_path):
    ann, img = write_coco(tmp_path)
    (img / "a.png").write_bytes(b"not a png")
    ds = CocoDataset(ann, img)
    with pytest.raises(DataError, match=r"ann\.json: image_id 5: cannot read image file .*a\.png"):
        ds[0]
    Image.fromarray(np.zeros((21, 30, 3), np.uint8)).save(img / "a.png")
    with pytest.raises(DataError, match=r"image_id 5: image file is 21x30 \(HxW\), annotations say 20x30"):
        ds[0]


def test_an_image_above_the_decompression_bomb_limit_is_one_data_error(tmp_path, monkeypatch):
    ann, img = write_coco(tmp_path)  # 600 pixels; PIL refuses above twice its limit
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DataError) as e:
        CocoDataset(ann, img)[0]
    assert str(e.value).startswith(f"{ann}: image_id 5: image file {img / 'a.png'} is too large to decode safely (")
    assert "exceeds limit" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError, match=rf"{img / 'a.png'}: image is too large to decode safely"):
        ImageSet.from_folder(img)


def test_bad_segmentation_is_named(tmp_path):
    ann, img = write_coco(tmp_path)
    data = json.loads(ann.read_text())
    data["annotations"][0]["segmentation"] = {"size": [5, 5], "counts": "abc"}
    ann.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"image_id 5: annotation 1 has a bad segmentation"):
        CocoDataset(ann, img)[0]


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "LA", "1"])
def test_image_modes_load_as_rgb(tmp_path, mode):
    ann, img = write_coco(tmp_path)
    base = np.full((20, 30), 200, np.uint8)
    if mode == "I;16":
        im = Image.fromarray(base.astype(np.uint16) * 257)
        assert im.mode == "I;16"
    elif mode == "1":
        im = Image.fromarray(base > 100).convert("1")
    elif mode == "P":
        im = Image.fromarray(np.stack([base] * 3, -1)).convert("P", palette=Image.Palette.ADAPTIVE)
    else:
        im = Image.fromarray(np.stack([base] * 3, -1)).convert(mode)
    im.save(img / "a.png")
    x, _ = CocoDataset(ann, img)[0]
    assert x.shape == (3, 20, 30)
    expected = 255 if mode == "1" else 200
    assert torch.allclose(x * 255, torch.full_like(x, expected), atol=1.0)


def test_image_set_from_folder_orders_by_name_and_round_trips(tmp_path):
    for name in ["b.png", "a.jpg", "sub/c.png"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.fromarray(np.zeros((4 + len(name), 6, 3), np.uint8)).save(tmp_path / name)
    s = ImageSet.from_folder(tmp_path)
    assert s.table.column("file_name").to_pylist() == ["a.jpg", "b.png", "sub/c.png"]
    assert s.image_ids == [1, 2, 3] and s.size(3) == (13, 6)
    s.write(tmp_path / "images.parquet")
    again = ImageSet.from_table(tmp_path / "images.parquet", tmp_path)
    assert again.table.equals(s.table)
    assert again.read(2).shape == (3, 9, 6)
    with pytest.raises(DataError, match="image_id 9 is not in the image set"):
        again.read(9)
    with pytest.raises(DataError, match="no image files"):
        ImageSet.from_folder(_empty(tmp_path))


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_synthetic_set_loads(synth_small):
    ds = CocoDataset(synth_small / "annotations.json", synth_small / "images")
    assert len(ds) == 8 and ds.categories.num_classes == 8
    for i in range(len(ds)):
        _, t = ds[i]
        # every box is the tight box of its mask
        for box, m in zip(t["boxes"], t["masks"]):
            ys, xs = torch.nonzero(m, as_tuple=True)
            assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


# --------------------------------------------------------------------------- EXIF orientation

# exif_transpose turns orientation 6 by ROTATE_270 and 8 by ROTATE_90, 5 by TRANSPOSE and 3 by
# ROTATE_180: a camera stores the pixels turned the other way
_STORED = {3: Image.Transpose.ROTATE_180, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def _upright():
    """16x24 grey background 40 with an object of 200 at rows 0:8, cols 8:16 (8-pixel blocks:
    JPEG keeps flat blocks nearly exact)."""
    a = np.full((16, 24, 3), 40, np.uint8)
    a[0:8, 8:16] = 200
    return a


def _write_turned(path, orientation, exif_after_data=False):
    """The upright image stored turned, with the EXIF orientation that turns it back."""
    stored = Image.fromarray(_upright()).transpose(_STORED[orientation])
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    if not exif_after_data:
        stored.save(path, exif=exif.tobytes(), **({"quality": 95} if path.suffix == ".jpg" else {}))
        return path
    stored.save(path)  # then an eXIf chunk just before IEND, where PIL finds it only on decode
    data = path.read_bytes()
    payload = exif.tobytes()[6:]  # without the "Exif\0\0" prefix, as PNG stores it
    chunk = struct.pack(">I", len(payload)) + b"eXIf" + payload + struct.pack(">I", zlib.crc32(b"eXIf" + payload))
    end = data.rindex(b"IEND") - 4
    path.write_bytes(data[:end] + chunk + data[end:])
    return path


def _upright_coco(root, file_name, size=(16, 24)):
    h, w = size
    square = np.zeros((16, 24), np.uint8)
    square[0:8, 8:16] = 1
    rle = mask_utils.encode(np.asfortranarray(square))
    data = {"images": [{"id": 1, "file_name": file_name, "height": h, "width": w}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [8, 0, 8, 8], "iscrowd": 0, "area": 64,
                             "segmentation": {"size": [16, 24], "counts": rle["counts"].decode()}}],
            "categories": [{"id": 1, "name": "thing"}]}  # fmt: skip
    (root / "ann.json").write_text(json.dumps(data))
    return root / "ann.json"


@pytest.mark.parametrize("name,orientation", [("a.png", 6), ("a.png", 8), ("a.png", 5), ("a.png", 3), ("a.jpg", 6), ("a.jpg", 8)])
def test_exif_orientation_turns_images_upright_and_the_annotations_line_up(tmp_path, name, orientation):
    from PIL import ImageOps

    (tmp_path / "img").mkdir()
    path = _write_turned(tmp_path / "img" / name, orientation)
    with Image.open(path) as im:
        assert im.size == ((16, 24) if orientation in (5, 6, 8) else (24, 16))  # stored turned: W x H
        expected = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    ds = CocoDataset(_upright_coco(tmp_path, name), tmp_path / "img")
    image, target = ds[0]
    got = (image * 255).round().byte().permute(1, 2, 0).numpy()
    assert got.shape == (16, 24, 3) and np.array_equal(got, expected)  # what PIL's exif_transpose gives
    tol = 0 if name.endswith(".png") else 6  # JPEG: flat 8x8 blocks come back within a few levels
    assert np.abs(got.astype(int) - _upright()).max() <= tol
    # the annotated box and mask hold the object (200), the rest the background (40)
    x1, y1, x2, y2 = target["boxes"][0].int().tolist()
    assert float(image[:, y1:y2, x1:x2].mean()) * 255 == pytest.approx(200, abs=tol + 1e-3)
    m = target["masks"][0].bool()
    assert float(image[:, m].mean()) * 255 == pytest.approx(200, abs=tol + 1e-3)
    assert float(image[:, ~m].mean()) * 255 == pytest.approx(40, abs=tol + 1e-3)
    # a folder's sizes are the upright sizes too, read from the header
    s = ImageSet.from_folder(tmp_path / "img")
    assert s.size(1) == (16, 24) and np.array_equal(s.read(1).permute(1, 2, 0).numpy(), expected)


def test_exif_in_a_png_after_its_pixels_is_found_without_decoding(tmp_path):
    (tmp_path / "img").mkdir()
    path = _write_turned(tmp_path / "img" / "a.png", 6, exif_after_data=True)
    with Image.open(path) as im:
        assert "exif" not in im.info  # PIL sees it only once the pixels are decoded
    s = ImageSet.from_folder(tmp_path / "img")
    assert s.size(1) == (16, 24)
    assert np.array_equal(s.read(1).permute(1, 2, 0).numpy(), _upright())


def test_a_size_mismatch_from_exif_orientation_says_so(tmp_path):
    (tmp_path / "img").mkdir()
    _write_turned(tmp_path / "img" / "a.jpg", 6)
    ann = _upright_coco(tmp_path, "a.jpg", size=(24, 16))  # the size of the stored pixels, as some tools record it
    data = json.loads(ann.read_text())
    data["annotations"] = []
    ann.write_text(json.dumps(data))
    with pytest.raises(DataError) as e:
        CocoDataset(ann, tmp_path / "img")[0]
    assert str(e.value).startswith(f"{ann}: image_id 1: image file is 24x16 (HxW) as stored but its EXIF orientation 6 turns it "
                                   "to 16x24; annotations say 24x16 (")  # fmt: skip
    assert "\n" not in str(e.value)
    # a mismatch of an unturned image is worded as before
    Image.fromarray(np.zeros((20, 16, 3), np.uint8)).save(tmp_path / "img" / "a.jpg")
    with pytest.raises(DataError, match=r"image_id 1: image file is 20x16 \(HxW\), annotations say 24x16$"):
        CocoDataset(ann, tmp_path / "img")[0]


def test_pictures_are_drawn_on_the_upright_image(tmp_path):
    from twopass.pipeline.coco import CocoIndex
    from twopass.pipeline.visualize import category_color, render_image

    (tmp_path / "img").mkdir()
    _write_turned(tmp_path / "img" / "a.png", 8)
    gt = CocoIndex.load(_upright_coco(tmp_path, "a.png"))
    picture = np.asarray(render_image(gt.image_set(tmp_path / "img"), 1, gt.categories, [("ground truth", gt.anns_by_image[1])]))
    scale = 512 // 24  # small images are enlarged; a 14-pixel title bar sits above
    assert picture.shape == (14 + 16 * scale, 24 * scale, 3)
    # the box outline of the annotation at x 8..16, y 0..8 of the upright image
    assert tuple(picture[14, 8 * scale]) == category_color(1) == tuple(picture[14 + 8 * scale - 1, 16 * scale - 1])
    assert tuple(picture[14 + 12 * scale, 4 * scale]) == (40, 40, 40)  # the background, unmasked
