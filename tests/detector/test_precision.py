"""Mixed precision (pipeline/precision.py): what each device refuses, bf16 training on a CPU with
float32 checkpoints, and bf16 inference close to fp32 with float32 outputs."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file
from torchvision.ops import ps_roi_align
from typer.testing import CliRunner

from twopass.detector.api import DETECTOR, detect_images, load_for_inference, views_of
from twopass.detector.checkpoint import read_meta
from twopass.detector.heads import LevelPooler
from twopass.detector.model import build_detector
from twopass.detector.train import TrainOptions, train
from twopass.pipeline import precision as prec
from twopass.pipeline.coco import CocoDataset, ImageSet
from twopass.pipeline.settings import DetectSettings
from twopass.segmenter.infer import mask_probs

from test_detector_train import tiny_config  # noqa: E402 (this folder is on sys.path under pytest)


@pytest.fixture
def native_bf16(monkeypatch):
    """Pretend the CPU computes bfloat16 natively (so no warning), whatever this one does."""
    monkeypatch.setattr(prec, "cpu_bf16_native", lambda: True)


def test_refused_precisions_name_the_option_and_the_device():
    with pytest.raises(ValueError, match=r"--precision: expected one of fp32, bf16, fp16, got 'half'"):
        prec.check_precision("half", "cpu")
    with pytest.raises(ValueError, match=r"--precision fp16: needs a CUDA device \(device is cpu\); on a CPU use bf16"):
        prec.check_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="train.precision"):
        prec.check_precision("fp64", "cpu", what="train.precision")


def test_bf16_on_a_cpu_without_native_bf16_warns_naming_the_lack(monkeypatch):
    monkeypatch.setattr(prec, "cpu_bf16_native", lambda: False)
    with pytest.warns(RuntimeWarning, match="has no native bfloat16 .*emulated and slower than fp32"):
        prec.check_precision("bf16", "cpu")
    monkeypatch.setattr(prec, "cpu_bf16_native", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prec.check_precision("bf16", "cpu")
        prec.check_precision("fp32", "cpu")


def test_cpu_bf16_native_reads_the_cpu_flags(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags : fpu sse avx512f avx512_bf16 amx_tile\n")
    monkeypatch.setattr(prec, "Path", lambda p: info if p == "/proc/cpuinfo" else prec.Path(p))
    prec.cpu_bf16_native.cache_clear()
    try:
        assert prec.cpu_bf16_native()
        info.write_text("processor : 0\nflags : fpu sse avx512f avx512_vnni\n")
        prec.cpu_bf16_native.cache_clear()
        assert not prec.cpu_bf16_native() or prec.platform.system() == "Darwin"
    finally:
        prec.cpu_bf16_native.cache_clear()


def test_ps_roi_align_under_autocast_pools_the_float32_map():
    """torchvision has no bfloat16 CPU kernel for ps_roi_align: the pooler casts back, and gives
    what float32 pooling of the same (bf16-rounded) map gives."""
    torch.manual_seed(0)
    pooler = LevelPooler([2], 3, 2, ps_roi_align)
    feat = torch.randn(1, 18, 16, 16).bfloat16()
    boxes = [torch.tensor([[4.0, 4.0, 40.0, 36.0], [0.0, 8.0, 20.0, 60.0]])]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = pooler([feat], boxes)
    want = pooler([feat.float()], boxes)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


def test_bf16_training_keeps_float32_weights_and_records_its_precision(synth_small, tmp_path, native_bf16):
    cfg = tiny_config()
    dataset = CocoDataset(synth_small / "annotations.json", synth_small / "images", with_masks=True)
    losses = {}
    for p in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = build_detector(cfg, dataset.categories.num_classes)
        opts = TrainOptions(out=tmp_path / p, iters=2, batch=2, progress=False, checkpoint_every=2, precision=p)
        result = train(model, dataset, opts, cfg.train, kind="detector", config=cfg.to_dict(), categories=dataset.categories)
        losses[p] = result.history[0]["loss"]
        meta = read_meta(result.checkpoint)
        assert meta.extra["precision"] == p
        weights = load_file(str(meta.path.with_suffix(".safetensors")))
        assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float32}
    # the same first batch and weights: bf16 autocast changes the loss a little, not a lot
    assert losses["bf16"] != losses["fp32"]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)


def test_config_precision_is_used_and_the_option_overrides_it(synth_small, tmp_path):
    cfg = tiny_config()
    cfg.train.precision = "fp16"  # refused on a CPU: proves the config's value is read
    dataset = CocoDataset(synth_small / "annotations.json", synth_small / "images", with_masks=True)
    model = build_detector(cfg, dataset.categories.num_classes)
    opts = TrainOptions(out=tmp_path / "a", iters=1, batch=2, progress=False)
    with pytest.raises(ValueError, match="fp16: needs a CUDA device"):
        train(model, dataset, opts, cfg.train, kind="detector", config=cfg.to_dict(), categories=dataset.categories)
    assert not (tmp_path / "a").exists()  # refused before anything was written
    opts = TrainOptions(out=tmp_path / "b", iters=1, batch=2, progress=False, precision="fp32")
    assert train(model, dataset, opts, cfg.train, kind="detector", config=cfg.to_dict(), categories=dataset.categories).iteration == 1


@pytest.fixture(scope="module")
def trained(synth_small, tmp_path_factory):
    """A tiny detector with a mask head after a few fp32 iterations (scores above noise)."""
    cfg = tiny_config()
    dataset = CocoDataset(synth_small / "annotations.json", synth_small / "images", with_masks=True)
    torch.manual_seed(0)
    model = build_detector(cfg, dataset.categories.num_classes)
    out = tmp_path_factory.mktemp("prec_run")
    opts = TrainOptions(out=out, iters=4, batch=2, progress=False, checkpoint_every=4)
    return train(model, dataset, opts, cfg.train, kind="detector", config=cfg.to_dict(), categories=dataset.categories).checkpoint


def test_bf16_inference_is_close_to_fp32_and_float32(trained, synth_small, native_bf16):
    loaded = load_for_inference(DETECTOR, trained)
    image_set = ImageSet.open(synth_small / "images", ann=synth_small / "annotations.json")
    ids = image_set.image_ids[:3]
    views = views_of(trained, None, False)
    tables = {p: detect_images(loaded, image_set, views, DetectSettings(precision=p), image_ids=ids)[0] for p in ("fp32", "bf16")}
    assert tables["bf16"].schema == tables["fp32"].schema
    top = {p: sorted(t.column("score").to_pylist(), reverse=True)[:10] for p, t in tables.items()}
    assert top["bf16"] == pytest.approx(top["fp32"], abs=0.02)
    # given-box masks (pass two): float32 probabilities within a bf16 rounding of fp32's
    model = loaded.model
    image = image_set.read(ids[0]).float() / 255
    boxes = torch.tensor([[4.0, 4.0, 40.0, 36.0], [10.0, 20.0, 60.0, 60.0]])
    labels = torch.tensor([1, 2])
    p32 = mask_probs(model, image, boxes, labels, views, "fp32")
    p16 = mask_probs(model, image, boxes, labels, views, "bf16")
    assert p16.dtype == torch.float32
    assert (p16 - p32).abs().max() < 0.05


def test_detect_and_segment_commands_refuse_fp16_on_cpu(trained, synth_small, tmp_path):
    from twopass.pipeline.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["detect", "--checkpoint", str(trained), "--images", str(synth_small / "images"),
                            "--ann", str(synth_small / "annotations.json"), "--out", str(tmp_path / "d.parquet"), "--precision", "fp16"])  # fmt: skip
    assert r.exit_code != 0 and "fp16: needs a CUDA device" in str(r.exception or r.output)
    assert not (tmp_path / "d.parquet").exists()
    r = runner.invoke(app, ["detect", "--checkpoint", str(trained), "--images", str(synth_small / "images"),
                            "--ann", str(synth_small / "annotations.json"), "--out", str(tmp_path / "d.parquet"), "--precision", "fp8"])  # fmt: skip
    assert r.exit_code != 0 and "precision" in str(r.exception or r.output)
