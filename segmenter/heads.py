"""Mask branches: the standard Mask R-CNN head and the heavier head of the Location Sensitive Header.

A branch maps (FPN maps, boxes) to class-specific mask logits:
  feats: list of FloatTensor[B, C, H_l, W_l], one per RoI level; boxes: list of [R_i, 4] XYXY in
  input-batch pixels -> FloatTensor[R, K + 1, 2P, 2P] (P = pool size, 14 -> 28 x 28 masks).

standard: RoIAlign P x P on each box's level, `num_convs` conv3x3 (4 x 256), deconv x2, 1x1
  conv to one map per class (torchvision's MaskRCNNHeads + MaskRCNNPredictor layout).
heavier: 8 conv3x3 with GroupNorm, plus PANet's fully-connected fusion branch (from the third
  conv: conv3x3 C, conv3x3 C/2, fc to (2P)^2) added to every class's map.
multi_scale_roi: PANet adaptive feature pooling: every box pooled from every level, one first
  conv per level, element-wise max, then the remaining convs.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from twopass.detector.config import RoIPoolConfig
from twopass.detector.heads import LevelPooler


def _conv3x3(i: int, o: int, norm: Callable[[int], nn.Module] | None) -> nn.Sequential:
    conv = nn.Conv2d(i, o, 3, padding=1, bias=norm is None)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    layers: list[nn.Module] = [conv]
    if norm is not None:
        layers.append(norm(o))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class MaskBranch(nn.Module):
    """Pooling, convs, upsampling and per-class prediction of masks for given boxes."""

    def __init__(
        self,
        in_channels: int,
        levels: list[int],
        num_classes: int,
        pool_size: int = 14,
        sampling_ratio: int = 2,
        conv_dim: int = 256,
        num_convs: int = 4,
        multi_scale: bool = False,
        fc_fusion: bool = False,
        fc_fusion_from: int = 3,
        norm: Callable[[int], nn.Module] | None = None,
        roi: RoIPoolConfig = RoIPoolConfig(),
    ):
        super().__init__()
        if fc_fusion and not 1 <= fc_fusion_from <= num_convs:
            raise ValueError(f"fc_fusion_from={fc_fusion_from} must lie in 1..num_convs={num_convs}")
        self.levels = list(levels)
        self.pooler = LevelPooler(levels, pool_size, sampling_ratio, roi=roi)
        self.multi_scale = multi_scale
        self.mask_size = 2 * pool_size
        if multi_scale:
            self.first = nn.ModuleList(_conv3x3(in_channels, conv_dim, norm) for _ in levels)
        else:
            self.first = _conv3x3(in_channels, conv_dim, norm)
        self.convs = nn.ModuleList(_conv3x3(conv_dim, conv_dim, norm) for _ in range(num_convs - 1))
        self.upsample = nn.ConvTranspose2d(conv_dim, conv_dim, 2, stride=2)
        self.predictor = nn.Conv2d(conv_dim, num_classes + 1, 1)
        for m in (self.upsample, self.predictor):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        self.fc_fusion_from = fc_fusion_from if fc_fusion else 0
        if fc_fusion:
            half = max(conv_dim // 2, 1)
            self.fusion = nn.Sequential(
                _conv3x3(conv_dim, conv_dim, norm),
                _conv3x3(conv_dim, half, norm),
                nn.Flatten(1),
                nn.Linear(half * pool_size * pool_size, self.mask_size**2),
            )

    def forward(self, feats: list[Tensor], boxes: list[Tensor]) -> Tensor:
        if self.multi_scale:
            pooled = self.pooler.pool_all(feats, boxes)
            x = self.first[0](pooled[0])
            for conv, p in zip(list(self.first)[1:], pooled[1:]):
                x = torch.maximum(x, conv(p))
        else:
            x = self.first(self.pooler(feats, boxes))
        fused = None
        for i, conv in enumerate(self.convs, start=2):  # the first conv is conv 1
            if i - 1 == self.fc_fusion_from:
                fused = self.fusion(x)
            x = conv(x)
        if len(self.convs) + 1 == self.fc_fusion_from:
            fused = self.fusion(x)
        logits = self.predictor(F.relu(self.upsample(x)))
        if fused is not None:
            logits = logits + fused.view(-1, 1, self.mask_size, self.mask_size)
        return logits
