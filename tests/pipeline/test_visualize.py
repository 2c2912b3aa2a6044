"""pipeline.visualize.best_per_image: the k best rows of each image, in the table's order."""

from __future__ import annotations

import numpy as np
import pytest

from twopass.pipeline.tables import detections_table
from twopass.pipeline.visualize import best_per_image


def test_best_per_image_keeps_the_k_best_of_each_image():
    ids = [2, 1, 2, 2, 1, 3]
    scores = [0.1, 0.9, 0.8, 0.5, 0.2, 0.3]
    table = detections_table(ids, [1] * 6, scores, np.tile([0, 0, 4, 4], (6, 1)), "m")
    best = best_per_image(table, 2)
    # image 2 loses its 0.1; images 1 and 3 keep everything; the table's order is kept
    assert best.column("image_id").to_pylist() == [1, 2, 2, 1, 3]
    assert np.allclose(best.column("score").to_pylist(), [0.9, 0.8, 0.5, 0.2, 0.3])
    assert best_per_image(table, 1).column("score").to_pylist() == pytest.approx([0.9, 0.8, 0.3])
    assert best_per_image(table.slice(0, 0), 3).num_rows == 0
