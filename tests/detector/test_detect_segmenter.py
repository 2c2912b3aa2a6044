"""`twopass detect` on a segmenter checkpoint: the segmenter is a full Mask R-CNN, so its own
boxes (and, with --with-masks, its end-to-end instances) need no Python."""

from __future__ import annotations

import numpy as np
from typer.testing import CliRunner

from twopass.detector.api import DETECTOR, detect_images, load_for_inference, views_of
from twopass.pipeline.cli import app
from twopass.pipeline.coco import ImageSet
from twopass.pipeline.settings import DetectSettings
from twopass.pipeline.tables import read_table
from twopass.segmenter.api import SEGMENTER


def test_detect_runs_a_segmenter_checkpoint(synth_small, ckpts, tmp_path):
    images, ann = synth_small / "images", synth_small / "annotations.json"
    run = CliRunner().invoke
    r = run(app, ["detect", "--checkpoint", str(ckpts["seg"]), "--images", str(images), "--ann", str(ann),
                  "--out", str(tmp_path / "boxes.parquet"), "--score-thresh", "0.0"])  # fmt: skip
    assert r.exit_code == 0, r.output
    r = run(app, ["detect", "--checkpoint", str(ckpts["seg"]), "--images", str(images), "--ann", str(ann),
                  "--out", str(tmp_path / "inst.parquet"), "--score-thresh", "0.0", "--with-masks"])  # fmt: skip
    assert r.exit_code == 0, r.output
    boxes, meta = read_table(tmp_path / "boxes.parquet", "detections")
    inst, imeta = read_table(tmp_path / "inst.parquet", "instances")
    assert meta.producer.startswith("segmenter:") and imeta.kind == "instances"
    # the same rows as the Python front door gives, and the instances carry those same boxes
    loaded = load_for_inference(SEGMENTER, ckpts["seg"])
    want, _ = detect_images(loaded, ImageSet.open(images, ann=ann), views_of(ckpts["seg"], None, False), DetectSettings(score_thresh=0.0))
    assert boxes.num_rows == want.num_rows == inst.num_rows > 0
    for c in ("image_id", "category_id", "x1", "y1", "x2", "y2", "score"):
        np.testing.assert_array_equal(boxes.column(c).to_numpy(), want.column(c).to_numpy())
        np.testing.assert_array_equal(inst.column(c).to_numpy(), want.column(c).to_numpy())
    assert all(inst.column("mask_counts").to_pylist())

    r = run(app, ["detect", "--checkpoint", str(ckpts["a"]), "--images", str(images), "--out", str(tmp_path / "x.parquet"), "--with-masks"])
    assert r.exit_code != 0 and "--with-masks" in str(r.exception) and "'detector' checkpoint" in str(r.exception)
    assert not (tmp_path / "x.parquet").exists()
    assert load_for_inference(DETECTOR, ckpts["a"]).meta.kind == "detector"
