"""`fuse`: detections tables of several models and test-time views in, one detections table out."""

from __future__ import annotations

from typing import Any, Literal, Mapping, Sequence

import numpy as np
import pyarrow as pa

from twopass.pipeline.settings import FUSE, FuseMethod, FuseSettings
from twopass.pipeline.tables import DETECTIONS_SCHEMA, boxes_of, check_values, detections_table

from . import fusion

METHODS = ("wbf", "soft-nms", "nms")
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
    method: FuseMethod = FUSE.method,
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
    """
    if method not in METHODS:
        raise ValueError(f"method: {method!r}, expected one of {METHODS}")
    if labels not in LABELS:
        raise ValueError(f"labels: {labels!r}, expected one of {LABELS}")
    by_label = labels == "per_label"  # `labels` names the input's category ids below
    if not tables:
        raise ValueError("fuse: no input tables")
    names = list(names) if names is not None else [f"tables[{i}]" for i in range(len(tables))]
    if len(names) != len(tables):
        raise ValueError(f"names: {len(names)} names for {len(tables)} tables")
    if max_per_image is not None and max_per_image < 1:
        raise ValueError(f"max_per_image: {max_per_image} must be >= 1")
    # None: the method's defaults, as `pipeline.settings.FuseSettings` defines them
    filled = FuseSettings.model_construct(method=method, iou_thr=iou_thr, rescore=rescore).resolved()
    iou_thr, rescore = filled["iou_thr"], filled["rescore"]
    fusion.check_params(iou_thr, skip_box_thr=skip_box_thr, thresh=thresh)
    if conf_type not in fusion.CONF_TYPES:
        raise ValueError(f"conf_type: {conf_type!r}, expected one of {fusion.CONF_TYPES}")
    if decay not in ("gaussian", "linear"):
        raise ValueError(f"decay: {decay!r}, expected 'gaussian' or 'linear'")
    if not (np.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma: {sigma} must be > 0")
    if rescore and backend == "ensemble_boxes":
        raise ValueError("rescore: ensemble_boxes returns input scores only; use backend='vectorised'")
    if not by_label and backend == "ensemble_boxes":
        raise ValueError("labels: ensemble_boxes fuses per label only; use backend='vectorised' for 'vote'")

    checked = []
    for t, name in zip(tables, names):
        missing = [c for c in DETECTIONS_SCHEMA.names if c not in t.column_names]
        if missing:
            raise ValueError(f"{name}: missing columns {missing}; expected a detections table")
        t = t.select(DETECTIONS_SCHEMA.names)  # instances: the masks are not fused
        check_values(t, name, score_range=(0.0, 1.0) if method != "nms" else None)
        checked.append(t)
    members, per_table = _members(checked)
    member_weights = _member_weights(weights, members, per_table, names)
    name = source or f"{method}:" + "+".join(members)

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
    params = dict(
        method=method, weights=member_weights, iou_thr=iou_thr, skip_box_thr=skip_box_thr, conf_type=conf_type,
        allows_overflow=allows_overflow, linear=decay == "linear", sigma=sigma, thresh=thresh, rescore=rescore,
        by_label=by_label,
    )  # fmt: skip
    if backend == "vectorised":
        result = _run(flat, **params)
    elif backend == "ensemble_boxes":
        result = _run_reference(flat, **params)
    else:
        raise ValueError(f"backend: {backend!r}, expected one of {fusion.BACKENDS}")

    # Image ascending, score descending (stable: ties keep the method's order), then the cap.
    order = np.lexsort((-result.scores, result.image))
    img = result.image[order]
    if max_per_image is not None:
        first = np.searchsorted(img, img, side="left")
        order = order[np.arange(len(order)) - first < max_per_image]
    return detections_table(
        image_ids[result.image[order]],
        result.labels[order],
        result.scores[order],
        result.pixels()[order],
        name,
    )


def _run(flat: fusion.Flat, method: str, weights: np.ndarray | None, **p: Any) -> fusion.Result:
    by_label = p["by_label"]
    if method == "wbf":
        return fusion.run_wbf(flat, weights, p["iou_thr"], p["skip_box_thr"], p["conf_type"], p["allows_overflow"], by_label)
    if method == "soft-nms":
        return fusion.run_soft_nms(flat, weights, p["linear"], p["iou_thr"], p["sigma"], p["thresh"], p["rescore"], by_label)
    return fusion.run_nms(flat, weights, p["iou_thr"], by_label)


def _run_reference(flat: fusion.Flat, method: str, weights: np.ndarray | None, **p: Any) -> fusion.Result:
    """ensemble_boxes, image by image."""
    if method == "wbf":
        fn, kw = "weighted_boxes_fusion", {k: p[k] for k in ("iou_thr", "skip_box_thr", "conf_type", "allows_overflow")}
    elif method == "soft-nms":
        fn = "soft_nms"
        kw = dict(method=1 if p["linear"] else 2, iou_thr=p["iou_thr"], sigma=p["sigma"], thresh=p["thresh"])
    else:
        fn, kw = "nms", dict(iou_thr=p["iou_thr"])
    parts = []
    by_image = np.argsort(flat.image, kind="stable")  # keeps the member-major order inside an image
    starts = np.flatnonzero(np.diff(flat.image[by_image], prepend=-1))
    for rows in np.split(by_image, starts[1:]):
        r = fusion.reference(fn, flat.take(rows), weights, **kw)
        r.image[:] = flat.image[rows[0]]
        parts.append(r)
    fields = ("boxes", "scores", "labels", "image", "scale")
    return fusion.Result(*(np.concatenate([getattr(r, f) for r in parts]) for f in fields))
