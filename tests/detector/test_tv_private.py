"""The torchvision internals the models are built from (`detector.tv_private`) still have the
signatures and the behaviour the code relies on. A torchvision upgrade that renames, moves or
changes one fails here, naming it, instead of deep inside a model or an exactness test."""

from __future__ import annotations

import inspect

import pytest
import torch

from twopass.detector import tv_private

# name -> the parameters (in order) the code passes
SIGNATURES = {
    "resize_image_and_masks": ["image", "self_min_size", "self_max_size", "target", "fixed_size"],
    "resize_boxes": ["boxes", "original_size", "new_size"],
    "convert_to_roi_format": ["boxes"],
    "maskrcnn_loss": ["mask_logits", "proposals", "gt_masks", "gt_labels", "mask_matched_idxs"],
    "project_masks_on_boxes": ["gt_masks", "boxes", "matched_idxs", "M"],
    "Matcher": ["high_threshold", "low_threshold", "allow_low_quality_matches"],
    "BoxCoder": ["weights", "bbox_xform_clip"],
    "LevelMapper": ["k_min", "k_max", "canonical_scale", "canonical_level", "eps"],
}


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_signature(name):
    obj = getattr(tv_private, name)
    params = list(inspect.signature(obj).parameters)
    assert params == SIGNATURES[name], f"torchvision changed {name}: parameters {params}, expected {SIGNATURES[name]}"


def test_resize_image_and_masks_is_torchvisions_rule():
    """Shorter side to 64 unless the longer side would pass 96; bilinear, scale factor floored."""
    img = torch.arange(2 * 30 * 50, dtype=torch.float32).reshape(2, 30, 50)
    out, target = tv_private.resize_image_and_masks(img, 64, 96, {"masks": torch.ones(1, 30, 50)})
    assert tuple(out.shape) == (2, 57, 96)  # 96 / 50 = 1.92: 30 * 1.92 = 57.6 -> 57
    assert tuple(target["masks"].shape) == (1, 57, 96)
    same, _ = tv_private.resize_image_and_masks(img, 30, 1000)
    torch.testing.assert_close(same, img)  # scale 1: the same pixels


def test_resize_boxes_scales_x_by_width_and_y_by_height():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    got = tv_private.resize_boxes(boxes, (100, 200), (50, 400))  # (h, w) -> (h, w)
    torch.testing.assert_close(got, torch.tensor([[20.0, 10.0, 60.0, 20.0]]))


def test_convert_to_roi_format_prepends_the_image_index():
    boxes = [torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.zeros(0, 4), torch.tensor([[5.0, 6.0, 7.0, 8.0], [0.0, 0.0, 1.0, 1.0]])]
    want = torch.tensor([[0, 1, 2, 3, 4], [2, 5, 6, 7, 8], [2, 0, 0, 1, 1]], dtype=torch.float32)
    torch.testing.assert_close(tv_private.convert_to_roi_format(boxes), want)


def test_matcher_and_box_coder():
    matcher = tv_private.Matcher(0.5, 0.5, allow_low_quality_matches=False)
    iou = torch.tensor([[0.9, 0.2, 0.5], [0.1, 0.4, 0.6]])  # [gt, proposals]
    assert matcher(iou).tolist() == [0, matcher.BELOW_LOW_THRESHOLD, 1]
    assert matcher.BELOW_LOW_THRESHOLD == -1
    coder = tv_private.BoxCoder((10.0, 10.0, 5.0, 5.0))
    ref = torch.tensor([[10.0, 10.0, 50.0, 30.0]])
    gt = torch.tensor([[12.0, 8.0, 60.0, 34.0]])
    deltas = coder.encode_single(gt, ref)
    torch.testing.assert_close(coder.decode(deltas, [ref])[:, 0], gt, atol=1e-4, rtol=0)


def test_level_mapper_is_fpn_eqn_1():
    """k = floor(4 + log2(sqrt(wh) / 224)), clamped to [k_min, k_max], as an index from k_min."""
    mapper = tv_private.LevelMapper(2, 5)
    boxes = [torch.tensor([[0.0, 0.0, 224.0, 224.0], [0.0, 0.0, 56.0, 56.0], [0.0, 0.0, 2000.0, 2000.0], [0, 0, 10.0, 10.0]])]
    assert mapper(boxes).tolist() == [2, 0, 3, 0]  # P4, P2, P5 (clamped), P2 (clamped)


def test_mask_targets_and_loss():
    """project_masks_on_boxes crops each matched ground-truth mask to its box at M x M;
    maskrcnn_loss is the binary cross entropy of each RoI's own-class logits against it."""
    gt = torch.zeros(1, 20, 20)
    gt[0, :, :10] = 1  # left half
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0]])
    target = tv_private.project_masks_on_boxes(gt, boxes, torch.tensor([0]), 4)
    assert tuple(target.shape) == (1, 4, 4)
    assert ((target > 0.5) == torch.tensor([[[True, True, False, False]] * 4])).all()  # RoIAlign blurs the edge
    logits = torch.zeros(1, 3, 4, 4)
    logits[0, 2] = torch.where(target[0] > 0.5, 5.0, -5.0)
    loss = tv_private.maskrcnn_loss(logits, [boxes], [gt], [torch.tensor([2])], [torch.tensor([0])])
    want = torch.nn.functional.binary_cross_entropy_with_logits(logits[0, 2], target[0])
    torch.testing.assert_close(loss, want)
