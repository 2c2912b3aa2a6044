"""The segmenter: every mask switch trains a step; a small model overfits 8 images; better boxes
give better masks on held-out images; the CLI runs pass two alone on boxes from a file."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from twopass.detector.infer import LoadedModel, detect_images, make_views
from twopass.pipeline.coco import CocoDataset, CocoIndex
from twopass.pipeline.evaluate import evaluate
from twopass.pipeline.settings import DetectSettings
from twopass.pipeline.synth import generate
from twopass.pipeline.tables import from_coco_results
from twopass.segmenter.config import SegmenterConfig, load_segmenter_config
from twopass.segmenter.infer import segment
from twopass.segmenter.api import SEGMENTER
from twopass.segmenter.model import build_segmenter
from twopass.detector.train import TrainOptions, train

SWITCHES = [
    dict(),
    dict(type="heavier"),
    dict(multi_scale_roi=True),
    dict(edge_loss="sobel", edge_weight=2.0),
    dict(type="heavier", multi_scale_roi=True, edge_loss="sobel"),
    dict(pool_size=14),  # 28 x 28 masks
]


def small_config(name="small", **mask) -> SegmenterConfig:
    return SegmenterConfig.model_validate(
        dict(
            name=name,
            backbone=dict(name="resnet18", fpn_channels=32, trainable_stages=5),
            norm=dict(backbone="bn", gn_groups=8),
            rpn=dict(anchors=dict(sizes=[8, 16, 32, 64, 128]), pre_nms_top_n_train=300, post_nms_top_n_train=150,
                     pre_nms_top_n_test=300, post_nms_top_n_test=150, batch_size_per_image=64),
            box_head=dict(type="location_sensitive", fc_dim=128, kernel_size=5, mid_channels=16, alpha=4,
                          batch_size_per_image=64, positive_fraction=0.5),
            mask_head=dict(conv_dim=32, max_positives_per_image=24, **mask),
            input=dict(train_sizes=[128], test_size=128, max_size=128),
            train=dict(base_lr=0.02, base_batch=8, warmup_iters=20, steps=[0.8], hflip_prob=0.0, clip_grad_norm=5.0),
        )
    )


@pytest.mark.parametrize("mask", SWITCHES, ids=lambda m: ",".join(f"{k}={v}" for k, v in m.items()) or "standard")
def test_every_mask_switch_trains_a_step(mask, synth_small, tmp_path):
    cfg = small_config(**mask)
    ds = CocoDataset(synth_small / "annotations.json", synth_small / "images")
    torch.manual_seed(0)
    model = build_segmenter(cfg, ds.categories.num_classes)
    opts = TrainOptions(out=tmp_path, iters=2, batch=2, progress=False)
    result = train(model, ds, opts, cfg.train, kind="segmenter", config=cfg.to_dict(), categories=ds.categories)
    assert ("loss_mask_edge" in result.losses) == (mask.get("edge_loss") == "sobel")
    assert all(torch.isfinite(torch.tensor(v)) for v in result.losses.values())
    again, meta = SEGMENTER.load(tmp_path)
    assert meta.kind == "segmenter" and again.config == cfg


@pytest.fixture(scope="module")
def quick(synth_small):
    """A standard-head segmenter after 2 iterations: enough to exercise files and the CLI."""
    cfg = small_config("quick")
    ds = CocoDataset(synth_small / "annotations.json", synth_small / "images")
    torch.manual_seed(0)
    model = build_segmenter(cfg, ds.categories.num_classes)
    train(model, ds, TrainOptions(out=synth_small.parent / "seg_quick", iters=2, batch=2, progress=False),
          cfg.train, kind="segmenter", config=cfg.to_dict(), categories=ds.categories)
    return model.eval(), ds.categories


@pytest.fixture(scope="module")
def overfit(synth_small):
    """The full Location Sensitive Header (LSD box head, heavier mask head, multi-scale RoI,
    edge loss), trained on the 8 images of `synth_small`."""
    cfg = small_config("overfit", type="heavier", multi_scale_roi=True, edge_loss="sobel")
    ds = CocoDataset(synth_small / "annotations.json", synth_small / "images")
    torch.manual_seed(0)
    model = build_segmenter(cfg, ds.categories.num_classes)
    opts = TrainOptions(out=synth_small.parent / "seg_overfit", iters=100, batch=8, progress=False, checkpoint_every=1000)
    result = train(model, ds, opts, cfg.train, kind="segmenter", config=cfg.to_dict(), categories=ds.categories)
    return model.eval(), ds.categories, result


def gt_boxes(ann):
    data = json.loads(ann.read_text())
    return from_coco_results([dict(a, score=1.0) for a in data["annotations"]], source="gt")


@pytest.mark.slow
def test_overfits_eight_images(overfit, synth_small):
    model, categories, result = overfit
    losses = [h["loss"] for h in result.history]
    assert sum(losses[-10:]) / 10 < 0.35 * sum(losses[:3]) / 3
    ann = synth_small / "annotations.json"
    images = CocoIndex.load(ann).image_set(synth_small / "images")
    inst, _ = segment(model, categories, images, gt_boxes(ann), make_views([128], False))
    m = evaluate(ann, inst, iou_types=("segm",))
    assert m["segm"]["AP50"] >= 0.9, m["segm"]


@pytest.mark.slow
def test_masks_on_ground_truth_boxes_beat_own_boxes_on_held_out_images(overfit, tmp_path):
    model, categories, _ = overfit
    ann = generate(tmp_path / "val", num_images=6, size=128, seed=99)
    images = CocoIndex.load(ann).image_set(tmp_path / "val" / "images")
    views = make_views([128], False)
    settings = DetectSettings(score_thresh=0.001, max_per_image=model.roi_heads.detections_per_img)
    own, _ = detect_images(LoadedModel.in_memory(model, categories, "segmenter"), images, None, settings, name="own")
    on_own, _ = segment(model, categories, images, own, views)
    on_gt, _ = segment(model, categories, images, gt_boxes(ann), views)
    ap_own = evaluate(ann, on_own, iou_types=("segm",))["segm"]["AP"]
    ap_gt = evaluate(ann, on_gt, iou_types=("segm",))["segm"]["AP"]
    assert ap_gt > ap_own, (ap_gt, ap_own)


def test_cli_segments_boxes_from_a_json_file(quick, synth_small, tmp_path):
    from twopass.detector.checkpoint import save_checkpoint
    from twopass.pipeline.cli import app
    from twopass.pipeline.tables import read_table

    model, categories = quick
    ckpt = save_checkpoint(tmp_path / "seg", model, kind="segmenter", config=model.config.to_dict(),
                           categories=categories, iteration=2)
    ann = synth_small / "annotations.json"
    boxes = [dict(a, score=0.9) for a in json.loads(ann.read_text())["annotations"]]
    for b in boxes:
        b.pop("segmentation")
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    runner = CliRunner()
    args = ["segment", "--checkpoint", str(ckpt), "--detections", str(tmp_path / "boxes.json"),
            "--images", str(synth_small / "images"), "--ann", str(ann), "--out", str(tmp_path / "inst.parquet"),
            "--coco-json", str(tmp_path / "inst.json"), "--tta-scales", "160", "--tta-flip"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    results = json.loads((tmp_path / "inst.json").read_text())
    assert len(results) == len(boxes) and all("segmentation" in x for x in results)
    table, meta = read_table(tmp_path / "inst.parquet", "instances", categories)
    assert table.num_rows == len(boxes) and meta.extra["views"] == ["quick@160", "quick@160+flip"]
    assert sorted(table.column("score").to_pylist()) == [pytest.approx(0.9)] * len(boxes)
    # a box of an unknown category fails naming it; --skip-invalid drops and counts it
    boxes[0]["category_id"] = 77
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    r = runner.invoke(app, args)
    assert r.exit_code != 0 and "category_id 77" in str(r.exception)
    r = runner.invoke(app, args + ["--skip-invalid"])
    assert r.exit_code == 0 and "skipped 1 rows" in r.output
    assert read_table(tmp_path / "inst.parquet", "instances")[1].extra["skipped"] == {
        "category the segmenter was not trained on": 1
    }


def test_config_errors_name_the_field(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nmask_head: {type: heaviest}\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: field 'mask_head\.type'"):
        load_segmenter_config(p)
    p.write_text("name: x\nmask_head: {enabled: false}\n")
    with pytest.raises(ValueError, match="mask_head.enabled must be true"):
        load_segmenter_config(p)


def test_segmenter_configs_load():
    from twopass.detector.config import CONFIG_DIR

    names = sorted(p.stem for p in CONFIG_DIR.glob("*_seg.yaml"))
    assert {"r50_seg", "r50_lsh_seg", "shufflev2_gap_lsh_seg", "r18_cpu_seg", "r18_lsh_cpu_seg"} <= set(names)
    for n in names:
        cfg = load_segmenter_config(n)
        assert cfg.name == n and cfg.mask_head.enabled
