"""torchvision's models in the two-pass flow: a random-weight `maskrcnn_resnet50_fpn` imported as
the segmenter and a random-weight `fasterrcnn_resnet50_fpn_v2` as a detector, run by
`twopass flow run` on the 8 synthetic images (slow: two ResNet-50s on CPU, about a minute)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
import yaml

from twopass.pipeline.coco import CocoIndex
from twopass.pipeline.tables import read_table, rles_of


@pytest.mark.slow
def test_flow_runs_imported_torchvision_models(synth_small, tmp_path):
    from twopass.detector.importer import ARCHS, import_torchvision

    ann = synth_small / "annotations.json"
    runs = {}
    for name, arch in (("tvseg", "maskrcnn_resnet50_fpn"), ("tvdet", "fasterrcnn_resnet50_fpn_v2")):
        torch.manual_seed(len(runs))
        torch.save(ARCHS[arch].torchvision_model(9).state_dict(), tmp_path / f"{name}.pth")  # 8 shapes + background
        import_torchvision(arch, tmp_path / f"{name}.pth", tmp_path / name, categories=ann)  # label == category id
        runs[name] = tmp_path / name
    spec = lambda n: {"name": n, "model": str(runs[n] / "config.yaml"), "checkpoint": str(runs[n]), "tta": {"scales": [128]}}  # noqa: E731
    cfg = {
        "name": "imported",
        "data": {"images": str(synth_small / "images"), "ann": str(ann), "shard_size": 4},
        "detectors": [spec("tvdet")],
        "segmenter": spec("tvseg"),
        "evaluation": {"overlays": 1},
    }
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "twopass.pipeline.cli", "flow", "run", "--config", str(tmp_path / "pipeline.yaml"), "--out", str(run)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]

    table, meta = read_table(run / "outputs" / "instances.parquet", "instances")
    index = CocoIndex.load(ann)
    images = index.image_set(synth_small / "images")
    assert meta.categories == index.categories and table.num_rows > 0
    assert set(table.column("image_id").to_pylist()) <= set(images.image_ids)
    sizes = {i: images.size(i) for i in images.image_ids}
    for image_id, rle in zip(table.column("image_id").to_pylist(), rles_of(table)):
        assert tuple(rle["size"]) == sizes[image_id]
    assert mask_util.decode(rles_of(table)).any()
    boxes = np.stack([table.column(c).to_numpy() for c in ("x1", "y1", "x2", "y2")], 1)
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 2] <= 128).all()
