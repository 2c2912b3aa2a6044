"""Checkpoints: weights as safetensors, a JSON beside them (kind, config, categories,
iteration), and for resuming the optimizer state as a second safetensors file plus JSON.

No pickle anywhere: loading a checkpoint cannot run code. Layout of a run folder:

    RUN/checkpoints/iter_0001000.safetensors   model weights
    RUN/checkpoints/iter_0001000.json          {"kind", "config", "categories", "iteration", ...}
    RUN/checkpoints/iter_0001000.optim.safetensors   optimizer tensors (resume only)
    RUN/checkpoints/last.json                  {"checkpoint": "iter_0001000.json"}

Every file is written atomically (`pipeline.fileio.atomic_path`); `last.json` goes last, so
it only ever names a complete checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from twopass.pipeline.categories import Categories
from twopass.pipeline.fileio import atomic_path, disk_full, is_disk_full, read_json, write_json

FORMAT = "twopass-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit; the message names the file."""


@dataclass
class CheckpointMeta:
    path: Path  # the JSON file
    kind: str
    config: dict[str, Any]
    categories: Categories
    iteration: int
    extra: dict[str, Any]

    @property
    def weights_path(self) -> Path:
        return self.path.with_suffix(".safetensors")

    @property
    def optim_path(self) -> Path:
        return self.path.with_suffix(".optim.safetensors")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel (or the model itself)."""
    return model.module if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel) else model


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    # clone: safetensors refuses tensors sharing storage, and views may be non-contiguous
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        try:
            save_file(flat, str(tmp), metadata=metadata)
        except SafetensorError as e:  # not an OSError: a full disk would reach the user as a traceback
            if is_disk_full(e):
                raise disk_full(path, sum(t.numel() * t.element_size() for t in flat.values()), at_least=False) from None
            raise OSError(f"{path}: cannot write the tensors ({e})") from None


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_state(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for pid, values in info.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(values)
    return {"state": state, "param_groups": info["param_groups"]}


def save_checkpoint(
    run_dir: str | Path,
    model: nn.Module,
    *,
    kind: str,
    config: dict[str, Any],
    categories: Categories,
    iteration: int,
    optimizer: torch.optim.Optimizer | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the checkpoint of `iteration` under RUN/checkpoints; returns the JSON path."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    stem = ckpt_dir / f"iter_{iteration:07d}"
    json_path = stem.with_suffix(".json")
    _save_tensors(stem.with_suffix(".safetensors"), unwrap(model).state_dict(), {"format": FORMAT})
    meta: dict[str, Any] = {
        "format": FORMAT,
        "kind": kind,
        "iteration": int(iteration),
        "config": config,
        "categories": categories.to_coco(),
        "weights": stem.with_suffix(".safetensors").name,
        "extra": extra or {},
    }
    if optimizer is not None:
        tensors, info = optimizer_tensors(optimizer)
        _save_tensors(stem.with_suffix(".optim.safetensors"), tensors)
        meta["optimizer"] = info
    write_json(json_path, meta, indent=1)
    write_json(ckpt_dir / "last.json", {"checkpoint": json_path.name})
    return json_path


def resolve(path: str | Path) -> Path:
    """A checkpoint JSON from: the JSON, its .safetensors, a run folder or its checkpoints/."""
    p = Path(path)
    if p.is_dir():
        for d in (p / "checkpoints", p):
            last = d / "last.json"
            if last.is_file():
                try:
                    name = read_json(last)["checkpoint"]
                except (ValueError, KeyError, TypeError) as e:
                    raise CheckpointError(f"{last}: unreadable ({e})") from None
                target = d / str(name)
                # refused before anything opens it: a pointer may not leave its run folder
                if not target.resolve().is_relative_to(d.resolve()):
                    raise CheckpointError(f"{last}: points at {name!r}, outside {d}")
                return target
        raise CheckpointError(f"{p}: no checkpoint in this folder (no checkpoints/last.json)")
    if p.suffix == ".safetensors":
        p = p.with_suffix("").with_suffix(".json") if p.name.endswith(".optim.safetensors") else p.with_suffix(".json")
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint")
    return p


# A run folder's own files besides checkpoints/: the engine's metrics, the importer's config
# copy, the run-folder stage's marker.
RUN_FILES = ("metrics.jsonl", "config.yaml", "done.json")


def files_in_use(path: str | Path) -> list[Path]:
    """What a command that reads checkpoint `path` must not write over (`fileio.check_outputs`):
    the checkpoints/ folder and the run folder's own files (RUN_FILES) when it lies in a run
    folder, else its JSON, weights and pointer files."""
    p = resolve(path)
    if p.parent.name == "checkpoints":
        return [p.parent, *(p.parent.parent / n for n in RUN_FILES)]
    return [p, p.with_suffix(".safetensors"), p.with_suffix(".optim.safetensors"), p.parent / "last.json"]


def last_meta(run: str | Path) -> CheckpointMeta | None:
    """The meta of a run folder's last checkpoint; None if nothing has been saved there yet.
    A damaged checkpoint is an error (CheckpointError), never mistaken for a fresh start."""
    run = Path(run)
    if not any((d / "last.json").is_file() for d in (run / "checkpoints", run)):
        return None
    return read_meta(run)


def read_meta(path: str | Path) -> CheckpointMeta:
    p = resolve(path)
    try:
        d = read_json(p)
    except (ValueError, FileNotFoundError) as e:
        raise CheckpointError(f"{p}: not a checkpoint ({e})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise CheckpointError(f"{p}: not a twopass checkpoint (format {d.get('format') if isinstance(d, dict) else None!r})")
    for key in ("kind", "config", "categories", "iteration"):
        if key not in d:
            raise CheckpointError(f"{p}: checkpoint JSON has no {key!r}")
    try:
        categories = Categories.from_coco(d["categories"], source=str(p))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{p}: bad categories ({e})") from None
    extra = dict(d.get("extra") or {})
    if "optimizer" in d:
        extra["_optimizer"] = d["optimizer"]
    return CheckpointMeta(p, d["kind"], d["config"], categories, int(d["iteration"]), extra)


def state_mismatch(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str | None:
    """What keeps `state` from loading into a module whose state dict is `own` (missing and
    unexpected names, shapes that differ), in words; None when it fits."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    parts = []
    if missing:
        parts.append(f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
    if unexpected:
        parts.append(f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
    if bad:
        parts.append(f"shape differs for {bad[:3]} (file {tuple(state[bad[0]].shape)}, model {tuple(own[bad[0]].shape)})")
    return "; ".join(parts) or None


def load_weights(model: nn.Module, meta: CheckpointMeta) -> None:
    """Load the checkpoint's weights into `model`, strictly, naming what does not fit."""
    state = _load_tensors(meta.weights_path)
    wrong = state_mismatch(unwrap(model).state_dict(), state)
    if wrong:
        raise CheckpointError(f"{meta.weights_path}: weights do not fit the model ({wrong})")
    unwrap(model).load_state_dict(state, strict=True)


def init_weights(model: nn.Module, meta: CheckpointMeta, categories: Categories) -> list[str]:
    """Start `model` (built for `categories`) from another run's weights (`--init`): every tensor
    is taken whole, except, where the two category lists differ, the final predictors' tensors
    with one slice per class (classifier, class-specific boxes, masks): of those the background
    slice and the slices of the categories both lists name alike are taken, and the others keep
    their fresh initialisation. A tensor that does not fit otherwise is an error (the other
    run's config is the architecture to fine-tune). Returns one line per tensor not taken whole."""
    state = _load_tensors(meta.weights_path)
    own = unwrap(model).state_dict()
    if missing := sorted(set(own) - set(state)):
        raise CheckpointError(f"--init {meta.path}: its weights lack {missing[:3]}{'...' if len(missing) > 3 else ''} "
                              "(a different architecture; fine-tune with its config)")  # fmt: skip
    theirs = meta.categories
    k, k2 = categories.num_classes + 1, theirs.num_classes + 1
    by_name = {n: i + 1 for i, n in enumerate(theirs.names)}
    rows = [0] + [by_name.get(n, -1) for n in categories.names]  # their slice of each of our labels
    shared = sum(r > 0 for r in rows)
    notes, merged = [], {}
    for key, mine in own.items():
        t = state[key]
        m = 0 if theirs == categories else _slices_per_class(key, mine, k)
        fits = tuple(t.shape) == ((m * k2, *mine.shape[1:]) if m else tuple(mine.shape))
        if not fits:
            raise CheckpointError(f"--init {meta.path}: {key} has shape {tuple(t.shape)} there, {tuple(mine.shape)} here "
                                  "(a different architecture; fine-tune with its config)")  # fmt: skip
        if not m:
            merged[key] = t
            continue
        new, old = mine.clone().view(k, m, *mine.shape[1:]), t.view(k2, m, *t.shape[1:])
        for label, row in enumerate(rows):
            if row >= 0:
                new[label] = old[row]
        merged[key] = new.view_as(mine)
        notes.append(f"{key}: background and {shared} of {categories.num_classes} categories taken (same name), the others re-initialised")
    if unused := sorted(set(state) - set(own)):
        notes.append(f"not used: {len(unused)} tensors of {meta.weights_path.name} ({unused[0]}, ...)")
    unwrap(model).load_state_dict(merged, strict=True)
    return notes


_PER_CLASS = ("cls_score", "bbox_pred", "mask_branch.predictor", "mask_fcn_logits")


def _slices_per_class(key: str, t: torch.Tensor, k: int) -> int:
    """m when tensor `key` of the RoI heads' final predictors holds m slices for each of k
    classes (background included), else 0. A class-agnostic bbox_pred has 4 rows: not per class."""
    if key.startswith("roi_heads.") and key.rsplit(".", 1)[0].endswith(_PER_CLASS) and t.shape[0] in (k, 4 * k):
        return t.shape[0] // k
    return 0


def load_optimizer(optimizer: torch.optim.Optimizer, meta: CheckpointMeta) -> None:
    info = meta.extra.get("_optimizer")
    if info is None:
        raise CheckpointError(f"{meta.path}: holds no optimizer state; cannot resume from it")
    tensors = _load_tensors(meta.optim_path)
    try:
        optimizer.load_state_dict(optimizer_state(tensors, info))
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{meta.optim_path}: optimizer state does not fit ({e})") from None


def load_model(path: str | Path, kind: str, parse: Callable, build: Callable, device: str | torch.device = "cpu"):
    """(model in eval mode, meta) from a `kind` checkpoint (file or run folder): `parse(dict,
    where)` validates its config, `build(config, num_classes)` makes the model."""
    from .config import ConfigError

    meta = read_meta(path)
    if meta.kind != kind:
        raise CheckpointError(f"{meta.path}: a {meta.kind!r} checkpoint, expected {kind!r}")
    try:
        config = parse(meta.config, f"{meta.path} (config)")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    model = build(config, meta.categories.num_classes)
    load_weights(model, meta)
    return model.to(device).eval(), meta
