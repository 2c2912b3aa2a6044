"""The settings of the inference stages, with their defaults: the one home of each.

Each stage's front door (`detector.api.detect_images`, `ensemble.api.fuse_files`,
`segmenter.api.segment_images`) takes one of these records; the CLI options read their defaults
from here and the pipeline config (`pipeline.config`) is built from the same records, so a
command and a flow given the same settings compute the same thing. They live in `pipeline/`
because the pipeline config embeds them and `pipeline/` imports no stage package.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FuseMethod = Literal["wbf", "soft-nms", "nms"]
# Mixed precision of a model's forward passes (pipeline/precision.py applies it).
Precision = Literal["fp32", "bf16", "fp16"]
ConfType = Literal["avg", "max", "box_and_model_avg", "absent_model_aware_avg"]

# ensemble_boxes' defaults for each method.
DEFAULT_IOU_THR: dict[str, float] = {"wbf": 0.55, "soft-nms": 0.5, "nms": 0.5}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DetectSettings(_Strict):
    """Pass one, per model: what a detector's views keep."""

    score_thresh: float = Field(0.001, ge=0, le=1, description="Keep detections scoring above this (COCO practice).")
    max_per_image: int = Field(100, ge=1, description="Detections kept per image and view.")
    batch: int = Field(2, ge=1, description="Images per forward pass.")
    precision: Precision = Field("fp32", description="fp32 | bf16 | fp16: autocast of the forward passes (pipeline/precision.py).")


class FuseSettings(_Strict):
    """Fusion of several models' and views' boxes, per image and category."""

    method: FuseMethod = "wbf"
    iou_thr: float | None = Field(None, gt=0, lt=1, description="Default: 0.55 for wbf, 0.5 for soft-nms and nms.")
    skip_box_thr: float = Field(0.0, ge=0, le=1, description="wbf: ignore boxes scoring below this.")
    conf_type: ConfType = "avg"
    decay: Literal["gaussian", "linear"] = Field("gaussian", description="soft-nms: score decay.")
    sigma: float = Field(0.5, gt=0, description="soft-nms: Gaussian decay exp(-iou^2 / sigma).")
    thresh: float = Field(0.001, ge=0, le=1, description="soft-nms: drop boxes whose decayed score is <= this.")
    rescore: bool | None = Field(
        None, description="soft-nms: write the decayed scores (Bodla et al.), not the input scores. Default: true for soft-nms."
    )
    max_per_image: int = Field(100, ge=1, description="Keep the best N boxes an image.")
    labels: Literal["per_label", "vote"] = Field(
        "per_label",
        description="per_label: fuse each category apart (ensemble_boxes' way); vote: fuse boxes of all categories together, "
        "each fused box taking the category with the largest summed score (times model weight) among the boxes it fused",
    )

    def resolved(self) -> dict[str, Any]:
        """Every setting with the method-dependent defaults filled in (hashable, and what
        `ensemble.fuse` receives). `labels` only when not per_label: the stages' content keys
        and the fused files' metadata stay those of the runs made before the setting."""
        out = self.model_dump()
        if out["labels"] == "per_label":
            del out["labels"]
        if out["iou_thr"] is None:
            out["iou_thr"] = DEFAULT_IOU_THR.get(self.method)  # an unknown method is named by `ensemble.fuse`
        if out["rescore"] is None:
            out["rescore"] = self.method == "soft-nms"
        return out


class SegmentSettings(_Strict):
    """Pass two: masks for given boxes."""

    mask_thresh: float = Field(0.5, gt=0, lt=1, description="Pixels whose averaged probability exceeds this are in the mask.")
    skip_invalid: bool = Field(
        False, description="Drop (and count in the output's metadata) rows that cannot be segmented, instead of failing."
    )
    precision: Precision = Field("fp32", description="fp32 | bf16 | fp16: autocast of the forward passes (pipeline/precision.py).")


def help_of(settings: type[BaseModel], field: str) -> str:
    """A CLI option's help text: the description of its settings field."""
    return settings.model_fields[field].description or ""


DETECT = DetectSettings()
FUSE = FuseSettings()
SEGMENT = SegmentSettings()
