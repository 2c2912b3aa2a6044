"""Shared fixtures: the thread settings, a small synthetic COCO set generated once per session,
tiny model configs saved as real random-weight checkpoints, and pipeline configs over the set."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

# Two threads at most: CI machines have 2 cores and tests run beside other work. Passive
# OpenMP waits: threads that spin for a busy core made training steps 4x slower here.
# Both must be set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory) -> Path:
    """8 images of 128 px (seed 0): `root/images/*.png`, `root/annotations.json`."""
    from twopass.pipeline.synth import generate

    root = tmp_path_factory.mktemp("synth_small")
    generate(root, num_images=8, size=128, seed=0)
    return root


# --------------------------------------------------------------------------- tiny models and pipeline configs


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


def _tiny_model(name: str, head: str = "two_fc", mask: bool = False) -> dict[str, Any]:
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
    from twopass.segmenter.api import KINDS

    cfg = KINDS[kind].config(model)
    torch.manual_seed(seed)
    net = KINDS[kind].build(cfg, categories.num_classes)
    return save_checkpoint(path, net, kind=kind, config=cfg.to_dict(), categories=categories, iteration=0)


def random_checkpoints(base: Path, ann: Path) -> dict[str, Path]:
    """Two detectors (different heads) and a segmenter with random weights; made once per base."""
    from twopass.detector.checkpoint import last_meta
    from twopass.pipeline.coco import CocoIndex

    cats = CocoIndex.load(ann).categories
    out = {}
    for name, kind, model in (
        ("a", "detector", _tiny_model("a")),
        ("b", "detector", _tiny_model("b", head="location_sensitive")),
        ("seg", "segmenter", _tiny_model("seg", mask=True)),
    ):
        folder = base / name
        if last_meta(folder) is None:
            save_random(folder, kind, model, cats, seed=len(out))
        out[name] = folder / "checkpoints" / "iter_0000000.json"
    return out


def _config(data_dir: Path, ckpts: dict[str, Path] | None, shard_size: int = 3, **changes: Any):
    """A pipeline config over a synthetic set: detectors a (one view) and b (2 scales x flip)."""
    from twopass.pipeline.config import PipelineConfig

    ck = (lambda n: str(ckpts[n])) if ckpts else (lambda n: None)
    d = {
        "name": "test",
        "data": {"images": str(data_dir / "images"), "ann": str(data_dir / "annotations.json"), "train_images": str(data_dir / "images"),
                 "train_ann": str(data_dir / "annotations.json"), "shard_size": shard_size},
        "detectors": [
            {"name": "a", "model": _tiny_model("a"), "checkpoint": ck("a"), "max_per_image": 20, "train": {"iters": 1}},
            {"name": "b", "model": _tiny_model("b", head="location_sensitive"), "checkpoint": ck("b"), "max_per_image": 20,
             "tta": {"scales": [64], "flip": True}, "train": {"iters": 1}},
        ],
        "segmenter": {"name": "seg", "model": _tiny_model("seg", mask=True), "checkpoint": ck("seg"),
                      "tta": {"scales": [64], "flip": True}, "train": {"iters": 1}},
        "evaluation": {"overlays": 2},
    }  # fmt: skip
    for key, value in changes.items():
        d[key] = {**d[key], **value} if isinstance(value, dict) and isinstance(d.get(key), dict) else value
    return PipelineConfig.model_validate(d)


def _copy_data(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _counts(run_dir: Path, since: int = 0) -> dict[str, int]:
    """Stage executions that computed, from the ledger (lines after the first `since`)."""
    from twopass.pipeline.runfolder import read_ledger, stage_counts

    return stage_counts(read_ledger(run_dir)[since:])


def _ledger_len(run_dir: Path) -> int:
    from twopass.pipeline.runfolder import read_ledger

    return len(read_ledger(run_dir))


@pytest.fixture(scope="session")
def ckpts(synth_small, tmp_path_factory) -> dict[str, Path]:
    """Random-weight checkpoints over `synth_small`'s categories: detectors a and b, segmenter seg."""
    return random_checkpoints(tmp_path_factory.getbasetemp() / "flows_models", synth_small / "annotations.json")


@pytest.fixture
def tiny_model():
    """`tiny_model(name, head="two_fc", mask=False)` -> a tiny model config mapping (64 px inputs)."""
    return _tiny_model


@pytest.fixture
def config():
    """`config(data_dir, ckpts, shard_size=3, **changes)` -> a PipelineConfig: detectors a (one
    view) and b (2 views), segmenter seg; `changes` update its sections."""
    return _config


@pytest.fixture
def copy_data():
    """`copy_data(src, dst)`: a copy of a data folder that a test may damage."""
    return _copy_data


@pytest.fixture
def counts():
    """`counts(run_dir, since=0)`: stage executions that computed, from the run's ledger."""
    return _counts


@pytest.fixture
def ledger_len():
    """`ledger_len(run_dir)`: lines in the run's ledger."""
    return _ledger_len
