"""The segmenter's config: the detector's config with the mask branch switched on and its switches.

Each switch is independent, so the slides' rows (heavier header, mask edge loss, multi-scale
RoI) are one line each in a YAML file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from twopass.detector.config import MaskHeadConfig, ModelConfig, config_from_dict, load_config


class SegmenterMaskConfig(MaskHeadConfig):
    enabled: bool = True
    # standard: 4 conv3x3 256, deconv, 28x28. heavier: 8 conv3x3 with GroupNorm plus the
    # fully-connected fusion branch (docs/method.md §8, heavier mask head).
    type: Literal["standard", "heavier"] = "standard"
    # PANet adaptive feature pooling for the mask RoIs.
    multi_scale_roi: bool = False
    # Sobel edge term on top of sigmoid cross-entropy (docs/method.md §9, mask edge loss).
    edge_loss: Literal["none", "sobel"] = "none"
    edge_weight: float = Field(1.0, ge=0)
    # Which conv feeds the fc fusion branch (PANet: the third).
    fc_fusion_from: int = Field(3, ge=1)

    @property
    def convs(self) -> int:
        """Number of conv3x3 layers: `num_convs` for standard, 8 for heavier unless set higher."""
        return max(self.num_convs, 8) if self.type == "heavier" else self.num_convs


class SegmenterConfig(ModelConfig):
    mask_head: SegmenterMaskConfig = SegmenterMaskConfig()

    @model_validator(mode="after")
    def _check_mask(self) -> "SegmenterConfig":
        if not self.mask_head.enabled:
            raise ValueError("mask_head.enabled must be true for a segmenter")
        return self


def segmenter_config_from_dict(data: Any, source: str = "config") -> SegmenterConfig:
    return config_from_dict(data, source, SegmenterConfig)


def load_segmenter_config(path_or_name: str | Path) -> SegmenterConfig:
    """Load a YAML segmenter config: a file path, or the name of a file in `configs/`."""
    return load_config(path_or_name, SegmenterConfig)
