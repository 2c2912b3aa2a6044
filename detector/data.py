"""Training batches: which images an iteration sees and how they are flipped, as pure functions
of (seed, iteration, process rank), so a resumed run sees exactly the batches an uninterrupted
run would have seen.

Samples are (image FloatTensor[3, H, W] in [0, 1], target dict) in torchvision's detection
format (see `pipeline.coco.CocoDataset`); boxes are XYXY pixels of that image.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, iteration, rank, ...), well spread."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h ^= (int(p) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def hflip(image: Tensor, target: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
    """Mirror an image [C, H, W] and its target: x -> W - x for boxes (x1, x2 swap), masks flipped."""
    w = image.shape[-1]
    out = dict(target)
    boxes = target["boxes"]
    out["boxes"] = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
    if "masks" in target:
        out["masks"] = target["masks"].flip(-1)
    return image.flip(-1), out


def clean_target(target: dict[str, Any]) -> dict[str, Any]:
    """Drop crowd regions and boxes without area (a COCO box may clip to zero width)."""
    boxes = target["boxes"]
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if "iscrowd" in target:
        keep &= target["iscrowd"] == 0
    if bool(keep.all()):
        return target
    return {k: (v[keep] if isinstance(v, Tensor) and v.dim() > 0 and len(v) == len(keep) else v) for k, v in target.items()}


class IterationBatches(torch.utils.data.Dataset):
    """Item k is the batch of iteration `start + k` for process `rank` of `world`.

    The sample stream is epochs of seeded permutations of the dataset; iteration i on rank r
    takes positions (i * world + r) * batch ... + batch - 1 of it. Each sample is flipped with
    probability `hflip_prob`, decided by a generator seeded from (seed, i, r, j).
    """

    def __init__(self, dataset, batch: int, start: int, iters: int, seed: int, hflip_prob: float, rank: int = 0, world: int = 1):
        self.dataset = dataset
        self.batch, self.start, self.iters = batch, start, iters
        self.seed, self.hflip_prob = seed, hflip_prob
        self.rank, self.world = rank, world
        self._perms: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return max(self.iters - self.start, 0)

    def indices(self, iteration: int) -> list[int]:
        n = len(self.dataset)
        first = (iteration * self.world + self.rank) * self.batch
        out = []
        for pos in range(first, first + self.batch):
            epoch = pos // n
            perm = self._perms.get(epoch)
            if perm is None:
                if len(self._perms) > 4:
                    self._perms.clear()
                g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
                perm = self._perms[epoch] = torch.randperm(n, generator=g)
            out.append(int(perm[pos % n]))
        return out

    def __getitem__(self, k: int) -> tuple[list[Tensor], list[dict[str, Any]]]:
        it = self.start + k
        images, targets = [], []
        for j, idx in enumerate(self.indices(it)):
            image, target = self.dataset[idx]
            g = torch.Generator().manual_seed(mix_seed(self.seed, it, self.rank, j, 1))
            if float(torch.rand((), generator=g)) < self.hflip_prob:
                image, target = hflip(image, target)
            images.append(image)
            targets.append(clean_target(target))
        return images, targets


def to_device(images: Sequence[Tensor], targets: Sequence[dict], device: torch.device) -> tuple[list[Tensor], list[dict]]:
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in t.items()} for t in targets]
    return images, targets
