"""Shared helpers of the flow tests (no tests here): tiny random-weight models saved as real
checkpoints, and pipeline configs over the `synth_small` set."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

TINY: dict[str, Any] = {
    "name": "tiny",
    "backbone": {"name": "shufflenet_v2_x0_5", "fpn_channels": 16, "trainable_stages": 5},
    "norm": {"backbone": "bn"},
    "rpn": {"anchors": {"sizes": [16, 32, 64, 128]}, "pre_nms_top_n_train": 64, "post_nms_top_n_train": 32, "pre_nms_top_n_test": 64, "post_nms_top_n_test": 24,
            "batch_size_per_image": 32},
    "box_head": {"type": "two_fc", "fc_dim": 32, "batch_size_per_image": 16},
    "input": {"train_sizes": [64], "test_size": 64, "max_size": 96},
    "train": {"warmup_iters": 2},
}  # fmt: skip


def tiny_model(name: str, head: str = "two_fc", mask: bool = False) -> dict[str, Any]:
    m = copy.deepcopy(TINY)
    m["name"] = name
    if head == "location_sensitive":
        m["box_head"] = {"type": "location_sensitive", "fc_dim": 32, "kernel_size": 3, "mid_channels": 8, "alpha": 2,
                         "batch_size_per_image": 16}  # fmt: skip
    if mask:
        m["mask_head"] = {"conv_dim": 8, "num_convs": 1, "max_positives_per_image": 3}
    return m


def save_random(path: Path, kind: str, model: dict[str, Any], categories, seed: int = 0) -> Path:
    """A checkpoint of a randomly initialised model (no training), as the engine writes them."""
    import torch

    from twopass.detector.checkpoint import save_checkpoint

    if kind == "detector":
        from twopass.detector.config import config_from_dict
        from twopass.detector.model import build_detector as build
    else:
        from twopass.segmenter.config import segmenter_config_from_dict as config_from_dict
        from twopass.segmenter.model import build_segmenter as build
    cfg = config_from_dict(model)
    torch.manual_seed(seed)
    net = build(cfg, categories.num_classes)
    return save_checkpoint(path, net, kind=kind, config=cfg.to_dict(), categories=categories, iteration=0)


def random_checkpoints(base: Path, ann: Path) -> dict[str, Path]:
    """Two detectors (different heads) and a segmenter with random weights; made once per base."""
    from twopass.detector.checkpoint import last_meta
    from twopass.pipeline.coco import CocoIndex

    cats = CocoIndex.load(ann).categories
    out = {}
    for name, kind, model in (
        ("a", "detector", tiny_model("a")),
        ("b", "detector", tiny_model("b", head="location_sensitive")),
        ("seg", "segmenter", tiny_model("seg", mask=True)),
    ):
        folder = base / name
        if last_meta(folder) is None:
            save_random(folder, kind, model, cats, seed=len(out))
        out[name] = folder / "checkpoints" / "iter_0000000.json"
    return out


def config(data_dir: Path, ckpts: dict[str, Path] | None, shard_size: int = 3, **changes: Any):
    """A pipeline config over a synthetic set: detectors a (one view) and b (2 scales x flip)."""
    from twopass.pipeline.config import PipelineConfig

    ck = (lambda n: str(ckpts[n])) if ckpts else (lambda n: None)
    d = {
        "name": "test",
        "data": {"images": str(data_dir / "images"), "ann": str(data_dir / "annotations.json"), "train_images": str(data_dir / "images"),
                 "train_ann": str(data_dir / "annotations.json"), "shard_size": shard_size},
        "detectors": [
            {"name": "a", "model": tiny_model("a"), "checkpoint": ck("a"), "max_per_image": 20, "train": {"iters": 1}},
            {"name": "b", "model": tiny_model("b", head="location_sensitive"), "checkpoint": ck("b"), "max_per_image": 20,
             "tta": {"scales": [64], "flip": True}, "train": {"iters": 1}},
        ],
        "segmenter": {"name": "seg", "model": tiny_model("seg", mask=True), "checkpoint": ck("seg"),
                      "tta": {"scales": [64], "flip": True}, "train": {"iters": 1}},
        "evaluation": {"overlays": 2},
    }  # fmt: skip
    for key, value in changes.items():
        d[key] = {**d[key], **value} if isinstance(value, dict) and isinstance(d.get(key), dict) else value
    return PipelineConfig.model_validate(d)


def copy_data(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def counts(run_dir: Path, since: int = 0) -> dict[str, int]:
    """Stage executions that computed, from the ledger (lines after the first `since`)."""
    from twopass.pipeline.runfolder import read_ledger, stage_counts

    return stage_counts(read_ledger(run_dir)[since:])


def ledger_len(run_dir: Path) -> int:
    from twopass.pipeline.runfolder import read_ledger

    return len(read_ledger(run_dir))
