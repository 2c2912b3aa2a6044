"""Inference: views undo exactly, TTA sources, masks, and the inference-only speed rewrites."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from twopass.detector.config import ModelConfig
from twopass.detector.infer import (
    LoadedModel, View, detect_images, flip_boxes, from_view, from_view_outputs, make_view_image, make_views, to_view, view_inputs, view_size,
)  # fmt: skip
from twopass.detector.model import build_detector
from twopass.detector.tv_private import resize_image_and_masks
from twopass.detector.speed import fold_batchnorm, optimize_for_inference
from twopass.pipeline.categories import Categories
from twopass.pipeline.coco import ImageSet
from twopass.pipeline.settings import DetectSettings


def detect(model, image_set, categories, *, model_name, views=None, with_masks=False, nms_thresh=None, **settings):
    """The front door on a model in memory, its own score threshold and detections an image
    unless given."""
    rh = model.roi_heads
    settings = DetectSettings(**{"score_thresh": rh.score_thresh, "max_per_image": rh.detections_per_img, **settings})
    loaded = LoadedModel.in_memory(model, categories)
    return detect_images(loaded, image_set, views, settings, name=model_name, with_masks=with_masks, nms_thresh=nms_thresh)[0]


def predict(model, images, view, max_size, max_per_image=None):
    """One view's predictions in the original images' frame, as `detect_images` makes them."""
    inputs, size = view_inputs(images, view, max_size)
    outputs = model.predict(inputs, size=size, detections_per_img=max_per_image, paste_masks=False)
    return from_view_outputs(outputs, images, inputs, view)


def test_view_size_matches_torchvision_resize():
    for h, w in [(128, 128), (100, 80), (427, 640), (33, 517), (800, 1216)]:
        for scale, max_size in [(48, 96), (64, 1333), (480, 800), (800, 1333), (641, 1000)]:
            img = torch.zeros(3, h, w)
            resized, _ = resize_image_and_masks(img, scale, max_size)
            assert view_size(h, w, scale, max_size) == tuple(resized.shape[-2:])
            # and the view image itself is what the model's transform would feed
            assert tuple(make_view_image(img, View(scale), max_size).shape[-2:]) == tuple(resized.shape[-2:])


def test_tta_box_round_trip():
    g = torch.Generator().manual_seed(0)
    orig = (427, 640)
    xy = torch.rand(50, 2, generator=g) * torch.tensor([600.0, 400.0])
    wh = torch.rand(50, 2, generator=g) * 40 + 0.5
    boxes = torch.cat([xy, xy + wh], 1)
    assert torch.allclose(flip_boxes(flip_boxes(boxes, 640), 640), boxes, atol=1e-4, rtol=0)
    for scale in (320, 480, 640, 800, 1000):
        for flip in (False, True):
            vhw = view_size(*orig, scale, 1333)
            v = to_view(boxes, orig, vhw, flip)
            assert (v[:, 2] > v[:, 0]).all() and (v[:, 3] > v[:, 1]).all()
            back = from_view(v, orig, vhw, flip)
            assert torch.allclose(back, boxes, atol=1e-4, rtol=0), (scale, flip, (back - boxes).abs().max())
    # A box at the left edge comes back to the left edge from the mirrored view.
    b = torch.tensor([[0.0, 10.0, 30.0, 50.0]])
    v = to_view(b, orig, view_size(*orig, 800, 1333), True)
    assert v[0, 2].item() == pytest.approx(view_size(*orig, 800, 1333)[1])
    assert torch.allclose(from_view(v, orig, view_size(*orig, 800, 1333), True), b, atol=1e-4)


class BrightBoxModel(nn.Module):
    """Stands in for a detector: 'detects' the bright square of each input image in the frame
    of the image it is given (so the test sees what `detect_images` does with the view frames)."""

    def __init__(self, test_size=64, max_size=1333):
        super().__init__()
        self.config = SimpleNamespace(name="bright", input=SimpleNamespace(test_size=test_size, max_size=max_size), to_dict=dict)
        self.roi_heads = SimpleNamespace(score_thresh=0.05, detections_per_img=100, has_mask=lambda: False)
        self.seen: list[tuple] = []

    def predict(self, images, *, size=None, score_thresh=None, nms_thresh=None, detections_per_img=None, paste_masks=True):
        assert size is None  # inference takes the view frame as given
        out = []
        for im in images:
            self.seen.append(tuple(im.shape[-2:]))
            ys, xs = torch.where(im[0] > 0.5)
            box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
            out.append({"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([2])})
        return out


def test_detect_undoes_each_view(tmp_path):
    """An off-centre square through 3 scales x flip comes back where it is in the original."""
    h, w = 90, 120
    x1, y1, x2, y2 = 10, 20, 50, 44  # far from symmetric, so a missing unflip would show
    a = np.zeros((h, w, 3), np.uint8)
    a[y1:y2, x1:x2] = 255
    (tmp_path / "imgs").mkdir()
    Image.fromarray(a).save(tmp_path / "imgs" / "a.png")
    image_set = ImageSet.from_folder(tmp_path / "imgs")
    model = BrightBoxModel()
    cats = Categories((5, 9), ("x", "y"))
    views = make_views([45, 90, 180], flip=True)
    table = detect(model, image_set, cats, model_name="m", views=views)
    assert table.column("source").to_pylist() == ["m@45", "m@45+flip", "m@90", "m@90+flip", "m@180", "m@180+flip"]
    assert model.seen == [(45, 60), (45, 60), (90, 120), (90, 120), (180, 240), (180, 240)]
    assert set(table.column("category_id").to_pylist()) == {9}
    boxes = np.stack([table.column(c).to_numpy() for c in ("x1", "y1", "x2", "y2")], 1)
    # exact at the native scale; within the resampling blur (one view pixel) at the others
    assert np.allclose(boxes[2:4], [x1, y1, x2, y2], atol=1e-4)
    assert np.allclose(boxes, [[x1, y1, x2, y2]] * 6, atol=2.01)
    assert model.roi_heads.score_thresh == 0.05  # nothing written on the model


def _tiny(**over) -> ModelConfig:
    base = dict(
        name="tiny",
        backbone=dict(name="resnet18", fpn_channels=16, trainable_stages=5),
        norm=dict(backbone="frozen_bn"),
        box_head=dict(type="location_sensitive", fc_dim=32, kernel_size=3, mid_channels=8, alpha=2, score_thresh=0.0),
        mask_head=dict(enabled=True, conv_dim=8, num_convs=1),
        input=dict(train_sizes=[64], test_size=64, max_size=96),
    )
    base.update(over)
    return ModelConfig.model_validate(base)


def _randomise_frozen_bn(model):
    from torchvision.ops.misc import FrozenBatchNorm2d

    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            n = m.weight.numel()
            m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


def test_explicit_views_equal_the_models_own_resize():
    torch.manual_seed(0)
    model = build_detector(_tiny(), 3).eval()
    images = [torch.rand(3, 100, 80), torch.rand(3, 70, 90)]
    with torch.no_grad():
        ref = model(images)
        mine = predict(model, images, View(64), 96)
    for r, m in zip(ref, mine):
        assert torch.allclose(r["boxes"], m["boxes"], atol=1e-3) and torch.allclose(r["scores"], m["scores"], atol=1e-5)


def test_instances_with_masks(tmp_path):
    torch.manual_seed(0)
    model = build_detector(_tiny(), 3).eval()
    (tmp_path / "imgs").mkdir()
    Image.fromarray((np.random.default_rng(0).random((70, 90, 3)) * 255).astype(np.uint8)).save(tmp_path / "imgs" / "a.png")
    image_set = ImageSet.from_folder(tmp_path / "imgs")
    table = detect(model, image_set, Categories((1, 2, 3), ("a", "b", "c")), model_name="t", views=make_views([64], True), with_masks=True, max_per_image=5)
    assert table.num_rows == 10
    assert set(table.column("mask_height").to_pylist()) == {70} and set(table.column("mask_width").to_pylist()) == {90}


@pytest.mark.parametrize("backbone", ["resnet18", "shufflenet_v2_x0_5"])
def test_batchnorm_folding_and_channels_last_keep_outputs(backbone):
    torch.manual_seed(0)
    model = build_detector(_tiny(backbone=dict(name=backbone, fpn_channels=16, trainable_stages=3)), 3).eval()
    with torch.no_grad():
        _randomise_frozen_bn(model)
    fast = optimize_for_inference(copy.deepcopy(model), channels_last=True)
    assert not any(type(m).__name__ == "FrozenBatchNorm2d" for m in fast.backbone.modules())
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        ref = model.backbone(x)
        got = fast.backbone(x)
        for k in ref:
            assert torch.allclose(ref[k], got[k], atol=1e-4, rtol=1e-4), k
        images = [torch.rand(3, 64, 64)]
        a, b = model(images)[0], fast(images)[0]
    assert torch.allclose(a["scores"][:20], b["scores"][:20], atol=1e-4)
    assert torch.allclose(a["boxes"][:20], b["boxes"][:20], atol=1e-2)


def test_fold_counts_every_resnet_batchnorm():
    import torchvision
    from twopass.detector.backbone import freeze_batchnorm

    net = freeze_batchnorm(torchvision.models.resnet50(weights=None))
    assert fold_batchnorm(net) == 53  # stem + 16 blocks x 3 + 4 downsample


@pytest.mark.parametrize("ratio,out", [(2, 7), (1, 14), (3, 5)])
def test_sparse_roi_align_equals_torchvision(ratio, out):
    from torchvision.ops import roi_align

    from twopass.detector.heads import roi_align_channels_last

    g = torch.Generator().manual_seed(ratio)
    x = torch.randn(2, 8, 23, 37, generator=g)
    xy = torch.rand(40, 2, generator=g) * torch.tensor([180.0, 110.0]) - 20  # some start outside
    wh = torch.rand(40, 2, generator=g) * 90
    wh[:5] = 0.3  # boxes smaller than a feature pixel
    boxes = torch.cat([xy, xy + wh], 1)
    rois = torch.cat([torch.randint(0, 2, (40, 1), generator=g).float(), boxes], 1)
    ref = roi_align(x, rois, out, 0.2, ratio)
    got = roi_align_channels_last(x.contiguous(memory_format=torch.channels_last), rois, out, 0.2, ratio)
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-5)  # float rounding only


def test_validation_scores_as_coco_does(synth_small, monkeypatch):
    """The training validator keeps detections down to 0.001 (the top 100 an image), not the
    model's own 0.05, so that early learning curves are not understated."""
    import twopass.pipeline.evaluate
    from twopass.detector.infer import EVAL_MAX_PER_IMAGE, EVAL_SCORE_THRESH, make_validator
    from twopass.pipeline.coco import CocoIndex

    index = CocoIndex.load(synth_small / "annotations.json")
    # the model's own settings: score_thresh 0.05, 20 detections an image
    cfg = _tiny(box_head=dict(type="two_fc", fc_dim=32, detections_per_img=20))
    torch.manual_seed(0)
    model = build_detector(cfg, index.categories.num_classes).eval()
    with torch.no_grad():  # every foreground class scores about e^0 / (e^4 + 8) ~ 0.016 < 0.05
        model.roi_heads.box_predictors[0].cls_score.bias[0] = 4.0
    seen = {}
    monkeypatch.setattr(twopass.pipeline.evaluate, "evaluate", lambda gt, table, iou_types: seen.setdefault("table", table) and {})
    make_validator(synth_small / "annotations.json", synth_small / "images", index.categories)(model)
    scores = seen["table"].column("score").to_numpy()
    assert len(scores) and scores.max() < 0.05 and scores.min() >= EVAL_SCORE_THRESH
    per_image = np.bincount(seen["table"].column("image_id").to_numpy())
    assert per_image.max() == EVAL_MAX_PER_IMAGE  # cut at COCO's 100, not the model's own
    assert (model.roi_heads.score_thresh, model.roi_heads.detections_per_img) == (0.05, 20)  # restored


def _two_images(synth_small, tmp_path):
    """The annotations of the first two images of `synth_small` (a quick run)."""
    data = json.loads((synth_small / "annotations.json").read_text())
    ids = {im["id"] for im in data["images"][:2]}
    data["images"] = data["images"][:2]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
    (tmp_path / "ann.json").write_text(json.dumps(data))
    return tmp_path / "ann.json"


def test_detect_cli_writes_coco_json_equal_to_its_parquet(synth_small, ckpts, tmp_path):
    from typer.testing import CliRunner

    from twopass.pipeline.cli import app
    from twopass.pipeline.tables import read_results, to_coco_results

    ann = _two_images(synth_small, tmp_path)
    out, coco = tmp_path / "d.parquet", tmp_path / "d.json"
    r = CliRunner().invoke(app, ["detect", "--checkpoint", str(ckpts["a"]), "--images", str(synth_small / "images"), "--ann", str(ann),
                                 "--out", str(out), "--coco-json", str(coco), "--score-thresh", "0"])  # fmt: skip
    assert r.exit_code == 0, r.output
    table, meta = read_results(out)
    assert meta.kind == "detections" and table.num_rows > 0
    assert json.loads(coco.read_text()) == to_coco_results(table)


def _image_set(tmp_path, sizes=((70, 90), (64, 80))):
    (tmp_path / "imgs").mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    return ImageSet.from_folder(tmp_path / "imgs")


def test_one_model_serves_two_threads_with_their_own_thresholds(tmp_path):
    """Thresholds are arguments, not model attributes: two threads running one model with
    different thresholds at once each get what a call alone gets, and the model is unchanged."""
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(0)
    model = build_detector(_tiny(), 3).eval()
    image_set = _image_set(tmp_path)
    cats = Categories((1, 2, 3), ("a", "b", "c"))
    settings = [dict(score_thresh=0.0, max_per_image=50, nms_thresh=1.0), dict(score_thresh=0.3, max_per_image=3)]

    def run(kw):
        return detect(model, image_set, cats, model_name="t", views=make_views([64, 80], True), **kw)

    alone = [run(kw) for kw in settings]
    assert alone[0].num_rows > alone[1].num_rows > 0  # the two settings keep different rows
    all_kept = dict(score_thresh=0.0, max_per_image=10_000)
    assert run(all_kept).num_rows < run(dict(all_kept, nms_thresh=1.0)).num_rows  # the model's NMS (0.5) merges
    with ThreadPoolExecutor(2) as pool:
        together = [f.result() for f in [pool.submit(run, kw) for kw in settings * 3]]
    for i, table in enumerate(together):
        assert table.equals(alone[i % 2]), i
    rh = model.roi_heads
    assert (rh.score_thresh, rh.nms_thresh, rh.detections_per_img, model.training) == (0.0, 0.5, 100, False)


def test_end_to_end_masks_honour_mask_thresh(tmp_path):
    """`detect_images(with_masks=True)` thresholds the pasted soft masks at `mask_thresh` (0.5 by default)."""
    from twopass.detector.infer import masks_to_rles
    from twopass.pipeline.tables import rles_of

    torch.manual_seed(0)
    model = build_detector(_tiny(), 3).eval()
    image_set = _image_set(tmp_path, [(70, 90)])
    cats = Categories((1, 2, 3), ("a", "b", "c"))
    image = image_set.read(image_set.image_ids[0]).float() / 255
    with torch.inference_mode():
        out = predict(model, [image], View(64), 96, max_per_image=5)[0]
    counts = {}
    for thresh in (0.5, 0.45):
        table = detect(model, image_set, cats, model_name="t", with_masks=True, max_per_image=5, mask_thresh=thresh)
        want = masks_to_rles(out["masks"], out["boxes"], (70, 90), thresh)
        counts[thresh] = [r["counts"] for r in rles_of(table)]
        assert counts[thresh] == [r["counts"] for r in want]
    default = detect(model, image_set, cats, model_name="t", with_masks=True, max_per_image=5)
    assert [r["counts"] for r in rles_of(default)] == counts[0.5] != counts[0.45]


def test_masks_for_boxes_equal_the_models_own_masks():
    """Given its own detections back (boxes and labels), the model's `masks_for_boxes` gives the
    soft masks its end-to-end pass gave them, at the input size and through its resize."""
    torch.manual_seed(0)
    model = build_detector(_tiny(), 3).eval()
    images = [torch.rand(3, 64, 80), torch.rand(3, 70, 90)]
    with torch.inference_mode():
        for size in (None, 64):
            own = model.predict(images, size=size, paste_masks=False, detections_per_img=5)
            given = model.masks_for_boxes(images, [o["boxes"] for o in own], [o["labels"] for o in own], size=size)
            for o, g in zip(own, given):
                assert len(o["boxes"]) == 5
                torch.testing.assert_close(g, o["masks"][:, 0], atol=1e-5, rtol=1e-4)


def test_a_model_in_memory_detects_as_its_saved_checkpoint(tmp_path):
    """`LoadedModel.in_memory` (a notebook's model, the validation hook's) gives the rows its
    checkpoint gives once saved and loaded, and its table names no checkpoint file."""
    from twopass.detector.api import DETECTOR, load_for_inference
    from twopass.detector.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = build_detector(_tiny(), 3).eval()
    cats = Categories((1, 2, 3), ("a", "b", "c"))
    image_set = _image_set(tmp_path)
    settings = DetectSettings(score_thresh=0.0, max_per_image=20)
    mine, meta = detect_images(LoadedModel.in_memory(model, cats), image_set, make_views([64], True), settings)
    save_checkpoint(tmp_path / "run", model, kind="detector", config=model.config.to_dict(), categories=cats, iteration=0)
    saved, _ = detect_images(load_for_inference(DETECTOR, tmp_path / "run", fast=False), image_set, make_views([64], True), settings)
    assert mine.num_rows > 0 and mine.equals(saved)
    assert meta.extra["checkpoint"] == "<in memory>" and meta.producer == "detector:tiny"
