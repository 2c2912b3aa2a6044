"""Inference over an image set with test-time augmentation (scales x horizontal flip):
`detect_images`, pass one's front door (re-exported by `detector.api`), and its views.

Each view is made here, explicitly: the original image [3, H, W] is resized to the view size
(the model's own resize rule: shorter side `scale`, longer side at most `max_size`) and
mirrored if the view flips; the model sees it as is (`Detector.predict` with no size) and
returns boxes in the view frame; `from_view` maps them back (unflip in the view frame, then
rescale). Imported torchvision models (`torchvision_resize`) are resized by the model after
normalising, as torchvision does, so their outputs are torchvision's at any image size.
Thresholds are arguments of each call; nothing is written on the model, so threads may share it.
Output rows are in original-image pixels with COCO category ids, `source` naming the model and
the view (`r50_lsd@640`, `r50_lsd@640+flip`), so the fusion stage merges views and models alike.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from twopass.pipeline.settings import DETECT, SEGMENT, DetectSettings
from twopass.pipeline.categories import Categories
from twopass.pipeline.masks import paste_and_encode
from twopass.pipeline.precision import autocast, check_precision
from twopass.pipeline.tables import TableMeta, detections_table, instances_table, write_table

from .checkpoint import CheckpointMeta


@dataclass(frozen=True)
class View:
    """One test-time view: shorter side `scale` px, mirrored or not."""

    scale: int
    flip: bool = False

    def source(self, model_name: str) -> str:
        return f"{model_name}@{self.scale}" + ("+flip" if self.flip else "")


def make_views(scales: Sequence[int], flip: bool) -> list[View]:
    views = []
    for s in scales:
        views.append(View(int(s)))
        if flip:
            views.append(View(int(s), True))
    return views


def view_size(h: int, w: int, scale: int, max_size: int) -> tuple[int, int]:
    """(h', w') of the view: torchvision's GeneralizedRCNNTransform rule and rounding
    (interpolate with scale_factor and recompute_scale_factor=True floors h * f)."""
    f = min(float(scale) / min(h, w), float(max_size) / max(h, w))
    return int(math.floor(float(h) * f)), int(math.floor(float(w) * f))


def flip_boxes(boxes: Tensor, width: int | float) -> Tensor:
    """Mirror XYXY boxes in an image `width` wide: x -> width - x (x1 and x2 swap). Self-inverse."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


def rescale_boxes(boxes: Tensor, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> Tensor:
    """XYXY boxes from an image of size from_hw to one of size to_hw (x by w ratio, y by h ratio)."""
    ry = to_hw[0] / from_hw[0]
    rx = to_hw[1] / from_hw[1]
    scale = torch.tensor([rx, ry, rx, ry], dtype=torch.float64, device=boxes.device)
    return (boxes.double() * scale).to(boxes.dtype)


def to_view(boxes: Tensor, orig_hw: tuple[int, int], view_hw: tuple[int, int], flip: bool) -> Tensor:
    """Original-image boxes -> view-frame boxes."""
    b = rescale_boxes(boxes, orig_hw, view_hw)
    return flip_boxes(b, view_hw[1]) if flip else b


def from_view(boxes: Tensor, orig_hw: tuple[int, int], view_hw: tuple[int, int], flip: bool) -> Tensor:
    """View-frame boxes -> original-image boxes: the exact inverse of `to_view`."""
    b = flip_boxes(boxes, view_hw[1]) if flip else boxes
    return rescale_boxes(b, view_hw, orig_hw)


def make_view_image(image: Tensor, view: View, max_size: int) -> Tensor:
    """Image FloatTensor[3, H, W] -> the view's FloatTensor[3, h', w'] (bilinear, as torchvision)."""
    h, w = image.shape[-2:]
    vh, vw = view_size(h, w, view.scale, max_size)
    if (vh, vw) != (h, w):
        image = F.interpolate(image[None], size=(vh, vw), mode="bilinear", align_corners=False)[0]
    return image.flip(-1) if view.flip else image


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """A model still training (the validation hook's, a test's fresh one) in eval mode for the
    call and back in train mode after it; a model already in eval mode, which threads may share,
    is left untouched (Detectron2's `inference_context`, without the write on a shared model)."""
    if not model.training:
        yield
        return
    model.eval()
    try:
        yield
    finally:
        model.train()


def view_inputs(
    images: list[Tensor], view: View, max_size: int, torchvision_resize: bool = False
) -> tuple[list[Tensor], int | None]:
    """Original images [3, H_i, W_i] in [0, 1] as the model takes them through one view, and the
    `size` for the model's `predict` (None: resized here, before normalising).
    torchvision_resize: the model resizes after normalising (torchvision's order; the flip
    comes first, exact in either order)."""
    if torchvision_resize:
        return [im.flip(-1) if view.flip else im for im in images], view.scale
    return [make_view_image(im, view, max_size) for im in images], None


def from_view_outputs(
    outputs: list[dict[str, Tensor]], images: list[Tensor], inputs: list[Tensor], view: View, torchvision_resize: bool = False
) -> list[dict[str, Tensor]]:
    """The model's predictions on `view_inputs` back in the original images' frame: boxes in
    original-image pixels, RoI-sized soft masks [N, 1, M, M] unflipped. In place."""
    for im, vim, o in zip(images, inputs, outputs):
        if torchvision_resize:  # the model's boxes are already in the (flipped) original's pixels
            o["boxes"] = flip_boxes(o["boxes"], im.shape[-1]) if view.flip else o["boxes"]
        else:
            o["boxes"] = from_view(o["boxes"], tuple(im.shape[-2:]), tuple(vim.shape[-2:]), view.flip)
        if view.flip and "masks" in o:
            o["masks"] = o["masks"].flip(-1)
    return outputs


def masks_to_rles(soft: Tensor, boxes: Tensor, hw: tuple[int, int], mask_thresh: float = SEGMENT.mask_thresh) -> list[dict]:
    """RoI soft masks [N, 1, M, M] pasted at boxes (original pixels), thresholded at `mask_thresh`, as RLEs."""
    return paste_and_encode(soft[:, 0], boxes, hw, mask_thresh)


@dataclass
class LoadedModel:
    """A model ready for inference (eval mode) and its checkpoint's record. Inference takes its
    thresholds as arguments and writes nothing on the model, so threads may share one."""

    model: nn.Module
    meta: CheckpointMeta

    @classmethod
    def in_memory(cls, model: nn.Module, categories: Categories, kind: str = "detector") -> "LoadedModel":
        """A model not read from a checkpoint (one in training, one built in a notebook)."""
        meta = CheckpointMeta(Path("<in memory>"), kind, model.config.to_dict(), categories, iteration=0, extra={})
        return cls(model, meta)

    @property
    def name(self) -> str:
        return self.model.config.name

    @property
    def torchvision_resize(self) -> bool:
        """An imported torchvision model: resized after normalising, as torchvision does, so its
        outputs are torchvision's at any image size (`view_inputs`)."""
        return "imported_from" in self.meta.extra


def check_categories(loaded: LoadedModel, image_set) -> None:
    """A model may only run on images annotated with its own category list."""
    if image_set.categories is not None:
        loaded.meta.categories.check_same(image_set.categories, f"{image_set.source} against checkpoint {loaded.meta.path}")


def detect_images(
    loaded: LoadedModel,
    image_set,
    views: Sequence[View] | None = None,
    settings: DetectSettings = DETECT,
    *,
    name: str | None = None,
    device: str | torch.device = "cpu",
    image_ids: Sequence[int] | None = None,
    with_masks: bool = False,
    out: str | Path | None = None,
    extra: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
    nms_thresh: float | None = None,
) -> tuple[pa.Table, TableMeta]:
    """Pass one of one model: its detections on `image_set` (a `pipeline.coco.ImageSet`, or
    `image_ids` of it) through every view (default: the model's test size), boxes XYXY in
    original pixels, COCO category ids, `source` naming the model and the view. A segmenter run
    end to end (`with_masks`) gives instances, masks thresholded at `settings.mask_thresh`.
    The settings' thresholds go into the model's `predict`; `nms_thresh`: the per-class NMS IoU
    (None: the model's own; 1.0 keeps every box, for a Soft-NMS downstream). `precision`:
    autocast of the forward passes (boxes, scores and masks come out float32). Written to `out`
    when given; returns (table, meta)."""
    check_categories(loaded, image_set)
    check_precision(settings.precision, device)
    model, categories, name = loaded.model, loaded.meta.categories, name or loaded.name
    if with_masks and not model.roi_heads.has_mask():
        raise ValueError(f"model {name!r} has no mask head; cannot write instances")
    views = list(views) if views else [View(model.config.input.test_size)]
    max_size = model.config.input.max_size
    ids = list(image_set.image_ids if image_ids is None else image_ids)
    cols: dict[str, list] = {"image_id": [], "category_id": [], "score": [], "boxes": [], "source": []}
    rles: list[dict] = []
    with eval_mode(model), torch.inference_mode():
        for start in range(0, len(ids), settings.batch):
            chunk = ids[start : start + settings.batch]
            images = [image_set.read(i).to(device).float().div_(255.0) for i in chunk]
            for view in views:
                inputs, size = view_inputs(images, view, max_size, loaded.torchvision_resize)
                with autocast(device, settings.precision):
                    outputs = model.predict(inputs, size=size, score_thresh=settings.score_thresh, nms_thresh=nms_thresh,
                                            detections_per_img=settings.max_per_image, paste_masks=False)  # fmt: skip
                outputs = from_view_outputs(outputs, images, inputs, view, loaded.torchvision_resize)
                for image_id, im, o in zip(chunk, images, outputs):
                    n = len(o["boxes"])
                    if n == 0:
                        continue
                    cols["image_id"].append(np.full(n, image_id, dtype=np.int64))
                    cols["category_id"].append(categories.to_category_ids(o["labels"].cpu().numpy()))
                    cols["score"].append(o["scores"].float().cpu().numpy())
                    cols["boxes"].append(o["boxes"].float().cpu().numpy())
                    cols["source"].extend([view.source(name)] * n)
                    if with_masks:
                        rles.extend(masks_to_rles(o["masks"].float(), o["boxes"].float(), tuple(im.shape[-2:]), settings.mask_thresh))
            if progress is not None:
                progress(min(start + settings.batch, len(ids)))
    cat = lambda xs, dtype, shape: np.concatenate(xs).astype(dtype) if xs else np.zeros(shape, dtype)  # noqa: E731
    table = detections_table(
        cat(cols["image_id"], np.int64, (0,)),
        cat(cols["category_id"], np.int32, (0,)),
        cat(cols["score"], np.float32, (0,)),
        cat(cols["boxes"], np.float32, (0, 4)),
        cols["source"],
    )
    if with_masks:
        table = instances_table(table, rles)
    meta = TableMeta(
        kind="instances" if with_masks else "detections",
        producer=f"{loaded.meta.kind}:{name}",
        categories=categories,
        config=loaded.meta.config,
        dataset=image_set.source,
        extra={"checkpoint": str(loaded.meta.path), "iteration": loaded.meta.iteration,
               "views": [v.source(name) for v in views],
               **({"precision": settings.precision} if settings.precision != "fp32" else {}),
               **({"mask_thresh": settings.mask_thresh} if with_masks and settings.mask_thresh != DETECT.mask_thresh else {}),
               **(extra or {})},  # fmt: skip
    )
    if out is not None:
        write_table(out, table, meta)
    return table, meta


# COCO practice for scoring a model: keep everything above 0.001, the best 100 an image (pass
# one's defaults). The model's own score_thresh (0.05) would cut the low-precision tail that AP
# still counts, and understate learning curves early in training.
EVAL_SCORE_THRESH = DETECT.score_thresh
EVAL_MAX_PER_IMAGE = DETECT.max_per_image


def make_validator(
    ann_file, image_root, categories: Categories, *, batch: int = 2, device: str | torch.device = "cpu", with_masks: bool = False
) -> Callable[[nn.Module], dict[str, Any]]:
    """validate(model) -> COCO metrics of the model on a COCO set (scored as COCO does:
    EVAL_SCORE_THRESH, EVAL_MAX_PER_IMAGE), for the training engine."""
    from twopass.pipeline.coco import CocoIndex
    from twopass.pipeline.evaluate import evaluate

    index = CocoIndex.load(ann_file)
    categories.check_same(index.categories, f"validation set {ann_file}")
    image_set = index.image_set(image_root)

    def validate(model: nn.Module) -> dict[str, Any]:
        loaded = LoadedModel.in_memory(model, categories, "segmenter" if with_masks else "detector")
        settings = DetectSettings(score_thresh=EVAL_SCORE_THRESH, max_per_image=EVAL_MAX_PER_IMAGE, batch=batch)
        table, _ = detect_images(loaded, image_set, None, settings, name="val", device=device, with_masks=with_masks)
        iou_types = ("bbox", "segm") if with_masks else ("bbox",)
        return evaluate(index.raw, table, iou_types=iou_types)

    return validate
