"""Import torchvision's detection models (a `.pth` state dict, e.g. COCO-trained weights) as
this project's run folders: a detector (Faster R-CNN) or a segmenter (Mask R-CNN) that
`detect`, `fuse`, `segment` and the flows use like any model trained here.

The architectures are the same module for module (ResNet-50 body, FPN P2..P6, RPN, RoI heads;
the *_v2 models' BatchNorm FPN, two-conv RPN head and 4conv1fc box head are config switches),
so the import renames keys and reorders the classifier rows, nothing else. torchvision's
classifiers have one output per label; `categories` says which label is which COCO category
(torchvision's COCO models: label == COCO id, 91 outputs with 10 unused ids), and only the
outputs of those categories are kept, in this project's label order (categories by id).
Dropping the unused outputs leaves their share out of the softmax, which a COCO-trained model
gives near-zero probability anyway; a categories list naming every label keeps them all.

    twopass import-torchvision --arch maskrcnn_resnet50_fpn --weights maskrcnn.pth --out runs/tv-mrcnn
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from twopass.pipeline.categories import Categories
from twopass.pipeline.coco_categories import coco_categories
from twopass.pipeline.fileio import atomic_path, check_outputs, read_json

from .checkpoint import save_checkpoint, state_mismatch

log = logging.getLogger(__name__)

_V2 = {"norm": {"backbone": "frozen_bn", "heads": "bn"}, "rpn": {"convs": 2}, "box_head": {"type": "conv_fc"}}


@dataclass(frozen=True)
class Arch:
    kind: str  # "detector" | "segmenter"
    config: dict[str, Any]
    builder: str  # the torchvision.models.detection function

    def torchvision_model(self, num_classes: int, **kwargs: Any) -> torch.nn.Module:
        """torchvision's model with random weights (nothing is downloaded); `kwargs`: its builder's
        own (box_score_thresh, min_size, ...)."""
        import torchvision.models.detection as tvd

        return getattr(tvd, self.builder)(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)


def _config(name: str, *parts: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "backbone": {"name": "resnet50", "trainable_stages": 3}, "norm": {"backbone": "frozen_bn"}}
    for p in parts:
        for k, v in p.items():
            out[k] = {**out.get(k, {}), **v}
    return out


# torchvision's defaults (anchors 32..512 at 3 ratios, 800/1333 px, score 0.05, NMS 0.5, 100 a
# picture, 1000 proposals) are this project's config defaults, so the configs name only what differs.
ARCHS: dict[str, Arch] = {
    "fasterrcnn_resnet50_fpn": Arch("detector", _config("tv_fasterrcnn_resnet50_fpn"), "fasterrcnn_resnet50_fpn"),
    "fasterrcnn_resnet50_fpn_v2": Arch("detector", _config("tv_fasterrcnn_resnet50_fpn_v2", _V2), "fasterrcnn_resnet50_fpn_v2"),
    "maskrcnn_resnet50_fpn": Arch("segmenter", _config("tv_maskrcnn_resnet50_fpn", {"mask_head": {"type": "standard"}}), "maskrcnn_resnet50_fpn"),
    "maskrcnn_resnet50_fpn_v2": Arch(
        "segmenter", _config("tv_maskrcnn_resnet50_fpn_v2", _V2, {"mask_head": {"type": "standard"}}), "maskrcnn_resnet50_fpn_v2"
    ),
}
# fasterrcnn_mobilenet_v3_large_fpn is left out: its body (MobileNetV3) is not one of the
# config's backbones, and its FPN has two levels from the last two stages with 15 anchors a
# position, a different pyramid from the P2..P6 (or P3..P6) the configs describe.

# torchvision key prefix -> this project's (after torchvision has normalised legacy names)
_RENAMES: list[tuple[str, str]] = [
    ("roi_heads.box_head.fc", "roi_heads.box_heads.0.fc"),  # two_fc: fc6, fc7
    ("roi_heads.box_head.", "roi_heads.box_heads.0.layers."),  # conv_fc: torchvision's module as is
    ("roi_heads.box_predictor.", "roi_heads.box_predictors.0."),
    ("roi_heads.mask_head.0.", "roi_heads.mask_branch.first."),
    ("roi_heads.mask_predictor.conv5_mask.", "roi_heads.mask_branch.upsample."),
    ("roi_heads.mask_predictor.mask_fcn_logits.", "roi_heads.mask_branch.predictor."),
]


def _rename(key: str) -> str:
    for old, new in _RENAMES:
        if key.startswith(old):
            return new + key[len(old) :]
    if key.startswith("roi_heads.mask_head."):  # conv i (i >= 1) is our convs[i - 1]
        i, rest = key[len("roi_heads.mask_head.") :].split(".", 1)
        return f"roi_heads.mask_branch.convs.{int(i) - 1}.{rest}"
    return key


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """(tensors, SHA-256 of the file) of a torchvision `.pth` (read with weights_only=True: no
    code runs), a `{"model": state_dict}` training checkpoint of torchvision's references, or a
    `.safetensors`. The file is read once for both."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--weights {path}: no such file")
    data = path.read_bytes()
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load

            state: Any = load(data)
        else:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling, zip and safetensors errors have no common base
        raise ValueError(f"--weights {path}: not a readable state dict ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--weights {path}: expected a state dict (parameter name -> tensor)")
    return state, hashlib.sha256(data).hexdigest()


def categories_with_labels(spec: str | Path, num_outputs: int) -> tuple[Categories, list[int]]:
    """(categories, the torchvision label of each, in the categories' order) from `coco` (the
    shipped COCO list, label == id) or a JSON file: a COCO `categories` list (or a COCO file
    holding one) whose entries may give their `label`; without it, label == id, as torchvision's
    reference training scripts label COCO-format data."""
    where = "--categories coco" if str(spec) == "coco" else f"--categories {spec}"
    if str(spec) == "coco":
        entries = coco_categories()
    else:
        data = read_json(spec)
        entries = data.get("categories") if isinstance(data, dict) else data
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"{where}: expected a list of categories ({{'id', 'name'[, 'label']}}) or a COCO file with one")
    categories = Categories.from_coco(entries, source=where)
    for i, c in enumerate(entries):
        if "label" in c and (isinstance(c["label"], bool) or not isinstance(c["label"], int)):
            raise ValueError(f"{where}: categories[{i}] ({c['name']!r}): label {c['label']!r} is not an integer")
    label_of = {int(c["id"]): int(c.get("label", c["id"])) for c in entries}
    labels = [label_of[i] for i in categories.ids]
    bad = sorted(lb for lb in labels if not 1 <= lb < num_outputs)
    if bad:
        raise ValueError(f"{where}: labels {bad[:5]} outside the model's 1..{num_outputs - 1} (it has {num_outputs} outputs with background)")
    if len(set(labels)) != len(labels):
        raise ValueError(f"{where}: two categories share a label")
    return categories, labels


def _keep_rows(state: dict[str, torch.Tensor], labels: list[int]) -> None:
    """Keep the classifier, box and mask outputs of background and `labels`, in that order."""
    idx = torch.tensor([0, *labels])
    for key in ("roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias",
                "roi_heads.mask_predictor.mask_fcn_logits.weight", "roi_heads.mask_predictor.mask_fcn_logits.bias"):  # fmt: skip
        if key in state:
            state[key] = state[key][idx]
    for key in ("roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias"):
        v = state[key]
        state[key] = v.reshape(-1, 4, *v.shape[1:])[idx].reshape(-1, *v.shape[1:])


def convert_state_dict(arch: str, state: dict[str, torch.Tensor], labels: list[int], ours: dict[str, torch.Tensor],
                       source: str = "weights") -> dict[str, torch.Tensor]:  # fmt: skip
    """torchvision `arch` tensors -> the state of this project's model (whose own state dict is
    `ours`) with one class per entry of `labels` (torchvision labels, in our label order)."""
    spec = ARCHS[arch]
    num_outputs = state["roi_heads.box_predictor.cls_score.weight"].shape[0]
    # torchvision's own load normalises the names of older checkpoints (mask_fcn1, rpn conv,
    # FPN blocks without the norm index) and checks the file against the architecture.
    tv = spec.torchvision_model(num_outputs)
    try:
        tv.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{source}: does not fit torchvision's {arch} ({str(e).splitlines()[0]}...)") from None
    state = dict(tv.state_dict())
    _keep_rows(state, labels)
    out = {}
    for k, v in state.items():
        k = _rename(k)
        if k in ours:  # num_batches_tracked of BatchNorms that are frozen here
            out[k] = v
    wrong = state_mismatch(ours, out)
    if wrong:  # a mapping gap: not the user's doing
        raise RuntimeError(f"{arch}: converted weights do not fit ({wrong})")
    return out


def import_torchvision(arch: str, weights: str | Path, out: str | Path, categories: str | Path = "coco",
                       overwrite: bool = False) -> Path:  # fmt: skip
    """Write run folder `out` (checkpoints/iter_0000000.{json,safetensors}, config.yaml) holding
    torchvision's `arch` with the tensors of `weights`; returns the checkpoint JSON."""
    from twopass.segmenter.api import kind_of  # the one map of model kinds (the segmenter's is built on this package)

    from .api import claim_run_folder

    if arch not in ARCHS:
        raise ValueError(f"--arch {arch!r}: not importable; choose one of {', '.join(ARCHS)}")
    inputs = {"--weights": weights, "--categories": None if str(categories) == "coco" else categories}
    check_outputs({"--out": Path(out) / "config.yaml"}, inputs)
    claim_run_folder(out, resume=False, overwrite=overwrite, inputs=inputs, resumable=False)
    spec = ARCHS[arch]
    kind = kind_of(spec.kind)
    state, digest = read_state_dict(weights)
    key = "roi_heads.box_predictor.cls_score.weight"
    if key not in state:
        raise ValueError(f"--weights {weights}: no {key!r}; not a torchvision detection model")
    cats, labels = categories_with_labels(categories, state[key].shape[0])
    config = kind.config(spec.config, f"--arch {arch}")
    model = kind.build(config, cats.num_classes)
    model.load_state_dict(convert_state_dict(arch, state, labels, model.state_dict(), f"--weights {weights}"), strict=True)
    extra = {"imported_from": {"arch": arch, "weights": str(Path(weights).resolve()), "sha256": digest, "categories": str(categories)}}
    path = save_checkpoint(out, model, kind=spec.kind, config=config.to_dict(), categories=cats, iteration=0, extra=extra)
    # A copy for reading and for `--config` when fine-tuning with changes; the checkpoint JSON
    # holds the config the model is built from.
    with atomic_path(Path(out) / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    log.info("imported %s (%d categories) from %s -> %s", arch, cats.num_classes, weights, path)
    return path
