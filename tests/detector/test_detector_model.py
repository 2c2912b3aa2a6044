"""Config and model: every switch builds and trains a step on a tiny input; head shapes."""

from __future__ import annotations

import pytest
import torch

from twopass.detector.backbone import BackboneError, build_backbone
from twopass.detector.config import CONFIG_DIR, ConfigError, ModelConfig, config_from_dict, load_config
from twopass.detector.heads import LevelPooler, LocationSensitiveHead, TwoFCHead
from twopass.detector.model import build_detector


SIZE = 64


def tiny(**over) -> ModelConfig:
    """A tiny config: every width small, 64 px inputs; `over` replaces whole sections' fields."""
    base = dict(
        name="tiny",
        backbone=dict(name="resnet18", fpn_channels=16, trainable_stages=5),
        norm=dict(backbone="bn", gn_groups=4),
        rpn=dict(pre_nms_top_n_train=64, post_nms_top_n_train=32, pre_nms_top_n_test=64, post_nms_top_n_test=32, batch_size_per_image=32),
        box_head=dict(fc_dim=32, kernel_size=3, mid_channels=8, alpha=2, batch_size_per_image=16),
        mask_head=dict(conv_dim=8, num_convs=1),
        input=dict(train_sizes=[SIZE], test_size=SIZE, max_size=SIZE),
    )
    for section, fields in over.items():
        if isinstance(fields, dict):
            base.setdefault(section, {}).update(fields)
        else:
            base[section] = fields
    return ModelConfig.model_validate(base)


def target(size: int = SIZE) -> dict:
    boxes = torch.tensor([[8.0, 8.0, 40.0, 48.0], [30.0, 20.0, 60.0, 60.0]])
    masks = torch.zeros(2, size, size, dtype=torch.uint8)
    masks[0, 8:48, 8:40] = 1
    masks[1, 20:60, 30:60] = 1
    return {"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": masks}


def train_and_eval_step(cfg: ModelConfig) -> tuple[dict, list]:
    torch.manual_seed(0)
    model = build_detector(cfg, num_classes=3)
    model.train()
    losses = model([torch.rand(3, SIZE, SIZE), torch.rand(3, SIZE, SIZE)], [target(), target()])
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    # Every box head and predictor gets a gradient (cascade stages included).
    for head in list(model.roi_heads.box_heads) + list(model.roi_heads.box_predictors):
        assert any(p.grad is not None for p in head.parameters())
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, SIZE, SIZE), torch.rand(3, 48, SIZE)])
    for o, (h, w) in zip(out, [(SIZE, SIZE), (48, SIZE)]):
        assert o["boxes"].shape[1] == 4 and len(o["boxes"]) == len(o["scores"]) == len(o["labels"])
        if len(o["boxes"]):
            assert (o["boxes"][:, 2] <= w + 1e-3).all() and (o["boxes"][:, 3] <= h + 1e-3).all()
            assert o["labels"].min() >= 1 and o["labels"].max() <= 3
    return losses, out


SWITCHES = {
    "resnet18": {},
    "resnet50": dict(backbone=dict(name="resnet50")),
    "shufflenet_v2_x0_5": dict(backbone=dict(name="shufflenet_v2_x0_5")),
    "shufflenet_v2_x1_0": dict(backbone=dict(name="shufflenet_v2_x1_0")),
    "shufflenet_v2_x2_0": dict(backbone=dict(name="shufflenet_v2_x2_0")),
    "shufflenet_p2": dict(backbone=dict(name="shufflenet_v2_x0_5", first_level=2)),
    "resnet_p3": dict(backbone=dict(first_level=3)),
    "global_context": dict(backbone=dict(global_context=True)),
    "frozen_bn": dict(norm=dict(backbone="frozen_bn")),
    "sync_bn_single_process": dict(norm=dict(backbone="sync_bn")),
    "frozen_stages": dict(backbone=dict(trainable_stages=2)),
    "gn_heads": dict(norm=dict(heads="gn")),
    "bn_heads": dict(norm=dict(heads="bn"), mask_head=dict(enabled=True)),
    "conv_fc_v2_style": dict(norm=dict(heads="bn"), rpn=dict(convs=2), box_head=dict(type="conv_fc", num_convs=2, conv_dim=16)),
    "conv_fc_plain": dict(box_head=dict(type="conv_fc", num_convs=1, conv_dim=8)),
    "location_sensitive": dict(box_head=dict(type="location_sensitive")),
    "two_fc_multi_scale_roi": dict(box_head=dict(multi_scale_roi=True)),
    "lsd_multi_scale_roi": dict(box_head=dict(type="location_sensitive", multi_scale_roi=True)),
    "cascade_two_fc": dict(box_head=dict(cascade_stages=3)),
    "cascade_lsd_class_specific": dict(box_head=dict(type="location_sensitive", cascade_stages=3, class_agnostic_box=False)),
    "class_agnostic_single_stage": dict(box_head=dict(class_agnostic_box=True)),
    "mask_head": dict(mask_head=dict(enabled=True, max_positives_per_image=4)),
    "mask_head_gn_lsd": dict(mask_head=dict(enabled=True), norm=dict(heads="gn"), box_head=dict(type="location_sensitive")),
    "explicit_anchors": dict(rpn=dict(anchors=dict(sizes=[8, 16, 32, 64, 128], aspect_ratios=[1.0]))),
    "anchors_3_per_octave": dict(rpn=dict(anchors=dict(sizes=[8, 16, 32, 64, 128], scales_per_octave=3))),
    "rpn_iou_thresholds": dict(rpn=dict(fg_iou_thresh=0.6, bg_iou_thresh=0.4)),
    "canonical_scale_small_inputs": dict(roi_pool=dict(canonical_scale=36, canonical_level=4)),
    "aligned_roi_align": dict(roi_pool=dict(aligned=True), mask_head=dict(enabled=True)),
    "aligned_lsd_multi_scale": dict(roi_pool=dict(aligned=True), box_head=dict(type="location_sensitive", multi_scale_roi=True)),
    "multi_scale_training": dict(input=dict(train_sizes=[48, 56, 64])),
}


@pytest.mark.parametrize("name", list(SWITCHES))
def test_every_switch_trains_and_infers(name):
    cfg = tiny(**SWITCHES[name])
    losses, _ = train_and_eval_step(cfg)
    expected = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    if cfg.box_head.cascade_stages == 3:
        expected |= {"loss_classifier_s1", "loss_box_reg_s1", "loss_classifier_s2", "loss_box_reg_s2"}
    if cfg.mask_head.enabled:
        expected.add("loss_mask")
    assert set(losses) == expected


def test_mask_head_outputs_full_image_masks():
    cfg = tiny(mask_head=dict(enabled=True), box_head=dict(score_thresh=0.0))
    model = build_detector(cfg, num_classes=3).eval()
    with torch.no_grad():
        out = model([torch.rand(3, 48, SIZE)])
    assert out[0]["masks"].shape[1:] == (1, 48, SIZE)


def test_frozen_bn_and_frozen_stages_have_no_trainable_norm():
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = build_detector(tiny(norm=dict(backbone="frozen_bn")), 3)
    body = model.backbone.body
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in body.modules())
    model = build_detector(tiny(backbone=dict(trainable_stages=2)), 3)
    body = model.backbone.body
    assert not any(p.requires_grad for p in body.layer2.parameters())
    assert all(p.requires_grad for p in body.layer3.parameters())
    assert isinstance(body.layer2[0].bn1, FrozenBatchNorm2d) and isinstance(body.layer3[0].bn1, torch.nn.BatchNorm2d)


def test_global_context_reaches_every_level():
    cfg = tiny(backbone=dict(global_context=True))
    bb = build_backbone(cfg)
    x = torch.rand(1, 3, SIZE, SIZE)
    feats = bb(x)
    assert list(feats) == ["p2", "p3", "p4", "p5", "p6"]
    loss = sum(f.sum() for n, f in feats.items() if n in ("p2", "p5"))
    loss.backward()
    assert bb.fpn.context.weight.grad.abs().sum() > 0
    assert [tuple(f.shape[-2:]) for f in feats.values()] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]


def test_location_sensitive_head_shapes():
    ch, p, alpha, fc = 16, 7, 3, 40
    head = LocationSensitiveHead(ch, [2, 3, 4, 5], p=p, sampling_ratio=2, k=5, mid_channels=8, alpha=alpha, fc_dim=fc, multi_scale=False)
    feats = {f"p{l}": torch.rand(2, ch, 128 // 2**l, 128 // 2**l) for l in range(2, 7)}
    thin = head.thin_maps(feats)
    assert [tuple(t.shape) for t in thin] == [(2, alpha * p * p, 128 // 2**l, 128 // 2**l) for l in range(2, 6)]
    boxes = [torch.tensor([[0.0, 0.0, 20.0, 30.0], [10.0, 10.0, 120.0, 100.0]]), torch.tensor([[5.0, 5.0, 60.0, 60.0]])]
    pooled = head.pooler(thin, boxes)
    assert tuple(pooled.shape) == (3, alpha, p, p)
    assert tuple(head(feats, boxes).shape) == (3, fc)
    # Position sensitivity: bin (i, j) reads only channel group (i, j) of the thin map.
    only = torch.zeros(1, alpha * p * p, 16, 16)
    only[:, 0 * p * p + 2 * p + 3] = 1.0  # channel of output channel 0, bin (2, 3)
    out = head.pooler([only], [torch.tensor([[0.0, 0.0, 60.0, 60.0]])])
    assert out[0, 0, 2, 3] > 0.99 and out.sum() == pytest.approx(out[0, 0, 2, 3].item())


def test_multi_scale_roi_pools_from_every_level():
    levels = [2, 3, 4, 5]
    pooler = LevelPooler(levels, 7, 2)
    feats = [torch.full((1, 4, 64 // 2**l, 64 // 2**l), float(l)) for l in levels]
    boxes = [torch.tensor([[4.0, 4.0, 20.0, 20.0]])]
    per_level = pooler.pool_all(feats, boxes)
    assert [float(t.mean()) for t in per_level] == pytest.approx([2.0, 3.0, 4.0, 5.0])
    # The single-level pooler reads one level only (a small box goes to P2).
    assert float(pooler(feats, boxes).mean()) == pytest.approx(2.0)
    for head in (
        TwoFCHead(4, levels, 7, 2, 16, multi_scale=True),
        LocationSensitiveHead(4, levels, p=3, sampling_ratio=2, k=3, mid_channels=4, alpha=2, fc_dim=16, multi_scale=True),
    ):
        fmaps = {f"p{l}": torch.rand(1, 4, 64 // 2**l, 64 // 2**l, requires_grad=True) for l in levels}
        # Many RoIs so the max fusion picks each level for some output unit.
        many = [torch.tensor([[4.0, 4.0, 20.0, 20.0], [0.0, 0.0, 60.0, 60.0], [10.0, 30.0, 50.0, 40.0]])]
        head(fmaps, many).sum().backward()
        for l in levels:
            assert fmaps[f"p{l}"].grad.abs().sum() > 0, f"level {l} unused"


def test_configs_folder_loads(tmp_path):
    # pass two's configs (`*_seg`, read by segmenter/config.py) sit beside the detectors'
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if not p.stem.endswith("_seg"))
    assert {"r50_fpn", "r50_lsd", "r50_cascade", "shufflev2_gap_lsd", "r18_lsd_cpu"} <= set(names)
    for n in names:
        cfg = load_config(n)
        assert cfg.name == n


def test_bad_config_names_file_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nbox_head:\n  type: three_fc\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*box_head\.type"):
        load_config(bad)
    bad.write_text("name: x\nbackbone:\n  nmae: resnet18\n")
    with pytest.raises(ConfigError, match=r"backbone\.nmae"):
        load_config(bad)
    bad.write_text("name: x\nrpn:\n  anchors:\n    sizes: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"rpn.anchors.sizes"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such config"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="cascade"):
        config_from_dict({"name": "x", "box_head": {"cascade_stages": 3, "cascade_ious": [0.5]}})


def test_backbone_weights_from_a_local_file(tmp_path):
    import torchvision

    torch.manual_seed(1)
    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    cfg = tiny(norm=dict(backbone="frozen_bn"), backbone=dict(trainable_stages=3))
    model = build_detector(cfg, 3, backbone_weights=path)
    body = model.backbone.body
    assert torch.equal(body.layer3[1].conv2.weight, ref.layer3[1].conv2.weight)
    assert torch.equal(body.bn1.running_var, ref.bn1.running_var)
    assert torch.equal(body.layer1[0].bn1.weight, ref.layer1[0].bn1.weight)
    # safetensors works too
    from safetensors.torch import save_file

    st = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(st))
    model = build_detector(cfg, 3, backbone_weights=st)
    assert torch.equal(model.backbone.body.conv1.weight, ref.conv1.weight)
    # The wrong architecture or a broken file is a clear error naming the file.
    r50 = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), r50)
    with pytest.raises(BackboneError, match="r50.pth.*does not fit"):
        build_detector(cfg, 3, backbone_weights=r50)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="junk.pth"):
        build_detector(cfg, 3, backbone_weights=junk)
    with pytest.raises(BackboneError, match="no such"):
        build_detector(cfg, 3, backbone_weights=tmp_path / "none.pth")


def test_level_mapping_follows_the_configured_canonical_scale():
    """FPN's Eqn. 1: level = floor(k0 + log2(sqrt(wh) / s0)), clamped to the RoI levels."""
    from twopass.detector.config import RoIPoolConfig

    levels = [2, 3, 4, 5]
    feats = [torch.full((1, 1, 256 // 2**l, 256 // 2**l), float(l)) for l in levels]  # boxes lie inside
    sides = [8.0, 17.0, 20.0, 36.0, 40.0, 72.0, 80.0, 150.0]

    def pooled_levels(roi: RoIPoolConfig) -> list[float]:
        pooler = LevelPooler(levels, 2, 2, roi=roi)
        boxes = [torch.tensor([[0.0, 0.0, s, s] for s in sides])]
        return pooler(feats, boxes).mean(dim=(1, 2, 3)).tolist()

    # FPN's 224 px at P4: everything under 112 px goes to P2, 150 px to P3.
    assert pooled_levels(RoIPoolConfig()) == [2, 2, 2, 2, 2, 2, 2, 3]
    # 36 px at P4 (224 scaled to 128 px inputs): 18 px one level down, 72 px one level up.
    assert pooled_levels(RoIPoolConfig(canonical_scale=36)) == [2, 2, 3, 4, 4, 5, 5, 5]
    assert pooled_levels(RoIPoolConfig(canonical_scale=36, canonical_level=3)) == [2, 2, 2, 3, 3, 4, 4, 5]


@pytest.mark.parametrize("aligned", [False, True])
def test_level_pooler_matches_torchvision_roi_align(aligned):
    """Both pooling paths (torchvision's op and the sparse channels-last product used at
    inference) give torchvision's roi_align with the same `aligned`."""
    from torchvision.ops import roi_align

    from twopass.detector.config import RoIPoolConfig

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 19, 23, generator=g)
    xy = torch.rand(30, 2, generator=g) * 70 - 5
    boxes = [torch.cat([xy[:15], xy[:15] + torch.rand(15, 2, generator=g) * 20], 1), torch.cat([xy[15:], xy[15:] + 0.4], 1)]
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes)])
    ref = roi_align(x, rois, 5, 0.25, 2, aligned=aligned)
    pooler = LevelPooler([2], 5, 2, roi=RoIPoolConfig(aligned=aligned))
    assert torch.allclose(pooler([x], boxes), ref, atol=1e-6)
    pooler.sparse_cpu = True
    with torch.no_grad():
        got = pooler([x.contiguous(memory_format=torch.channels_last)], boxes)
    assert torch.allclose(got, ref, atol=1e-4)
    # aligned changes the numbers: the test would fail if the flag were ignored
    assert not torch.allclose(ref, roi_align(x, rois, 5, 0.25, 2, aligned=not aligned), atol=1e-3)


def test_anchor_scales_per_octave():
    cfg = tiny(rpn=dict(anchors=dict(sizes=[8, 16, 32, 64, 128], scales_per_octave=2, aspect_ratios=[1.0])))
    model = build_detector(cfg, 3)
    assert model.rpn.anchor_generator.sizes[1] == pytest.approx((16.0, 16.0 * 2**0.5))
    assert model.rpn.head.cls_logits.out_channels == 2
    # default: one size per level, `scale` x the stride
    assert tiny().rpn.anchors.level_sizes([4, 8]) == [(32.0,), (64.0,)]
