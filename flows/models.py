"""Models for the flows: configs, training and loading, through the detector's and the
segmenter's own functions. No model logic here, only the calls and a small in-process cache of
loaded models (with a lock each: inference mutates a model's settings while it runs).

Detectors: `detector.model.build_detector`, `detector.checkpoint.load_detector`. The segmenter:
`segmenter.model.build_segmenter`, `load_segmenter`. Both train on the same engine
(`detector.train.train`, kind "detector" / "segmenter") and run inference after
`detector.speed.optimize_for_inference` (BatchNorm folded, channels-last on CPU).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal

from pipeline.config import DetectorSpec, SegmenterSpec, TrainSpec

Kind = Literal["detector", "segmenter"]


# --------------------------------------------------------------------------- configs


def model_config(kind: Kind, spec: DetectorSpec | SegmenterSpec, where: str):
    """The validated model config of a detector or the segmenter (`where` names the field)."""
    if kind == "detector":
        from detector.config import config_from_dict as from_dict
        from detector.config import load_config as load
    else:
        from segmenter.config import load_segmenter_config as load
        from segmenter.config import segmenter_config_from_dict as from_dict
    if isinstance(spec.model, dict):
        return from_dict(spec.model, f"{where}.model")
    try:
        return load(spec.model)
    except ValueError as e:
        raise ValueError(f"{where}.model: {e}") from None


# --------------------------------------------------------------------------- training


def build_model(kind: Kind, cfg, num_classes: int, backbone_weights: Path | None = None):
    if kind == "detector":
        from detector.model import build_detector

        return build_detector(cfg, num_classes, backbone_weights)
    from segmenter.model import build_segmenter

    return build_segmenter(cfg, num_classes, backbone_weights)


def train_model(
    kind: Kind,
    spec: DetectorSpec | SegmenterSpec,
    where: str,
    train_ann: Path,
    train_images: Path,
    out: Path,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[Path, int]:
    """Train (or resume training) into the run folder `out`; returns (checkpoint JSON, iteration).

    A run killed mid-way resumes from its last checkpoint (the engine retraces the
    uninterrupted run exactly, without a time budget).
    """
    import torch

    from detector.checkpoint import last_meta
    from detector.train import TrainOptions, train
    from pipeline.coco import CocoDataset

    cfg = model_config(kind, spec, where)
    t: TrainSpec = spec.train
    dataset = CocoDataset(train_ann, train_images, with_masks=cfg.mask_head.enabled)
    meta = last_meta(out)
    if meta is not None and meta.iteration >= t.iters:
        return meta.path, meta.iteration
    torch.manual_seed(cfg.train.seed if t.seed is None else t.seed)
    model = build_model(kind, cfg, dataset.categories.num_classes, None if meta is not None else t.backbone_weights)
    options = TrainOptions(
        out=out,
        iters=t.iters,
        batch=t.batch,
        lr=t.lr,
        device=device,
        resume=True,
        checkpoint_every=t.checkpoint_every,
        seed=t.seed,
        progress=progress,
        time_budget_s=t.time_budget_s,
    )
    result = train(model, dataset, options, cfg.train, kind=kind, config=cfg.to_dict(), categories=dataset.categories)
    if result.checkpoint is None:
        raise RuntimeError(f"{where}: training into {out} ended without a checkpoint")
    return result.checkpoint, result.iteration


# --------------------------------------------------------------------------- loading


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint JSON of a JSON, a .safetensors file or a run folder (its last checkpoint)."""
    from detector.checkpoint import resolve

    return resolve(path)


def _load(kind: Kind, path: Path, device: str):
    from detector.speed import optimize_for_inference

    if kind == "detector":
        from detector.checkpoint import load_detector as load
    else:
        from segmenter.model import load_segmenter as load
    model, meta = load(path, device)
    return optimize_for_inference(model), meta


class LoadedModel:
    def __init__(self, model, meta):
        self.model = model
        self.meta = meta
        self.lock = threading.Lock()


_CACHE: "OrderedDict[tuple, LoadedModel]" = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 4


def get_model(kind: Kind, checkpoint: Path, checkpoint_key: str, device: str) -> LoadedModel:
    """A loaded model, shared by the tasks of this process (hold `.lock` while using it)."""
    key = (kind, str(checkpoint), checkpoint_key, device)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
            return hit
    loaded = LoadedModel(*_load(kind, checkpoint, device))
    with _CACHE_LOCK:
        loaded = _CACHE.setdefault(key, loaded)
        _CACHE.move_to_end(key)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return loaded


def clear_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()


def describe(kind: Kind, cfg: Any) -> str:
    """One line about a model config, for reports."""
    b = cfg.backbone
    parts = [b.name, f"FPN {b.fpn_channels}"]
    if b.global_context:
        parts.append("global context")
    parts.append("LSD head" if cfg.box_head.type == "location_sensitive" else "2fc head")
    if cfg.box_head.multi_scale_roi:
        parts.append("multi-scale RoI")
    if cfg.box_head.cascade_stages > 1:
        parts.append("cascade")
    if kind == "segmenter":
        m = cfg.mask_head
        parts.append(f"mask head {getattr(m, 'type', 'standard')}")
    return ", ".join(parts)
