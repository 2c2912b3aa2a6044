import json

import numpy as np
import pytest
import torch
from PIL import Image
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
