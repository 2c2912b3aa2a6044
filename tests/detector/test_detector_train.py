"""Training engine: overfitting, exact resume, schedule, checkpoints and their errors, CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from twopass.detector.api import DETECTOR
from twopass.detector.checkpoint import CheckpointError, read_meta, save_checkpoint
from twopass.detector.config import ModelConfig, TrainConfig
from twopass.detector.hooks import HookBase
from twopass.detector.infer import make_validator
from twopass.detector.model import build_detector
from twopass.detector.train import TrainOptions, effective_lr, lr_at, train
from twopass.pipeline.categories import Categories
from twopass.pipeline.coco import CocoDataset


TINY_YAML = """\
name: tiny
backbone: {name: resnet18, fpn_channels: 16, trainable_stages: 5}
norm: {backbone: bn}
rpn: {pre_nms_top_n_train: 64, post_nms_top_n_train: 32, batch_size_per_image: 32}
box_head: {type: location_sensitive, fc_dim: 32, kernel_size: 3, mid_channels: 8, alpha: 2, batch_size_per_image: 16}
input: {train_sizes: [64], test_size: 64, max_size: 96}
train: {warmup_iters: 2, clip_grad_norm: 5.0}
"""


def tiny_config(**box) -> ModelConfig:
    return ModelConfig.model_validate(
        dict(
            name="tiny",
            backbone=dict(name="resnet18", fpn_channels=16, trainable_stages=5),
            norm=dict(backbone="bn"),
            rpn=dict(pre_nms_top_n_train=64, post_nms_top_n_train=32, batch_size_per_image=32),
            box_head=dict(type="location_sensitive", fc_dim=32, kernel_size=3, mid_channels=8, alpha=2, batch_size_per_image=16, **box),
            mask_head=dict(enabled=True, conv_dim=8, num_convs=1, max_positives_per_image=3),
            input=dict(train_sizes=[48, 64, 80], test_size=64, max_size=96),
            train=dict(warmup_iters=2, steps=[0.5], clip_grad_norm=5.0),
        )
    )


@pytest.fixture(scope="module")
def dataset(synth_small):
    return CocoDataset(synth_small / "annotations.json", synth_small / "images", with_masks=True)


def _run(cfg, dataset, out, iters=6, **kw):
    torch.manual_seed(0)
    model = build_detector(cfg, dataset.categories.num_classes)
    opts = TrainOptions(out=out, iters=iters, batch=2, progress=False, checkpoint_every=2, **kw)
    return train(model, dataset, opts, cfg.train, kind="detector", config=cfg.to_dict(), categories=dataset.categories)


@pytest.mark.slow  # 100 s of the default suite; `make test-slow` and the demo check that models learn
def test_overfits_eight_images(synth_small):
    """A small LSD detector learns 8 synthetic 128 px images: loss falls by far more than half
    and AP50 on those images reaches 0.9."""
    cfg = ModelConfig.model_validate(
        dict(
            name="overfit",
            backbone=dict(name="resnet18", fpn_channels=32, trainable_stages=5),
            norm=dict(backbone="bn"),
            rpn=dict(anchors=dict(sizes=[8, 16, 32, 64, 128]), pre_nms_top_n_train=300, post_nms_top_n_train=150,
                     pre_nms_top_n_test=300, post_nms_top_n_test=150, batch_size_per_image=64),
            box_head=dict(type="location_sensitive", fc_dim=128, kernel_size=5, mid_channels=16, alpha=4,
                          batch_size_per_image=64, positive_fraction=0.5),
            input=dict(train_sizes=[128], test_size=128, max_size=128),
            train=dict(base_lr=0.02, base_batch=8, warmup_iters=20, steps=[0.8], hflip_prob=0.0, clip_grad_norm=5.0),
        )
    )
    ds = CocoDataset(synth_small / "annotations.json", synth_small / "images", with_masks=False)
    torch.manual_seed(0)
    model = build_detector(cfg, ds.categories.num_classes)
    validate = make_validator(synth_small / "annotations.json", synth_small / "images", ds.categories, batch=8)
    opts = TrainOptions(out=synth_small.parent / "overfit_run", iters=100, batch=8, progress=False, checkpoint_every=1000)
    result = train(model, ds, opts, cfg.train, kind="detector", config=cfg.to_dict(), categories=ds.categories, validate=validate)
    losses = [h["loss"] for h in result.history]
    first, last = sum(losses[:3]) / 3, sum(losses[-10:]) / 10
    assert last < 0.35 * first, (first, last)
    assert result.val["bbox"]["AP50"] >= 0.9, result.val["bbox"]


def test_resume_equals_uninterrupted(dataset, tmp_path):
    """Stopped after iteration 5 (last checkpoint at 4) and resumed: the same weights, bit for
    bit, as 6 iterations in one go (cascade, mask head, multi-scale training, flips included)."""
    cfg = tiny_config(cascade_stages=3)
    a = _run(cfg, dataset, tmp_path / "a")
    b1 = _run(cfg, dataset, tmp_path / "b", stop_at=5)
    assert b1.iteration == 5 and read_meta(tmp_path / "b").iteration == 4
    b2 = _run(cfg, dataset, tmp_path / "b", resume=True)
    assert a.iteration == b2.iteration == 6 and len(b2.history) == 2
    wa = load_file(str(tmp_path / "a/checkpoints/iter_0000006.safetensors"))
    wb = load_file(str(tmp_path / "b/checkpoints/iter_0000006.safetensors"))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    oa = load_file(str(tmp_path / "a/checkpoints/iter_0000006.optim.safetensors"))
    ob = load_file(str(tmp_path / "b/checkpoints/iter_0000006.optim.safetensors"))
    assert all(torch.equal(oa[k], ob[k]) for k in oa)
    # The JSONL holds each iteration once: the lost iteration 5 was replaced, not duplicated.
    lines = [json.loads(l) for l in (tmp_path / "b/metrics.jsonl").read_text().splitlines()]
    assert [l["iter"] for l in lines] == [1, 2, 3, 4, 5, 6]
    assert lines[4]["loss"] == pytest.approx([h for h in a.history if h["iter"] == 5][0]["loss"])
    # Training further than the run's end needs a larger --iters.
    with pytest.raises(ValueError, match="already trained"):
        _run(cfg, dataset, tmp_path / "b", resume=True)


def test_resume_with_adamw_equals_uninterrupted(dataset, tmp_path):
    cfg = tiny_config()
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"optimizer": "adamw", "base_lr": 0.002})})
    a = _run(cfg, dataset, tmp_path / "a", iters=4)
    _run(cfg, dataset, tmp_path / "b", iters=4, stop_at=3)
    _run(cfg, dataset, tmp_path / "b", iters=4, resume=True)
    wa = load_file(str(tmp_path / "a/checkpoints/iter_0000004.safetensors"))
    wb = load_file(str(tmp_path / "b/checkpoints/iter_0000004.safetensors"))
    assert a.iteration == 4 and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_without_checkpoint_starts_fresh_and_damage_is_an_error(dataset, tmp_path):
    cfg = tiny_config()
    r = _run(cfg, dataset, tmp_path / "fresh", iters=2, resume=True)  # nothing saved yet
    assert r.iteration == 2 and len(r.history) == 2
    (tmp_path / "fresh" / "checkpoints" / "iter_0000002.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="iter_0000002.json"):
        _run(cfg, dataset, tmp_path / "fresh", iters=4, resume=True)


def test_lr_schedule_scales_warms_and_decays():
    cfg = TrainConfig(base_lr=0.02, base_batch=16, warmup_iters=10, warmup_factor=0.001, steps=[0.5, 0.75], gamma=0.1)
    peak = effective_lr(None, cfg, total_batch=4)
    assert peak == pytest.approx(0.005)
    assert effective_lr(0.04, cfg, total_batch=32) == pytest.approx(0.08)
    assert lr_at(0, 100, peak, cfg) == pytest.approx(peak * 0.001)
    assert lr_at(5, 100, peak, cfg) == pytest.approx(peak * (0.001 * 0.5 + 0.5))
    assert lr_at(10, 100, peak, cfg) == pytest.approx(peak)
    assert lr_at(49, 100, peak, cfg) == pytest.approx(peak)
    assert lr_at(50, 100, peak, cfg) == pytest.approx(peak * 0.1)
    assert lr_at(80, 100, peak, cfg) == pytest.approx(peak * 0.01)


def test_checkpoint_round_trip_and_errors(tmp_path):
    cfg = tiny_config()
    cats = Categories((3, 7), ("a", "b"))
    torch.manual_seed(0)
    model = build_detector(cfg, 2)
    path = save_checkpoint(tmp_path / "run", model, kind="detector", config=cfg.to_dict(), categories=cats, iteration=3)
    for ref in (tmp_path / "run", path, path.with_suffix(".safetensors")):
        loaded, meta = DETECTOR.load(ref)
        assert meta.iteration == 3 and meta.categories == cats and not loaded.training
        for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert k == k2 and torch.equal(v, v2)
    with pytest.raises(CheckpointError, match="no checkpoint in this folder"):
        DETECTOR.load(tmp_path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        DETECTOR.load(tmp_path / "nope.json")
    # A truncated weights file
    weights = path.with_suffix(".safetensors")
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match=r"iter_0000003.safetensors: not a readable safetensors"):
        DETECTOR.load(path)
    weights.write_bytes(blob)
    # Weights of another architecture
    meta = json.loads(path.read_text())
    meta["config"]["box_head"]["fc_dim"] = 64
    path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not fit the model.*box_heads"):
        DETECTOR.load(path)
    # A config that no longer validates, a JSON that is not a checkpoint, a wrong kind
    meta["config"]["box_head"]["type"] = "nonsense"
    path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"box_head\.type"):
        DETECTOR.load(path)
    path.write_text(json.dumps({"hello": 1}))
    with pytest.raises(CheckpointError, match="not a twopass checkpoint"):
        DETECTOR.load(path)
    path.write_text("{broken")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        DETECTOR.load(path)
    meta["config"]["box_head"]["type"] = "two_fc"
    meta["kind"] = "segmenter"
    path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="expected 'detector'"):
        DETECTOR.load(path)


def test_category_mismatch_is_a_clear_error(dataset, tmp_path):
    cfg = tiny_config()
    other = Categories((1, 2), ("ellipse", "rectangle"))
    model = build_detector(cfg, 2)
    with pytest.raises(ValueError, match="training set .*category list does not match"):
        train(model, dataset, TrainOptions(out=tmp_path, iters=1, progress=False), cfg.train, kind="detector", config=cfg.to_dict(), categories=other)
    _run(cfg, dataset, tmp_path / "r", iters=2)
    model = build_detector(cfg, 2)
    # Resuming a run with a dataset of other categories
    meta = read_meta(tmp_path / "r")
    blob = json.loads(meta.path.read_text())
    blob["categories"] = other.to_coco()
    meta.path.write_text(json.dumps(blob))
    with pytest.raises(ValueError, match="resume from .*category list does not match"):
        _run(cfg, dataset, tmp_path / "r", iters=4, resume=True)


runner = CliRunner()


def test_cli_train_detect_and_user_errors(synth_small, tmp_path):
    from twopass.pipeline.cli import app

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY_YAML)
    ann, images, run = synth_small / "annotations.json", synth_small / "images", tmp_path / "run"
    r = runner.invoke(app, ["train-detector", "--config", str(cfg), "--train-ann", str(ann), "--train-images", str(images),
                            "--out", str(run), "--iters", "3", "--batch", "2", "--checkpoint-every", "2", "--no-progress",
                            "--val-ann", str(ann), "--val-images", str(images)])
    assert r.exit_code == 0, r.output
    assert (run / "checkpoints" / "iter_0000002.json").is_file() and (run / "checkpoints" / "iter_0000003.json").is_file()
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["iter"] for x in records if "loss" in x] == [1, 2, 3]
    assert "bbox" in records[-1]["val"]
    out = tmp_path / "det.parquet"
    r = runner.invoke(app, ["detect", "--checkpoint", str(run), "--images", str(images), "--ann", str(ann), "--out", str(out),
                            "--tta-scales", "48,64", "--tta-flip", "--max-per-image", "20"])
    assert r.exit_code == 0, r.output
    from twopass.pipeline.tables import read_table

    table, meta = read_table(out, "detections")
    assert set(table.column("source").to_pylist()) == {"tiny@48", "tiny@48+flip", "tiny@64", "tiny@64+flip"}
    assert set(table.column("category_id").to_pylist()) <= set(meta.categories.ids)
    assert table.column("x2").to_numpy().max() <= 128 and table.column("y1").to_numpy().min() >= 0
    assert meta.extra["views"] == ["tiny@48", "tiny@48+flip", "tiny@64", "tiny@64+flip"]

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "twopass.pipeline.cli", *args], capture_output=True, text=True)

    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY_YAML.replace("location_sensitive", "lsd"))
    p = cli("train-detector", "--config", str(bad), "--train-ann", str(ann), "--train-images", str(images), "--out", str(tmp_path / "x"))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "bad.yaml" in p.stderr and "box_head.type" in p.stderr
    p = cli("detect", "--checkpoint", str(tmp_path / "missing"), "--images", str(images), "--out", str(tmp_path / "y.parquet"))
    assert p.returncode == 2 and "missing" in p.stderr and "Traceback" not in p.stderr
    other = json.loads(ann.read_text())
    other["categories"] = other["categories"][:-1] + [{"id": 99, "name": "blob"}]
    other["annotations"] = [a for a in other["annotations"] if a["category_id"] != 8]
    (tmp_path / "other.json").write_text(json.dumps(other))
    p = cli("detect", "--checkpoint", str(run), "--images", str(images), "--ann", str(tmp_path / "other.json"), "--out", str(tmp_path / "z.parquet"))
    assert p.returncode == 2 and "category list does not match" in p.stderr and "Traceback" not in p.stderr
    p = cli("detect", "--checkpoint", str(run), "--images", str(images), "--out", str(tmp_path / "z.parquet"), "--tta-scales", "a,b")
    assert p.returncode == 2 and "--tta-scales" in p.stderr


class _Quadratic(torch.nn.Module):
    """loss = w^2 on any batch: plain SGD at lr 1.15 overshoots, multiplying the loss by 1.69 an
    iteration (finite for hundreds of iterations); `nan` makes the loss NaN from `nan` on."""

    def __init__(self, nan: int | None = None):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.nan, self.calls = nan, 0

    def forward(self, images, targets):
        self.calls += 1
        loss = (self.w**2).sum()
        return {"loss_w": loss * float("nan") if self.nan is not None and self.calls >= self.nan else loss}


def _train_quadratic(out, model, iters=100):
    cfg = TrainConfig(base_lr=1.15, base_batch=1, momentum=0.0, weight_decay=0.0, warmup_iters=0, hflip_prob=0.0)
    data = [(torch.zeros(3, 4, 4), {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)})] * 2
    opts = TrainOptions(out=out, iters=iters, batch=1, progress=False, checkpoint_every=1000)
    return train(model, data, opts, cfg, kind="detector", config={}, categories=Categories((1,), ("x",)))


def test_a_diverging_loss_stops_training_and_is_recorded(tmp_path, capsys):
    from twopass.detector.api import claim_run_folder, failed_before_checkpoint
    from twopass.detector.train import DIVERGE_WINDOW, TrainingFailed, diverged

    assert diverged([1.0] * 100) is None and diverged([1.0] * 38 + [1e9]) is None  # too few to judge
    assert "above 100x the mean 1" in diverged([1.0] * 20 + [1e3] * 20)
    with pytest.raises(TrainingFailed) as e:
        _train_quadratic(tmp_path / "run", _Quadratic())
    assert isinstance(e.value, FloatingPointError) and isinstance(e.value, ValueError)  # the CLI: one line; flows: no retry
    assert str(e.value).startswith(f"{tmp_path / 'run'}: iteration {2 * DIVERGE_WINDOW}: loss diverged: mean ")
    assert "lower --lr" in str(e.value) and "\n" not in str(e.value)
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 * DIVERGE_WINDOW + 1 and records[-1]["error"].startswith("TrainingFailed: ")
    assert not (tmp_path / "run" / "checkpoints").exists()
    # the same command again: the failed run is replaced, saying what is removed
    assert "failed at iteration 41 before saving a checkpoint" in failed_before_checkpoint(tmp_path / "run")
    claim_run_folder(tmp_path / "run", resume=False, overwrite=False)
    assert "removing its metrics.jsonl and starting again" in capsys.readouterr().out
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_non_finite_loss_is_recorded_and_a_run_that_saved_nothing_restarts(tmp_path):
    from twopass.detector.api import claim_run_folder, failed_before_checkpoint
    from twopass.detector.train import TrainingFailed
    from twopass.pipeline.fileio import OutputError

    with pytest.raises(TrainingFailed, match=r"iteration 3: loss is nan"):
        _train_quadratic(tmp_path / "run", _Quadratic(nan=3))
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["iter"] == 3
    assert "failed at iteration 3" in failed_before_checkpoint(tmp_path / "run")
    empty = tmp_path / "empty"  # killed in its first iteration: an empty metrics.jsonl, nothing saved
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    assert failed_before_checkpoint(empty) == "stopped before its first iteration"
    alive = tmp_path / "alive"  # iterations recorded, no error: may still be running, never replaced
    alive.mkdir()
    (alive / "metrics.jsonl").write_text('{"iter": 1, "loss": 2.0}\n')
    assert failed_before_checkpoint(alive) is None
    (tmp_path / "run" / "checkpoints").mkdir()
    (tmp_path / "run" / "checkpoints" / "mine.txt").write_text("not the engine's")  # a file not ours: never removed
    assert failed_before_checkpoint(tmp_path / "run") is None
    for folder in (alive, tmp_path / "run"):
        with pytest.raises(OutputError, match="holds another run"):
            claim_run_folder(folder, resume=False, overwrite=False)
    assert (tmp_path / "run" / "checkpoints" / "mine.txt").is_file()


class _Recorder(HookBase):
    """A user hook that records each call with what the trainer shows it then."""

    def __init__(self, run, stop_after=None, fail_after=None):
        self.run, self.stop_after, self.fail_after, self.calls = run, stop_after, fail_after, []

    def before_train(self):
        self.calls.append(("before_train", self.trainer.iter))

    def before_step(self):
        self.calls.append(("before_step", self.trainer.iter, self.trainer.optimizer.param_groups[0]["lr"]))

    def after_step(self):
        t = self.trainer
        saved = (self.run / "checkpoints" / f"iter_{t.iter:07d}.json").is_file()
        self.calls.append(("after_step", t.iter, t.record["iter"], t.record["loss"], saved, t.last))
        if t.iter == self.fail_after:
            raise RuntimeError("boom")
        if t.iter == self.stop_after:
            t.stop()

    def after_train(self):
        self.calls.append(("after_train", self.trainer.iter, repr(self.trainer.error)))


def _run_hooked(cfg, dataset, out, hook, iters=3, **kw):
    hook = _Recorder(out, **hook)
    wsum = lambda m: {"wsum": float(sum(p.detach().double().sum() for p in m.parameters()))}  # noqa: E731
    torch.manual_seed(0)
    model = build_detector(cfg, dataset.categories.num_classes)
    opts = TrainOptions(out=out, iters=iters, batch=2, progress=False, **kw)
    try:
        result = train(model, dataset, opts, cfg.train, kind="detector", config=cfg.to_dict(), categories=dataset.categories,
                       validate=wsum, hooks=[hook])  # fmt: skip
    except RuntimeError as e:
        result = e
    return result, hook.calls


def test_a_user_hook_is_called_in_order_after_the_default_hooks(dataset, tmp_path):
    """before_train, then before_step / after_step per iteration, then after_train: the LR is set
    when before_step runs, the record and the checkpoint of the iteration exist when after_step
    runs, `last` marks the final iteration, and after_train sees no error."""
    cfg = tiny_config()
    result, calls = _run_hooked(cfg, dataset, tmp_path / "run", {}, iters=3, checkpoint_every=2)
    peak = effective_lr(None, cfg.train, 2)
    losses = [h["loss"] for h in result.history]
    assert calls == [
        ("before_train", 0),
        ("before_step", 0, lr_at(0, 3, peak, cfg.train)), ("after_step", 1, 1, losses[0], False, False),
        ("before_step", 1, lr_at(1, 3, peak, cfg.train)), ("after_step", 2, 2, losses[1], True, False),
        ("before_step", 2, lr_at(2, 3, peak, cfg.train)), ("after_step", 3, 3, losses[2], True, True),
        ("after_train", 3, "None"),
    ]  # fmt: skip


def test_a_hook_that_stops_early_gets_that_iteration_saved_and_validated(dataset, tmp_path):
    """stop() after iteration 2 of 6: training ends there, iteration 2 is checkpointed and
    validated, and its weights are those an uninterrupted 6-iteration run saves at 2."""
    cfg = tiny_config()
    result, calls = _run_hooked(cfg, dataset, tmp_path / "stopped", {"stop_after": 2}, iters=6, checkpoint_every=100)
    assert result.iteration == 2 and result.checkpoint.name == "iter_0000002.json"
    assert [c[0] for c in calls] == ["before_train", "before_step", "after_step", "before_step", "after_step", "after_train"]
    records = [json.loads(l) for l in (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [1, 2, 2] and records[-1]["val"] == result.val
    whole, _ = _run_hooked(cfg, dataset, tmp_path / "whole", {}, iters=6, checkpoint_every=2)
    wa = load_file(str(tmp_path / "stopped/checkpoints/iter_0000002.safetensors"))
    wb = load_file(str(tmp_path / "whole/checkpoints/iter_0000002.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_failing_hook_is_recorded_and_every_hook_sees_the_error(dataset, tmp_path):
    error, calls = _run_hooked(tiny_config(), dataset, tmp_path / "run", {"fail_after": 1}, iters=3, checkpoint_every=100)
    assert str(error) == "boom" and calls[-1] == ("after_train", 1, "RuntimeError('boom')")
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last == {"iter": 2, "error": "RuntimeError: boom"}
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_default_hooks_train_as_the_plain_loop_does(dataset, tmp_path):
    """`train` with its default hooks against the loop written out by hand (seeded per iteration,
    LR schedule, clipping, SGD): the same losses, LRs and final weights, bit for bit."""
    from twopass.detector.data import IterationBatches, mix_seed
    from twopass.detector.train import make_optimizer, param_groups, seed_everything

    cfg = tiny_config(cascade_stages=3)
    t = cfg.train
    result = _run(cfg, dataset, tmp_path / "run", iters=4)
    torch.manual_seed(0)
    model = build_detector(cfg, dataset.categories.num_classes).train()
    peak = effective_lr(None, t, 2)
    opt = make_optimizer(param_groups(model, t.weight_decay), peak, t)
    params = [p for g in opt.param_groups for p in g["params"]]
    batches = IterationBatches(dataset, 2, 0, 4, t.seed, t.hflip_prob)
    want = []
    for i in range(4):
        seed_everything(mix_seed(t.seed, i, 0, 2))
        for g in opt.param_groups:
            g["lr"] = lr_at(i, 4, peak, t)
        total = sum(model(*batches[i]).values())
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, t.clip_grad_norm)
        opt.step()
        want.append((i + 1, lr_at(i, 4, peak, t), float(total.detach())))
    assert [(h["iter"], h["lr"], h["loss"]) for h in result.history] == want
    saved = load_file(str(tmp_path / "run/checkpoints/iter_0000004.safetensors"))
    assert saved.keys() == model.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
