"""Devices (pipeline/devices.py): cpu, cuda, cuda:N and mps wherever a device is named, and a
device this machine lacks refused on one line naming the option and the reason, before
anything is written."""

from __future__ import annotations

import sys

import pytest
import torch

from twopass.pipeline import cli as pcli
from twopass.pipeline.config import PipelineConfigError, pipeline_config_from_dict
from twopass.pipeline.devices import DeviceError, check_device, check_device_syntax

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA GPUs")
no_mps = pytest.mark.skipif(torch.backends.mps.is_available(), reason="a machine without MPS")


def run_main(monkeypatch, capsys, *args) -> tuple[int, str]:
    """`twopass ARGS` in this process: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["twopass", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        pcli.main()
    return e.value.code, capsys.readouterr().err


def test_cpu_is_a_device_everywhere():
    assert check_device("cpu") == torch.device("cpu")
    for name in ("cpu", "cuda", "cuda:0", "cuda:12", "mps"):
        assert check_device_syntax(name) == name


@pytest.mark.parametrize("name", ["gpu", "tpu", "CPU", "cuda:", "cuda:01", "cuda:-1", "cuda:x", "mps:0", "", "cpu "])
def test_unknown_device_names_are_refused(name):
    with pytest.raises(DeviceError) as e:
        check_device(name, "--device")
    assert str(e.value) == f"--device {name!r}: unknown device; expected cpu, cuda, cuda:N (a GPU index) or mps"


@no_cuda
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_gpu_is_refused(name):
    with pytest.raises(DeviceError, match=rf"^--device {name}: torch (sees no CUDA GPU here|was built without CUDA) "
                                          r"\(torch.cuda.is_available\(\) is False\); use cpu$"):  # fmt: skip
        check_device(name)


def test_a_gpu_index_past_the_last_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert check_device("cuda") == torch.device("cuda") and check_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(DeviceError, match=r"^--device cuda:3: torch sees 1 CUDA GPU here \(cuda:0\)$"):
        check_device("cuda:3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(DeviceError, match=r"^model\.device cuda:2: torch sees 2 CUDA GPUs here \(cuda:0 to cuda:1\)$"):
        check_device("cuda:2", "model.device")


def test_under_torchrun_each_process_takes_its_own_gpu(monkeypatch):
    from twopass.detector.train import check_train_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert check_train_device("cuda") == torch.device("cuda") and check_train_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match=r"^--device cuda:1: under torchrun \(2 processes\) give cpu or cuda "
                                          r"\(each process takes cuda:LOCAL_RANK\)$"):  # fmt: skip
        check_train_device("cuda:1")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert check_train_device("cuda:1") == torch.device("cuda", 1)


@no_mps
def test_mps_where_torch_has_none_is_refused():
    with pytest.raises(DeviceError, match=r"^--device mps: .*\(torch.backends.mps.is_available\(\) is False\); use cpu$"):
        check_device("mps")


def test_the_pipeline_config_checks_the_device_syntax():
    base = {"data": {"images": "x"}, "detectors": [{"name": "a", "model": "m"}], "segmenter": {"model": "s"}}
    # the syntax only: a config may name the GPU of the machine it will run on
    for name in ("cpu", "cuda", "cuda:1", "mps"):
        assert pipeline_config_from_dict({**base, "device": name}).device == name
    for name in ("gpu", "cuda:01", "cuda 0"):
        with pytest.raises(PipelineConfigError, match=r"^pipe\.yaml: field 'device': String should match pattern"):
            pipeline_config_from_dict({**base, "device": name}, "pipe.yaml")


@no_cuda
@no_mps
def test_commands_refuse_a_missing_device_before_writing(monkeypatch, capsys, synth_small, ckpts, tmp_path):
    images, ann = synth_small / "images", synth_small / "annotations.json"
    boxes = tmp_path / "boxes.json"
    boxes.write_text("[]")
    out = tmp_path / "out"
    cases = [
        (["detect", "--checkpoint", ckpts["a"], "--images", images, "--ann", ann, "--out", out / "d.parquet"], "cuda:0"),
        (["detect", "--checkpoint", ckpts["a"], "--images", images, "--out", out / "d.parquet"], "gpu"),
        (["segment", "--checkpoint", ckpts["seg"], "--detections", boxes, "--images", images, "--out", out / "i.parquet"], "mps"),
        (["train-detector", "--config", "r18_fpn_cpu", "--train-ann", ann, "--train-images", images, "--out", out / "run",
          "--iters", "1", "--no-progress"], "cuda:1"),
    ]  # fmt: skip
    for args, device in cases:
        code, err = run_main(monkeypatch, capsys, *args, "--device", device)
        assert code == 2 and err.count("\n") == 1, (args, err)
        reason = "unknown device" if device == "gpu" else f"is_available() is False); use cpu"
        assert err.startswith(f"twopass: error: --device {device!r}: " if device == "gpu" else f"twopass: error: --device {device}: ")
        assert reason in err, err
        assert not out.exists(), args


@no_cuda
def test_flow_commands_refuse_a_missing_device_before_writing(monkeypatch, capsys, tmp_path):
    import yaml

    config = tmp_path / "pipe.yaml"
    config.write_text(yaml.safe_dump({"data": {"images": "images"}, "detectors": [{"name": "a", "model": "r18_fpn_cpu"}],
                                      "segmenter": {"model": "r18_cpu_seg"}, "device": "cuda:0"}))  # fmt: skip
    out = tmp_path / "run"
    for command in (["flow", "run"], ["flow", "train"], ["flow", "detect"]):
        code, err = run_main(monkeypatch, capsys, *command, "--config", config, "--out", out)
        assert code == 2 and err.startswith(f"twopass: error: {config}: device cuda:0: ") and err.count("\n") == 1, err
        assert not out.exists()  # no OUT/prefect/ either
