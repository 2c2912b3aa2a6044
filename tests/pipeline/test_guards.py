"""Nothing lost, every bad input named: outputs that would destroy an input or cannot be written
are refused before any compute (exit 2, one line naming both paths), and the inputs are
byte-identical afterwards; OS errors become one line; files keep the umask's mode."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from twopass.pipeline import cli as pcli


def run_main(monkeypatch, capsys, *args) -> tuple[int, str]:
    """`twopass ARGS` in this process: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["twopass", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        pcli.main()
    return e.value.code, capsys.readouterr().err


def snapshot(*paths: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in paths}


@pytest.fixture
def data(synth_small, copy_data, tmp_path) -> Path:
    return copy_data(synth_small, tmp_path / "data")


def test_an_output_that_is_an_input_is_refused(monkeypatch, capsys, data, ckpts, tmp_path):
    ann = data / "annotations.json"
    results = tmp_path / "boxes.json"
    results.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "score": 0.5}]))
    before = snapshot(ann, results)
    cases = [
        ("detect", "--checkpoint", ckpts["a"], "--images", data / "images", "--ann", ann, "--out", ann),
        ("evaluate", "--ann", ann, "--results", results, "--out", ann),
        ("evaluate", "--ann", ann, "--results", results, "--out", results),
        ("segment", "--checkpoint", ckpts["seg"], "--detections", results, "--images", data / "images", "--ann", ann,
         "--out", tmp_path / "inst.parquet", "--coco-json", ann),
        ("segment", "--checkpoint", ckpts["seg"], "--detections", results, "--images", data / "images",
         "--out", results),
    ]  # fmt: skip
    for args in cases:
        code, err = run_main(monkeypatch, capsys, *args)
        assert code == 2, (args, err)
        assert err.count("\n") == 1 and "refusing to overwrite an input" in err, err
        assert err.count(str(ann)) + err.count(str(results)) == 2, err  # the path, as output and as input
    assert snapshot(ann, results) == before
    assert not (tmp_path / "inst.parquet").exists()


def test_an_output_inside_an_image_folder_or_a_run_in_use_is_refused(monkeypatch, capsys, data, ckpts, tmp_path):
    import shutil

    ann, images = data / "annotations.json", data / "images"
    run = tmp_path / "run_a"
    shutil.copytree(ckpts["a"].parent.parent, run)
    (run / "metrics.jsonl").write_text('{"iter": 1}\n')
    results = tmp_path / "boxes.json"
    results.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "score": 0.5}]))
    kept = [*sorted(images.iterdir()), *sorted((run / "checkpoints").iterdir()), run / "metrics.jsonl"]
    before = snapshot(*kept)
    detect = ("detect", "--checkpoint", run, "--images", images, "--ann", ann)
    cases = [
        ((*detect, "--out", images / "000001.png"), f"lies inside the input --images {images}"),
        ((*detect, "--out", images / "new.parquet"), "refusing to write into an input folder"),
        ((*detect, "--out", run / "checkpoints" / "iter_0000000.json"), f"lies inside the input --checkpoint {run / 'checkpoints'}"),
        ((*detect[:2], run / "checkpoints" / "iter_0000000.json", *detect[3:], "--out", run / "metrics.jsonl"),
         f"is the input --checkpoint {run / 'metrics.jsonl'}"),
        (("segment", "--checkpoint", ckpts["seg"], "--detections", results, "--images", images, "--ann", ann,
          "--out", tmp_path / "i.parquet", "--coco-json", images / "000002.png"), "--coco-json"),
        (("images", images, "--out", images / "table.parquet"), f"lies inside the input FOLDER {images}"),
        (("show", "--images", images, "--ann", ann, "--out", images), f"--out {images} is the input --images"),
        (("train-detector", "--init", run, "--train-ann", ann, "--train-images", images, "--out", run, "--overwrite",
          "--iters", "1", "--no-progress"), "is the input --init"),
    ]  # fmt: skip
    for args, message in cases:
        code, err = run_main(monkeypatch, capsys, *args)
        assert code == 2 and err.count("\n") == 1 and message in err, (args, err)
    assert snapshot(*kept) == before
    assert sorted(p.name for p in images.iterdir()) == [p.name for p in kept if p.parent == images]
    assert not (tmp_path / "i.parquet").exists()


def test_overwrite_never_removes_an_input(monkeypatch, capsys, data, ckpts, tmp_path):
    import shutil

    run = tmp_path / "run_a"
    shutil.copytree(ckpts["a"].parent.parent, run)
    before = snapshot(*(run / "checkpoints").iterdir())
    code, err = run_main(monkeypatch, capsys, "train-detector", "--init", run / "checkpoints" / "iter_0000000.json", "--train-ann",
                         data / "annotations.json", "--train-images", data / "images", "--out", run, "--overwrite", "--iters", "1")  # fmt: skip
    assert code == 2 and "is the input --init" in err and str(run) in err
    weights = run / "checkpoints" / "iter_0000000.safetensors"
    code, err = run_main(monkeypatch, capsys, "import-torchvision", "--arch", "fasterrcnn_resnet50_fpn", "--weights", weights,
                         "--out", run, "--overwrite")  # fmt: skip
    assert code == 2 and err == f"twopass: error: --out {run}: replacing its run would remove the input --weights {weights}\n"
    assert snapshot(*(run / "checkpoints").iterdir()) == before


def test_fuse_refuses_to_overwrite_an_input(monkeypatch, capsys, tmp_path):
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "score": 0.5}]))
    before = snapshot(boxes)
    code, err = run_main(monkeypatch, capsys, "fuse", boxes, "--out", boxes)
    assert code == 2 and f"--out {boxes} is the input #1 {boxes}" in err
    assert snapshot(boxes) == before


def test_an_output_that_is_a_folder_or_twice_given_is_refused(monkeypatch, capsys, data, ckpts, tmp_path):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    code, err = run_main(monkeypatch, capsys, "detect", "--checkpoint", ckpts["a"], "--images", data / "images", "--out", folder)
    assert code == 2 and f"--out {folder}: is a folder; give a file path" in err
    same = tmp_path / "x.parquet"
    code, err = run_main(monkeypatch, capsys, "segment", "--checkpoint", ckpts["seg"], "--detections", data / "annotations.json",
                         "--images", data / "images", "--out", same, "--coco-json", same)  # fmt: skip
    assert code == 2 and "--out and --coco-json are the same file" in err


def test_mask_thresh_and_detect_settings_are_range_checked(monkeypatch, capsys, data, ckpts, tmp_path):
    code, err = run_main(monkeypatch, capsys, "segment", "--checkpoint", ckpts["seg"], "--detections", data / "annotations.json",
                         "--images", data / "images", "--out", tmp_path / "i.parquet", "--mask-thresh", "5")  # fmt: skip
    assert code == 2 and "field 'mask_thresh'" in err and "less than 1" in err
    code, err = run_main(monkeypatch, capsys, "detect", "--checkpoint", ckpts["a"], "--images", data / "images",
                         "--out", tmp_path / "d.parquet", "--score-thresh", "1.5")  # fmt: skip
    assert code == 2 and "field 'score_thresh'" in err
    assert not (tmp_path / "i.parquet").exists() and not (tmp_path / "d.parquet").exists()


def test_training_into_a_folder_with_another_run(monkeypatch, capsys, data, tiny_model, tmp_path):
    import yaml

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_model("tiny")))
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"iteration": 7}\n')
    (run / "notes.txt").write_text("mine")
    args = ["train-detector", "--config", cfg, "--train-ann", data / "annotations.json", "--train-images", data / "images",
            "--out", run, "--iters", "1", "--batch", "2", "--no-progress"]  # fmt: skip
    code, err = run_main(monkeypatch, capsys, *args)
    assert code == 2 and "holds another run" in err and "--resume" in err and "--overwrite" in err
    assert (run / "metrics.jsonl").read_text() == '{"iteration": 7}\n' and not (run / "checkpoints").exists()
    code, _ = run_main(monkeypatch, capsys, *args, "--overwrite")
    assert code == 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert '"iteration": 7' not in lines[0] and (run / "checkpoints" / "last.json").is_file()
    assert (run / "notes.txt").read_text() == "mine"  # only the run's own files are replaced


def test_a_non_finite_loss_is_one_line_and_the_same_command_retries(monkeypatch, capsys, data, tiny_model, tmp_path):
    import yaml

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_model("tiny")))
    run = tmp_path / "run"
    args = ["train-detector", "--config", cfg, "--train-ann", data / "annotations.json", "--train-images", data / "images",
            "--out", run, "--iters", "4", "--batch", "1", "--lr", "1e30", "--no-progress"]  # fmt: skip
    code, err = run_main(monkeypatch, capsys, *args)
    assert code == 2 and err.count("\n") == 1 and f"twopass: error: {run}: iteration " in err and "loss is nan" in err, err
    assert "lower --lr" in err and not (run / "checkpoints").exists()
    monkeypatch.setattr(sys, "argv", ["twopass", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        pcli.main()
    out, err = capsys.readouterr()
    assert e.value.code == 2 and "holds another run" not in err and "loss is nan" in err  # it ran again
    assert f"--out {run}: the run there failed at iteration " in out and "removing its metrics.jsonl and starting again" in out


def test_os_errors_are_one_line_naming_the_path():
    assert pcli.error_line(OSError(28, "No space left on device", "/data/out.parquet")) == (
        "/data/out.parquet: No space left on device (errno 28)"
    )
    assert pcli.error_line(IsADirectoryError(21, "Is a directory", "out")) == "out: Is a directory (errno 21)"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_read_only_output_folder_is_refused(monkeypatch, capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    boxes = tmp_path / "boxes.json"
    boxes.write_text("[]")
    code, err = run_main(monkeypatch, capsys, "fuse", boxes, "--out", ro / "f.parquet")
    assert code == 2 and "is not writable" in err


def test_atomic_writes_keep_the_umask_mode(tmp_path):
    from twopass.pipeline.fileio import _UMASK, write_json

    write_json(tmp_path / "x.json", {"a": 1})
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o666 & ~_UMASK
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temp file left


def test_a_checkpoint_pointer_outside_its_run_folder_is_refused(tmp_path):
    from twopass.detector.checkpoint import CheckpointError, resolve

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.json").write_text(json.dumps({"checkpoint": "../../../etc/passwd"}))
    with pytest.raises(CheckpointError, match=r"points at '\.\./\.\./\.\./etc/passwd', outside"):
        resolve(run)


def test_model_config_values_are_range_checked_naming_the_field():
    from twopass.detector.config import ConfigError, config_from_dict

    for section, field, value in (("input", "test_size", -5), ("train", "base_lr", -0.1), ("box_head", "nms_thresh", 1.5),
                                  ("rpn", "fg_iou_thresh", 2.0), ("train", "hflip_prob", -1)):  # fmt: skip
        with pytest.raises(ConfigError, match=rf"field '{section}.{field}'"):
            config_from_dict({"name": "x", section: {field: value}}, "cfg.yaml")


def _results(ann: Path, **change) -> list[dict]:
    gt = json.loads(ann.read_text())
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9, **change}
            for a in gt["annotations"][:5]]  # fmt: skip


def test_evaluate_checks_ground_truth_and_results(monkeypatch, capsys, data, tmp_path):
    ann = data / "annotations.json"
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_results(ann)))
    gt = json.loads(ann.read_text())
    cases = []
    for name, edit, message in (
        ("nan", lambda a: a.__setitem__("bbox", [float("nan"), 1, 2, 2]), "bad bbox"),
        ("negative", lambda a: a.__setitem__("bbox", [1, 1, -3, 2]), "degenerate bbox"),
        ("outside", lambda a: a.__setitem__("bbox", [120, 120, 50, 50]), "lies outside"),
        ("polygon", lambda a: a.__setitem__("segmentation", [[1, 1, 5, 5]]), "polygon of fewer than 3 points"),
    ):
        bad = json.loads(json.dumps(gt))
        edit(bad["annotations"][0])
        path = tmp_path / f"gt_{name}.json"
        path.write_text(json.dumps(bad))
        cases.append((("evaluate", "--ann", path, "--results", good), message))
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps(_results(ann, score=1.5)))
    cases.append((("evaluate", "--ann", ann, "--results", scores), "field 'score' is 1.5"))
    for args, message in cases:
        code, err = run_main(monkeypatch, capsys, *args)
        assert code == 2 and message in err and err.count("\n") == 1, (args, err)


def test_evaluate_refuses_results_of_another_category_list(monkeypatch, capsys, data, tmp_path):
    from twopass.pipeline.categories import Categories
    from twopass.pipeline.tables import TableMeta, from_coco_results, write_table

    ann = data / "annotations.json"
    table = from_coco_results(_results(ann), source="x")
    other = Categories.from_coco([{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}])
    write_table(tmp_path / "r.parquet", table, TableMeta(kind="detections", producer="test", categories=other))
    code, err = run_main(monkeypatch, capsys, "evaluate", "--ann", ann, "--results", tmp_path / "r.parquet")
    assert code == 2 and "against the ground truth" in err


def test_segment_names_a_score_outside_0_1(monkeypatch, capsys, data, ckpts, tmp_path):
    det = tmp_path / "det.json"
    det.write_text(json.dumps(_results(data / "annotations.json", score=1.5)))
    code, err = run_main(monkeypatch, capsys, "segment", "--checkpoint", ckpts["seg"], "--detections", det, "--images", data / "images",
                         "--ann", data / "annotations.json", "--out", tmp_path / "i.parquet")  # fmt: skip
    assert code == 2 and f"{det}: field 'score' is 1.5" in err and not (tmp_path / "i.parquet").exists()


def test_fuse_checks_json_inputs_against_the_annotations(monkeypatch, capsys, data, tmp_path):
    ann = data / "annotations.json"
    boxes = tmp_path / "b.json"
    boxes.write_text(json.dumps(_results(ann, category_id=77)))
    code, err = run_main(monkeypatch, capsys, "fuse", boxes, "--images", ann, "--out", tmp_path / "f.parquet")
    assert code == 2 and "77" in err and str(boxes) in err
    boxes.write_text(json.dumps(_results(ann, image_id=999)))
    code, err = run_main(monkeypatch, capsys, "fuse", boxes, "--images", ann, "--out", tmp_path / "f.parquet")
    assert code == 2 and "image_id 999" in err and not (tmp_path / "f.parquet").exists()


def test_fuse_checks_image_ids_against_an_images_table_and_says_what_it_cannot_check(monkeypatch, capsys, data, tmp_path):
    ann = data / "annotations.json"
    table = tmp_path / "images.parquet"
    assert run_main(monkeypatch, capsys, "images", data / "images", "--out", table)[0] == 0
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(_results(ann)))
    bad.write_text(json.dumps(_results(ann, image_id=9999)))
    code, err = run_main(monkeypatch, capsys, "fuse", good, bad, "--images", table, "--out", tmp_path / "f.parquet")
    assert code == 2 and err == f"twopass: error: {bad}: image_id 9999 is not an image of {table} (1 unknown image id(s))\n"
    assert not (tmp_path / "f.parquet").exists()
    code, err = run_main(monkeypatch, capsys, "fuse", good, "--images", table, "--out", tmp_path / "f.parquet")
    assert code == 0 and err == f"twopass: warning: {good}: category ids not checked (give --images with the COCO annotations)\n"
    code, err = run_main(monkeypatch, capsys, "fuse", good, bad, "--out", tmp_path / "g.parquet")
    assert code == 0 and f"twopass: warning: {good}, {bad}: image ids and category ids not checked" in err
    code, err = run_main(monkeypatch, capsys, "fuse", good, "--images", ann, "--out", tmp_path / "h.parquet")
    assert code == 0 and err == ""


def test_temp_files_of_killed_writers_are_swept(tmp_path):
    import subprocess

    from twopass.pipeline.fileio import atomic_path, sweep_temp_files

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    (tmp_path / "sub").mkdir()
    stale = tmp_path / "sub" / f".shard.parquet.{dead}.k2j4h5.tmp"
    stale.write_text("half")
    with atomic_path(tmp_path / "live.json") as live:  # this process's own temp file
        live.write_text("{}")
        assert sweep_temp_files(tmp_path) == [stale] and live.exists() and not stale.exists()
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["live.json"]


def test_the_next_write_of_a_file_sweeps_the_temp_files_killed_writers_left_of_it(tmp_path):
    import subprocess

    from twopass.pipeline.fileio import write_json

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".out.json.{dead}.k2j4h5.tmp"  # killed at the rename: a full-size copy
    other = tmp_path / f".out.json.x.{dead}.k2j4h5.tmp"  # another file's, left for its own writer
    live = tmp_path / f".out.json.{os.getpid()}.abcdef.tmp"  # a live writer's
    for p in (stale, other, live):
        p.write_text("{}")
    write_json(tmp_path / "out.json", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([other.name, live.name, "out.json"])


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch
    import torch
    from safetensors import SafetensorError

    from twopass.detector.checkpoint import save_checkpoint
    from twopass.pipeline.categories import Categories
    from twopass.pipeline.fileio import atomic_path

    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError) as e:
        save_checkpoint(tmp_path / "run", torch.nn.Linear(2, 3), kind="detector", config={}, categories=Categories((1,), ("x",)), iteration=1)
    weights = tmp_path / "run" / "checkpoints" / "iter_0000001.safetensors"
    assert pcli.error_line(e.value).startswith(f"{weights}: No space left on device (needs 0.0 MB, ") and "MB free there" in str(e.value)
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []
    with pytest.raises(OSError) as e:
        with atomic_path(tmp_path / "out.parquet") as tmp:
            tmp.write_bytes(b"x" * 2_000_000)
            raise OSError("Error writing bytes to file. Detail: [errno 28] No space left on device")  # as pyarrow words it
    assert pcli.error_line(e.value).startswith(f"{tmp_path / 'out.parquet'}: No space left on device (needs more than 2.0 MB, ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_segment_writes_both_outputs_or_neither(monkeypatch, capsys, data, ckpts, tmp_path):
    from twopass.pipeline import tables

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tables, "to_coco_results", full)
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps(_results(data / "annotations.json")))
    out, coco = tmp_path / "i.parquet", tmp_path / "i.json"
    code, err = run_main(monkeypatch, capsys, "segment", "--checkpoint", ckpts["seg"], "--detections", boxes,
                         "--images", data / "images", "--ann", data / "annotations.json", "--out", out, "--coco-json", coco)  # fmt: skip
    assert code == 2 and err.startswith(f"twopass: error: {coco}: No space left on device") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["boxes.json", "data"]  # not the Parquet either


def test_init_from_a_run_of_the_other_kind_names_the_kind(monkeypatch, capsys, data, ckpts, tmp_path):
    code, err = run_main(monkeypatch, capsys, "train-detector", "--init", ckpts["seg"], "--train-ann", data / "annotations.json",
                         "--train-images", data / "images", "--out", tmp_path / "r", "--iters", "1")  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and "Extra inputs" not in err
    assert f"--init {ckpts['seg']}: a segmenter run, and train-detector takes its config from it; give --config" in err
    assert not (tmp_path / "r").exists()


def test_a_flow_on_a_full_disk_is_one_line_before_the_server_starts(monkeypatch, capsys, tmp_path):
    from collections import namedtuple

    from twopass.pipeline import fileio

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 5_000_000, 5_000_000))
    config = tmp_path / "pipeline.yaml"
    code, err = run_main(monkeypatch, capsys, "flow", "example-config", config, "--data", tmp_path / "data", "--smoke")
    assert code in (None, 0), err
    out = tmp_path / "run"
    for command in (["flow", "run", "--config", config], ["flow", "train", "--config", config], ["demo"]):
        code, err = run_main(monkeypatch, capsys, *command, "--out", out)
        assert code == 2 and err == (f"twopass: error: {tmp_path}: No space left on device (a flow run needs at least "
                                     f"100 MB free, 5.0 MB free there) (errno 28)\n"), err  # fmt: skip
        assert not out.exists()  # no OUT/prefect/ with a half-made database


def test_a_second_flow_on_a_run_folder_in_use_is_one_line(monkeypatch, capsys, tmp_path):
    import subprocess
    import textwrap

    config = tmp_path / "pipeline.yaml"
    run_main(monkeypatch, capsys, "flow", "example-config", config, "--data", tmp_path / "data", "--smoke")
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from twopass.flows.env import hold
        hold({str(out)!r}); print("held", flush=True); sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        for command in (["flow", "run", "--config", config], ["demo"]):
            code, err = run_main(monkeypatch, capsys, *command, "--out", out)
            assert code == 2 and err == (f"twopass: error: {out}: in use by another run (pid {holder.pid}); wait for it to "
                                         f"end or choose another --out (errno 16)\n"), err  # fmt: skip
            assert sorted(p.name for p in out.iterdir()) == [".twopass.lock"]  # nothing of the holder's run touched
    finally:
        holder.communicate("")
    from twopass.flows.env import _HELD, hold

    hold(out)  # free again once the holder has ended (a killed holder frees it too)
    assert _HELD[out.resolve()] and (out / ".twopass.lock").read_text() == str(__import__("os").getpid())
