import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torchvision.models.detection.roi_heads import paste_masks_in_image

from twopass.pipeline.masks import paste_and_encode, rle_from_region


def reference(probs, boxes, size, thresh=0.5):
    full = paste_masks_in_image(probs[:, None], boxes, size)[:, 0] > thresh
    return mask_utils.encode(np.asfortranarray(full.permute(1, 2, 0).numpy().astype(np.uint8))), full


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paste_equals_torchvision_bit_for_bit(seed):
    g = torch.Generator().manual_seed(seed)
    h, w, n = 97, 131, 40
    probs = torch.nn.functional.avg_pool2d(torch.rand(n, 1, 28, 28, generator=g), 5, 1, 2)[:, 0]
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w, h]) - 5
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 60 + 2], 1)
    boxes[0] = torch.tensor([0.0, 0, w, h])  # whole image: runs cross column boundaries
    probs[0] = 1.0
    boxes[1] = torch.tensor([w - 4.0, h - 4, w + 30, h + 30])  # reaches the last pixel
    probs[1] = 1.0
    boxes[2] = torch.tensor([-20.0, -20, 3, 3])  # mostly outside
    ref, full = reference(probs, boxes, (h, w))
    ours = paste_and_encode(probs, boxes, (h, w))
    assert [r["counts"] for r in ours] == [r["counts"] for r in ref]
    assert all(r["size"] == [h, w] for r in ours)
    np.testing.assert_array_equal(mask_utils.decode(ours).transpose(2, 0, 1), full.numpy())


def test_rle_of_empty_and_full_regions():
    assert mask_utils.decode(rle_from_region(np.zeros((3, 4), bool), 2, 2, (10, 10))).sum() == 0
    full = rle_from_region(np.ones((10, 10), bool), 0, 0, (10, 10))
    assert full["counts"] == mask_utils.encode(np.asfortranarray(np.ones((10, 10), np.uint8)))["counts"]
    assert paste_and_encode(torch.zeros(0, 28, 28), torch.zeros(0, 4), (5, 5)) == []
