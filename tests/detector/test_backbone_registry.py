"""A backbone of an existing family is one entry of `detector.config.BACKBONES`: its channels
and default first level are what the built body gives, and a new entry builds a model."""

from __future__ import annotations

import pytest
import torch

from twopass.detector.backbone import build_body
from twopass.detector.config import BACKBONES, BackboneSpec, ConfigError, ModelConfig, config_from_dict
from twopass.detector.model import build_detector


def config(name: str) -> ModelConfig:
    return config_from_dict(dict(
        name="tiny", backbone=dict(name=name, fpn_channels=16, trainable_stages=5), norm=dict(backbone="bn"),
        box_head=dict(fc_dim=32), input=dict(train_sizes=[64], test_size=64, max_size=64),
    ), "tiny.yaml")  # fmt: skip


@pytest.mark.parametrize("name", list(BACKBONES))
def test_every_entry_states_its_bodys_channels_and_levels(name):
    spec = BACKBONES[name]
    cfg = config(name)
    assert cfg.first_level == spec.first_level
    body, channels = build_body(cfg)
    with torch.no_grad():
        maps = body.eval()(torch.zeros(1, 3, 64, 64))
    assert list(maps) == [f"c{level}" for level in range(spec.first_level, 6)]
    assert [m.shape[1] for m in maps.values()] == channels == list(spec.channels[spec.first_level - 2 :])
    assert [64 // m.shape[-1] for m in maps.values()] == [2**level for level in range(spec.first_level, 6)]


def test_a_new_backbone_of_a_family_is_one_entry(monkeypatch):
    with pytest.raises(ConfigError, match=r"^tiny.yaml: field 'backbone.name': Value error, 'resnet34', expected one of \('resnet18'"):
        config("resnet34")
    monkeypatch.setitem(BACKBONES, "resnet34", BackboneSpec("resnet", (64, 128, 256, 512)))
    model = build_detector(config("resnet34"), 3).eval()
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.backbone.body.modules()) == 36  # resnet34's convs
    with torch.no_grad():
        out = model([torch.rand(3, 64, 64)])
    assert set(out[0]) >= {"boxes", "scores", "labels"}
