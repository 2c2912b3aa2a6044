"""The pipeline config: YAML in, validated, relative paths resolved, errors naming the field."""

from __future__ import annotations

import pytest
import yaml

from twopass.pipeline.config import PipelineConfig, PipelineConfigError, load_pipeline_config, pipeline_config_from_dict

BASE = {
    "data": {"images": "data/images", "ann": "data/annotations.json", "shard_size": 4},
    "detectors": [{"name": "a", "model": "r50_fpn"}, {"name": "b", "model": {"name": "inline"}}],
    "segmenter": {"model": "seg.yaml"},
}


def test_yaml_round_trip_and_relative_paths(tmp_path):
    (tmp_path / "seg.yaml").write_text("name: seg\n")
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(BASE))
    cfg = load_pipeline_config(path)
    assert cfg.data.images == tmp_path / "data/images"  # relative to the YAML's folder
    assert cfg.data.ann == tmp_path / "data/annotations.json"
    assert cfg.detectors[0].model == "r50_fpn"  # a name in configs/, not a file here: kept
    assert cfg.segmenter.model == str(tmp_path / "seg.yaml")  # a file next to the YAML: resolved
    again = PipelineConfig.model_validate(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


def test_defaults():
    cfg = pipeline_config_from_dict(BASE)
    assert cfg.fusion.resolved()["iou_thr"] == 0.55 and cfg.fusion.resolved()["rescore"] is False
    soft = pipeline_config_from_dict({**BASE, "fusion": {"method": "soft-nms"}})
    # Soft-NMS writes the decayed scores unless told otherwise (ensemble_boxes keeps the input scores).
    assert soft.fusion.resolved()["rescore"] is True and soft.fusion.resolved()["iou_thr"] == 0.5
    assert pipeline_config_from_dict({**BASE, "fusion": {"method": "soft-nms", "rescore": False}}).fusion.resolved()["rescore"] is False
    assert cfg.segmenter.name == "segmenter" and cfg.device == "cpu"


@pytest.mark.parametrize(
    "change,message",
    [
        ({"fusion": {"method": "nmw"}}, r"field 'fusion.method'"),
        ({"fusion": {"iou": 0.5}}, r"field 'fusion.iou': Extra inputs are not permitted"),
        ({"detectors": []}, r"field 'detectors'"),
        ({"detectors": [{"name": "a", "model": "x"}, {"name": "a", "model": "y"}]}, r"detector names must be unique, \['a'\]"),
        ({"detectors": [{"name": "a b", "model": "x"}]}, r"field 'detectors\[0\].name'"),
        ({"detectors": [{"name": "a", "model": "x", "tta": {"scales": [8]}}]}, r"detectors\[0\].tta.scales"),
        ({"data": {"images": "x", "shard_size": 0}}, r"field 'data.shard_size'"),
        ({"data": {"images": "x", "train_ann": "a.json"}}, r"train_ann.*go together"),
        ({"segmenter": {"name": "a", "model": "x"}}, r"segmenter name 'a' is also a detector's name"),
    ],
)
def test_errors_name_the_field(change, message):
    with pytest.raises(PipelineConfigError, match=message):
        pipeline_config_from_dict({**BASE, **change}, "pipe.yaml")


def test_file_errors(tmp_path):
    with pytest.raises(PipelineConfigError, match="no such pipeline config"):
        load_pipeline_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(PipelineConfigError, match="bad.yaml: not valid YAML"):
        load_pipeline_config(bad)
    bad.write_text("- a list")
    with pytest.raises(PipelineConfigError, match="bad.yaml: a pipeline config is a mapping"):
        load_pipeline_config(bad)


def test_display_score_thresh_and_its_former_name():
    """The pictures' threshold is `display_score_thresh` (pass one's `score_thresh` is another
    threshold); configs written before the rename, with `evaluation.score_thresh`, still read."""
    assert pipeline_config_from_dict(BASE).evaluation.display_score_thresh == 0.3
    for key in ("display_score_thresh", "score_thresh"):
        cfg = pipeline_config_from_dict({**BASE, "evaluation": {key: 0.6}})
        assert cfg.evaluation.display_score_thresh == 0.6
        assert "display_score_thresh: 0.6" in cfg.to_yaml()
        with pytest.raises(PipelineConfigError, match=rf"field 'evaluation.{key}'"):
            pipeline_config_from_dict({**BASE, "evaluation": {key: 1.5}}, "pipe.yaml")
