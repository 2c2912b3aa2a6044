"""Pass one's front doors: train a model, load one for inference, detect on a set of images.

The CLI (`twopass train-detector`, `train-segmenter`, `detect`), the run-folder stages
(`detector.stage`) and the benchmarks call these and nothing below them, so a setting means
the same everywhere. Both model kinds train on one engine (`detector.train`); a `ModelKind`
record says how to configure, build and load each (the segmenter's is `segmenter.api.SEGMENTER`;
`segmenter.api.KINDS` maps both by name).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from twopass.pipeline.coco import CocoDataset
from twopass.pipeline.devices import check_device
from twopass.pipeline.fileio import Inputs, OutputError, check_outputs, read_json, sweep_temp_files

from .checkpoint import CheckpointMeta, files_in_use, init_weights, last_meta, load_model, read_meta, resolve
from .config import ConfigError, ModelConfig, config_from_dict, load_config
# detection's front door lives with the inference loop; it is re-exported here with the others
from .infer import LoadedModel, View, check_categories, detect_images, make_validator, make_views  # noqa: F401
from .model import build_detector
from .speed import optimize_for_inference
from .train import TrainOptions, TrainResult, check_train_device, train


@dataclass(frozen=True)
class ModelKind:
    """How to configure, build and load one kind of model ("detector", "segmenter")."""

    name: str
    load_config: Callable[[str | Path], ModelConfig]  # a YAML path or a name in configs/
    config_from_dict: Callable[[Any, str], ModelConfig]  # (mapping, where) -> validated config
    build: Callable[..., nn.Module]  # (config, num_classes, backbone_weights=None) -> model

    def config(self, model: str | Path | dict, where: str = "model") -> ModelConfig:
        """The validated config of `model`: a mapping, a YAML path or a preset name; errors name `where`."""
        if isinstance(model, dict):
            return self.config_from_dict(model, where)
        try:
            return self.load_config(model)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None

    def load(self, checkpoint: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, CheckpointMeta]:
        """(model in eval mode, meta) from a checkpoint JSON, .safetensors or run folder."""
        return load_model(checkpoint, self.name, self.config_from_dict, self.build, device)


DETECTOR = ModelKind("detector", load_config, config_from_dict, build_detector)


# --------------------------------------------------------------------------- training


def train_model(
    kind: ModelKind,
    config: ModelConfig,
    train_ann: str | Path,
    train_images: str | Path,
    options: TrainOptions,
    *,
    backbone_weights: str | Path | None = None,
    init: str | Path | None = None,
    val_ann: str | Path | None = None,
    val_images: str | Path | None = None,
) -> TrainResult:
    """Build a `kind` model from `config` and train it on COCO data into `options.out`.

    `init`: another run (or checkpoint) to start from, e.g. an imported torchvision model
    (`checkpoint.init_weights`: class slices move by category name). With `options.resume`, the
    run folder's last checkpoint (if any) is continued; its config must be `config` (compared
    through the config class, so fields added since keep their defaults), and neither
    `backbone_weights` nor `init` is then loaded (the checkpoint holds the weights).
    """
    if init is not None and backbone_weights is not None:
        raise ValueError("--init and --backbone-weights: give one (the --init run holds a backbone)")
    if (val_ann is None) != (val_images is None):
        raise ValueError("--val-ann and --val-images go together")
    check_train_device(options.device)
    # (a run folder inside an image folder adds no image and replaces none: its names are fixed)
    inputs = {"--train-ann": train_ann, "--val-ann": val_ann, "--backbone-weights": backbone_weights,
              "--init": files_in_use(init) if init is not None and Path(init).exists() else None}  # fmt: skip
    claim_run_folder(options.out, options.resume, options.overwrite, inputs)
    dataset = CocoDataset(train_ann, train_images, with_masks=config.mask_head.enabled)
    meta = last_meta(options.out) if options.resume else None
    if meta is not None:
        if type(config).model_validate(meta.config).to_dict() != config.to_dict():
            raise ValueError(f"--resume: config {config.name} differs from the one in {meta.path}")
        backbone_weights = init = None
    init_meta = read_meta(init) if init is not None else None  # read before any compute: a bad path fails here
    torch.manual_seed(config.train.seed if options.seed is None else options.seed)
    model = kind.build(config, dataset.categories.num_classes, backbone_weights)
    if init_meta is not None:
        for note in init_weights(model, init_meta, dataset.categories):
            print(f"--init {init_meta.path}: {note}", flush=True)
    validate = None
    if val_ann is not None:
        validate = make_validator(val_ann, val_images, dataset.categories, batch=options.batch, device=options.device,
                                  with_masks=config.mask_head.enabled)  # fmt: skip
    options.sync_bn = config.norm.backbone == "sync_bn"
    return train(model, dataset, options, config.train, kind=kind.name, config=config.to_dict(),
                 categories=dataset.categories, validate=validate)  # fmt: skip


def claim_run_folder(out: str | Path, resume: bool, overwrite: bool, inputs: Mapping[str, Inputs] | None = None,
                     resumable: bool = True) -> None:  # fmt: skip
    """Before any compute: a run folder that holds another run is continued (`resume`) or
    replaced (`overwrite`: its checkpoints and metrics are removed), never mixed with a new one.
    A run that failed before its first checkpoint (`failed_before_checkpoint`) holds nothing to
    continue: it is replaced, saying so. `inputs` ({option: path}, as for `check_outputs`): the
    run's files may not be one of them or lie inside one (the --init run's checkpoints/), and
    they may not lie in what is removed. `resumable`: whether the command has --resume to suggest."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out}: is a file; a run folder is expected")
    if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f"--out {out}: folder is not writable")
    check_outputs({"--out": out / "metrics.jsonl"}, inputs or {})
    if out.is_dir():
        for p in sweep_temp_files(out):  # what a killed run left mid-write
            print(f"--out {out}: removed {p.name}, left by a writer that was killed", flush=True)
    held = [out / n for n in ("checkpoints", "metrics.jsonl") if (out / n).exists()]
    if not held or resume:
        return
    failed = failed_before_checkpoint(out)
    if failed is None and not overwrite:
        meta = last_meta(out) if (out / "checkpoints").exists() else None
        at = f" (last checkpoint at iteration {meta.iteration})" if meta is not None else ""
        hint = "pass --resume to continue it or --overwrite to replace it" if resumable else "pass --overwrite to replace it"
        raise OutputError(f"--out {out}: holds another run{at}; {hint}")
    for name, value in (inputs or {}).items():
        for p in value if isinstance(value, (list, tuple)) else [value]:
            if p is not None and any(Path(p).resolve().is_relative_to(h.resolve()) for h in held):
                raise OutputError(f"--out {out}: replacing its run would remove the input {name} {p}")
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank gets here; one removes
        if failed is not None:
            print(f"--out {out}: the run there {failed}; removing its {' and '.join(p.name for p in held)} and starting again",
                  flush=True)  # fmt: skip
        for p in held:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def failed_before_checkpoint(out: str | Path) -> str | None:
    """How the run in folder `out` failed, in words, when it saved no checkpoint (no last.json;
    checkpoints/ holds at most the engine's partial files) and its metrics.jsonl is empty or
    ends with the engine's error record (`hooks.MetricsLog`), or is absent (an import that failed);
    else None (no run, a run with a checkpoint, or one that may still be running or was
    killed without a record)."""
    out = Path(out)
    ckpts, metrics = out / "checkpoints", out / "metrics.jsonl"
    if any((d / "last.json").is_file() for d in (ckpts, out)):
        return None
    if ckpts.is_dir() and not all(p.is_file() and _PARTIAL.fullmatch(p.name) for p in ckpts.iterdir()):
        return None  # files that are not ours: not removed
    if not metrics.is_file():
        return "saved no checkpoint (checkpoints/ has no last.json)" if ckpts.is_dir() else None
    lines = [ln for ln in metrics.read_text(errors="replace").splitlines() if ln.strip()]
    if not lines:
        return "stopped before its first iteration"
    try:
        last = json.loads(lines[-1])
    except json.JSONDecodeError:
        return None
    if not (isinstance(last, dict) and "error" in last):
        return None
    error = str(last["error"])
    return f"failed at iteration {last.get('iter', '?')} before saving a checkpoint ({error if len(error) < 300 else error[:300] + '...'})"


# what a checkpoint save that did not finish leaves (`checkpoint.save_checkpoint`, `fileio.atomic_path`)
_PARTIAL = re.compile(r"iter_\d{7}(\.optim)?\.(json|safetensors)|\..+\.tmp")


# --------------------------------------------------------------------------- loading


_CACHE: "OrderedDict[tuple, LoadedModel]" = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 4


def load_for_inference(kind: ModelKind, checkpoint: str | Path, device: str = "cpu", fast: bool = True) -> LoadedModel:
    """The model of a checkpoint (JSON, .safetensors or run folder), in eval mode; `fast`:
    BatchNorm folded and channels-last on CPU (`detector.speed`). Remembered per checkpoint
    content within the process, so the shards of a run load each model once."""
    check_device(device)
    path = resolve(checkpoint)
    weights = path.with_suffix(".safetensors")
    stamp = [(p.stat().st_size, p.stat().st_mtime_ns) for p in (path, weights) if p.is_file()]
    key = (kind.name, str(path.resolve()), tuple(stamp), device, fast)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
            return hit
    model, meta = kind.load(path, device)
    loaded = LoadedModel(optimize_for_inference(model) if fast else model, meta)
    with _CACHE_LOCK:
        loaded = _CACHE.setdefault(key, loaded)
        _CACHE.move_to_end(key)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return loaded


def clear_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()


def views_of(checkpoint: str | Path, scales: Sequence[int] | None, flip: bool) -> list[View]:
    """Test-time views of a model: `scales` (shorter sides), else the model's test size; a
    mirrored view of each with `flip`. Reads only the checkpoint's JSON."""
    if not scales:
        scales = [int(read_json(resolve(checkpoint))["config"]["input"]["test_size"])]
    return make_views(scales, flip)


