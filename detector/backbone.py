"""Backbone bodies (torchvision ResNets and ShuffleNetV2s), norms, and the FPN.

Frames: a body maps a padded image batch FloatTensor[B, 3, H, W] to C{l} maps of stride 2**l;
the FPN maps them to P{l} maps (all `fpn_channels` wide), keys "p2".."p6".
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from .checkpoint import state_mismatch
from .config import BACKBONES, ModelConfig


class BackboneError(ValueError):
    """Backbone weights file missing or not matching the backbone."""


# --------------------------------------------------------------------------- norms


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d in `module` with a FrozenBatchNorm2d holding its statistics."""
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        with torch.no_grad():
            frozen.weight.copy_(module.weight)
            frozen.bias.copy_(module.bias)
            frozen.running_mean.copy_(module.running_mean)
            frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        new = freeze_batchnorm(child)
        if new is not child:
            setattr(module, name, new)
    return module


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; the gradient of a sum is the sum of the gradients."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class NaiveSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose batch statistics are averaged over all DDP processes.

    `nn.SyncBatchNorm` refuses CPU tensors, so CPU runs (gloo) use this one, which all-reduces
    per-channel sums with a differentiable all-reduce (as Detectron2's NaiveSyncBatchNorm
    does). Processes may hold different numbers of pixels.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        n = torch.tensor([x.numel() / c], dtype=x.dtype, device=x.device)
        local = torch.cat([x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3)), n])
        total = _AllReduceSum.apply(local)
        count = total[-1]
        mean = total[:c] / count
        var = (total[c : 2 * c] / count - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                unbiased = var * count / (count - 1).clamp_min(1)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.detach(), alpha=m)
                self.num_batches_tracked.add_(1)
        scale = self.weight * torch.rsqrt(var + self.eps)
        shift = self.bias - mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Trainable BatchNorm2d -> synchronised BatchNorm: nn.SyncBatchNorm on GPU, naive on CPU."""
    device = next(module.parameters()).device
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)

    def convert(m: nn.Module) -> nn.Module:
        if type(m) is nn.BatchNorm2d:
            new = NaiveSyncBatchNorm(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
            new.load_state_dict(m.state_dict())
            new.to(device)
            new.train(m.training)
            return new
        for name, child in m.named_children():
            c = convert(child)
            if c is not child:
                setattr(m, name, c)
        return m

    return convert(module)


def head_norm(config: ModelConfig) -> Callable[[int], nn.Module] | None:
    """Norm layer factory for FPN and head convs: GroupNorm, BatchNorm, or None (conv bias instead)."""
    if config.norm.heads == "gn":
        groups = config.norm.gn_groups
        return lambda ch: nn.GroupNorm(min(groups, ch), ch)
    if config.norm.heads == "bn":
        return nn.BatchNorm2d
    return None


# --------------------------------------------------------------------------- bodies


class ShuffleNetBody(nn.Module):
    """torchvision ShuffleNetV2 without its classifier: C2 = stem (stride 4), C3 = stage2,
    C4 = stage3, C5 = conv5(stage4) (stride 32)."""

    def __init__(self, net: torchvision.models.ShuffleNetV2, first_level: int):
        super().__init__()
        self.conv1, self.maxpool = net.conv1, net.maxpool
        self.stage2, self.stage3, self.stage4, self.conv5 = net.stage2, net.stage3, net.stage4, net.conv5
        self.first_level = first_level

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        out: "OrderedDict[str, Tensor]" = OrderedDict()
        x = self.maxpool(self.conv1(x))
        if self.first_level <= 2:
            out["c2"] = x
        x = self.stage2(x)
        out["c3"] = x
        x = self.stage3(x)
        out["c4"] = x
        out["c5"] = self.conv5(self.stage4(x))
        return out


def _classifier(name: str) -> nn.Module:
    """The torchvision classification model, random weights (never a download)."""
    return getattr(torchvision.models, name)(weights=None)


def load_backbone_weights(net: nn.Module, path: str | Path) -> None:
    """Load a local torchvision state dict (.pth/.pt via torch.load(weights_only) or .safetensors)."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"{path}: no such backbone weights file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise BackboneError(f"{path}: cannot read backbone weights ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BackboneError(f"{path}: not a state dict")
    # A classifier head of another class count does not matter: the body never uses it.
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    wrong = state_mismatch(own, state)
    if wrong:
        raise BackboneError(f"{path}: does not fit a {type(net).__name__} ({wrong})")
    net.load_state_dict(state, strict=False)


def _resnet_body(net: nn.Module, first: int) -> tuple[nn.Module, list[nn.Module]]:
    """torchvision ResNet's layer{l-1} as c{l}; its stages, stem first."""
    return_layers = {f"layer{l - 1}": f"c{l}" for l in range(first, 6)}
    body = torchvision.models._utils.IntermediateLayerGetter(net, return_layers=return_layers)
    return body, [net.conv1, net.layer1, net.layer2, net.layer3, net.layer4]


def _shufflenet_body(net: nn.Module, first: int) -> tuple[nn.Module, list[nn.Module]]:
    return ShuffleNetBody(net, first), [net.conv1, net.stage2, net.stage3, net.stage4, net.conv5]


# Body builders per family (`detector.config.BACKBONES` names each backbone's): the torchvision
# classifier and the first level in, the body and its 5 stages (stem first, for freezing) out.
FAMILIES: dict[str, Callable[[nn.Module, int], tuple[nn.Module, list[nn.Module]]]] = {
    "resnet": _resnet_body,
    "shufflenet": _shufflenet_body,
}


def build_body(config: ModelConfig, weights: str | Path | None = None) -> tuple[nn.Module, list[int]]:
    """Body returning OrderedDict c{first_level}..c5, and those maps' channel counts."""
    name = config.backbone.name
    spec = BACKBONES[name]
    net = _classifier(name)
    if weights is not None:
        load_backbone_weights(net, weights)
    first = config.first_level
    body, stages = FAMILIES[spec.family](net, first)
    # Freeze the first stages: no gradients, and frozen BN statistics there whatever the norm.
    n_frozen = 5 - config.backbone.trainable_stages
    for stage in stages[:n_frozen]:
        for p in stage.parameters():
            p.requires_grad_(False)
        freeze_batchnorm(stage)
    if spec.family == "resnet" and n_frozen >= 1:  # the stem's BN sits beside conv1, not in it
        body.bn1.requires_grad_(False)
        body.bn1 = freeze_batchnorm(body.bn1)
    if config.norm.backbone == "frozen_bn":
        freeze_batchnorm(body)
    channels = list(spec.channels[first - 2 :])
    return body, channels


# --------------------------------------------------------------------------- FPN


class FPN(FeaturePyramidNetwork):
    """torchvision's FPN plus the optional global context, with outputs named p{level}.

    Overridden `forward` only to add GAP(C5) -> 1x1 conv onto the top lateral before the
    top-down pass (torchvision has no hook there) and to name levels by their stride.
    """

    def __init__(self, in_channels: list[int], out_channels: int, first_level: int, global_context: bool, norm_layer=None):
        super().__init__(in_channels, out_channels, extra_blocks=LastLevelMaxPool(), norm_layer=norm_layer)
        self.first_level = first_level
        self.context = nn.Conv2d(in_channels[-1], out_channels, 1) if global_context else None
        if self.context is not None:
            nn.init.kaiming_uniform_(self.context.weight, a=1)
            nn.init.zeros_(self.context.bias)

    def forward(self, x: dict[str, Tensor]) -> "OrderedDict[str, Tensor]":
        feats = list(x.values())
        last_inner = self.inner_blocks[-1](feats[-1])
        if self.context is not None:
            last_inner = last_inner + self.context(F.adaptive_avg_pool2d(feats[-1], 1))
        results = [self.layer_blocks[-1](last_inner)]
        for idx in range(len(feats) - 2, -1, -1):
            lateral = self.inner_blocks[idx](feats[idx])
            last_inner = lateral + F.interpolate(last_inner, size=lateral.shape[-2:], mode="nearest")
            results.insert(0, self.layer_blocks[idx](last_inner))
        results.append(F.max_pool2d(results[-1], kernel_size=1, stride=2))  # P6, as LastLevelMaxPool
        return OrderedDict((f"p{self.first_level + i}", r) for i, r in enumerate(results))


class BackboneWithFPN(nn.Module):
    """Body + FPN. Input FloatTensor[B, 3, H, W] (normalised, padded); output OrderedDict
    p{first}..p6 of FloatTensor[B, out_channels, H / 2**l, W / 2**l]."""

    def __init__(self, body: nn.Module, fpn: FPN, out_channels: int, levels: list[int]):
        super().__init__()
        self.body = body
        self.fpn = fpn
        self.out_channels = out_channels  # read by torchvision-style builders
        self.levels = levels

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        return self.fpn(self.body(x))


def build_backbone(config: ModelConfig, weights: str | Path | None = None) -> BackboneWithFPN:
    body, channels = build_body(config, weights)
    norm = head_norm(config)
    fpn = FPN(channels, config.backbone.fpn_channels, config.first_level, config.backbone.global_context, norm)
    return BackboneWithFPN(body, fpn, config.backbone.fpn_channels, config.levels)
