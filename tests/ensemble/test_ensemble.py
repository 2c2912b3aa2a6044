"""Soft-NMS, NMS and WBF: ours against ensemble_boxes, hand-worked cases, labels, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from twopass.ensemble import nms, soft_nms, weighted_boxes_fusion
from twopass.ensemble.synthetic import detections

SIZE = (480.0, 640.0)  # (height, width)


def assert_same(ours, ref, tol=1e-5):
    """Same boxes, same labels, same order; coordinates (pixels) and scores within `tol`."""
    (b, s, lab), (rb, rs, rlab) = ours, ref
    assert b.shape == rb.shape, f"{len(b)} boxes kept, reference keeps {len(rb)}"
    np.testing.assert_array_equal(lab, rlab)
    np.testing.assert_allclose(b, rb, rtol=0, atol=tol)
    np.testing.assert_allclose(s, rs, rtol=0, atol=tol)


def both(fn, boxes, scores, labels, size=SIZE, **kwargs):
    ours = fn(boxes, scores, labels, size, **kwargs)
    ref = fn(boxes, scores, labels, size, backend="ensemble_boxes", **kwargs)
    return ours, ref


def random_case(seed: int, max_boxes: int = 1000):
    """1-5 models, 0-`max_boxes` boxes each, 1-80 categories, random or clustered, some with ties."""
    rng = np.random.default_rng(seed)
    n_models = int(rng.integers(1, 6))
    n_boxes = int(rng.choice([0, 1, 2, 5, 20, 100, 300, max_boxes]))
    n_classes = int(rng.choice([1, 3, 80]))
    kind = "random" if seed % 3 == 0 else "clustered"
    decimals = 2 if seed % 4 == 1 else None  # equal scores: ties must come out in the reference's order
    boxes, scores, labels = detections(rng, n_models, n_boxes, n_classes, SIZE, kind=kind, score_decimals=decimals)
    if n_models > 1 and seed % 5 == 2:  # a model that found nothing
        boxes[1], scores[1], labels[1] = np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64)
    weights = (rng.integers(1, 4, n_models).astype(float)).tolist() if seed % 2 else None
    return boxes, scores, labels, weights


SEEDS = range(14)


# --------------------------------------------------------------------------- against the reference


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("method", ["gaussian", "linear"])
def test_soft_nms_matches_reference(seed, method):
    boxes, scores, labels, weights = random_case(seed)
    params = dict(method=method, weights=weights)
    if seed % 3 == 1:
        params.update(iou_thr=0.3, sigma=0.1, thresh=0.2)  # many boxes decay below `thresh`
    assert_same(*both(soft_nms, boxes, scores, labels, **params))


@pytest.mark.parametrize("seed", SEEDS)
def test_nms_matches_reference(seed):
    boxes, scores, labels, weights = random_case(seed + 100)
    iou_thr = [0.5, 0.3, 0.7][seed % 3]
    assert_same(*both(nms, boxes, scores, labels, iou_thr=iou_thr, weights=weights))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("conf_type", ["avg", "max", "box_and_model_avg", "absent_model_aware_avg"])
def test_wbf_matches_reference(seed, conf_type):
    boxes, scores, labels, weights = random_case(seed + 200, max_boxes=600)
    params = dict(conf_type=conf_type, weights=weights, iou_thr=[0.55, 0.4, 0.7][seed % 3])
    if seed % 4 == 3:
        params.update(skip_box_thr=0.3, allows_overflow=True)
    assert_same(*both(weighted_boxes_fusion, boxes, scores, labels, **params))


@pytest.mark.parametrize("fn", [soft_nms, nms, weighted_boxes_fusion])
def test_full_size_case_matches_reference(fn):
    """3 models x 1,000 clustered boxes, 80 categories: the benchmark's case."""
    boxes, scores, labels = detections(np.random.default_rng(7), 3, 1000, 80, SIZE)
    ours, ref = both(fn, boxes, scores, labels)
    assert len(ours[0]) > 1000
    assert_same(ours, ref)


@pytest.mark.parametrize("fn", [soft_nms, nms, weighted_boxes_fusion])
def test_one_big_category_matches_reference(fn):
    """Many boxes in one category: the sequential steps of one long group."""
    boxes, scores, labels = detections(np.random.default_rng(3), 2, 400, 1, SIZE, score_decimals=2)
    assert_same(*both(fn, boxes, scores, labels))


@pytest.mark.parametrize("fn", [soft_nms, nms, weighted_boxes_fusion])
def test_odd_boxes_match_reference(fn):
    """Boxes sticking out of the image, wholly outside it, inverted, or of zero width."""
    boxes = [
        np.array([[-20, -10, 50, 60], [600, 400, 700, 520], [700, 10, 800, 50], [100, 100, 40, 30], [10, 10, 10, 90]]),
        np.array([[-15, -12, 48, 61], [605, 398, 690, 500], [90, 95, 45, 33], [0, 0, 640, 480]]),
    ]
    scores = [np.array([0.9, 0.8, 0.7, 0.6, 0.5]), np.array([0.85, 0.75, 0.65, 0.3])]
    labels = [np.array([1, 1, 1, 2, 2]), np.array([1, 1, 2, 2])]
    ours, ref = both(fn, boxes, scores, labels)
    assert len(ours[0]) >= 3  # the box wholly outside the image and the zero-width one are dropped
    assert_same(ours, ref)
    b = ours[0]
    assert b.min() >= 0 and (b[:, 2] <= 640).all() and (b[:, 3] <= 480).all()


def test_scores_may_exceed_one_for_nms_only():
    boxes, labels = [np.array([[0, 0, 10, 10], [1, 1, 11, 11]])], [np.array([0, 0])]
    ours, ref = both(nms, boxes, [np.array([3.0, -1.0])], labels)
    assert_same(ours, ref)
    assert ours[1].tolist() == [3.0]


# --------------------------------------------------------------------------- hand-worked cases

# A 64 x 64 image: every coordinate below is a multiple of 1/64 once normalised, so exact.
IMG = (64.0, 64.0)


def test_nms_by_hand():
    boxes = np.array([[0, 0, 16, 8], [0, 0, 8, 8], [2, 0, 18, 8], [40, 40, 50, 50]], dtype=float)
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    # IoU(0, 1) = 64 / 128 = 0.5 exactly: not > 0.5, kept. IoU(0, 2) = 112 / 144 > 0.5: suppressed.
    b, s, lab = nms(boxes, scores, np.zeros(4, dtype=int), IMG, iou_thr=0.5)
    np.testing.assert_array_equal(b, boxes[[0, 1, 3]])
    np.testing.assert_array_equal(s, [0.9, 0.8, 0.6])
    b, s, lab = nms(boxes, scores, np.zeros(4, dtype=int), IMG, iou_thr=0.49)
    np.testing.assert_array_equal(s, [0.9, 0.6])


def test_soft_nms_by_hand():
    # A and B: IoU = 40 / 64 = 0.625. C overlaps neither.
    boxes = np.array([[0, 0, 8, 8], [0, 0, 8, 5], [32, 32, 40, 40]], dtype=float)
    scores = np.array([0.9, 0.8, 0.5])
    labels = np.zeros(3, dtype=int)
    iou = 0.625
    # Linear: B decays to 0.8 * (1 - 0.625) = 0.3 < C's 0.5, so the order is A, C, B.
    b, s, _ = soft_nms(boxes, scores, labels, IMG, method="linear", rescore=True)
    np.testing.assert_array_equal(b, boxes[[0, 2, 1]])
    np.testing.assert_allclose(s, [0.9, 0.5, 0.8 * (1 - iou)], rtol=1e-12)
    # The reference's output: same boxes and order, but the input scores.
    b, s, _ = soft_nms(boxes, scores, labels, IMG, method="linear")
    np.testing.assert_array_equal(s, [0.9, 0.5, 0.8])
    # Gaussian: 0.8 * exp(-0.625^2 / 0.5) = 0.366.
    b, s, _ = soft_nms(boxes, scores, labels, IMG, method="gaussian", sigma=0.5, rescore=True)
    np.testing.assert_allclose(s, [0.9, 0.5, 0.8 * math.exp(-(iou**2) / 0.5)], rtol=1e-12)
    # `thresh` drops B once decayed below it; IoU not above iou_thr: no linear decay at all.
    assert len(soft_nms(boxes, scores, labels, IMG, method="linear", thresh=0.31)[0]) == 2
    _, s, _ = soft_nms(boxes, scores, labels, IMG, method="linear", iou_thr=0.7, rescore=True)
    np.testing.assert_array_equal(s, [0.9, 0.8, 0.5])
    # Weights scale each model's scores by w / sum(w) first.
    _, s, _ = soft_nms([boxes[:1], boxes[1:]], [scores[:1], scores[1:]], [labels[:1], labels[1:]], IMG,
                       method="linear", weights=[3, 1])  # fmt: skip
    np.testing.assert_allclose(s, [0.9 * 0.75, 0.5 * 0.25, 0.8 * 0.25], rtol=1e-12)


def wbf_case():
    """Model 0: A and A2 of one object, model 1: B of the same object, model 2: D elsewhere."""
    boxes = [np.array([[0, 0, 10, 10], [1, 0, 11, 10]], float), np.array([[0, 1, 10, 11]], float),
             np.array([[60, 60, 70, 70]], float)]  # fmt: skip
    scores = [np.array([0.9, 0.6]), np.array([0.3]), np.array([0.5])]
    labels = [np.array([4, 4]), np.array([4]), np.array([4])]
    return boxes, scores, labels


def test_wbf_by_hand():
    boxes, scores, labels = wbf_case()
    b, s, lab = weighted_boxes_fusion(boxes, scores, labels, (100.0, 100.0))
    # Cluster {A, A2, B}: the score-weighted mean box, conf 1.8 over 3 boxes.
    expected = np.array([0.6 / 1.8, 0.3 / 1.8, 18.6 / 1.8, 18.3 / 1.8])
    np.testing.assert_allclose(b, [expected, [60, 60, 70, 70]], atol=1e-5)  # float32 in the reference
    np.testing.assert_allclose(s, [0.6 * 3 / 3, 0.5 * 1 / 3], atol=1e-7)  # avg * min(3, n) / sum(w)
    np.testing.assert_array_equal(lab, [4, 4])


@pytest.mark.parametrize(
    "conf_type, expected",
    [
        ("avg", [0.6, 0.5 / 3]),
        ("max", [0.9, 0.5]),
        ("box_and_model_avg", [0.6 * 3 / 3 * 2 / 3, 0.5 * 1 / 3]),  # 2 of 3 models in the cluster
        ("absent_model_aware_avg", [0.6 * 3 / (3 + 1), 0.5 / (1 + 2)]),
    ],
)
def test_wbf_conf_types_by_hand(conf_type, expected):
    boxes, scores, labels = wbf_case()
    _, s, _ = weighted_boxes_fusion(boxes, scores, labels, (100.0, 100.0), conf_type=conf_type)
    np.testing.assert_allclose(s, expected, atol=1e-7)


def test_wbf_weights_and_thresholds_by_hand():
    boxes, scores, labels = wbf_case()
    # Weights [2, 1, 1]: model 0's boxes count twice in the mean box and score.
    b, s, _ = weighted_boxes_fusion(boxes, scores, labels, (100.0, 100.0), weights=[2, 1, 1])
    conf = 2 * 0.9 + 2 * 0.6 + 0.3
    np.testing.assert_allclose(b[0, 0], 1.2 / conf, atol=1e-5)
    np.testing.assert_allclose(s[0], conf / 3 * 3 / 4, atol=1e-7)
    # skip_box_thr drops B and D; iou_thr above A-A2's IoU (90 / 110) splits them.
    b, s, _ = weighted_boxes_fusion(boxes, scores, labels, (100.0, 100.0), skip_box_thr=0.55)
    assert len(b) == 1
    b, s, _ = weighted_boxes_fusion(boxes, scores, labels, (100.0, 100.0), iou_thr=0.82)
    assert len(b) == 4


def test_labels_survive():
    """Identical boxes of different categories are neither fused nor suppressed; ids are kept."""
    box = np.array([[10.0, 10.0, 50.0, 50.0]] * 3)
    labels = np.array([90, 1, 17])
    scores = np.array([0.5, 0.9, 0.7])
    for fn in (soft_nms, nms, weighted_boxes_fusion):
        b, s, lab = fn(box, scores, labels, SIZE)
        assert sorted(lab.tolist()) == [1, 17, 90]
        np.testing.assert_allclose(b, box, atol=1e-4)
        assert dict(zip(lab.tolist(), s.tolist()))[1] == pytest.approx(0.9)


def test_tensors_in_tensors_out():
    boxes, scores, labels = detections(np.random.default_rng(1), 2, 50, 5, SIZE)
    for fn in (soft_nms, nms, weighted_boxes_fusion):
        out = fn([torch.from_numpy(b) for b in boxes], [torch.from_numpy(s) for s in scores],
                 [torch.from_numpy(x) for x in labels], SIZE)  # fmt: skip
        ref = fn(boxes, scores, labels, SIZE)
        assert all(isinstance(t, torch.Tensor) for t in out)
        assert out[0].shape == (len(ref[0]), 4) and out[2].dtype == torch.int64
        assert_same(tuple(t.numpy() for t in out), ref, tol=0)


def test_empty_inputs_give_empty_outputs():
    for fn in (soft_nms, nms, weighted_boxes_fusion):
        for backend in ("vectorised", "ensemble_boxes"):
            none = ([np.zeros((0, 4))] * 2, [np.zeros(0)] * 2, [np.zeros(0, dtype=int)] * 2)
            b, s, lab = fn(*none, SIZE, backend=backend)
            assert b.shape == (0, 4) and s.shape == (0,) and lab.shape == (0,)
            # Only boxes outside the image: nothing survives the clipping.
            b, s, lab = fn(np.array([[700.0, 0, 800, 10]]), np.array([0.5]), np.array([1]), SIZE, backend=backend)
            assert b.shape == (0, 4)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda b, s, lab: b[1].__setitem__((2, 3), np.nan), r"boxes\[1\]: non-finite value .* at row 2"),
        (lambda b, s, lab: b[0].__setitem__((0, 0), np.inf), r"boxes\[0\]: non-finite"),
        (lambda b, s, lab: s[1].__setitem__(4, np.nan), r"scores\[1\]: non-finite value nan at row 4"),
        (lambda b, s, lab: s[0].__setitem__(1, 1.5), r"scores\[0\]: score 1.5 at row 1 is outside \[0, 1\]"),
        (lambda b, s, lab: s[0].__setitem__(1, -0.1), r"scores\[0\]: score -0.1 at row 1 is outside \[0, 1\]"),
    ],
)
@pytest.mark.parametrize("fn", [soft_nms, weighted_boxes_fusion])
def test_bad_values_name_model_and_field(fn, change, message):
    boxes, scores, labels = detections(np.random.default_rng(0), 2, 10, 3, SIZE)
    change(boxes, scores, labels)
    with pytest.raises(ValueError, match=message):
        fn(boxes, scores, labels, SIZE)


def test_bad_arguments():
    boxes, scores, labels = detections(np.random.default_rng(0), 3, 10, 3, SIZE)
    with pytest.raises(ValueError, match="weights: 2 weights for 3 inputs"):
        weighted_boxes_fusion(boxes, scores, labels, SIZE, weights=[1, 2])
    with pytest.raises(ValueError, match="weights: weight 0.0 at position 1 must be finite and > 0"):
        nms(boxes, scores, labels, SIZE, weights=[1, 0, 1])
    with pytest.raises(ValueError, match="conf_type"):
        weighted_boxes_fusion(boxes, scores, labels, SIZE, conf_type="mean")
    with pytest.raises(ValueError, match="image_size"):
        nms(boxes, scores, labels, (0, 640))
    with pytest.raises(ValueError, match="iou_thr"):
        soft_nms(boxes, scores, labels, SIZE, iou_thr=1.5)
    with pytest.raises(ValueError, match=r"model 1: 10 boxes, 9 scores"):
        nms(boxes, [scores[0], scores[1][:9], scores[2]], labels, SIZE)
    with pytest.raises(ValueError, match="labels must be integers"):
        nms(boxes, scores, [lab + 0.5 for lab in labels], SIZE)
    with pytest.raises(ValueError, match="rescore"):
        soft_nms(boxes, scores, labels, SIZE, rescore=True, backend="ensemble_boxes")


@pytest.mark.parametrize("fn", [nms, weighted_boxes_fusion])
def test_iou_equal_to_threshold_does_not_match(fn):
    """IoU exactly 0.5 (64 / 128) is not > iou_thr 0.5: two boxes out; just below 0.5: one."""
    boxes, scores, labels = np.array([[0.0, 0, 16, 8], [0, 0, 8, 8]]), np.array([0.9, 0.8]), np.array([3, 3])
    assert len(fn(boxes, scores, labels, IMG, iou_thr=0.5)[0]) == 2
    assert len(fn(boxes, scores, labels, IMG, iou_thr=0.4999)[0]) == 1
    assert_same(*both(fn, boxes, scores, labels, size=IMG, iou_thr=0.5), tol=0)
