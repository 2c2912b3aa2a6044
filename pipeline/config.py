"""The pipeline config: one YAML file naming the data, the detectors, the fusion and the segmenter.

The Prefect flows in `flows/` take a `PipelineConfig` as a parameter, so Prefect validates it
(a deployment run with a bad value is refused before it starts). Unknown keys are errors: a
misspelt setting must not be ignored silently.

    name: demo
    data:
      images: data/val/images           # the images pass one and pass two run on
      ann: data/val/annotations.json    # their ids and sizes; the ground truth for evaluation
      train_images: data/train/images   # for train_flow
      train_ann: data/train/annotations.json
      shard_size: 16                    # images per task
    detectors:
      - name: r18_fpn
        model: r18_fpn_cpu              # a YAML in configs/, a path, or an inline mapping
        train: {iters: 300, batch: 4}   # used by train_flow when no checkpoint is given
        tta: {scales: [128, 160], flip: true}
        weight: 1.0                     # fusion weight of all this detector's views
    fusion: {method: wbf, iou_thr: 0.55}
    segmenter:
      model: {...}
      train: {iters: 300}
      tta: {scales: [128], flip: true}
    evaluation: {overlays: 4}

Relative paths in a YAML file are relative to that file's folder (`load_pipeline_config`);
in a mapping given directly (a deployment parameter), relative to the working directory.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .devices import DEVICE_HELP, DEVICE_PATTERN
from .settings import DISPLAY_SCORE_THRESH, DetectSettings, FuseSettings, Precision, SegmentSettings

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class PipelineConfigError(ValueError):
    """The pipeline config is wrong; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    images: Path = Field(description="Folder of the images that pass one and pass two run on.")
    ann: Path | None = Field(
        None, description="COCO annotations of those images: ids, sizes, and the ground truth for evaluation."
    )
    images_table: Path | None = Field(
        None, description="Without `ann`: an images table (`twopass images`) giving the ids; else ids by sorted file name."
    )
    train_images: Path | None = Field(None, description="Training image folder (train_flow).")
    train_ann: Path | None = Field(None, description="Training COCO annotations (train_flow).")
    shard_size: int = Field(64, ge=1, description="Images per task: each stage runs one task per shard.")

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.ann is not None and self.images_table is not None:
            raise ValueError("give `ann` or `images_table`, not both")
        if (self.train_ann is None) != (self.train_images is None):
            raise ValueError("`train_ann` and `train_images` go together")
        return self


class TrainSpec(_Strict):
    """How train_flow trains a model (the model config holds its schedule's shape)."""

    iters: int = Field(1000, ge=1)
    batch: int = Field(2, ge=1, description="Images per iteration.")
    lr: float | None = Field(None, gt=0, description="LR for the model config's train.base_batch images.")
    seed: int | None = None
    time_budget_s: float | None = Field(None, gt=0, description="Stop (and save) after this much training time.")
    checkpoint_every: int | None = Field(None, ge=1)
    backbone_weights: Path | None = Field(None, description="Local torchvision classification weights (never downloaded).")
    precision: Precision | None = Field(None, description="fp32 | bf16 | fp16 (pipeline/precision.py); default: the model config's train.precision.")


class TTAConfig(_Strict):
    scales: list[int] | None = Field(None, description="Shorter sides of the views; default: the model's test size.")
    flip: bool = Field(False, description="Add a mirrored view of every scale.")

    @field_validator("scales")
    @classmethod
    def _scales(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or min(v) < 16):
            raise ValueError(f"scales must be a non-empty list of sizes >= 16 px, got {v}")
        return v


class _ModelSpec(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    model: str | dict[str, Any] = Field(
        description="Model config: a YAML path, the name of a file in configs/, or an inline mapping."
    )
    checkpoint: Path | None = Field(
        None, description="A trained checkpoint (JSON, .safetensors or run folder); else the one train_flow made."
    )
    train: TrainSpec = TrainSpec()
    tta: TTAConfig = TTAConfig()


class DetectorSpec(_ModelSpec, DetectSettings):
    weight: float = Field(1.0, gt=0, description="Fusion weight of this detector (all its views).")


class OwnBoxesSpec(_Strict):
    """The segmenter run end to end as one more model of pass one: its own boxes join the
    fusion, and its own masks (first view) are scored beside the two-pass masks."""

    weight: float = Field(1.0, gt=0, description="Fusion weight of the segmenter's boxes (all its views).")
    tta: TTAConfig = Field(TTAConfig(), description="Views of the segmenter as a detector (pass two's views are `segmenter.tta`).")


class SegmenterSpec(_ModelSpec, SegmentSettings):
    name: str = Field("segmenter", pattern=NAME_PATTERN)
    own_boxes: OwnBoxesSpec | None = Field(
        None, description="Also fuse the segmenter's own boxes in pass one (None: only the detectors' boxes)."
    )


class EvaluationConfig(_Strict):
    enabled: bool = Field(True, description="Evaluate when the data has annotations.")
    overlays: int = Field(4, ge=0, description="Images drawn in the report.")
    display_score_thresh: float = Field(
        DISPLAY_SCORE_THRESH, ge=0, le=1, description="Hide results below this score in the pictures.",
        validation_alias=AliasChoices("display_score_thresh", "score_thresh"),  # its name until 2026-12
    )
    overlay_top: int = Field(20, ge=1, description="At most this many results an image in the pictures (the best scoring).")


class PipelineConfig(_Strict):
    name: str = Field("twopass", pattern=NAME_PATTERN)
    data: DataConfig
    detectors: list[DetectorSpec] = Field(min_length=1)
    fusion: FuseSettings = FuseSettings()
    segmenter: SegmenterSpec
    evaluation: EvaluationConfig = EvaluationConfig()
    device: str = Field("cpu", pattern=DEVICE_PATTERN, description=f"{DEVICE_HELP}; checked against torch where the tasks run.")

    @model_validator(mode="after")
    def _check(self) -> "PipelineConfig":
        names = [d.name for d in self.detectors]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"detector names must be unique, {dup} repeat")
        if self.segmenter.name in names:
            raise ValueError(f"segmenter name {self.segmenter.name!r} is also a detector's name")
        return self

    def pass_one(self) -> list[tuple[Literal["detector", "segmenter"], DetectorSpec]]:
        """(kind, spec) of every model whose boxes pass one fuses: the detectors, then the
        segmenter as a detector when `segmenter.own_boxes` is set."""
        members: list[tuple[Literal["detector", "segmenter"], DetectorSpec]] = [("detector", d) for d in self.detectors]
        s = self.segmenter
        if s.own_boxes is not None:
            spec = DetectorSpec(name=s.name, model=s.model, checkpoint=s.checkpoint, train=s.train, tta=s.own_boxes.tta,
                                weight=s.own_boxes.weight, precision=s.precision, mask_thresh=s.mask_thresh)  # fmt: skip
            members.append(("segmenter", spec))
        return members

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def resolved(self, base: str | Path) -> "PipelineConfig":
        """A copy with every relative path (data, checkpoints, model YAML files) made absolute
        against `base`. A `model` string that names no file under `base` is left as it is (a
        name in configs/)."""
        base = Path(base)
        data = self.to_dict()

        def fix(value: Any) -> Any:
            if value is None:
                return None
            p = Path(value)
            return str(p if p.is_absolute() else (base / p).resolve())

        for key in ("images", "ann", "images_table", "train_images", "train_ann"):
            data["data"][key] = fix(data["data"][key])
        for spec in [*data["detectors"], data["segmenter"]]:
            spec["checkpoint"] = fix(spec["checkpoint"])
            spec["train"]["backbone_weights"] = fix(spec["train"]["backbone_weights"])
            model = spec["model"]
            if isinstance(model, str) and not Path(model).is_absolute() and (base / model).is_file():
                spec["model"] = str((base / model).resolve())
        return PipelineConfig.model_validate(data)


def format_validation_error(e: ValidationError, source: str) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in err["loc"]).replace(".[", "[")
        parts.append(f"field {loc or '(top level)'!r}: {err['msg']}")
    return f"{source}: " + "; ".join(parts)


M = TypeVar("M", bound=BaseModel)


def validate_mapping(cls: type[M], data: Any, source: str, error: type[ValueError], what: str) -> M:
    """`data` validated as `cls`; anything wrong raises `error` naming `source` and each field."""
    if not isinstance(data, dict):
        raise error(f"{source}: a {what} is a mapping, got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise error(format_validation_error(e, source)) from None


def pipeline_config_from_dict(data: Any, source: str = "pipeline config") -> PipelineConfig:
    if isinstance(data, PipelineConfig):
        return data
    return validate_mapping(PipelineConfig, data, source, PipelineConfigError, "pipeline config")


def load_pipeline_config(path: str | Path) -> PipelineConfig:
    """Read a pipeline YAML; relative paths in it are taken relative to its folder."""
    path = Path(path)
    if not path.is_file():
        raise PipelineConfigError(f"{path}: no such pipeline config file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise PipelineConfigError(f"{path}: not valid YAML ({e})") from None
    return pipeline_config_from_dict(data, str(path)).resolved(path.resolve().parent)


def write_pipeline_config(path: str | Path, config: PipelineConfig) -> Path:
    from .fileio import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(config.to_yaml())
    return path


def safe_name(text: str) -> str:
    """A file-name-safe form of a model or stage name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)
