"""The detector: a torchvision GeneralizedRCNN (transform -> backbone+FPN -> RPN -> RoI heads).

Input: list of FloatTensor[3, H_i, W_i] in [0, 1] (original images). Output in eval mode:
one dict per image with boxes FloatTensor[N, 4] XYXY in original-image pixels, scores, labels
(contiguous 1..K) and, with a mask head, masks FloatTensor[N, 1, H_i, W_i]. In train mode: a
dict of scalar losses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from collections import OrderedDict

from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from .backbone import build_backbone, head_norm
from .config import ModelConfig
from .heads import BoxPredictor, ConvFCHead, LevelPooler, LocationSensitiveHead, TwoFCHead
from .roi_heads import DetectorRoIHeads
from .tv_private import resize_boxes, resize_image_and_masks


class DetectorTransform(GeneralizedRCNNTransform):
    """torchvision's normalise / resize / pad, with the test size as its own attribute.

    torchvision resizes eval images to `min_size[-1]`; here `test_size` is separate from the
    training sizes, and `prepare` takes the size of each call as an argument, so test-time
    augmentation sets a view's scale (or feeds images already resized) without writing an
    attribute: one model can serve several threads at once.
    """

    def __init__(self, train_sizes: list[int], test_size: int, max_size: int, mean, std, size_divisible: int):
        super().__init__(tuple(train_sizes), max_size, list(mean), list(std), size_divisible=size_divisible)
        self.test_size = test_size

    def postprocess(self, result, image_shapes, original_image_sizes, paste_masks: bool = True):
        """Boxes back to original pixels; masks pasted there, or (`paste_masks=False`) kept as
        RoI-sized soft masks [N, 1, M, M] for the caller to paste (test-time augmentation
        pastes each view's masks into the original frame itself)."""
        if self.training or paste_masks:
            return super().postprocess(result, image_shapes, original_image_sizes)
        for r, im_s, o_im_s in zip(result, image_shapes, original_image_sizes):
            r["boxes"] = resize_boxes(r["boxes"], im_s, o_im_s)
        return result

    def resize(self, image: Tensor, target: Optional[dict[str, Tensor]] = None, size: Optional[int] = None):
        """torchvision's resize (shorter side `size`, default: a training size or the test
        size; longer side at most max_size), skipped when the image is already that size."""
        h, w = image.shape[-2:]
        if size is None:
            size = self.torch_choice(self.min_size) if self.training else self.test_size
        f = min(float(size) / min(h, w), float(self.max_size) / max(h, w))
        if int(h * f) == h and int(w * f) == w:  # already at that size: torchvision would still resample
            return image, target
        image, target = resize_image_and_masks(image, size, self.max_size, target)
        if target is not None:
            target["boxes"] = resize_boxes(target["boxes"], (h, w), image.shape[-2:])
        return image, target

    def prepare(self, images: list[Tensor], size: Optional[int] = None) -> ImageList:
        """Inference input: each image [3, H_i, W_i] normalised, then resized as torchvision
        does to shorter side `size` (None: taken as it is, already in the frame wanted), then
        padded into one batch. torchvision's `forward` without targets, the size an argument."""
        out = []
        for image in images:
            if image.dim() != 3:
                raise ValueError(f"images must be [C, H, W] tensors, got shape {tuple(image.shape)}")
            image = self.normalize(image)
            if size is not None:
                image, _ = self.resize(image, None, size)
            out.append(image)
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in out]
        return ImageList(self.batch_images(out, size_divisible=self.size_divisible), sizes)


class CachedAnchorGenerator(AnchorGenerator):
    """torchvision's AnchorGenerator, caching the anchors of each grid (torchvision rebuilds
    them on every forward though they depend only on the grid sizes and strides)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._cache: dict = {}

    def grid_anchors(self, grid_sizes, strides):
        key = (
            tuple(tuple(int(v) for v in g) for g in grid_sizes),
            tuple(tuple(int(v) for v in s) for s in strides),
            self.cell_anchors[0].device,
            self.cell_anchors[0].dtype,
        )
        hit = self._cache.get(key)
        if hit is None:
            if len(self._cache) > 32:
                self._cache.clear()
            hit = self._cache[key] = super().grid_anchors(grid_sizes, strides)
        return hit


class Detector(GeneralizedRCNN):
    """GeneralizedRCNN with the model config attached (`self.config`).

    `model(images)` is torchvision's forward with the thresholds the model was built with;
    `predict` and `masks_for_boxes` take the thresholds and the input frame as arguments
    and write no attribute, so one model in eval mode serves concurrent calls.
    """

    def __init__(self, config: ModelConfig, backbone, rpn, roi_heads, transform):
        super().__init__(backbone, rpn, roi_heads, transform)
        self.config = config

    def _features(self, image_list: ImageList) -> dict[str, Tensor]:
        features = self.backbone(image_list.tensors)
        return OrderedDict([("0", features)]) if isinstance(features, Tensor) else features

    def predict(
        self,
        images: list[Tensor],
        *,
        size: Optional[int] = None,
        score_thresh: Optional[float] = None,
        nms_thresh: Optional[float] = None,
        detections_per_img: Optional[int] = None,
        paste_masks: bool = True,
    ) -> list[dict[str, Tensor]]:
        """Eval-mode detections of images [3, H_i, W_i] in [0, 1].

        size: shorter side to resize to (torchvision's resize, after normalising); None: the
        images are used at their own size. Thresholds: None keeps the model's built-in ones.
        Boxes XYXY in the pixels of the images given; masks (with a mask head) pasted into
        them, or with `paste_masks=False` RoI-sized soft masks [N, 1, M, M]."""
        original_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        image_list = self.transform.prepare(images, size)
        features = self._features(image_list)
        proposals, _ = self.rpn(image_list, features)
        detections, _ = self.roi_heads(
            features, proposals, image_list.image_sizes,
            score_thresh=score_thresh, nms_thresh=nms_thresh, detections_per_img=detections_per_img,
        )  # fmt: skip
        return self.transform.postprocess(detections, image_list.image_sizes, original_sizes, paste_masks=paste_masks)

    def masks_for_boxes(
        self, images: list[Tensor], boxes: list[Tensor], labels: list[Tensor], *, size: Optional[int] = None
    ) -> list[Tensor]:
        """Soft masks FloatTensor[N_i, M, M] of given boxes, each of its own label
        (Detectron2's `forward_with_given_boxes`): the backbone and the mask branch only.

        images [3, H_i, W_i] in [0, 1]; boxes [N_i, 4] XYXY in the images' pixels; labels
        Int64Tensor[N_i] contiguous 1..K. size: as in `predict` (the boxes follow the resize)."""
        image_list = self.transform.prepare(images, size)
        if size is not None:
            boxes = [resize_boxes(b, (int(im.shape[-2]), int(im.shape[-1])), s) for b, im, s in zip(boxes, images, image_list.image_sizes)]
        masks = self.roi_heads.predict_masks(self._features(image_list), boxes, labels)
        return [m[:, 0] for m in masks]


class FloatRPNHead(RPNHead):
    """torchvision's RPNHead whose objectness and deltas come out float32 under autocast too,
    so proposal scores, their top-k and NMS, decoding and the RPN losses run in float32."""

    def forward(self, x: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        logits, deltas = super().forward(x)
        return [t.float() for t in logits], [t.float() for t in deltas]


def build_rpn(config: ModelConfig) -> RegionProposalNetwork:
    r = config.rpn
    sizes = r.anchors.level_sizes([2**l for l in config.levels])
    anchors = CachedAnchorGenerator(sizes=tuple(sizes), aspect_ratios=(tuple(r.anchors.aspect_ratios),) * len(sizes))
    head = FloatRPNHead(config.backbone.fpn_channels, anchors.num_anchors_per_location()[0], conv_depth=r.convs)
    return RegionProposalNetwork(
        anchors,
        head,
        fg_iou_thresh=r.fg_iou_thresh,
        bg_iou_thresh=r.bg_iou_thresh,
        batch_size_per_image=r.batch_size_per_image,
        positive_fraction=r.positive_fraction,
        pre_nms_top_n={"training": r.pre_nms_top_n_train, "testing": r.pre_nms_top_n_test},
        post_nms_top_n={"training": r.post_nms_top_n_train, "testing": r.post_nms_top_n_test},
        nms_thresh=r.nms_thresh,
    )


def build_box_head(config: ModelConfig) -> nn.Module:
    b = config.box_head
    ch = config.backbone.fpn_channels
    if b.type == "two_fc":
        return TwoFCHead(ch, config.roi_levels, b.pool_size, b.sampling_ratio, b.fc_width, b.multi_scale_roi, config.roi_pool)
    if b.type == "conv_fc":
        return ConvFCHead(ch, config.roi_levels, b.pool_size, b.sampling_ratio, b.num_convs, b.conv_dim, b.fc_width, head_norm(config), config.roi_pool)
    return LocationSensitiveHead(
        ch,
        config.roi_levels,
        p=b.pool_size,
        sampling_ratio=b.sampling_ratio,
        k=b.kernel_size,
        mid_channels=b.mid_channels,
        alpha=b.alpha,
        fc_dim=b.fc_width,
        multi_scale=b.multi_scale_roi,
        norm=head_norm(config),
        roi=config.roi_pool,
    )


def build_roi_heads(
    config: ModelConfig, num_classes: int, mask_branch: nn.Module | None = None, mask_loss_fn=None
) -> DetectorRoIHeads:
    """Box stages from the config; the mask branch given (the segmenter's) or the standard one."""
    b = config.box_head
    n = b.cascade_stages
    mask_kwargs = {}
    m = config.mask_head
    if mask_branch is not None:
        mask_kwargs = dict(
            mask_branch=mask_branch,
            mask_loss_fn=mask_loss_fn,
            mask_feature_names=[f"p{l}" for l in config.roi_levels],
            max_mask_positives=m.max_positives_per_image,
        )
    elif m.enabled:
        mask_kwargs = dict(
            mask_roi_pool=LevelPooler(config.roi_levels, m.pool_size, m.sampling_ratio, roi=config.roi_pool),
            mask_head=MaskRCNNHeads(config.backbone.fpn_channels, [m.conv_dim] * m.num_convs, 1, norm_layer=head_norm(config)),
            mask_predictor=MaskRCNNPredictor(m.conv_dim, m.conv_dim, num_classes + 1),
            mask_feature_names=[f"p{l}" for l in config.roi_levels],
            max_mask_positives=m.max_positives_per_image,
        )
    return DetectorRoIHeads(
        box_heads=[build_box_head(config) for _ in range(n)],
        box_predictors=[BoxPredictor(b.fc_width, num_classes, b.agnostic) for _ in range(n)],
        ious=b.cascade_ious[:n],
        stage_weights=b.cascade_weights[:n] if n > 1 else [1.0],
        reg_weights=b.bbox_reg_weights[:n],
        batch_size_per_image=b.batch_size_per_image,
        positive_fraction=b.positive_fraction,
        score_thresh=b.score_thresh,
        nms_thresh=b.nms_thresh,
        detections_per_img=b.detections_per_img,
        **mask_kwargs,
    )


def build_detector(
    config: ModelConfig,
    num_classes: int,
    backbone_weights: str | Path | None = None,
    mask_branch: nn.Module | None = None,
    mask_loss_fn=None,
) -> Detector:
    """Build the detector for `num_classes` foreground classes (labels 1..K, 0 background).

    backbone_weights: a local torchvision classification state dict; never downloaded.
    mask_branch, mask_loss_fn: the segmenter's mask branch and loss (see DetectorRoIHeads).
    """
    i = config.input
    transform = DetectorTransform(i.train_sizes, i.test_size, i.max_size, i.image_mean, i.image_std, i.size_divisible)
    return Detector(
        config,
        build_backbone(config, backbone_weights),
        build_rpn(config),
        build_roi_heads(config, num_classes, mask_branch, mask_loss_fn),
        transform,
    )
