import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from twopass.detector.config import ModelConfig
from twopass.detector.model import build_detector
from twopass.pipeline.categories import Categories
from twopass.pipeline.coco import CocoIndex
from twopass.pipeline.tables import detections_table, rles_of
from twopass.detector.infer import View, make_views, to_view
from twopass.segmenter.infer import mask_probs, segment

SIZE = 64


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig.model_validate(dict(
        name="tiny",
        backbone=dict(name="resnet18", fpn_channels=16, trainable_stages=5),
        norm=dict(backbone="bn", gn_groups=4),
        rpn=dict(pre_nms_top_n_test=64, post_nms_top_n_test=32),
        box_head=dict(fc_dim=32),
        mask_head=dict(enabled=True, conv_dim=8, num_convs=1),
        input=dict(train_sizes=[SIZE], test_size=SIZE, max_size=4 * SIZE),
    ))
    torch.manual_seed(0)
    return build_detector(cfg, num_classes=8).eval()


def test_flip_view_equals_flipped_image(model):
    image = torch.rand(3, 48, SIZE)
    boxes = torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 2.0, 60.0, 47.0]])
    labels = torch.tensor([1, 5])
    via_view = mask_probs(model, image, boxes, labels, [View(SIZE, True)])
    mirrored = to_view(boxes, (48, SIZE), (48, SIZE), True)
    direct = mask_probs(model, image.flip(-1), mirrored, labels, [View(SIZE, False)]).flip(-1)
    torch.testing.assert_close(via_view, direct)
    both = mask_probs(model, image, boxes, labels, make_views([SIZE], flip=True))
    plain = mask_probs(model, image, boxes, labels, [View(SIZE)])
    torch.testing.assert_close(both, (plain + via_view) / 2)


def test_segment_writes_instances_on_given_boxes(model, synth_small):
    index = CocoIndex.load(synth_small / "annotations.json")
    images = index.image_set(synth_small / "images")
    anns = [a for iid in (3, 1) for a in index.anns_by_image[iid]]
    boxes = np.array([a["bbox"] for a in anns], np.float32)
    boxes[:, 2:] += boxes[:, :2]
    det = detections_table([a["image_id"] for a in anns], [a["category_id"] for a in anns],
                           np.linspace(0.9, 0.1, len(anns)), boxes, "gt")
    out, report = segment(model, index.categories, images, det, make_views([SIZE, 96], flip=True))
    assert out.num_rows == len(anns) == report.written
    assert out.column("image_id").to_pylist() == sorted(a["image_id"] for a in anns)  # grouped by image
    masks = mask_utils.decode(rles_of(out))
    assert masks.shape == (128, 128, len(anns))
    # every mask lies inside its (integer-grown) box, and the scores are the boxes' scores
    for k, b in enumerate(out.select(["x1", "y1", "x2", "y2"]).to_pylist()):
        ys, xs = np.nonzero(masks[:, :, k])
        if len(xs):
            assert xs.min() >= int(b["x1"]) - 2 and xs.max() <= b["x2"] + 2
            assert ys.min() >= int(b["y1"]) - 2 and ys.max() <= b["y2"] + 2
    assert sorted(out.column("score").to_pylist()) == sorted(det.column("score").to_pylist())


@pytest.mark.parametrize(
    "row,message",
    [
        (dict(image_id=999), "image_id 999, category_id 1.*image not in the image set"),
        (dict(category_id=42), "image_id 1, category_id 42.*category the segmenter was not trained on"),
        (dict(box=[5, 5, 5, 9]), r"image_id 1, category_id 1, box \[5.0, 5.0, 5.0, 9.0\]\): degenerate box"),
        (dict(box=[5, 5, float("nan"), 9]), "image_id 1, category_id 1, box .*nan.*non-finite box or score"),
    ],
)
def test_bad_rows_are_named_or_skipped(model, synth_small, row, message):
    index = CocoIndex.load(synth_small / "annotations.json")
    images = index.image_set(synth_small / "images")
    good = dict(image_id=1, category_id=1, box=[2, 2, 20, 20])
    bad = {**good, **row}
    rows = [good, bad]
    det = detections_table([r["image_id"] for r in rows], [r["category_id"] for r in rows], [0.5, 0.5],
                           np.array([r["box"] for r in rows], np.float32), "x")
    with pytest.raises(ValueError, match=rf"dets\.parquet: row 1 \({message}"):
        segment(model, index.categories, images, det, [View(SIZE)], what="dets.parquet")
    out, report = segment(model, index.categories, images, det, [View(SIZE)], skip_invalid=True)
    assert out.num_rows == 1 and sum(report.skipped.values()) == 1


def test_zero_boxes_give_empty_valid_output(model, synth_small):
    index = CocoIndex.load(synth_small / "annotations.json")
    out, report = segment(model, Categories.from_coco(index.raw["categories"]), index.image_set(synth_small / "images"),
                          detections_table([], [], [], np.zeros((0, 4)), "x"), [View(SIZE)])
    assert out.num_rows == 0 and "mask_counts" in out.column_names and report.written == 0


def test_image_whose_size_differs_from_the_annotation_is_named(model, synth_small, tmp_path):
    import shutil

    from PIL import Image

    from twopass.pipeline.coco import DataError

    shutil.copytree(synth_small / "images", tmp_path / "images")
    Image.new("RGB", (100, 90)).save(tmp_path / "images" / "000002.png")
    index = CocoIndex.load(synth_small / "annotations.json")
    images = index.image_set(tmp_path / "images")
    det = detections_table([2], [1], [0.5], np.array([[2, 2, 20, 20]], np.float32), "x")
    with pytest.raises(DataError, match=r"image_id 2: image file is 90x100 \(HxW\), annotations say 128x128"):
        segment(model, index.categories, images, det, [View(SIZE)])


def test_segment_cli_takes_results_json_with_polygon_masks(synth_small, ckpts, tmp_path):
    """Another tool's instances as boxes: polygon masks are read (rasterised at the image's size)
    and the instances are those of the same boxes without masks."""
    import json

    from typer.testing import CliRunner

    from twopass.pipeline.cli import app
    from twopass.pipeline.tables import read_results, to_coco_results

    data = json.loads((synth_small / "annotations.json").read_text())
    anns = [a for a in data["annotations"] if a["image_id"] in (1, 2)]
    boxes = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.8} for a in anns]
    polygons = []
    for b in boxes:
        x, y, w, h = b["bbox"]
        polygons.append({**b, "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
    runs = {}
    for name, results in (("boxes", boxes), ("polygons", polygons)):
        (tmp_path / f"{name}.json").write_text(json.dumps(results))
        out = tmp_path / f"{name}.parquet"
        r = CliRunner().invoke(app, ["segment", "--checkpoint", str(ckpts["seg"]), "--detections", str(tmp_path / f"{name}.json"),
                                     "--images", str(synth_small / "images"), "--ann", str(synth_small / "annotations.json"),
                                     "--out", str(out), "--coco-json", str(tmp_path / f"{name}.out.json")])  # fmt: skip
        assert r.exit_code == 0, r.output
        runs[name] = read_results(out)[0]
        assert json.loads((tmp_path / f"{name}.out.json").read_text()) == to_coco_results(runs[name])
    same = [c for c in runs["boxes"].column_names if c != "source"]  # the source is the file's name
    assert runs["polygons"].num_rows == len(anns) and runs["polygons"].select(same).equals(runs["boxes"].select(same))
    # a polygon on an image the set does not have: no size to rasterise it at, named before any compute
    polygons[1]["image_id"] = 99
    (tmp_path / "bad.json").write_text(json.dumps(polygons))
    r = CliRunner().invoke(app, ["segment", "--checkpoint", str(ckpts["seg"]), "--detections", str(tmp_path / "bad.json"),
                                 "--images", str(synth_small / "images"), "--ann", str(synth_small / "annotations.json"),
                                 "--out", str(tmp_path / "bad.parquet")])  # fmt: skip
    assert r.exit_code != 0 and not (tmp_path / "bad.parquet").exists()
    assert str(r.exception) == (f"{tmp_path / 'bad.json'}: entry 1 (image_id 99): segmentation is a polygon, which needs its image's "
                                "height and width, and image_id 99 is not among the 8 images given")  # fmt: skip
