"""The demo's pipeline config: two different small detectors and one segmenter for the
synthetic 128 px shapes set, trained from scratch on a CPU within a time budget each.

The model configs are inline (the pipeline config holds them), so the demo does not depend on
which presets `configs/` holds; `RUN/pipeline.yaml` shows the whole config the demo ran.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig

SIZE = 128


def _model(name: str, backbone: str, box_head: dict[str, Any], anchor_sizes: list[int], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "backbone": {"name": backbone, "fpn_channels": 32, "trainable_stages": 5},
        "norm": {"backbone": "bn", "heads": "gn", "gn_groups": 8},  # GN in FPN and heads: learns faster from scratch
        "rpn": {
            "anchors": {"sizes": anchor_sizes},
            "pre_nms_top_n_train": 300,
            "post_nms_top_n_train": 150,
            "pre_nms_top_n_test": 300,
            "post_nms_top_n_test": 100,
            "batch_size_per_image": 64,
        },
        "box_head": {"batch_size_per_image": 64, "positive_fraction": 0.5, **box_head},
        "input": {"train_sizes": [112, 128, 144], "test_size": SIZE, "max_size": 192},
        # AdamW (learns faster than SGD from random weights) at a constant LR after warm-up:
        # a time budget may end training at any iteration.
        "train": {"optimizer": "adamw", "base_lr": 0.002, "base_batch": 8, "warmup_iters": 50, "steps": [], "clip_grad_norm": 5.0},
        **extra,
    }


# Two detectors that differ in backbone and head, as an ensemble should.
R18_FPN = _model("r18_fpn", "resnet18", {"type": "two_fc", "fc_dim": 128}, [8, 16, 32, 64, 128])
SHUFFLE_LSD = _model(
    "shufflev2_lsd",
    "shufflenet_v2_x1_0",
    {"type": "location_sensitive", "fc_dim": 128, "kernel_size": 5, "mid_channels": 16, "alpha": 4},
    [16, 32, 64, 128],  # P3..P6: ShuffleNet has no P2
)
SEGMENTER = _model(
    "r18_seg",
    "resnet18",
    {"type": "two_fc", "fc_dim": 128},
    [8, 16, 32, 64, 128],
    mask_head={"conv_dim": 32, "num_convs": 2, "max_positives_per_image": 16},
)


def demo_config(data_dir: str | Path, train_budget_s: float = 180.0, iters: int = 2000, batch: int = 4, shard_size: int = 16) -> PipelineConfig:
    """Pipeline config for the demo's data under `data_dir` (train/ and val/)."""
    data_dir = Path(data_dir).resolve()
    train = {"iters": iters, "batch": batch, "time_budget_s": train_budget_s}
    return PipelineConfig.model_validate(
        {
            "name": "demo",
            "data": {
                "images": str(data_dir / "val" / "images"),
                "ann": str(data_dir / "val" / "annotations.json"),
                "train_images": str(data_dir / "train" / "images"),
                "train_ann": str(data_dir / "train" / "annotations.json"),
                "shard_size": shard_size,
            },
            "detectors": [
                {"name": "r18_fpn", "model": R18_FPN, "train": train, "tta": {"scales": [SIZE, 160], "flip": True}},
                {"name": "shufflev2_lsd", "model": SHUFFLE_LSD, "train": train, "tta": {"scales": [SIZE, 160], "flip": True}},
            ],
            "fusion": {"method": "wbf", "iou_thr": 0.55, "skip_box_thr": 0.001},
            "segmenter": {"name": "r18_seg", "model": SEGMENTER, "train": train, "tta": {"scales": [SIZE], "flip": True}},
            # A few minutes of training from scratch give low scores: show each image's best boxes.
            "evaluation": {"overlays": 4, "score_thresh": 0.0, "overlay_top": 8},
        }
    )
