"""Synthetic detections of one image by several models, for the tests and the benchmark.

"clustered": each model sees the same objects and returns jittered copies of their boxes
(most with the object's category, some with another) plus scattered false positives, as
detectors and test-time views do; a few boxes stick out of the image. "random": uniform
boxes and categories. Boxes: XYXY float64 in absolute pixels of a (height, width) image.
"""

from __future__ import annotations

from typing import Literal

import numpy as np


def detections(
    rng: np.random.Generator,
    n_models: int,
    n_boxes: int,
    n_classes: int,
    image_size: tuple[float, float] = (480.0, 640.0),
    kind: Literal["clustered", "random"] = "clustered",
    score_decimals: int | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Per model: boxes (n_boxes, 4), scores (n_boxes,) in [0, 1], labels (n_boxes,) in 0..n_classes-1.

    `score_decimals` rounds the scores, which makes many equal scores (ties).
    """
    h, w = image_size
    size = np.array([w, h, w, h])
    n_objects = max(1, n_boxes // 8)
    centre = rng.random((n_objects, 2)) * [w, h]
    half = (0.02 + 0.3 * rng.random((n_objects, 2)) ** 2) * [w, h]
    objects = np.concatenate([centre - half, centre + half], axis=1)
    object_class = rng.integers(0, n_classes, n_objects)
    boxes, scores, labels = [], [], []
    for _ in range(n_models):
        if kind == "random":
            xy = rng.random((n_boxes, 4)) * size
            b = np.concatenate([np.minimum(xy[:, :2], xy[:, 2:]), np.maximum(xy[:, :2], xy[:, 2:])], axis=1)
            s = rng.random(n_boxes)
            lab = rng.integers(0, n_classes, n_boxes)
        else:
            n_true = int(round(0.75 * n_boxes))
            which = rng.integers(0, n_objects, n_true)
            extent = np.tile(objects[which, 2:] - objects[which, :2], 2)
            b_true = objects[which] + rng.normal(0.0, 0.06, (n_true, 4)) * extent
            lab_true = np.where(rng.random(n_true) < 0.9, object_class[which], rng.integers(0, n_classes, n_true))
            s_true = rng.beta(4, 2, n_true)
            n_false = n_boxes - n_true
            c = rng.random((n_false, 2)) * [w, h]
            hw = (0.01 + 0.2 * rng.random((n_false, 2))) * [w, h]
            b = np.concatenate([b_true, np.concatenate([c - hw, c + hw], axis=1)])
            b = np.concatenate([np.minimum(b[:, :2], b[:, 2:]), np.maximum(b[:, :2], b[:, 2:])], axis=1)
            s = np.concatenate([s_true, rng.beta(1, 4, n_false)])
            lab = np.concatenate([lab_true, rng.integers(0, n_classes, n_false)])
            perm = rng.permutation(n_boxes)
            b, s, lab = b[perm], s[perm], lab[perm]
        if score_decimals is not None:
            s = np.round(s, score_decimals)
        boxes.append(b)
        scores.append(np.clip(s, 0.0, 1.0))
        labels.append(lab.astype(np.int64))
    return boxes, scores, labels
