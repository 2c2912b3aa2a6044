"""The settings of the inference stages, with their defaults: the one home of each.

Each stage's front door (`detector.api.detect_images`, `ensemble.api.fuse_files`,
`segmenter.api.segment_images`) takes one of these records; the CLI options read their defaults
from here and the pipeline config (`pipeline.config`) is built from the same records, so a
command and a flow given the same settings compute the same thing. They live in `pipeline/`
because the pipeline config embeds them and `pipeline/` imports no stage package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# Mixed precision of a model's forward passes (pipeline/precision.py applies it).
Precision = Literal["fp32", "bf16", "fp16"]
ConfType = Literal["avg", "max", "box_and_model_avg", "absent_model_aware_avg"]


@dataclass(frozen=True)
class FusionMethod:
    """One fusion method: the one entry a new method needs (beside its kernel and a test).

    `kernel`: "module:function" (imported on first use: `pipeline/` imports no stage package)
    or the function itself, called as `kernel(flat, weights, settings, by_label=..., **options)`
    on every image's boxes at once (`ensemble.fusion.Flat`, (M,) member weights or None, the
    `FuseSettings`) and returning an `ensemble.fusion.Result`. `reference`: the same for one
    image by `ensemble_boxes` (None: the method has no reference). `default_iou`: `iou_thr`
    when the settings leave it out. `params`: the `FuseSettings` fields the method reads.
    `rescore`: `rescore` when the settings leave it out. `unit_scores`: input scores must lie
    in [0, 1] (NMS takes any finite score)."""

    kernel: str | Callable[..., Any]
    reference: str | Callable[..., Any] | None
    default_iou: float
    params: tuple[str, ...]
    rescore: bool = False
    unit_scores: bool = True


FUSION_METHODS: dict[str, FusionMethod] = {
    # ensemble_boxes' defaults for each method's IoU threshold
    "wbf": FusionMethod("twopass.ensemble.fusion:run_wbf", "twopass.ensemble.fusion:wbf_reference", 0.55,
                        ("iou_thr", "skip_box_thr", "conf_type")),
    "soft-nms": FusionMethod("twopass.ensemble.fusion:run_soft_nms", "twopass.ensemble.fusion:soft_nms_reference", 0.5,
                             ("iou_thr", "decay", "sigma", "thresh", "rescore"), rescore=True),
    "nms": FusionMethod("twopass.ensemble.fusion:run_nms", "twopass.ensemble.fusion:nms_reference", 0.5, ("iou_thr",),
                        unit_scores=False),
}  # fmt: skip
# The built-in methods' default IoU thresholds (the keyword defaults of `ensemble.fusion`'s functions).
DEFAULT_IOU_THR: dict[str, float] = {name: m.default_iou for name, m in FUSION_METHODS.items()}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DetectSettings(_Strict):
    """Pass one, per model: what a detector's views keep."""

    score_thresh: float = Field(0.001, ge=0, le=1, description="Keep detections scoring above this (COCO practice).")
    max_per_image: int = Field(100, ge=1, description="Detections kept per image and view.")
    batch: int = Field(2, ge=1, description="Images per forward pass.")
    precision: Precision = Field("fp32", description="fp32 | bf16 | fp16: autocast of the forward passes (pipeline/precision.py).")
    mask_thresh: float = Field(
        0.5, gt=0, lt=1, description="A segmenter run end to end (--with-masks, own boxes): pixels whose probability exceeds this are in the mask."
    )


class FuseSettings(_Strict):
    """Fusion of several models' and views' boxes, per image and category."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # sigma: inf ran to the kernels' own check

    method: str = Field("wbf", description="A method of `FUSION_METHODS`: wbf | soft-nms | nms.")
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

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        if v not in FUSION_METHODS:
            raise ValueError(f"{v!r}, expected one of {tuple(FUSION_METHODS)}")
        return v

    @property
    def spec(self) -> FusionMethod:
        return FUSION_METHODS[self.method]

    @property
    def iou(self) -> float:
        """`iou_thr`, or the method's default."""
        return self.spec.default_iou if self.iou_thr is None else self.iou_thr

    @property
    def rescores(self) -> bool:
        """`rescore`, or the method's default."""
        return self.spec.rescore if self.rescore is None else self.rescore

    def resolved(self) -> dict[str, Any]:
        """Every setting with the method-dependent defaults filled in: the stages' content keys
        and the fused files' metadata (the fusion itself reads the record). `labels` only when
        not per_label: keys and metadata stay those of the runs made before the setting."""
        out = self.model_dump()
        if out["labels"] == "per_label":
            del out["labels"]
        out["iou_thr"], out["rescore"] = self.iou, self.rescores
        return out


class SegmentSettings(_Strict):
    """Pass two: masks for given boxes."""

    mask_thresh: float = Field(0.5, gt=0, lt=1, description="Pixels whose averaged probability exceeds this are in the mask.")
    skip_invalid: bool = Field(
        False, description="Drop (and count in the output's metadata) rows that cannot be segmented, instead of failing."
    )
    precision: Precision = Field("fp32", description="fp32 | bf16 | fp16: autocast of the forward passes (pipeline/precision.py).")


def settings_from_options(cls: type[BaseModel], values: dict[str, Any]) -> Any:
    """A settings record from a command's options, validated as the pipeline config validates
    it (the same fields, the same ranges); anything wrong raises one ValueError line naming
    each field, e.g. "iou_thr: 1.0: Input should be less than 1"."""
    try:
        return cls.model_validate(values)
    except ValidationError as e:
        raise ValueError("; ".join(_error_line(cls, err) for err in e.errors())) from None


def _error_line(cls: type[BaseModel], err: Any) -> str:
    field = ".".join(map(str, err["loc"]))
    if err["type"] == "literal_error":  # the choices as a tuple, as the fusion functions name them
        return f"{field}: {err['input']!r}, expected one of {get_args(cls.model_fields[err['loc'][0]].annotation)}"
    if err["type"] == "value_error":  # a validator's message names the value and the choices
        return f"{field}: {err['ctx']['error']}"
    return f"{field}: {err['input']!r}: {err['msg']}"


def help_of(settings: type[BaseModel], field: str) -> str:
    """A CLI option's help text: the description of its settings field."""
    return settings.model_fields[field].description or ""


# Pictures (the report's, `twopass show`, `Instances.plot`) hide results scoring below this:
# a reader's threshold, not pass one's `score_thresh` (what is kept) nor a model's own.
DISPLAY_SCORE_THRESH = 0.3

DETECT = DetectSettings()
FUSE = FuseSettings()
SEGMENT = SegmentSettings()
