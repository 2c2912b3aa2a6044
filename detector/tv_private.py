"""torchvision's private and undocumented names that the model code uses, imported in one place.

torchvision documents its detection models, not their parts; these helpers are what its own
Faster / Mask R-CNN are made of, and using them is what keeps an imported torchvision model
exact. They may change between torchvision releases without notice:
`tests/detector/test_tv_private.py` pins their signatures and behaviour, so an upgrade that
changes one fails there, by name, rather than somewhere inside a model.
"""

from __future__ import annotations

from torchvision.models.detection._utils import BoxCoder, Matcher
from torchvision.models.detection.roi_heads import maskrcnn_loss, project_masks_on_boxes
from torchvision.models.detection.transform import _resize_image_and_masks, resize_boxes
from torchvision.ops.poolers import LevelMapper, _convert_to_roi_format

# image FloatTensor[C, H, W] -> resized so the shorter side is `size` and the longer at most
# `max_size` (bilinear, torchvision's rounding), with a target's masks resized alike.
resize_image_and_masks = _resize_image_and_masks
# per-image boxes [R_i, 4] -> RoIs [R, 5] (batch index, x1, y1, x2, y2), as roi_align takes them.
convert_to_roi_format = _convert_to_roi_format

__all__ = [
    "BoxCoder",
    "LevelMapper",
    "Matcher",
    "convert_to_roi_format",
    "maskrcnn_loss",
    "project_masks_on_boxes",
    "resize_boxes",
    "resize_image_and_masks",
]
