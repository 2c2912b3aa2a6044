"""The demo's pipeline config: two different small detectors and one segmenter with the full
Location Sensitive Header for the synthetic `standard` 128 px shapes set, trained from scratch
on a CPU within a share of one time budget each.

The model configs are inline (the pipeline config holds them), so the demo does not depend on
which presets `configs/` holds; `RUN/pipeline.yaml` shows the whole config the demo ran.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twopass.pipeline.config import PipelineConfig

SIZE = 128


def _model(name: str, backbone: str, box_head: dict[str, Any], anchor_sizes: list[int], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "backbone": {"name": backbone, "fpn_channels": 32, "trainable_stages": 5},
        "norm": {"backbone": "bn", "heads": "gn", "gn_groups": 8},  # GN in FPN and heads: learns faster from scratch
        "rpn": {
            "anchors": {"sizes": anchor_sizes, "scales_per_octave": 2},  # helped on 2 seeds (docs/results.md, recipe)
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
# The segmenter with the full Location Sensitive Header: LSD box head with multi-scale RoI,
# the heavier mask head (8 convs with GroupNorm and the fc fusion branch, multi-scale RoI)
# and the Sobel mask edge loss, narrow enough to train on a CPU in minutes.
SEGMENTER = _model(
    "r18_lsh_seg",
    "resnet18",
    {"type": "location_sensitive", "fc_dim": 128, "kernel_size": 5, "mid_channels": 16, "alpha": 4, "multi_scale_roi": True},
    [8, 16, 32, 64, 128],
    mask_head={"type": "heavier", "conv_dim": 32, "pool_size": 7, "multi_scale_roi": True, "edge_loss": "sobel", "max_positives_per_image": 16},
)


# Shares of the demo's training time: the segmenter, whose masks are the output, gets most.
SHARES = {"r18_fpn": 0.3, "shufflev2_lsd": 0.3, "r18_lsh_seg": 0.4}


def demo_config(data_dir: str | Path, train_budget_s: float = 540.0, iters: int = 5000, batch: int = 4, shard_size: int = 16,
                precision: str = "fp32") -> PipelineConfig:  # fmt: skip
    """Pipeline config for the demo's data under `data_dir` (train/ and val/);
    `train_budget_s` seconds of training in all, shared as SHARES says; `precision` of every
    model's training and inference (fp32: bf16 was slower on a CPU without native bfloat16,
    docs/results.md)."""
    data_dir = Path(data_dir).resolve()
    # the key only where it is not the default: the fp32 demo's cache keys stay those of earlier runs
    prec = {"precision": precision} if precision != "fp32" else {}

    def train(name: str) -> dict[str, Any]:
        return {"iters": iters, "batch": batch, "time_budget_s": round(train_budget_s * SHARES[name], 1), **prec}

    views = {"scales": [SIZE, 160], "flip": True}
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
                {"name": "r18_fpn", "model": R18_FPN, "train": train("r18_fpn"), "tta": views, **prec},
                {"name": "shufflev2_lsd", "model": SHUFFLE_LSD, "train": train("shufflev2_lsd"), "tta": views, **prec},
            ],
            "fusion": {"method": "wbf", "iou_thr": 0.55, "skip_box_thr": 0.001},
            "segmenter": {
                "name": "r18_lsh_seg",
                "model": SEGMENTER,
                "train": train("r18_lsh_seg"),
                "tta": {"scales": [SIZE], "flip": True},
                "own_boxes": {"weight": 1.0, "tta": views},  # its own boxes are the third member of the fusion
                **prec,
            },
            # A few minutes of training from scratch give low scores: show each image's best boxes.
            "evaluation": {"overlays": 4, "display_score_thresh": 0.0, "overlay_top": 8},
        }
    )


def smoke_config(data_dir: str | Path) -> PipelineConfig:
    """The demo's pipeline with 10 training iterations a model and one view each: a first run of
    a deployment or a cluster set-up, to see every stage go through (the AP is near zero)."""
    d = demo_config(data_dir, iters=10).to_dict()
    d["name"] = "smoke"
    for spec in (*d["detectors"], d["segmenter"]):
        spec["train"].update(iters=10, time_budget_s=None)
        spec["tta"] = {"scales": None, "flip": False}
    if d["segmenter"].get("own_boxes"):
        d["segmenter"]["own_boxes"]["tta"] = {"scales": None, "flip": False}
    return PipelineConfig.model_validate(d)
