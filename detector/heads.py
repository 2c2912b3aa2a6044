"""RoI pooling over pyramid levels and the box heads (two_fc, conv_fc and Location Sensitive).

Frames: features are FPN maps p{l} of stride 2**l over the padded input batch; proposals are
list[Tensor[R_i, 4]] XYXY in input-batch pixels (after the model's resize). A box head maps
(features, proposals) to one vector per RoI, FloatTensor[R, fc_dim], R = sum R_i.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.ops import ps_roi_align, roi_align

from twopass.pipeline.precision import full_precision

from .config import RoIPoolConfig
from .tv_private import LevelMapper, convert_to_roi_format


def _roi_align_matrix(rois: Tensor, scale: float, out: int, ratio: int, n: int, h: int, w: int, aligned: bool = False) -> Tensor:
    """torchvision's RoIAlign (sampling_ratio > 0) as a sparse CSR matrix
    [R * out * out, n * h * w]: row (r, py, px) holds the bilinear weights, divided by the
    ratio * ratio samples of the bin, of the 4 pixels around each sample (the same sample
    positions, half-pixel offset, clamping and out-of-range rule as torchvision's CPU kernel)."""
    dev, dt = rois.device, rois.dtype
    num = rois.shape[0]
    x1, y1, x2, y2 = (rois[:, 1:] * scale - (0.5 if aligned else 0.0)).unbind(1)
    # aligned=False keeps the legacy minimum of one pixel per RoI side
    bin_w = ((x2 - x1) if aligned else (x2 - x1).clamp(min=1.0)) / out
    bin_h = ((y2 - y1) if aligned else (y2 - y1).clamp(min=1.0)) / out
    grid = torch.arange(out, device=dev, dtype=dt)[None, :, None]
    sub = ((torch.arange(ratio, device=dev, dtype=dt) + 0.5) / ratio)[None, None, :]
    ys = y1[:, None, None] + (grid + sub) * bin_h[:, None, None]  # [R, out, ratio]
    xs = x1[:, None, None] + (grid + sub) * bin_w[:, None, None]

    def neighbours(c: Tensor, size: int):
        valid = (c >= -1.0) & (c <= size)
        c = c.clamp(min=0)
        lo = c.floor().long()
        top = lo >= size - 1
        lo = torch.where(top, torch.full_like(lo, size - 1), lo)
        hi = torch.where(top, lo, lo + 1)
        frac = torch.where(top, torch.zeros_like(c), c - lo.to(dt))
        return lo, hi, 1 - frac, frac, valid

    ylo, yhi, wy0, wy1, vy = neighbours(ys, h)
    xlo, xhi, wx0, wx1, vx = neighbours(xs, w)

    def Y(t: Tensor) -> Tensor:  # [R, py, 1, iy, 1]
        return t[:, :, None, :, None]

    def X(t: Tensor) -> Tensor:  # [R, 1, px, 1, ix]
        return t[:, None, :, None, :]

    base = (rois[:, 0].long() * (h * w))[:, None, None, None, None]
    keep = (Y(vy) & X(vx)).to(dt) / (ratio * ratio)
    cols = torch.stack(
        [base + Y(ylo) * w + X(xlo), base + Y(ylo) * w + X(xhi), base + Y(yhi) * w + X(xlo), base + Y(yhi) * w + X(xhi)], -1
    )
    vals = torch.stack([Y(wy0) * X(wx0), Y(wy0) * X(wx1), Y(wy1) * X(wx0), Y(wy1) * X(wx1)], -1) * keep[..., None]
    per_row = ratio * ratio * 4
    rows = num * out * out
    crow = torch.arange(0, rows + 1, device=dev, dtype=torch.int64) * per_row
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(crow, cols.reshape(-1), vals.reshape(-1), size=(rows, n * h * w))


def roi_align_channels_last(
    feature: Tensor, rois: Tensor, output_size: int, scale: float, sampling_ratio: int, aligned: bool = False
) -> Tensor:
    """torchvision.ops.roi_align for a channels-last CPU map, as one sparse matrix product:
    the map viewed as [N * H * W, C] needs no copy, and the product runs on every thread.
    Measured, 250 RoIs on a 256 x 200 x 304 map, 2 threads: about 20 ms against 120 ms
    (torchvision, NCHW) or 270 ms (torchvision, channels-last). Inference only.
    Returns [R, C, p, p] (a channels-last view)."""
    n, c, h, w = feature.shape
    flat = feature.permute(0, 2, 3, 1).reshape(n * h * w, c)
    m = _roi_align_matrix(rois.to(feature.dtype), scale, output_size, sampling_ratio, n, h, w, aligned)
    return (m @ flat).reshape(-1, output_size, output_size, c).permute(0, 3, 1, 2)


class LevelPooler(nn.Module):
    """RoI pooling from the pyramid levels `levels` (strides 2**l), by `op` (roi_align or
    ps_roi_align).

    Replaces torchvision's MultiScaleRoIAlign, which infers the strides from the first batch
    it sees and caches them; here they come from the config. The level of each RoI follows
    FPN's Eqn. 1 through torchvision's LevelMapper, at the configured canonical scale and
    level (`RoIPoolConfig`: FPN's 224 px at P4 by default). `roi.aligned` applies to
    roi_align; ps_roi_align is half-pixel aligned in torchvision whatever it says.
    """

    def __init__(self, levels: list[int], output_size: int, sampling_ratio: int, op: Callable = roi_align, roi: RoIPoolConfig = RoIPoolConfig()):
        super().__init__()
        self.levels = list(levels)
        self.scales = [2.0 ** -l for l in self.levels]
        self.output_size = (output_size, output_size)
        self.sampling_ratio = sampling_ratio
        self.op = op
        self.aligned = roi.aligned and op is roi_align
        self.mapper = LevelMapper(self.levels[0], self.levels[-1], canonical_scale=roi.canonical_scale, canonical_level=roi.canonical_level)
        # Set by detector.speed.optimize_for_inference: RoIAlign as a sparse product on
        # channels-last CPU maps without gradients (see roi_align_channels_last).
        self.sparse_cpu = False

    def _pool(self, feature: Tensor, rois: Tensor, scale: float) -> Tensor:
        if (
            self.sparse_cpu
            and self.op is roi_align
            and self.sampling_ratio > 0
            and feature.device.type == "cpu"
            and feature.dtype == torch.float32  # the sparse product has no bfloat16 kernel
            and not (torch.is_grad_enabled() and feature.requires_grad)
            and feature.is_contiguous(memory_format=torch.channels_last)
        ):
            return roi_align_channels_last(feature, rois, self.output_size[0], scale, self.sampling_ratio, self.aligned)
        if self.aligned:
            return roi_align(feature, rois, self.output_size, scale, self.sampling_ratio, aligned=True)
        if self.op is ps_roi_align and feature.dtype != rois.dtype:
            # Under autocast: torchvision's ps_roi_align has no bfloat16 CPU kernel (it refuses
            # maps and boxes of different dtypes), so it pools float32 maps.
            with full_precision(feature):
                return ps_roi_align(feature.float(), rois.float(), self.output_size, scale, self.sampling_ratio)
        return self.op(feature, rois, self.output_size, scale, self.sampling_ratio)

    def forward(self, feats: list[Tensor], boxes: list[Tensor]) -> Tensor:
        """Pool each RoI from its own level. feats: one map per level; -> [R, C_out, p, p]."""
        rois = convert_to_roi_format(boxes)
        if len(feats) == 1:
            return self._pool(feats[0], rois, self.scales[0])
        level_of = self.mapper(boxes)
        out: Tensor | None = None
        for i, (feat, scale) in enumerate(zip(feats, self.scales)):
            idx = torch.where(level_of == i)[0]
            pooled = self._pool(feat, rois[idx], scale)
            if out is None:
                out = pooled.new_zeros((rois.shape[0],) + pooled.shape[1:])
            out[idx] = pooled
        assert out is not None
        return out

    def pool_all(self, feats: list[Tensor], boxes: list[Tensor]) -> list[Tensor]:
        """Pool every RoI from every level (PANet adaptive feature pooling); one [R, C_out, p, p] per level."""
        rois = convert_to_roi_format(boxes)
        return [self._pool(f, rois, s) for f, s in zip(feats, self.scales)]


def _linear(i: int, o: int) -> nn.Linear:
    fc = nn.Linear(i, o)
    nn.init.kaiming_uniform_(fc.weight, a=1)
    nn.init.zeros_(fc.bias)
    return fc


class PerLevelMaxFusion(nn.Module):
    """One first layer per level, then element-wise max over levels (PANet)."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, pooled: list[Tensor]) -> Tensor:
        out = self.layers[0](pooled[0].flatten(1))
        for layer, x in zip(self.layers[1:], pooled[1:]):
            out = torch.maximum(out, layer(x.flatten(1)))
        return out


class TwoFCHead(nn.Module):
    """Mask R-CNN baseline: RoIAlign p x p from the FPN, fc6, fc7 (ReLU each).

    multi_scale: pool from every level, per-level fc6, max fusion, fc7.
    Output FloatTensor[R, fc_dim].
    """

    def __init__(
        self, channels: int, levels: list[int], pool_size: int, sampling_ratio: int, fc_dim: int, multi_scale: bool, roi: RoIPoolConfig = RoIPoolConfig()
    ):
        super().__init__()
        self.feature_names = [f"p{l}" for l in levels]
        self.pooler = LevelPooler(levels, pool_size, sampling_ratio, roi_align, roi)
        self.multi_scale = multi_scale
        in_dim = channels * pool_size * pool_size
        if multi_scale:
            self.fc6 = PerLevelMaxFusion([_linear(in_dim, fc_dim) for _ in levels])
        else:
            self.fc6 = _linear(in_dim, fc_dim)
        self.fc7 = _linear(fc_dim, fc_dim)

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor]) -> Tensor:
        feats = [features[n] for n in self.feature_names]
        if self.multi_scale:
            x = self.fc6(self.pooler.pool_all(feats, proposals))
        else:
            x = self.fc6(self.pooler(feats, proposals).flatten(1))
        return F.relu(self.fc7(F.relu(x)))


class ConvFCHead(nn.Module):
    """RoIAlign p x p from the FPN, then torchvision's FastRCNNConvFCHead (`num_convs` conv3x3
    with an optional norm, one fc, ReLU): the box head of torchvision's *_v2 models, kept as
    torchvision's module so their weights load under `layers.`. Output FloatTensor[R, fc_dim]."""

    def __init__(
        self, channels: int, levels: list[int], pool_size: int, sampling_ratio: int, num_convs: int, conv_dim: int,
        fc_dim: int, norm: Callable | None = None, roi: RoIPoolConfig = RoIPoolConfig(),
    ):  # fmt: skip
        super().__init__()
        self.feature_names = [f"p{l}" for l in levels]
        self.pooler = LevelPooler(levels, pool_size, sampling_ratio, roi_align, roi)
        self.layers = FastRCNNConvFCHead((channels, pool_size, pool_size), [conv_dim] * num_convs, [fc_dim], norm_layer=norm)

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor]) -> Tensor:
        return self.layers(self.pooler([features[n] for n in self.feature_names], proposals))


class LargeSeparableConv(nn.Module):
    """Light-Head R-CNN's large separable convolution: (k x 1 then 1 x k) + (1 x k then k x 1).

    FloatTensor[B, C_in, H, W] -> FloatTensor[B, C_out, H, W]; optional GroupNorm after each
    branch's first conv.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, k: int, norm: Callable | None = None):
        super().__init__()
        pad = k // 2

        def conv(i: int, o: int, ks: tuple[int, int], pd: tuple[int, int], with_norm: bool) -> nn.Module:
            c = nn.Conv2d(i, o, ks, padding=pd, bias=not with_norm)
            nn.init.kaiming_uniform_(c.weight, a=1)
            if c.bias is not None:
                nn.init.zeros_(c.bias)
            return nn.Sequential(c, norm(o)) if with_norm else c

        with_norm = norm is not None
        self.col = nn.Sequential(conv(in_channels, mid_channels, (k, 1), (pad, 0), with_norm), conv(mid_channels, out_channels, (1, k), (0, pad), False))
        self.row = nn.Sequential(conv(in_channels, mid_channels, (1, k), (0, pad), with_norm), conv(mid_channels, out_channels, (k, 1), (pad, 0), False))

    def forward(self, x: Tensor) -> Tensor:
        return self.col(x) + self.row(x)


class LocationSensitiveHead(nn.Module):
    """Location Sensitive Detector: per level a large separable conv (shared across levels,
    as FPN shares its RPN head) makes a thin map of alpha * p * p channels; each RoI is pooled
    by position-sensitive RoIAlign into [alpha, p, p] (bin (i, j) reads channel group (i, j)),
    flattened, then one fc (ReLU).

    multi_scale: pool every RoI from every level's thin map, per-level fc, max fusion.
    Output FloatTensor[R, fc_dim].
    """

    def __init__(
        self,
        channels: int,
        levels: list[int],
        p: int,
        sampling_ratio: int,
        k: int,
        mid_channels: int,
        alpha: int,
        fc_dim: int,
        multi_scale: bool,
        norm: Callable | None = None,
        roi: RoIPoolConfig = RoIPoolConfig(),
    ):
        super().__init__()
        self.feature_names = [f"p{l}" for l in levels]
        self.thin = LargeSeparableConv(channels, mid_channels, alpha * p * p, k, norm)
        self.pooler = LevelPooler(levels, p, sampling_ratio, ps_roi_align, roi)
        self.multi_scale = multi_scale
        in_dim = alpha * p * p
        if multi_scale:
            self.fc = PerLevelMaxFusion([_linear(in_dim, fc_dim) for _ in levels])
        else:
            self.fc = _linear(in_dim, fc_dim)

    def thin_maps(self, features: dict[str, Tensor]) -> list[Tensor]:
        """One FloatTensor[B, alpha * p * p, H_l, W_l] per level."""
        return [self.thin(features[n]) for n in self.feature_names]

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor]) -> Tensor:
        thin = self.thin_maps(features)
        if self.multi_scale:
            x = self.fc(self.pooler.pool_all(thin, proposals))
        else:
            x = self.fc(self.pooler(thin, proposals).flatten(1))
        return F.relu(x)


class BoxPredictor(nn.Module):
    """Class scores [R, K + 1] and box deltas [R, K + 1, 4] (class-specific) or [R, 1, 4]
    (class-agnostic), deltas relative to the input RoIs (BoxCoder encoding)."""

    def __init__(self, in_dim: int, num_classes: int, class_agnostic: bool):
        super().__init__()
        self.cls_score = nn.Linear(in_dim, num_classes + 1)
        self.bbox_pred = nn.Linear(in_dim, 4 if class_agnostic else 4 * (num_classes + 1))
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # float32 out whatever autocast ran in: softmax, box decoding and the losses stay float32.
        deltas = self.bbox_pred(x).float()
        return self.cls_score(x).float(), deltas.reshape(x.shape[0], -1, 4)
