"""The segmenter's config: the detector's config with the mask branch switched on and its switches.

Each switch is independent, so the slides' rows (heavier header, mask edge loss, multi-scale
RoI) are one line each in a YAML file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from detector.config import CONFIG_DIR, ConfigError, MaskHeadConfig, ModelConfig, _format_error


class SegmenterMaskConfig(MaskHeadConfig):
    enabled: bool = True
    # standard: 4 conv3x3 256, deconv, 28x28. heavier: 8 conv3x3 with GroupNorm plus the
    # fully-connected fusion branch (METHOD.md, "Heavier Header").
    type: Literal["standard", "heavier"] = "standard"
    # PANet adaptive feature pooling for the mask RoIs.
    multi_scale_roi: bool = False
    # Sobel edge term on top of sigmoid cross-entropy (METHOD.md, "Mask Edge Loss").
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
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a segmenter config is a mapping, got {type(data).__name__}")
    try:
        return SegmenterConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from None


def load_segmenter_config(path_or_name: str | Path) -> SegmenterConfig:
    """Load a YAML segmenter config: a file path, or the name of a file in `configs/`."""
    path = Path(path_or_name)
    if not path.exists() and path.suffix == "" and (CONFIG_DIR / f"{path}.yaml").exists():
        path = CONFIG_DIR / f"{path}.yaml"
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file (nor a name in {CONFIG_DIR})")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    return segmenter_config_from_dict(data, str(path))
