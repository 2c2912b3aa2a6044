"""Pictures of fused results: one box per object (`pipeline.visualize`), the display side of
fusion's `labels` setting. (Here, beside the fusion tests, rather than in tests/pipeline.)"""

from __future__ import annotations

import numpy as np

from twopass.pipeline.coco import CocoIndex
from twopass.pipeline.tables import detections_table
from twopass.pipeline.visualize import keep_one_box_per_object, render_image


def test_keep_one_box_per_object_by_hand():
    # IoU with A: B 90/110 = 0.82, C 80/120 = 0.67, D 70/100 = 0.7 exactly, E 80/100; IoU(B, C) = 0.82.
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [2, 0, 12, 10], [0, 0, 10, 7], [0, 0, 10, 8]], float)
    cats = [1, 2, 3, 4, 1]
    scores = [0.9, 0.8, 0.7, 0.6, 0.5]
    # B: another category over A, dropped. C: over B only, which is not drawn: kept. D: at the
    # threshold of A (>=): dropped. E: A's own category, left as the results hold it.
    assert keep_one_box_per_object(boxes, cats, scores).tolist() == [True, False, True, False, True]
    # The order is the scores', not the rows'.
    assert keep_one_box_per_object(boxes[[1, 0]], [2, 1], [0.8, 0.9]).tolist() == [False, True]
    assert keep_one_box_per_object(boxes, cats, scores, iou_thr=0.9).all()
    assert keep_one_box_per_object(np.zeros((0, 4)), [], []).tolist() == []


def test_pictures_show_one_box_per_object(synth_small):
    gt = CocoIndex.load(synth_small / "annotations.json")
    image_set = gt.image_set(synth_small / "images")
    image_id = image_set.image_ids[0]
    box = np.array([[10, 10, 60, 60], [12, 11, 61, 59], [70, 70, 100, 100]], float)
    two_labels = detections_table([image_id] * 3, [1, 2, 2], [0.9, 0.6, 0.5], box, "fused")
    one_label = two_labels.take([0, 2])

    def picture(table, **kw):
        return np.asarray(render_image(image_set, image_id, gt.categories, [("fused", table)], 0.3, **kw))

    assert np.array_equal(picture(two_labels), picture(one_label))  # the default for results pictures
    assert not np.array_equal(picture(two_labels, one_box_per_object=False), picture(one_label))
