"""`twopass plot`: the curves drawn are the numbers of metrics.jsonl; bad files are named in one
line; TensorBoard events read back; the report's precision-recall curves are COCOeval's."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from twopass.pipeline.cli import app
from twopass.pipeline.curves import PALETTE, plot_training, pr_curves, read_metrics, smooth, smooth_window, write_tensorboard

runner = CliRunner()


def _records(n: int = 120, val_every: int = 60) -> list[dict]:
    """A run's metrics.jsonl as the engine writes it: iteration records (losses, lr, time) and
    validation records ({"iter", "val"}), COCO's -1 for an area range without ground truth."""
    rng = np.random.default_rng(0)
    out = []
    for it in range(1, n + 1):
        a, b = 2.0 / (1 + it / 20) + 0.2 * rng.random(), 0.5 + 0.1 * rng.random()
        out.append({"iter": it, "lr": 0.01 * min(1.0, it / 30), "loss": a + b, "loss_classifier": a, "loss_box_reg": b,
                    "time": 0.1, "grad_norm": 3.0})  # fmt: skip
        if it % val_every == 0:
            ap = it / n / 2
            out.append({"iter": it, "val": {"bbox": {"AP": ap, "AP50": ap + 0.2, "APs": -1.0},
                                            "segm": {"AP": ap / 2, "AP50": ap}, "per_category": {"bbox": {"a": ap}}}})  # fmt: skip
    return out


def _write(path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _trailing_mean(y, w):
    return np.array([np.mean(y[max(0, i - w + 1) : i + 1]) for i in range(len(y))])


def test_plot_draws_the_files_numbers(tmp_path):
    records = _records()
    _write(tmp_path / "run" / "metrics.jsonl", records)
    r = runner.invoke(app, ["plot", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    png = tmp_path / "run" / "curves.png"
    assert f"wrote {png}" in r.output
    with Image.open(png) as im:
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
    # the total loss (first colour) and the validation's second line (second colour) are drawn
    for c in PALETTE[:3]:
        assert (pixels == c).all(axis=1).sum() > 50

    drawn = plot_training(read_metrics(tmp_path / "run"), tmp_path / "again.png")
    it = [r for r in records if "val" not in r]
    iters = np.array([r["iter"] for r in it])
    w = smooth_window(len(it))
    assert w == 2  # 120 iterations / 50
    assert set(drawn["losses"]) == {"loss", "loss_classifier", "loss_box_reg"}  # not time, grad_norm
    for name, s in drawn["losses"].items():
        np.testing.assert_array_equal(s.x, iters)
        np.testing.assert_allclose(s.y, _trailing_mean(np.array([r[name] for r in it]), w), rtol=1e-12)
    np.testing.assert_array_equal(drawn["lr"]["lr"].y, [r["lr"] for r in it])
    val = [r for r in records if "val" in r]
    assert list(drawn["val"]) == ["bbox/AP", "bbox/AP50", "segm/AP", "segm/AP50"]
    for key in drawn["val"]:
        t, k = key.split("/")
        np.testing.assert_array_equal(drawn["val"][key].x, [r["iter"] for r in val])
        np.testing.assert_array_equal(drawn["val"][key].y, [r["val"][t][k] for r in val])
    assert "bbox/APs" not in read_metrics(tmp_path / "run").val  # -1: no ground truth of that size, not a value


def test_smooth_skips_what_is_not_finite():
    y = np.array([1.0, np.nan, 3.0, np.inf, 5.0, 7.0])
    np.testing.assert_allclose(smooth(y, 2), [1.0, 1.0, 3.0, 3.0, 5.0, 6.0])
    np.testing.assert_allclose(smooth(np.array([2.0, 4.0, 6.0]), 10), [2.0, 3.0, 4.0])
    assert np.isnan(smooth(np.array([np.nan, np.nan]), 1)).all()


def test_a_failed_run_and_a_line_being_written(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = _records(40, 100) + [{"iter": 41, "error": "TrainingFailed: loss diverged"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"iter": 42, "lo')  # no newline: being written
    curves = read_metrics(path)
    assert curves.error == (41, "TrainingFailed: loss diverged")
    assert curves.train["loss"].x[-1] == 40 and not curves.val
    r = runner.invoke(app, ["plot", str(path), "--out", str(tmp_path / "c.png")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "c.png").is_file()


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"iter": 1, "loss": 1.0}\n{"iter": 2, "loss": \n{"iter": 3, "loss": 1.0}\n', "metrics.jsonl, line 2: not JSON (Expecting value)"),
        ('{"iter": 1, "loss": 1.0}\n{"iter": 2, "loss": "high"}\n', "metrics.jsonl, line 2: \"loss\" is 'high', not a number"),
        ('{"iter": 1, "loss": 1.0}\n[1, 2]\n', 'metrics.jsonl, line 2: not a record with an integer "iter"'),
        ('{"loss": 1.0}\n', 'metrics.jsonl, line 1: not a record with an integer "iter"'),
        ('{"iter": 1, "val": 0.5}\n', 'metrics.jsonl, line 1: "val" is not an object'),
        ("", "metrics.jsonl: no training iteration recorded (the run was stopped in its first iteration?)"),
        ('{"iter": 1, "error": "RuntimeError: CUDA out of memory"}\n',
         "metrics.jsonl: no training iteration recorded (the run failed at iteration 1: RuntimeError: CUDA out of memory)"),
    ],
)
def test_bad_metrics_named_nothing_written(tmp_path, text, message):
    (tmp_path / "metrics.jsonl").write_text(text)
    r = runner.invoke(app, ["plot", str(tmp_path)])
    assert isinstance(r.exception, ValueError) and str(r.exception) == f"{tmp_path}/{message}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_missing_metrics_one_line(tmp_path):
    def plot(*args):
        r = subprocess.run([sys.executable, "-m", "twopass.pipeline.cli", "plot", *map(str, args)], capture_output=True, text=True)
        assert r.returncode == 2, r.stdout + r.stderr
        return r.stderr.strip()

    assert plot(tmp_path / "nope") == f"twopass: error: {tmp_path / 'nope'}: no such run folder"
    _write(tmp_path / "flow" / "models" / "det-1a2b" / "metrics.jsonl", _records(3))
    assert plot(tmp_path / "flow") == (f"twopass: error: {tmp_path / 'flow'}: no metrics.jsonl; the training runs under it: "
                                       f"{tmp_path / 'flow' / 'models' / 'det-1a2b'}")  # fmt: skip
    run = tmp_path / "flow" / "models" / "det-1a2b"
    assert plot(run, "--out", run / "metrics.jsonl").startswith(f"twopass: error: --out {run / 'metrics.jsonl'} is the input RUN")
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]


def test_tensorboard_hint_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    _write(tmp_path / "metrics.jsonl", _records(3))
    r = runner.invoke(app, ["plot", str(tmp_path), "--tensorboard"])
    assert str(r.exception) == "--tensorboard needs the tensorboard package: pip install 'twopass[tensorboard]'"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    with pytest.raises(ValueError, match=r"pip install 'twopass\[tensorboard\]'"):
        write_tensorboard(read_metrics(tmp_path), tmp_path / "tb")


def test_tensorboard_events_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = _records()
    _write(tmp_path / "metrics.jsonl", records)
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "notes.txt").write_text("mine")
    r = runner.invoke(app, ["plot", str(tmp_path), "--tensorboard"])
    assert "tensorboard" in str(r.exception) and "not TensorBoard events (notes.txt)" in str(r.exception)
    assert not (tmp_path / "curves.png").exists()
    (tmp_path / "tensorboard" / "notes.txt").unlink()
    for _ in range(2):  # a rerun replaces the events: no point twice
        r = runner.invoke(app, ["plot", str(tmp_path), "--tensorboard"])
        assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "tensorboard").iterdir())) == 1
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    it = [r for r in records if "val" not in r]
    val = [r for r in records if "val" in r]
    for tag, rows, get in (("train/loss", it, lambda r: r["loss"]), ("train/lr", it, lambda r: r["lr"]),
                           ("train/grad_norm", it, lambda r: r["grad_norm"]), ("val/segm/AP50", val, lambda r: r["val"]["segm"]["AP50"]),
                           ("val/per_category/bbox/a", val, lambda r: r["val"]["per_category"]["bbox"]["a"])):  # fmt: skip
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [r["iter"] for r in rows]
        np.testing.assert_allclose([e.value for e in events], [get(r) for r in rows], rtol=1e-6)  # stored as float32
    assert "val/bbox/APs" not in acc.Tags()["scalars"]


# --------------------------------------------------------------------------- precision-recall


def _rect(h, w, x1, y1, x2, y2):
    m = np.zeros((h, w), np.uint8)
    m[y1:y2, x1:x2] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode()
    return rle


def _pr_example():
    """3 images of 40 px, categories a and b with ground truth, c without; results that hit,
    miss by a little (IoU between 0.5 and 0.75), and are wrong."""
    S = 40
    images = [{"id": i, "file_name": f"{i}.png", "width": S, "height": S} for i in (1, 2, 3)]
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]
    gt_boxes = [(1, 1, (2, 2, 18, 18)), (1, 2, (20, 20, 36, 38)), (2, 1, (5, 5, 25, 25)), (2, 1, (26, 2, 38, 14)),
                (3, 2, (0, 10, 30, 30)), (3, 1, (30, 30, 40, 40))]  # fmt: skip
    anns = [{"id": k + 1, "image_id": im, "category_id": c, "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
             "iscrowd": 0, "segmentation": _rect(S, S, x1, y1, x2, y2)} for k, (im, c, (x1, y1, x2, y2)) in enumerate(gt_boxes)]  # fmt: skip
    res_boxes = [(1, 1, (2, 2, 18, 18), 0.9), (1, 2, (20, 24, 36, 38), 0.8), (1, 1, (20, 20, 36, 38), 0.7),
                 (2, 1, (5, 5, 22, 25), 0.95), (2, 1, (26, 2, 38, 14), 0.3), (2, 3, (0, 0, 10, 10), 0.6),
                 (3, 2, (0, 14, 26, 30), 0.5), (3, 1, (0, 0, 8, 8), 0.85), (3, 2, (10, 0, 20, 8), 0.4)]  # fmt: skip
    results = [{"image_id": im, "category_id": c, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s,
                "segmentation": _rect(S, S, x1, y1 + (2 if k % 3 == 0 else 0), x2, y2)}
               for k, (im, c, (x1, y1, x2, y2), s) in enumerate(res_boxes)]  # fmt: skip
    return {"images": images, "categories": cats, "annotations": anns}, results


def test_pr_curves_are_cocoevals_precision(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from twopass.pipeline.evaluate import evaluate

    gt, results = _pr_example()
    curves = pr_curves(gt, results)
    metrics = evaluate(gt, results, backend="pycocotools")
    for iou_type in ("bbox", "segm"):
        coco = COCO()
        coco.dataset = json.loads(json.dumps(gt))
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
            dets = coco.loadRes([{k: v for k, v in r.items() if iou_type == "segm" or k != "segmentation"} for r in results])
            ev = COCOeval(coco, dets, iou_type)
            ev.evaluate()
            ev.accumulate()
        prec = ev.eval["precision"][:, :, :, 0, 2]  # [10 IoUs, 101 recalls, 3 categories], all areas, 100 detections
        assert (prec[:, :, 2] == -1).all()  # c: no ground truth, left out of the means
        c = curves[iou_type]
        np.testing.assert_allclose(c.recall, np.linspace(0, 1, 101))
        np.testing.assert_allclose(c.iou50, prec[0, :, :2].mean(axis=1), atol=1e-12)
        np.testing.assert_allclose(c.iou75, prec[5, :, :2].mean(axis=1), atol=1e-12)
        np.testing.assert_allclose(c.mean, prec[:, :, :2].mean(axis=(0, 2)), atol=1e-12)
        # the area under each curve is the AP the report's table shows
        for curve, key in ((c.iou50, "AP50"), (c.iou75, "AP75"), (c.mean, "AP")):
            assert curve.mean() == pytest.approx(metrics[iou_type][key], abs=1e-12)
    assert 0 < curves["bbox"].iou75.mean() < curves["bbox"].iou50.mean() < 1  # the example tells the thresholds apart


def test_report_links_the_pr_curves(tmp_path):
    from twopass.pipeline import report
    from twopass.pipeline.config import PipelineConfig

    gt, results = _pr_example()
    (tmp_path / "ann.json").write_text(json.dumps(gt))
    (tmp_path / "images").mkdir()
    (tmp_path / "instances.json").write_text(json.dumps(results))
    config = PipelineConfig.model_validate({
        "name": "pr", "data": {"images": str(tmp_path / "images"), "ann": str(tmp_path / "ann.json")},
        "detectors": [{"name": "d", "model": "r18_fpn"}], "segmenter": {"model": "r18_lsh_seg"}, "evaluation": {"overlays": 0},
    })  # fmt: skip
    run = tmp_path / "run"
    pictures = report.render_pictures(run, config, None, str(tmp_path / "instances.json"))
    assert pictures == [] and not (run / "pictures").exists()  # overlays: 0
    with Image.open(run / "pr_curves.png") as im:
        assert im.size == (1240, 390)  # two charts: boxes, masks
    md = report.build_report(run, config, None, {}, pictures)
    assert "## Precision-recall curves (final instances)" in md and "![precision-recall curves](pr_curves.png)" in md
    assert "## Pictures" not in md
    inline = report.build_report(run, config, None, {}, pictures, inline_pictures=True)
    assert "![precision-recall curves](data:image/jpeg;base64," in inline
    # evaluation off: no curves, and the earlier run's are not shown as this run's
    off = config.model_copy(update={"evaluation": config.evaluation.model_copy(update={"enabled": False})})
    assert report.render_pictures(run, off, None, str(tmp_path / "instances.json")) == []
    assert not (run / "pr_curves.png").exists()
    assert "Precision-recall" not in report.build_report(run, off, None, {}, [])
