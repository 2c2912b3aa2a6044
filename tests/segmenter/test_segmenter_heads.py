import pytest
import torch

from twopass.segmenter.heads import MaskBranch
from twopass.segmenter.losses import edge_loss, mask_loss, sobel_edges


def feats(levels=(2, 3, 4, 5), c=16, size=64):
    return [torch.randn(2, c, size // 2**l, size // 2**l) for l in levels]


@pytest.mark.parametrize("multi_scale", [False, True])
@pytest.mark.parametrize("heavier", [False, True])
def test_branch_shapes_and_backward(multi_scale, heavier):
    norm = (lambda c: torch.nn.GroupNorm(4, c)) if heavier else None
    b = MaskBranch(16, [2, 3, 4, 5], num_classes=3, pool_size=7, conv_dim=16, num_convs=8 if heavier else 4,
                   multi_scale=multi_scale, fc_fusion=heavier, norm=norm)
    boxes = [torch.tensor([[0.0, 0, 20, 20], [10, 10, 60, 50]]), torch.tensor([[5.0, 5, 9, 9]])]
    out = b(feats(), boxes)
    assert out.shape == (3, 4, 14, 14)
    out.sum().backward()
    assert all(p.grad is not None for p in b.parameters())


def test_multi_scale_pools_from_every_level():
    b = MaskBranch(16, [2, 3, 4, 5], num_classes=1, pool_size=7, conv_dim=16, multi_scale=True)
    f = feats()
    for x in f:
        x.requires_grad_(True)
    b(f, [torch.tensor([[0.0, 0, 8, 8]]), torch.zeros(0, 4)]).sum().backward()
    # a small box maps to P2 alone without multi-scale pooling; here every level gets gradient
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in f)


def test_fc_fusion_adds_one_map_to_every_class():
    b = MaskBranch(16, [3], num_classes=2, pool_size=7, conv_dim=16, num_convs=4, fc_fusion=True)
    boxes = [torch.tensor([[0.0, 0, 30, 30]]), torch.zeros(0, 4)]
    f = feats(levels=(3,))
    with_fusion = b(f, boxes)
    b.fc_fusion_from = 0  # switch the branch off: the difference is the same for every class
    without = b(f, boxes)
    d = with_fusion - without
    assert d.abs().sum() > 0
    torch.testing.assert_close(d[:, 0], d[:, 1])
    torch.testing.assert_close(d[:, 1], d[:, 2])


def test_edge_loss_vanishes_at_target_and_grows_with_boundary_error():
    target = torch.zeros(1, 28, 28)
    target[:, 8:20, 8:20] = 1
    perfect = (target * 2 - 1) * 30  # sigmoid ~ target
    assert edge_loss(perfect, target) < 1e-6
    losses = []
    for shift in (0, 1, 2, 4):
        logits = torch.roll(perfect, shifts=shift, dims=2)
        losses.append(edge_loss(logits, target).item())
    assert losses == sorted(losses) and losses[-1] > losses[1] > 1e-3
    # a uniform map has no edges: its edge loss equals the target's edge energy / 2 channels
    flat = torch.zeros(1, 28, 28)
    assert edge_loss(flat, target) == pytest.approx(sobel_edges(target).pow(2).mean().item(), rel=1e-5)


def test_mask_loss_uses_the_ground_truth_class_map():
    logits = torch.zeros(2, 3, 28, 28, requires_grad=True)
    target = torch.ones(2, 28, 28)
    out = mask_loss(logits, torch.tensor([1, 2]), target, edge="sobel")
    assert set(out) == {"loss_mask", "loss_mask_edge"}
    sum(out.values()).backward()
    g = logits.grad.abs().sum(dim=(2, 3))
    assert g[0, 1] > 0 and g[1, 2] > 0 and g[0, 0] == 0 and g[0, 2] == 0 and g[1, 1] == 0
    empty = mask_loss(logits[:0], torch.zeros(0, dtype=torch.long), target[:0], edge="sobel")
    assert empty["loss_mask"] == 0 and empty["loss_mask_edge"] == 0
