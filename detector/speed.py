"""Inference-only rewrites that keep the outputs (up to float rounding) and save CPU time.

- BatchNorm folding: a frozen (or eval-mode) BatchNorm after a conv becomes the conv's scale
  and bias: w' = w * g / sqrt(v + eps), b' = (b - m) * g / sqrt(v + eps) + beta. torchvision's
  FrozenBatchNorm2d otherwise costs two extra passes over every activation.
- channels-last: the convolutions of the body, the FPN and the RPN head run on NHWC tensors
  (oneDNN's preferred layout on CPU): measured on resnet50 at 800x1216, 2 threads, the body
  took about 0.56 of its NCHW time once folded and channels-last (2026-11-25, 31b0399).
- RoIAlign on those channels-last maps as one sparse matrix product (`heads.LevelPooler`),
  instead of torchvision's kernel, which copies the map back to NCHW and runs one thread.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from .heads import LevelPooler


def _bn_params(bn: nn.Module) -> tuple[Tensor, Tensor]:
    """(scale, shift) of a frozen or eval-mode BatchNorm: y = x * scale + shift."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def _foldable(bn: nn.Module) -> bool:
    return isinstance(bn, FrozenBatchNorm2d) or (isinstance(bn, nn.BatchNorm2d) and not bn.training and bn.track_running_stats)


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.Module) -> None:
    scale, shift = _bn_params(bn)
    conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
    bias = shift if conv.bias is None else conv.bias * scale + shift
    conv.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)


def fold_batchnorm(module: nn.Module) -> int:
    """Fold every BatchNorm that directly follows a conv (in a Sequential, or as convK/bnK
    attribute pairs as in torchvision's ResNets) into that conv. Returns how many were folded."""
    folded = 0
    for m in list(module.modules()):
        if isinstance(m, nn.Sequential):
            names = list(m._modules)
            for a, b in zip(names, names[1:]):
                conv, bn = m._modules[a], m._modules[b]
                if isinstance(conv, nn.Conv2d) and _foldable(bn):
                    fold_conv_bn(conv, bn)
                    m._modules[b] = nn.Identity()
                    folded += 1
        for k in ("", "1", "2", "3"):
            conv, bn = getattr(m, f"conv{k}", None), getattr(m, f"bn{k}", None)
            if isinstance(conv, nn.Conv2d) and bn is not None and _foldable(bn):
                fold_conv_bn(conv, bn)
                setattr(m, f"bn{k}", nn.Identity())
                folded += 1
    return folded


class ChannelsLast(nn.Module):
    """Runs `backbone` (body + FPN) on a channels-last input, so every conv of the body, the
    FPN and the RPN head (which reads the FPN maps) runs NHWC. torchvision's roi_align and
    ps_roi_align give the same results on channels-last maps (tests/detector/test_detector_infer.py)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.inner = backbone.to(memory_format=torch.channels_last)
        self.out_channels = getattr(backbone, "out_channels", None)

    def forward(self, x: Tensor):
        return self.inner(x.contiguous(memory_format=torch.channels_last))


def optimize_for_inference(model: nn.Module, channels_last: bool | None = None) -> nn.Module:
    """Fold BatchNorm and (on CPU by default) run backbone and RPN head channels-last. In
    place; the model is for inference only afterwards (eval mode, no BatchNorm to train)."""
    model.eval()
    fold_batchnorm(model.backbone)
    device = next(model.parameters()).device
    if channels_last is None:
        channels_last = device.type == "cpu"
    if channels_last and not isinstance(model.backbone, ChannelsLast):
        model.backbone = ChannelsLast(model.backbone)
        model.rpn.head.to(memory_format=torch.channels_last)
    if channels_last:
        for m in model.modules():
            if isinstance(m, LevelPooler):
                m.sparse_cpu = True
    return model
