"""`fuse`: detections tables of several models and test-time views in, one detections table out."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np
import pyarrow as pa

from twopass.pipeline.settings import FUSE, FUSION_METHODS, FuseSettings
from twopass.pipeline.tables import DETECTIONS_SCHEMA, boxes_of, check_values, detections_table

from . import fusion

LABELS = ("per_label", "vote")


def _members(tables: Sequence[pa.Table]) -> tuple[list[str], list[np.ndarray]]:
    """Distinct `source` values in order of first appearance, and each table's rows' member index."""
    members: dict[str, int] = {}
    per_table = []
    for t in tables:
        encoded = t.column("source").combine_chunks().dictionary_encode()
        local = [members.setdefault(str(s), len(members)) for s in encoded.dictionary.to_pylist()]
        codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        per_table.append(np.asarray(local, dtype=np.int64)[codes] if len(local) else codes)
    return list(members), per_table


def _member_weights(
    weights: Sequence[float] | Mapping[str, float] | None,
    members: list[str],
    per_table: list[np.ndarray],
    names: Sequence[str],
) -> np.ndarray | None:
    """One weight per member, from one weight per input table or a {source: weight} mapping."""
    if weights is None:
        return None
    if isinstance(weights, Mapping):
        missing = [m for m in members if m not in weights]
        if missing:
            raise ValueError(f"weights: no weight for sources {missing}; sources are {members}")
        return fusion.check_weights([weights[m] for m in members], len(members))
    per_input = fusion.check_weights(list(weights), len(names))
    assert per_input is not None
    out = np.full(len(members), np.nan)
    for name, w, member in zip(names, per_input, per_table):
        for m in np.unique(member):
            if not np.isnan(out[m]) and out[m] != w:
                raise ValueError(
                    f"weights: source {members[m]!r} is in two inputs with different weights ({out[m]} and {w}, {name})"
                )
            out[m] = w
    return np.nan_to_num(out, nan=1.0)  # a member can only be missing if it has no rows


def _image_scale(
    image_ids: np.ndarray, boxes: np.ndarray, image: np.ndarray, image_sizes: Any
) -> np.ndarray:
    """(I, 4) (w, h, w, h) per image: given sizes, else each image's extent (largest x, y of its boxes)."""
    if image_sizes is None:
        extent = np.zeros((len(image_ids), 2))
        np.maximum.at(extent, image, np.maximum(boxes[:, :2], boxes[:, 2:]))
        extent = np.maximum(extent, 1.0)
        return np.concatenate([extent, extent], axis=1)
    if isinstance(image_sizes, pa.Table):
        ids = image_sizes.column("image_id").to_pylist()
        hw = zip(image_sizes.column("height").to_pylist(), image_sizes.column("width").to_pylist())
        image_sizes = dict(zip(ids, hw))
    scale = np.empty((len(image_ids), 4))
    for i, image_id in enumerate(image_ids.tolist()):
        if image_id not in image_sizes:
            raise ValueError(f"image_sizes: no size for image_id {image_id}")
        h, w = (float(v) for v in image_sizes[image_id])
        if not (np.isfinite(h) and np.isfinite(w) and h > 0 and w > 0):
            raise ValueError(f"image_sizes: image_id {image_id} has size {h}x{w} (height x width)")
        scale[i] = (w, h, w, h)
    return scale


def fuse(
    tables: Sequence[pa.Table],
    method: str = FUSE.method,
    weights: Sequence[float] | Mapping[str, float] | None = None,
    *,
    names: Sequence[str] | None = None,
    image_sizes: Mapping[int, tuple[float, float]] | pa.Table | None = None,
    iou_thr: float | None = FUSE.iou_thr,
    skip_box_thr: float = FUSE.skip_box_thr,
    conf_type: fusion.ConfType = FUSE.conf_type,
    allows_overflow: bool = False,
    decay: Literal["gaussian", "linear"] = FUSE.decay,
    sigma: float = FUSE.sigma,
    thresh: float = FUSE.thresh,
    rescore: bool | None = FUSE.rescore,
    max_per_image: int | None = FUSE.max_per_image,
    labels: Literal["per_label", "vote"] = FUSE.labels,
    source: str | None = None,
    backend: fusion.Backend = "vectorised",
) -> pa.Table:
    """Fuse detections tables (any mix of models and views) into one detections table.

    Every distinct `source` is one member of the fusion (a model, or one view of a model).
    Per image and category the members' boxes are fused by `method`: "wbf"
    (`weighted_boxes_fusion`), "soft-nms" (`soft_nms` with `decay`) or "nms"; see those for
    the parameters. `weights`: one per input table (its sources share it) or {source: weight}.
    `image_sizes`: {image_id: (height, width)} or an images table, to normalise and clip
    boxes as the algorithms expect; without it each image's extent (its boxes' largest x2, y2)
    stands in, so boxes are not clipped at the right and bottom. `names` name the tables
    in error messages (file names). Returns at most `max_per_image` boxes an image, image_id
    ascending then score descending, labels kept, `source` = `source` or "<method>:<a>+<b>...".

    `labels="vote"` fuses the boxes of all categories of an image together, so that one object
    labelled differently by two members gives one box: WBF's fused box takes the category with
    the largest summed score x weight among its boxes (ties: the smaller id); Soft-NMS and NMS
    become class-agnostic (a box decays or suppresses boxes of any category) and a kept box
    keeps its own category.

    The keyword form, for library use: it checks the values with the fusion functions' ranges
    (an IoU threshold of 0 or 1 included) and calls `fuse_tables`, which the stages call with
    a `FuseSettings` validated where it was made.
    """
    if method not in FUSION_METHODS:
        raise ValueError(f"method: {method!r}, expected one of {tuple(FUSION_METHODS)}")
    if labels not in LABELS:
        raise ValueError(f"labels: {labels!r}, expected one of {LABELS}")
    if max_per_image is not None and max_per_image < 1:
        raise ValueError(f"max_per_image: {max_per_image} must be >= 1")
    spec = FUSION_METHODS[method]
    fusion.check_params(spec.default_iou if iou_thr is None else iou_thr, skip_box_thr=skip_box_thr, thresh=thresh)
    if conf_type not in fusion.CONF_TYPES:
        raise ValueError(f"conf_type: {conf_type!r}, expected one of {fusion.CONF_TYPES}")
    if decay not in ("gaussian", "linear"):
        raise ValueError(f"decay: {decay!r}, expected 'gaussian' or 'linear'")
    if not (np.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma: {sigma} must be > 0")
    # Checked above with the functions' ranges, which are wider than the settings' (0 and 1)
    settings = FuseSettings.model_construct(method=method, iou_thr=iou_thr, skip_box_thr=skip_box_thr, conf_type=conf_type,
                                            decay=decay, sigma=sigma, thresh=thresh, rescore=rescore,
                                            max_per_image=max_per_image, labels=labels)  # fmt: skip
    return fuse_tables(tables, settings, weights, names=names, image_sizes=image_sizes, source=source, backend=backend,
                       allows_overflow=allows_overflow)  # fmt: skip


def _function(ref: str | Callable[..., Any]) -> Callable[..., Any]:
    """A registry entry's function: itself, or "module:name" imported."""
    if callable(ref):
        return ref
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def fuse_tables(
    tables: Sequence[pa.Table],
    settings: FuseSettings = FUSE,
    weights: Sequence[float] | Mapping[str, float] | None = None,
    *,
    names: Sequence[str] | None = None,
    image_sizes: Mapping[int, tuple[float, float]] | pa.Table | None = None,
    source: str | None = None,
    backend: fusion.Backend = "vectorised",
    allows_overflow: bool = False,
) -> pa.Table:
    """`fuse` with its settings as one record (`pipeline.settings.FuseSettings`), read as it
    is: validated where it was made (`twopass fuse`, the pipeline config). The method's
    kernel comes from `pipeline.settings.FUSION_METHODS`. Returns as `fuse`."""
    spec = FUSION_METHODS.get(settings.method)
    if spec is None:
        raise ValueError(f"method: {settings.method!r}, expected one of {tuple(FUSION_METHODS)}")
    by_label = settings.labels == "per_label"
    if not tables:
        raise ValueError("fuse: no input tables")
    names = list(names) if names is not None else [f"tables[{i}]" for i in range(len(tables))]
    if len(names) != len(tables):
        raise ValueError(f"names: {len(names)} names for {len(tables)} tables")
    if backend not in fusion.BACKENDS:
        raise ValueError(f"backend: {backend!r}, expected one of {fusion.BACKENDS}")
    if backend == "ensemble_boxes":
        if settings.rescores:
            raise ValueError("rescore: ensemble_boxes returns input scores only; use backend='vectorised'")
        if not by_label:
            raise ValueError("labels: ensemble_boxes fuses per label only; use backend='vectorised' for 'vote'")
        if spec.reference is None:
            raise ValueError(f"backend: {settings.method!r} has no ensemble_boxes reference; use backend='vectorised'")

    checked = []
    for t, name in zip(tables, names):
        missing = [c for c in DETECTIONS_SCHEMA.names if c not in t.column_names]
        if missing:
            raise ValueError(f"{name}: missing columns {missing}; expected a detections table")
        t = t.select(DETECTIONS_SCHEMA.names)  # instances: the masks are not fused
        check_values(t, name, score_range=(0.0, 1.0) if spec.unit_scores else None)
        checked.append(t)
    members, per_table = _members(checked)
    member_weights = _member_weights(weights, members, per_table, names)
    name = source or f"{settings.method}:" + "+".join(members)

    # Model after model (table order, then row order), as the reference concatenates them.
    member = np.concatenate(per_table) if per_table else np.zeros(0, dtype=np.int64)
    rows = np.argsort(member, kind="stable")
    member = member[rows]
    image_id = np.concatenate([t.column("image_id").to_numpy() for t in checked])[rows]
    labels = np.concatenate([t.column("category_id").to_numpy() for t in checked]).astype(np.int64)[rows]
    scores = np.concatenate([t.column("score").to_numpy() for t in checked]).astype(np.float64)[rows]
    boxes = np.concatenate([boxes_of(t) for t in checked]).astype(np.float64)[rows]
    if len(boxes) == 0:
        return detections_table([], [], [], np.zeros((0, 4)), name)

    image_ids, image = np.unique(image_id, return_inverse=True)
    scale = _image_scale(image_ids, boxes, image, image_sizes)[image]
    flat = fusion.Flat(boxes / scale, scores, labels, member, image, scale, len(members))
    options = {"allows_overflow": True} if allows_overflow else {}
    if backend == "vectorised":
        result = _function(spec.kernel)(flat, member_weights, settings, by_label=by_label, **options)
    else:
        result = _run_reference(_function(spec.reference), flat, member_weights, settings, options)

    # Image ascending, score descending (stable: ties keep the method's order), then the cap.
    order = np.lexsort((-result.scores, result.image))
    img = result.image[order]
    if settings.max_per_image is not None:
        first = np.searchsorted(img, img, side="left")
        order = order[np.arange(len(order)) - first < settings.max_per_image]
    return detections_table(
        image_ids[result.image[order]],
        result.labels[order],
        result.scores[order],
        result.pixels()[order],
        name,
    )


def _run_reference(ref: Callable[..., fusion.Result], flat: fusion.Flat, weights: np.ndarray | None, settings: FuseSettings,
                   options: dict[str, Any]) -> fusion.Result:  # fmt: skip
    """ensemble_boxes, image by image."""
    parts = []
    by_image = np.argsort(flat.image, kind="stable")  # keeps the member-major order inside an image
    starts = np.flatnonzero(np.diff(flat.image[by_image], prepend=-1))
    for rows in np.split(by_image, starts[1:]):
        r = ref(flat.take(rows), weights, settings, **options)
        r.image[:] = flat.image[rows[0]]
        parts.append(r)
    fields = ("boxes", "scores", "labels", "image", "scale")
    return fusion.Result(*(np.concatenate([getattr(r, f) for r in parts]) for f in fields))
