"""Model configs: one pydantic model, one YAML file per named model under `configs/`.

Every switch of docs/method.md is an independent field, so the slides' ablation rows are rerun by
changing one line. Unknown keys are errors (a misspelt switch must not be ignored silently).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from twopass.pipeline.config import validate_mapping
from twopass.pipeline.settings import Precision

# Range-checked field types: a bad value is refused when the config loads, naming its field.
PosInt = Annotated[int, Field(gt=0)]
PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]  # probabilities, IoU and score thresholds



@dataclass(frozen=True)
class BackboneSpec:
    """One backbone body, named as its torchvision classification model: `family` picks the
    body builder (`detector.backbone.FAMILIES`), `channels` are C2..C5's, `first_level` the
    first FPN level when the config leaves it out."""

    family: Literal["resnet", "shufflenet"]
    channels: tuple[int, int, int, int]
    first_level: Literal[2, 3] = 2


# A backbone of an existing family is one entry here. ShuffleNets start at P3: their C2 (the
# 24-channel stem output) is too thin to carry a pyramid level.
BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec("resnet", (64, 128, 256, 512)),
    "resnet50": BackboneSpec("resnet", (256, 512, 1024, 2048)),
    "shufflenet_v2_x0_5": BackboneSpec("shufflenet", (24, 48, 96, 1024), first_level=3),
    "shufflenet_v2_x1_0": BackboneSpec("shufflenet", (24, 116, 232, 1024), first_level=3),
    "shufflenet_v2_x2_0": BackboneSpec("shufflenet", (24, 244, 488, 2048), first_level=3),
}

# Named presets ship as package data (`twopass.configs`), so names resolve from an installed wheel too.
CONFIG_DIR = Path(str(resources.files("twopass.configs")))


class ConfigError(ValueError):
    """A config file or value is wrong; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class BackboneConfig(_Strict):
    name: str = Field("resnet50", description="A backbone of `BACKBONES`.")
    # Stages trained, counted from the top (torchvision's `trainable_layers`): 5 trains all,
    # 3 freezes the stem and the first stage (the usual choice with ImageNet weights).
    trainable_stages: int = Field(3, ge=0, le=5)
    fpn_channels: int = Field(256, ge=8)
    # First FPN level: 2 gives P2..P6, 3 gives P3..P6. None: the backbone's (`BACKBONES`).
    first_level: Literal[2, 3] | None = None
    # Global context (ThunderNet CEM): GAP(C5) -> 1x1 conv -> added to P5's lateral, so it
    # reaches every level through the top-down path.
    global_context: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if v not in BACKBONES:
            raise ValueError(f"{v!r}, expected one of {tuple(BACKBONES)}")
        return v


class NormConfig(_Strict):
    # frozen_bn: affine from the weights file, statistics fixed (small batches).
    # bn: trained BatchNorm, per process. sync_bn: BatchNorm synchronised across DDP processes
    # (plain `bn` when training in one process).
    backbone: Literal["frozen_bn", "bn", "sync_bn"] = "frozen_bn"
    # Norm in the FPN convs and in the conv layers of the box and mask heads: GroupNorm, or
    # BatchNorm (trained; torchvision's *_v2 models use it in the FPN and the conv heads).
    heads: Literal["none", "gn", "bn"] = "none"
    gn_groups: int = Field(32, ge=1)


class AnchorConfig(_Strict):
    # One size per pyramid level (first_level..6). None: `scale` x the level's stride.
    sizes: list[PosFloat] | None = None
    scale: float = Field(8.0, gt=0)
    aspect_ratios: list[PosFloat] = Field([0.5, 1.0, 2.0], min_length=1)
    # Sizes per level: size * 2**(i / n) for i < n (RetinaNet's octave scales). One anchor
    # size an octave leaves objects between two sizes with no anchor at IoU >= 0.7.
    scales_per_octave: int = Field(1, ge=1)

    def level_sizes(self, strides: list[int]) -> list[tuple[float, ...]]:
        """The anchor sizes of each level (stride), px in the input batch."""
        base = self.sizes or [self.scale * s for s in strides]
        n = self.scales_per_octave
        return [tuple(float(b) * 2 ** (i / n) for i in range(n)) for b in base]


class RPNConfig(_Strict):
    anchors: AnchorConfig = AnchorConfig()
    convs: int = Field(1, ge=1)
    pre_nms_top_n_train: PosInt = 2000
    pre_nms_top_n_test: PosInt = 1000
    post_nms_top_n_train: PosInt = 2000
    post_nms_top_n_test: PosInt = 1000
    nms_thresh: Fraction = 0.7
    fg_iou_thresh: Fraction = 0.7
    bg_iou_thresh: Fraction = 0.3
    batch_size_per_image: PosInt = 256
    positive_fraction: Fraction = 0.5


class RoIPoolConfig(_Strict):
    """How RoIs are pooled from the pyramid, for the box and mask heads alike."""

    # FPN's level mapping (Eqn. 1): a box of sqrt(area) `canonical_scale` px (input batch)
    # goes to P`canonical_level`, each halving or doubling one level down or up. FPN's 224 at
    # P4 fits 800 px inputs; on 128 px inputs it sends nearly every object to P2, so presets
    # for small inputs scale it with the input size (224 * 128 / 800 ~ 36).
    canonical_scale: float = Field(224.0, gt=0)
    canonical_level: int = Field(4, ge=2, le=5)
    # Half-pixel correction of RoIAlign (Detectron2's ROIAlignV2): sample at the pixel
    # centres the box covers. torchvision's ps_roi_align (the LSD's pooling) always does.
    aligned: bool = False


class BoxHeadConfig(_Strict):
    # two_fc: fc6, fc7 (Mask R-CNN). conv_fc: `num_convs` conv3x3 of `conv_dim` then one fc
    # (torchvision's FastRCNNConvFCHead, the *_v2 models' 4conv1fc head; norm.heads applies).
    # location_sensitive: the Location Sensitive Detector.
    type: Literal["two_fc", "conv_fc", "location_sensitive"] = "two_fc"
    # RoIAlign output for two_fc and conv_fc; p (bins per side of the position-sensitive pooling) for LSD.
    pool_size: int = Field(7, ge=1)
    sampling_ratio: int = Field(2, ge=0)
    # Width of the fc layers: two_fc and conv_fc 1024, location_sensitive 2048 (Light-Head) when None.
    fc_dim: PosInt | None = None
    num_convs: PosInt = 4  # conv_fc only
    conv_dim: PosInt = 256  # conv_fc only
    # Location Sensitive Detector: k x 1 / 1 x k separable conv of `kernel_size`, C_mid
    # `mid_channels`, to alpha * p * p channels.
    kernel_size: int = Field(15, ge=1)
    mid_channels: int = Field(256, ge=1)
    alpha: int = Field(10, ge=1)
    # PANet adaptive feature pooling: every RoI pooled from all levels, per-level first layer,
    # element-wise max fusion.
    multi_scale_roi: bool = False
    cascade_stages: Literal[1, 3] = 1
    cascade_ious: list[Fraction] = [0.5, 0.6, 0.7]
    cascade_weights: list[NonNegFloat] = [1.0, 0.5, 0.25]
    # Box regression weights per stage (Cascade R-CNN tightens them stage by stage).
    bbox_reg_weights: list[list[float]] = [[10.0, 10.0, 5.0, 5.0], [20.0, 20.0, 10.0, 10.0], [30.0, 30.0, 15.0, 15.0]]
    # One box per class (torchvision) or one for all; None: class-specific for one stage,
    # class-agnostic for a cascade (as in Cascade R-CNN).
    class_agnostic_box: bool | None = None
    batch_size_per_image: PosInt = 512
    positive_fraction: Fraction = 0.25
    score_thresh: Fraction = 0.05
    nms_thresh: Fraction = 0.5
    detections_per_img: PosInt = 100

    @property
    def fc_width(self) -> int:
        if self.fc_dim is not None:
            return self.fc_dim
        return 2048 if self.type == "location_sensitive" else 1024

    @property
    def agnostic(self) -> bool:
        return self.cascade_stages > 1 if self.class_agnostic_box is None else self.class_agnostic_box

    @model_validator(mode="after")
    def _check(self) -> "BoxHeadConfig":
        n = self.cascade_stages
        if len(self.cascade_ious) < n or len(self.cascade_weights) < n or len(self.bbox_reg_weights) < n:
            raise ValueError(f"cascade_ious, cascade_weights and bbox_reg_weights need {n} entries")
        if any(len(w) != 4 for w in self.bbox_reg_weights):
            raise ValueError("bbox_reg_weights: each entry needs 4 numbers (wx, wy, ww, wh)")
        if self.type == "conv_fc" and self.multi_scale_roi:
            raise ValueError("multi_scale_roi: not available with box_head.type conv_fc")
        return self


class MaskHeadConfig(_Strict):
    """Standard Mask R-CNN mask branch (torchvision's MaskRCNNHeads); pass two extends it."""

    enabled: bool = False
    pool_size: PosInt = 14
    sampling_ratio: int = Field(2, ge=0)
    conv_dim: PosInt = 256
    num_convs: int = Field(4, ge=1)
    # Train the mask head on at most this many positive RoIs per image (None: all of them).
    max_positives_per_image: PosInt | None = None


class InputConfig(_Strict):
    # Shorter side, drawn per image from this list in training (multi-scale training).
    train_sizes: list[PosInt] = Field([640, 672, 704, 736, 768, 800], min_length=1)
    test_size: PosInt = 800
    max_size: PosInt = 1333
    size_divisible: PosInt = 32
    image_mean: list[float] = Field([0.485, 0.456, 0.406], min_length=3, max_length=3)
    image_std: list[PosFloat] = Field([0.229, 0.224, 0.225], min_length=3, max_length=3)


class TrainConfig(_Strict):
    # sgd: SGD with momentum (the Detectron recipe). adamw: AdamW (betas momentum, 0.999),
    # which the *_cpu presets use: from random weights, in 5 minutes on the synthetic 128 px
    # set, it reached about twice SGD's val box AP (0.009 against 0.005 after 10 minutes).
    optimizer: Literal["sgd", "adamw"] = "sgd"
    # Learning rate for `base_batch` images; scaled linearly with the real total batch.
    base_lr: PosFloat = 0.02
    base_batch: PosInt = 16
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: NonNegFloat = 1e-4
    warmup_iters: int = Field(500, ge=0)
    warmup_factor: float = Field(0.001, gt=0, le=1)
    # Step decay at these fractions of the total iterations, by `gamma` each.
    steps: list[Annotated[float, Field(gt=0, le=1)]] = [0.67, 0.89]
    gamma: float = Field(0.1, gt=0, le=1)
    clip_grad_norm: PosFloat | None = None
    hflip_prob: Fraction = 0.5
    checkpoint_every: PosInt = 1000
    val_every: int = Field(0, ge=0)
    seed: int = 0
    num_workers: int = Field(0, ge=0)
    # Mixed precision of the training steps (pipeline/precision.py): fp32, bf16 (CUDA, or a CPU
    # with native bfloat16) or fp16 (CUDA, with a gradient scaler). Checkpoints stay float32.
    precision: Precision = "fp32"


class ModelConfig(_Strict):
    name: str
    backbone: BackboneConfig = BackboneConfig()
    norm: NormConfig = NormConfig()
    rpn: RPNConfig = RPNConfig()
    roi_pool: RoIPoolConfig = RoIPoolConfig()
    box_head: BoxHeadConfig = BoxHeadConfig()
    mask_head: MaskHeadConfig = MaskHeadConfig()
    input: InputConfig = InputConfig()
    train: TrainConfig = TrainConfig()

    @property
    def first_level(self) -> int:
        if self.backbone.first_level is not None:
            return self.backbone.first_level
        return BACKBONES[self.backbone.name].first_level

    @property
    def levels(self) -> list[int]:
        """Pyramid levels the RPN sees: first_level..6."""
        return list(range(self.first_level, 7))

    @property
    def roi_levels(self) -> list[int]:
        """Pyramid levels RoIs are pooled from: first_level..5 (P6 is for the RPN only)."""
        return list(range(self.first_level, 6))

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        sizes = self.rpn.anchors.sizes
        if sizes is not None and len(sizes) != len(self.levels):
            raise ValueError(
                f"rpn.anchors.sizes has {len(sizes)} entries; levels P{self.first_level}..P6 need {len(self.levels)}"
            )
        gn = self.norm.gn_groups
        if self.norm.heads == "gn":
            chans = [("backbone.fpn_channels", self.backbone.fpn_channels), ("mask_head.conv_dim", self.mask_head.conv_dim)]
            if self.box_head.type == "conv_fc":
                chans.append(("box_head.conv_dim", self.box_head.conv_dim))
            for what, ch in chans:
                if ch % gn:
                    raise ValueError(f"{what}={ch} is not divisible by norm.gn_groups={gn}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


C = TypeVar("C", bound=ModelConfig)


def config_from_dict(data: Any, source: str = "config", cls: type[C] = ModelConfig) -> C:
    """Validate a config mapping as `cls` (ModelConfig, or a subclass such as the segmenter's)."""
    return validate_mapping(cls, data, source, ConfigError, "model config")


def load_config(path_or_name: str | Path, cls: type[C] = ModelConfig) -> C:
    """Load a YAML model config: a file path, or the name of a file in `configs/` (no suffix)."""
    path = Path(path_or_name)
    if not path.exists() and path.suffix == "" and (CONFIG_DIR / f"{path}.yaml").exists():
        path = CONFIG_DIR / f"{path}.yaml"
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file (nor a name in {CONFIG_DIR})")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    return config_from_dict(data, str(path), cls)
