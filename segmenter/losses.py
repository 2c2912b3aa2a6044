"""Mask losses: sigmoid cross-entropy on the ground-truth class's map, plus the Sobel edge term.

Edge term (Edge Agreement Head, Zimmermann and Siems 2018; the slides' "Mask Edge Loss"):
fixed Sobel x and y filters on sigmoid(logits) and on the M x M target, and the mean squared
difference of the two edge maps. It is zero when the prediction equals the target and grows
with boundary error, which plain cross-entropy weighs no more than any other pixel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_SOBEL = torch.tensor(
    [
        [[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]],  # d/dx
        [[-1.0, -2.0, -1.0], [0.0, 0.0, 0.0], [1.0, 2.0, 1.0]],  # d/dy
    ]
)[:, None]  # [2, 1, 3, 3]


def sobel_edges(maps: Tensor) -> Tensor:
    """FloatTensor[N, M, M] -> FloatTensor[N, 2, M, M]: x and y gradients (replicate padding)."""
    x = F.pad(maps[:, None], (1, 1, 1, 1), mode="replicate")
    return F.conv2d(x, _SOBEL.to(device=maps.device, dtype=maps.dtype))


def edge_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean squared difference of the Sobel edges of sigmoid(logits) and of targets.

    logits, targets: FloatTensor[N, M, M] (targets in [0, 1]). Returns a scalar.
    """
    if logits.numel() == 0:
        return logits.sum() * 0
    return F.mse_loss(sobel_edges(logits.sigmoid()), sobel_edges(targets.to(logits.dtype)))


def mask_loss(
    logits: Tensor, labels: Tensor, targets: Tensor, edge: str = "none", edge_weight: float = 1.0
) -> dict[str, Tensor]:
    """Class-specific mask losses.

    logits: FloatTensor[N, K+1, M, M] (one map per class, background included, as torchvision);
    labels: Int64Tensor[N] (1..K); targets: FloatTensor[N, M, M] in [0, 1], in each RoI's frame.
    """
    if labels.numel() == 0:
        zero = logits.sum() * 0
        out = {"loss_mask": zero}
        if edge != "none":
            out["loss_mask_edge"] = zero
        return out
    picked = logits[torch.arange(labels.numel(), device=labels.device), labels]
    out = {"loss_mask": F.binary_cross_entropy_with_logits(picked, targets)}
    if edge == "sobel":
        out["loss_mask_edge"] = edge_weight * edge_loss(picked, targets)
    elif edge != "none":
        raise ValueError(f"edge loss must be 'none' or 'sobel', got {edge!r}")
    return out
