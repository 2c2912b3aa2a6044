"""The segmenter: the detector (backbone, FPN, RPN, box heads) with the configured mask branch.

It is trained end to end like the detector (same engine, kind "segmenter"); at pass two only
its backbone and mask branch run, on boxes given from outside (`segmenter.infer`).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from twopass.detector.backbone import head_norm
from twopass.detector.model import Detector, build_detector
from twopass.detector.tv_private import project_masks_on_boxes

from .config import SegmenterConfig
from .heads import MaskBranch
from .losses import mask_loss

KIND = "segmenter"


def roi_mask_loss(
    logits: Tensor,
    proposals: list[Tensor],
    gt_masks: list[Tensor],
    gt_labels: list[Tensor],
    matched_idxs: list[Tensor],
    edge: str = "none",
    edge_weight: float = 1.0,
) -> dict[str, Tensor]:
    """Mask losses of positive RoIs, with torchvision's maskrcnn_loss arguments.

    logits [R, K + 1, M, M]; proposals [R_i, 4] (input-batch pixels); gt_masks [G_i, H, W];
    matched_idxs [R_i] into each image's ground truth. The targets are the ground-truth masks
    cropped to each RoI and resized to M x M (torchvision's project_masks_on_boxes).
    """
    m = logits.shape[-1]
    labels = [gl[idx] for gl, idx in zip(gt_labels, matched_idxs)]
    targets = [project_masks_on_boxes(gm, p, i, m) for gm, p, i in zip(gt_masks, proposals, matched_idxs)]
    return mask_loss(logits, torch.cat(labels), torch.cat(targets), edge=edge, edge_weight=edge_weight)


def build_mask_branch(config: SegmenterConfig, num_classes: int) -> MaskBranch:
    m = config.mask_head
    heavier = m.type == "heavier"
    norm = head_norm(config)
    if heavier and norm is None:  # the heavier head is defined with GroupNorm
        groups = config.norm.gn_groups

        def norm(c: int) -> nn.Module:
            return nn.GroupNorm(groups, c)

    return MaskBranch(
        config.backbone.fpn_channels,
        config.roi_levels,
        num_classes,
        pool_size=m.pool_size,
        sampling_ratio=m.sampling_ratio,
        conv_dim=m.conv_dim,
        num_convs=m.convs,
        multi_scale=m.multi_scale_roi,
        fc_fusion=heavier,
        fc_fusion_from=m.fc_fusion_from,
        norm=norm,
        roi=config.roi_pool,
    )


def build_segmenter(config: SegmenterConfig, num_classes: int, backbone_weights: str | Path | None = None) -> Detector:
    """A detector whose mask branch and mask loss follow `config.mask_head`."""
    m = config.mask_head
    return build_detector(
        config,
        num_classes,
        backbone_weights,
        mask_branch=build_mask_branch(config, num_classes),
        mask_loss_fn=partial(roi_mask_loss, edge=m.edge_loss, edge_weight=m.edge_weight),
    )
