"""The stages the flows wrap, as plain functions (no Prefect): content-keyed outputs, skipping
finished shards, what a change reruns, bad inputs named, the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from twopass.detector import stage as detector_stage
from twopass.detector.api import DETECTOR
from twopass.ensemble import stage as ensemble_stage
from twopass.pipeline import runfolder
from twopass.segmenter import stage as segmenter_stage
from twopass.flows import steps
from twopass.segmenter.api import KINDS


def _detect_all(run, cfg, ckpts):
    """Every detector on every shard: {name: [path per shard]}."""
    return {
        d.name: [detector_stage.detect_shard(run, DETECTOR, d, str(ckpts[d.name]), cfg.data, ids) for ids in runfolder.shards(cfg.data)]
        for d in cfg.detectors
    }


def test_detect_outputs_are_keyed_and_skipped_when_present(config, counts, synth_small, ckpts, tmp_path):
    cfg = config(synth_small, ckpts)
    assert runfolder.shards(cfg.data) == [[1, 2, 3], [4, 5, 6], [7, 8]]
    run = tmp_path / "run"
    paths = _detect_all(run, cfg, ckpts)
    assert counts(run) == {"detect": 6}
    from twopass.pipeline.tables import read_table

    table, meta = read_table(paths["b"][0], "detections")
    assert set(table.column("source").to_pylist()) <= {"b@64", "b@64+flip"}
    assert set(table.column("image_id").to_pylist()) <= {1, 2, 3}
    assert meta.extra["views"] == ["b@64", "b@64+flip"]
    for name, ps in paths.items():  # the file name is the key of (checkpoint, settings, ids, images)
        for p, ids in zip(ps, runfolder.shards(cfg.data)):
            d = next(x for x in cfg.detectors if x.name == name)
            assert Path(p).name == detector_stage.detect_plan(run, DETECTOR, d, str(ckpts[name]), cfg.data, ids, "cpu").key + ".parquet"
    # A rerun finds every file and computes nothing; a lost file is recomputed, alone.
    assert _detect_all(run, cfg, ckpts) == paths
    assert counts(run) == {"detect": 6}
    Path(paths["a"][1]).unlink()
    assert _detect_all(run, cfg, ckpts) == paths
    assert counts(run) == {"detect": 7}


def test_keys_follow_content_not_names(config, copy_data, synth_small, ckpts, tmp_path):
    data = copy_data(synth_small, tmp_path / "data")
    cfg = config(data, ckpts)
    d = cfg.detectors[0]
    k = lambda ids: detector_stage.detect_plan(tmp_path, DETECTOR, d, str(ckpts["a"]), cfg.data, ids, "cpu").key  # noqa: E731
    before = [k(ids) for ids in runfolder.shards(cfg.data)]
    # Changing one image's content changes its shard's key only.
    img = data / "images" / json.loads((data / "annotations.json").read_text())["images"][4]["file_name"]
    from PIL import Image

    with Image.open(img) as im:
        im.convert("RGB").rotate(180).save(img)
    after = [k(ids) for ids in runfolder.shards(cfg.data)]
    assert [a == b for a, b in zip(before, after)] == [True, False, True]
    # Other settings or another checkpoint: other keys. Moving the data folder: the same keys.
    assert detector_stage.detect_plan(tmp_path, DETECTOR, d.model_copy(update={"score_thresh": 0.5}), str(ckpts["a"]), cfg.data, [1, 2, 3], "cpu").key != after[0]
    assert detector_stage.detect_plan(tmp_path, DETECTOR, d, str(ckpts["b"]), cfg.data, [1, 2, 3], "cpu").key != after[0]
    moved = copy_data(data, tmp_path / "moved")
    assert detector_stage.detect_plan(tmp_path, DETECTOR, d, str(ckpts["a"]), config(moved, ckpts).data, [1, 2, 3], "cpu").key == after[0]


def test_fusion_change_reruns_fusion_and_segmentation_only(config, counts, ledger_len, synth_small, ckpts, tmp_path):
    run = tmp_path / "run"

    def two_pass(cfg):
        det = _detect_all(run, cfg, ckpts)
        out = []
        for k, ids in enumerate(runfolder.shards(cfg.data)):
            fused = ensemble_stage.fuse_shard(run, cfg.fusion, [det[d.name][k] for d in cfg.detectors], [1.0, 1.0], cfg.data, ids)
            out.append(segmenter_stage.segment_shard(run, cfg.segmenter, str(ckpts["seg"]), fused, cfg.data, ids))
        return out

    wbf = config(synth_small, ckpts)
    first = two_pass(wbf)
    assert counts(run) == {"detect": 6, "fuse": 3, "segment": 3}
    n = ledger_len(run)
    assert two_pass(wbf) == first and ledger_len(run) == n  # all found
    soft = config(synth_small, ckpts, fusion={"method": "soft-nms", "sigma": 0.5})
    second = two_pass(soft)
    assert counts(run, since=n) == {"fuse": 3, "segment": 3}  # detection reused
    assert set(second).isdisjoint(first)
    from twopass.pipeline.tables import read_table

    fused = sorted((run / "fused").glob("*.parquet"))
    assert len(fused) == 6
    # Soft-NMS keeps the decayed scores (rescore defaults to true for soft-nms).
    t, meta = read_table(read_table(second[0], "instances")[1].extra["detections"], "detections")
    assert meta.config["rescore"] is True and meta.config["method"] == "soft-nms"


def test_segment_on_new_detections_from_any_source(config, counts, synth_small, ckpts, tmp_path):
    """Pass two alone on a COCO results JSON (ground-truth boxes as detections): only the
    segmentation stage runs, and a second new file reruns it again."""
    from twopass.pipeline.tables import read_table

    cfg = config(synth_small, ckpts)
    gt = json.loads((synth_small / "annotations.json").read_text())
    det = tmp_path / "gt_boxes.json"
    det.write_text(json.dumps([{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
                               for a in gt["annotations"]]))  # fmt: skip
    run = tmp_path / "run"
    outs = [segmenter_stage.segment_shard(run, cfg.segmenter, str(ckpts["seg"]), det, cfg.data, ids) for ids in runfolder.shards(cfg.data)]
    assert counts(run) == {"segment": 3}
    rows = sum(read_table(p, "instances")[0].num_rows for p in outs)
    assert rows == len(gt["annotations"])
    det.write_text(json.dumps([{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.5}
                               for a in gt["annotations"][:5]]))  # fmt: skip
    [segmenter_stage.segment_shard(run, cfg.segmenter, str(ckpts["seg"]), det, cfg.data, ids) for ids in runfolder.shards(cfg.data)]
    assert counts(run) == {"segment": 6}


def test_corrupt_image_fails_its_shard_naming_the_file(config, copy_data, counts, synth_small, ckpts, tmp_path):
    data = copy_data(synth_small, tmp_path / "data")
    cfg = config(data, ckpts)
    bad = data / "images" / json.loads((data / "annotations.json").read_text())["images"][4]["file_name"]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    run = tmp_path / "run"
    d = cfg.detectors[0]
    ok = [detector_stage.detect_shard(run, DETECTOR, d, str(ckpts["a"]), cfg.data, ids) for ids in ([1, 2, 3], [7, 8])]
    with pytest.raises(ValueError, match=rf"image_id 5: cannot read image file {bad}"):
        detector_stage.detect_shard(run, DETECTOR, d, str(ckpts["a"]), cfg.data, [4, 5, 6])
    assert all(Path(p).is_file() for p in ok) and counts(run) == {"detect": 2}
    assert len(list((run / "detections" / "a").glob("*"))) == 2  # no partial file of the failed shard


def test_missing_checkpoint_and_untrained_model_are_named(config, synth_small, ckpts, tmp_path):
    cfg = config(synth_small, None)
    with pytest.raises(FileNotFoundError, match=r"detector 'a': no checkpoint: set its checkpoint in the pipeline config, or run train_flow"):
        detector_stage.resolve_model(tmp_path, DETECTOR, cfg.detectors[0], cfg.data, "cpu")
    bad = cfg.detectors[0].model_copy(update={"model": {"name": "x", "box_head": {"type": "lsd"}}})
    with pytest.raises(ValueError, match=r"detector 'a': model: field 'box_head.type'"):
        detector_stage.train_key(DETECTOR, bad, cfg.data, "cpu")
    no_train = config(synth_small, None, data={"train_ann": None, "train_images": None})
    with pytest.raises(ValueError, match="data.train_ann / data.train_images are not set"):
        detector_stage.train_stage(tmp_path, DETECTOR, no_train.detectors[0], no_train.data)


def test_train_stage_trains_once_and_is_found(config, counts, synth_small, tmp_path):
    cfg = config(synth_small, None)
    spec = cfg.detectors[0]
    run = tmp_path / "run"
    ckpt = detector_stage.train_stage(run, DETECTOR, spec, cfg.data, progress=False)
    assert Path(ckpt).name == "iter_0000001.json" and counts(run) == {"train": 1}
    assert detector_stage.train_stage(run, DETECTOR, spec, cfg.data, progress=False) == ckpt
    assert counts(run) == {"train": 1}
    assert detector_stage.resolve_model(run, DETECTOR, spec, cfg.data, "cpu") == Path(ckpt)
    # Another training budget is another model.
    more = spec.model_copy(update={"train": spec.train.model_copy(update={"iters": 2})})
    assert detector_stage.trained_checkpoint(run, DETECTOR, more, cfg.data, "cpu") is None


def test_merge_evaluate_and_report(config, synth_small, ckpts, tmp_path):
    from twopass.pipeline import report
    from twopass.pipeline.tables import read_table

    cfg = config(synth_small, ckpts)
    run = tmp_path / "run"
    det = _detect_all(run, cfg, ckpts)
    merged = {name: runfolder.merge(run, "detections", name, ps) for name, ps in det.items()}
    table, _ = read_table(merged["a"], "detections")
    assert sorted(set(table.column("image_id").to_pylist())) == list(range(1, 9))
    fused = [ensemble_stage.fuse_shard(run, cfg.fusion, [det["a"][k], det["b"][k]], [2.0, 1.0], cfg.data, ids)
             for k, ids in enumerate(runfolder.shards(cfg.data))]  # fmt: skip
    fused_all = runfolder.merge(run, "fused", "fused", fused)
    inst = [segmenter_stage.segment_shard(run, cfg.segmenter, str(ckpts["seg"]), p, cfg.data, ids) for p, ids in zip(fused, runfolder.shards(cfg.data))]
    inst_all = runfolder.merge(run, "instances", "seg", inst)
    metrics_path = steps.evaluate_stage(run, cfg.data, cfg.fusion, merged, fused_all, inst_all)
    rows = runfolder.ap_table(json.loads(Path(metrics_path).read_text()))
    assert [r["stage"] for r in rows] == ["detector a", "detector b", "detector b + TTA", "fused", "final masks"]
    assert rows[-1]["mask AP"] is not None and rows[0]["mask AP"] is None
    assert steps.evaluate_stage(run, cfg.data, cfg.fusion, merged, fused_all, inst_all) == metrics_path
    pictures = report.render_pictures(run, cfg, fused_all, inst_all)
    assert [p.name for p in pictures] == ["1.png", "2.png"]
    md = report.build_report(run, cfg, metrics_path, {"instances": inst_all}, pictures, {"detect": 6})
    assert "| final masks | segmenter on the fused boxes |" in md and "![image 1](pictures/1.png)" in md
    assert "detect 6" in md and "How to read this" in md
    inline = report.build_report(run, cfg, metrics_path, {}, pictures, inline_pictures=True)
    assert "data:image/jpeg;base64," in inline
    assert "final masks" in runfolder.format_ap_table(rows)


def test_segmenter_own_boxes_join_the_fusion(config, counts, synth_small, ckpts, tmp_path):
    """`segmenter.own_boxes`: the segmenter runs as a third member of pass one, its boxes are
    fused with the detectors' at their weight, and its own masks are scored beside them."""
    from twopass.flows.plain import two_pass_plain
    from twopass.pipeline.tables import read_table

    cfg = config(synth_small, ckpts, segmenter={"own_boxes": {"weight": 2.0, "tta": {"scales": [64]}}})
    assert [(kind, d.name, d.weight) for kind, d in cfg.pass_one()] == [
        ("detector", "a", 1.0), ("detector", "b", 1.0), ("segmenter", "seg", 2.0)]  # fmt: skip
    run = tmp_path / "run"
    out = two_pass_plain(cfg, run)
    assert set(out["detections"]) == {"a", "b", "seg"}
    own, meta = read_table(out["detections"]["seg"], "instances")
    assert own.num_rows > 0 and meta.producer == "segmenter:seg" and set(own.column("source").to_pylist()) == {"seg@64"}
    # the run fused the three members' files at weights 1, 1, 2: the same fusion, asked again,
    # is the same key (so the same file, reused), and it is not the detectors' alone
    ids = runfolder.shards(cfg.data)[0]
    inputs = [detector_stage.detect_shard(run, KINDS[kind], d, str(ckpts[d.name]), cfg.data, ids) for kind, d in cfg.pass_one()]
    before = counts(run)
    three = ensemble_stage.fuse_shard(run, cfg.fusion, inputs, [1.0, 1.0, 2.0], cfg.data, ids)
    assert counts(run) == before  # nothing recomputed: the run made exactly this file
    fused, _ = read_table(out["fused"], "detections")
    assert read_table(three, "detections")[0].num_rows > 0 and fused.num_rows > 0
    two = ensemble_stage.fuse_plan(run, cfg.fusion, inputs[:2], [1.0, 1.0], cfg.data, ids).out
    assert Path(three) != two
    metrics = json.loads(Path(out["metrics"]).read_text())
    row = next(r for r in metrics["stages"] if r["stage"] == "detector seg")
    assert "segm" in row and "bbox" in row  # its own masks are scored
    assert "segm" not in next(r for r in metrics["stages"] if r["stage"] == "detector a")


def test_a_truncated_shard_is_computed_again(config, counts, synth_small, ckpts, tmp_path):
    """A finished shard file that no longer reads (a disk that filled, a copy cut short) is
    recomputed on the rerun, with a warning naming it, instead of failing every rerun."""
    cfg = config(synth_small, ckpts)
    run = tmp_path / "run"
    d, ids = cfg.detectors[0], [1, 2, 3]
    path = Path(detector_stage.detect_shard(run, DETECTOR, d, str(ckpts["a"]), cfg.data, ids))
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    said = []
    assert detector_stage.detect_shard(run, DETECTOR, d, str(ckpts["a"]), cfg.data, ids, log=said.append) == str(path)
    assert any(f"{path} is unreadable" in m for m in said) and counts(run) == {"detect": 2}
    assert path.read_bytes() == good  # the same content again
