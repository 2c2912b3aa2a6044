"""Fine-tuning from another run (`train-detector` / `train-segmenter --init RUN`): every tensor
is taken, except that the classes' slices of the final predictors move by category name and new
categories start fresh; an imported torchvision Mask R-CNN fine-tunes on the synthetic set."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from twopass.detector.checkpoint import CheckpointError, init_weights, read_meta, save_checkpoint
from twopass.pipeline.categories import Categories
from twopass.segmenter.api import KINDS


def save_random(path, kind: str, model: dict, categories: Categories, seed: int = 0) -> None:
    cfg = KINDS[kind].config(model)
    torch.manual_seed(seed)
    save_checkpoint(path, KINDS[kind].build(cfg, categories.num_classes), kind=kind, config=cfg.to_dict(), categories=categories, iteration=0)


def test_class_slices_move_by_name(tiny_model, tmp_path):
    source = Categories((1, 2, 3), ("ellipse", "ring", "star"))
    save_random(tmp_path / "src", "segmenter", tiny_model("seg", mask=True), source, seed=1)
    meta = read_meta(tmp_path / "src")
    theirs = KINDS["segmenter"].load(tmp_path / "src")[0].state_dict()

    target = Categories((10, 20), ("star", "blob"))  # star is their label 3; blob is new
    kind = KINDS["segmenter"]
    torch.manual_seed(5)
    model = kind.build(kind.config(tiny_model("seg", mask=True)), target.num_classes)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    notes = init_weights(model, meta, target)
    mine = model.state_dict()

    per_class = {"roi_heads.box_predictors.0.cls_score.weight", "roi_heads.box_predictors.0.cls_score.bias",
                 "roi_heads.box_predictors.0.bbox_pred.weight", "roi_heads.box_predictors.0.bbox_pred.bias",
                 "roi_heads.mask_branch.predictor.weight", "roi_heads.mask_branch.predictor.bias"}  # fmt: skip
    assert {n.split(":")[0] for n in notes} == per_class
    assert all("1 of 2 categories taken" in n for n in notes)
    for key, t in mine.items():
        if key not in per_class:
            assert torch.equal(t, theirs[key]), key
            continue
        m = t.shape[0] // 3
        ours, src, new = t.view(3, m, *t.shape[1:]), theirs[key].view(4, m, *t.shape[1:]), fresh[key].view(3, m, *t.shape[1:])
        assert torch.equal(ours[0], src[0])  # background
        assert torch.equal(ours[1], src[3])  # star
        assert torch.equal(ours[2], new[2])  # blob: its fresh initialisation


def test_init_refuses_another_architecture(tiny_model, tmp_path):
    cats = Categories((1, 2), ("a", "b"))
    save_random(tmp_path / "src", "detector", tiny_model("a"), cats)
    kind = KINDS["detector"]
    model = kind.build(kind.config(tiny_model("b", head="location_sensitive")), cats.num_classes)
    with pytest.raises(CheckpointError, match=r"--init .*iter_0000000.json: its weights lack \['roi_heads.box_heads.0.fc.bias'"):
        init_weights(model, read_meta(tmp_path / "src"), cats)


@pytest.mark.slow  # a ResNet-50 Mask R-CNN trains 2 iterations in a subprocess: ~15 s
def test_finetune_an_imported_torchvision_mask_rcnn(synth_small, tmp_path):
    """An imported random-weight maskrcnn_resnet50_fpn, its config at the synthetic set's 128 px,
    trained 2 iterations on it: the frozen stem keeps the imported weights exactly."""
    from twopass.detector.importer import ARCHS, import_torchvision

    torch.manual_seed(0)
    tv = ARCHS["maskrcnn_resnet50_fpn"].torchvision_model(3).eval()
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    (tmp_path / "cats.json").write_text(json.dumps([{"id": 1, "name": "ellipse"}, {"id": 2, "name": "person"}]))
    import_torchvision("maskrcnn_resnet50_fpn", tmp_path / "tv.pth", tmp_path / "imported", tmp_path / "cats.json")
    cfg = yaml.safe_load((tmp_path / "imported" / "config.yaml").read_text())
    cfg["input"].update(train_sizes=[128], test_size=128, max_size=128)
    cfg["rpn"].update(pre_nms_top_n_train=200, post_nms_top_n_train=100)
    cfg["box_head"].update(batch_size_per_image=64)
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(cfg))

    args = ["train-segmenter", "--init", str(tmp_path / "imported"), "--config", str(tmp_path / "small.yaml"),
            "--train-ann", str(synth_small / "annotations.json"), "--train-images", str(synth_small / "images"),
            "--out", str(tmp_path / "tuned"), "--iters", "2", "--batch", "1", "--no-progress"]  # fmt: skip
    p = subprocess.run([sys.executable, "-m", "twopass.pipeline.cli", *args], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "roi_heads.box_predictors.0.cls_score.weight: background and 1 of 8 categories taken" in p.stdout
    tuned = KINDS["segmenter"].load(tmp_path / "tuned")[0].state_dict()
    imported = KINDS["segmenter"].load(tmp_path / "imported")[0].state_dict()
    assert read_meta(tmp_path / "tuned").iteration == 2
    assert torch.equal(tuned["backbone.body.conv1.weight"], imported["backbone.body.conv1.weight"])
    assert not torch.equal(tuned["roi_heads.box_heads.0.fc6.weight"], imported["roi_heads.box_heads.0.fc6.weight"])  # trained
