"""Soft-NMS, NMS and Weighted Boxes Fusion of the detections of several models on one image.

Inputs are per model ("model" = one member of the fusion: a model, or one test-time view of
a model): XYXY boxes in absolute pixels of the original image, scores, integer labels. The
algorithms run per category on boxes normalised by the image's (height, width), exactly as
`ensemble_boxes` 1.0.9 runs them, and return absolute pixels.

`backend="vectorised"` (default) is ours (`ensemble._core`); `backend="ensemble_boxes"`
calls the reference. Ours reproduces the reference's results and order; its odd behaviours
are kept by default and listed in the docstrings ("Reference behaviour").
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np

from twopass.pipeline.settings import DEFAULT_IOU_THR, FUSE, FuseSettings

from . import _core

Backend = Literal["vectorised", "ensemble_boxes"]
ConfType = Literal["avg", "max", "box_and_model_avg", "absent_model_aware_avg"]
CONF_TYPES = ("avg", "max", "box_and_model_avg", "absent_model_aware_avg")
BACKENDS = ("vectorised", "ensemble_boxes")


# --------------------------------------------------------------------------- inputs


@dataclass
class Flat:
    """All boxes of all models, concatenated model after model (the reference's order).

    boxes: (N, 4) float64 normalised XYXY (not yet clipped); scores: (N,) float64;
    labels: (N,) int64; model: (N,) int64 member index; image: (N,) int64 image index;
    scale: (N, 4) float64 (w, h, w, h) of each box's image, to go back to pixels.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    model: np.ndarray
    image: np.ndarray
    scale: np.ndarray
    n_models: int

    def take(self, rows: np.ndarray) -> "Flat":
        return Flat(
            self.boxes[rows], self.scores[rows], self.labels[rows], self.model[rows],
            self.image[rows], self.scale[rows], self.n_models,
        )  # fmt: skip


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _numpy(x: Any) -> np.ndarray:
    if _is_torch(x):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def check_weights(weights: Sequence[float] | None, n_models: int, what: str = "weights") -> np.ndarray | None:
    """(M,) float64 weights, or None. Raises unless one finite positive weight per member."""
    if weights is None:
        return None
    w = np.asarray(_numpy(weights), dtype=np.float64).reshape(-1)
    if len(w) != n_models:
        raise ValueError(f"{what}: {len(w)} weights for {n_models} inputs; give one weight per input")
    bad = np.flatnonzero(~np.isfinite(w) | (w <= 0))
    if bad.size:
        raise ValueError(f"{what}: weight {w[bad[0]]} at position {bad[0]} must be finite and > 0")
    return w


def check_params(iou_thr: float, **finite: float) -> None:
    if not 0.0 <= iou_thr <= 1.0:
        raise ValueError(f"iou_thr: {iou_thr} is outside [0, 1]")
    for name, v in finite.items():
        if not np.isfinite(v):
            raise ValueError(f"{name}: {v} is not finite")


def _image_inputs(
    boxes: Any, scores: Any, labels: Any, image_size: Sequence[float], unit_scores: bool
) -> tuple[Flat, bool]:
    """Validate one image's per-model inputs; return them flat and whether they were tensors."""
    if (_is_torch(boxes) or isinstance(boxes, np.ndarray)) and boxes.ndim == 2:
        boxes, scores, labels = [boxes], [scores], [labels]  # one model given as one (N, 4) array
    if not (len(boxes) == len(scores) == len(labels)):
        raise ValueError(f"inputs: {len(boxes)} box arrays, {len(scores)} score arrays, {len(labels)} label arrays")
    tensors = any(_is_torch(x) for x in (*boxes, *scores, *labels))
    h, w = (float(v) for v in image_size)
    if not (np.isfinite(h) and np.isfinite(w) and h > 0 and w > 0):
        raise ValueError(f"image_size: (height, width) must be positive, got {tuple(image_size)}")
    parts_b, parts_s, parts_l, parts_m = [], [], [], []
    for m, (b, s, lab) in enumerate(zip(boxes, scores, labels)):
        b = _numpy(b).astype(np.float64, copy=False)
        s = _numpy(s).astype(np.float64, copy=False).reshape(-1)
        lab = _numpy(lab).reshape(-1)
        if b.size == 0:
            b = b.reshape(0, 4)
        if b.ndim != 2 or b.shape[1] != 4:
            raise ValueError(f"boxes[{m}]: shape {b.shape}, expected (N, 4) XYXY")
        if not (len(s) == len(lab) == len(b)):
            raise ValueError(f"model {m}: {len(b)} boxes, {len(s)} scores, {len(lab)} labels")
        check_finite(b, f"boxes[{m}]")
        check_finite(s, f"scores[{m}]")
        if unit_scores:
            check_unit(s, f"scores[{m}]")
        if lab.dtype.kind not in "iu":
            labf = lab.astype(np.float64)
            if not np.all(np.isfinite(labf) & (labf == np.round(labf))):
                raise ValueError(f"labels[{m}]: labels must be integers")
        parts_b.append(b)
        parts_s.append(s)
        parts_l.append(lab.astype(np.int64))
        parts_m.append(np.full(len(b), m, dtype=np.int64))
    n = sum(len(b) for b in parts_b)
    scale = np.array([w, h, w, h], dtype=np.float64)
    flat = Flat(
        boxes=np.concatenate(parts_b) / scale if n else np.zeros((0, 4)),
        scores=np.concatenate(parts_s) if n else np.zeros(0),
        labels=np.concatenate(parts_l) if n else np.zeros(0, dtype=np.int64),
        model=np.concatenate(parts_m) if n else np.zeros(0, dtype=np.int64),
        image=np.zeros(n, dtype=np.int64),
        scale=np.broadcast_to(scale, (n, 4)),
        n_models=len(parts_b),
    )
    return flat, tensors


def check_finite(a: np.ndarray, what: str) -> None:
    bad = np.flatnonzero(~np.isfinite(a).reshape(len(a), -1).all(axis=1)) if len(a) else []
    if len(bad):
        i = bad[0]
        raise ValueError(f"{what}: non-finite value {a[i].tolist()} at row {i}; {len(bad)} such rows")


def check_unit(s: np.ndarray, what: str) -> None:
    bad = np.flatnonzero((s < 0) | (s > 1))
    if bad.size:
        raise ValueError(f"{what}: score {s[bad[0]]} at row {bad[0]} is outside [0, 1]; {bad.size} such rows")


def clean_boxes(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Clip normalised boxes to [0, 1], order their corners, mark those with non-zero area.

    As ensemble_boxes' `prepare_boxes` / `prefilter_boxes` do. b: (N, 4); returns (N, 4), (N,) bool.
    """
    b = np.clip(b, 0.0, 1.0)
    lo, hi = np.minimum(b[:, :2], b[:, 2:]), np.maximum(b[:, :2], b[:, 2:])
    b = np.concatenate([lo, hi], axis=1)
    return b, (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) != 0.0


def _group_sizes(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Lengths of the runs of equal (image, label) in arrays already sorted by them."""
    if len(image) == 0:
        return np.zeros(0, dtype=np.int64)
    change = np.flatnonzero((image[1:] != image[:-1]) | (labels[1:] != labels[:-1])) + 1
    return np.diff(np.concatenate([[0], change, [len(image)]])).astype(np.int64)


# --------------------------------------------------------------------------- kernels on Flat


@dataclass
class Result:
    """Fused boxes, grouped by (image, label) ascending (by image alone when fused across
    labels, `by_label=False`), each group in the algorithm's order.

    boxes: (K, 4) float64 normalised; scores: (K,); labels: (K,) int64; image: (K,) int64;
    scale: (K, 4) to go back to pixels.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    image: np.ndarray
    scale: np.ndarray

    def pixels(self) -> np.ndarray:
        return self.boxes * self.scale


def _groups(flat: Flat, by_label: bool) -> np.ndarray:
    """The label each box is grouped by: its own, or one for all (fusion across labels)."""
    return flat.labels if by_label else np.zeros_like(flat.labels)


def _weighted_nms_scores(flat: Flat, weights: np.ndarray | None) -> np.ndarray:
    if weights is None:
        return flat.scores
    return (flat.scores * weights[flat.model]) / weights.sum()  # nms_method's weighting


def run_soft_nms(flat: Flat, weights: np.ndarray | None, settings: FuseSettings, by_label: bool = True, **_: Any) -> Result:
    """Soft-NMS with the settings' `decay`, `iou`, `sigma`, `thresh` and `rescores`.
    `by_label=False`: a box decays the boxes of every label (class-agnostic); each keeps its label."""
    scores = _weighted_nms_scores(flat, weights)
    boxes, keep = clean_boxes(flat.boxes)
    group = _groups(flat, by_label)
    rows = np.flatnonzero(keep)
    rows = rows[np.lexsort((group[rows], flat.image[rows]))]  # stable: model order inside a group
    sizes = _group_sizes(flat.image[rows], group[rows])
    order, decayed = _core.soft_nms_groups(
        boxes[rows], scores[rows], sizes, settings.decay == "linear", settings.iou, settings.sigma
    )
    kept = decayed > settings.thresh
    out = rows[order][kept]
    return Result(
        boxes=boxes[out],
        scores=decayed[kept] if settings.rescores else scores[out],
        labels=flat.labels[out],
        image=flat.image[out],
        scale=flat.scale[out],
    )


def run_nms(flat: Flat, weights: np.ndarray | None, settings: FuseSettings, by_label: bool = True, **_: Any) -> Result:
    """Greedy NMS at the settings' `iou`. `by_label=False`: a kept box suppresses boxes of every label
    (class-agnostic NMS); it keeps its label."""
    scores = _weighted_nms_scores(flat, weights)
    boxes, keep = clean_boxes(flat.boxes)
    group = _groups(flat, by_label)
    rows = np.flatnonzero(keep)
    rows = rows[_sorted_like_reference(scores[rows], flat.image[rows], group[rows], _numba_argsort)]
    sizes = _group_sizes(flat.image[rows], group[rows])
    out = rows[_core.nms_groups(boxes[rows], sizes, settings.iou)]
    return Result(boxes[out], scores[out], flat.labels[out], flat.image[out], flat.scale[out])


def _sorted_like_reference(scores: np.ndarray, image: np.ndarray, labels: np.ndarray, argsort: Any) -> np.ndarray:
    """Indices sorted by (image, label), then as the reference sorts a label's boxes.

    The reference sorts each label's scores with `argsort(scores)[::-1]`. Without equal
    scores any descending sort gives that order; a group with equal scores is re-sorted with
    the reference's own `argsort` on the same array, so ties come out in the same order.
    """
    order = np.lexsort((-scores, labels, image))
    sizes = _group_sizes(image[order], labels[order])
    s = scores[order]
    tie = s[1:] == s[:-1]
    if tie.any():
        ends = np.cumsum(sizes)
        starts = ends - sizes
        for g in np.unique(np.searchsorted(ends, np.flatnonzero(tie) + 1, side="right")):
            members = np.sort(order[starts[g] : ends[g]])  # the group in input order
            order[starts[g] : ends[g]] = members[argsort(scores[members])[::-1]]
    return order


_NUMBA_ARGSORT: Any = None


def _numba_argsort(a: np.ndarray) -> np.ndarray:
    """np.argsort as numba compiles it (its own quicksort), which `nms_float_fast` uses.

    Only called for groups with equal scores, to order ties as the reference does.
    """
    global _NUMBA_ARGSORT
    if _NUMBA_ARGSORT is None:
        import numba

        _NUMBA_ARGSORT = numba.njit(lambda x: np.argsort(x))
    return _NUMBA_ARGSORT(np.ascontiguousarray(a, dtype=np.float64))


def run_wbf(
    flat: Flat, weights: np.ndarray | None, settings: FuseSettings, by_label: bool = True, allows_overflow: bool = False
) -> Result:
    """WBF with the settings' `iou`, `skip_box_thr` and `conf_type`.
    `by_label=False`: boxes of all labels cluster together, as if they had one label; a
    fused box takes the label whose boxes in its cluster have the largest summed score x
    model weight (ties: the smaller label)."""
    conf_type = settings.conf_type
    weights = np.ones(flat.n_models) if weights is None else weights
    boxes, keep = clean_boxes(flat.boxes)
    keep &= ~(flat.scores < settings.skip_box_thr)
    group = _groups(flat, by_label)
    rows = np.flatnonzero(keep)
    s = flat.scores[rows] * weights[flat.model[rows]]  # prefilter_boxes: score * weight
    order = _sorted_like_reference(s, flat.image[rows], group[rows], np.argsort)
    rows, s = rows[order], s[order]
    model = flat.model[rows]
    w = weights[model]
    sizes = _group_sizes(flat.image[rows], group[rows])
    cluster, fused, conf = _core.wbf_groups(boxes[rows], s, sizes, settings.iou)

    # Cluster c of the group starting at row r is stored at row r + c.
    starts = np.repeat(np.cumsum(sizes) - sizes, sizes)
    cid = starts + cluster
    n = len(rows)
    count = np.bincount(cid, minlength=n)
    w_sum = np.bincount(cid, weights=w, minlength=n)  # sequential, in box order, as `w += b[2]`
    exists, first = np.unique(cid, return_index=True)  # first member = highest score
    count, w_sum, fused, conf = count[exists], w_sum[exists], fused[exists], conf[exists]

    # get_weighted_box stores score and weight in a float32 array once a cluster has 2 boxes.
    single = count == 1
    if conf_type == "max":
        score = s[first]
    else:
        score = conf / count
    score = np.where(single, s[first], score.astype(np.float32).astype(np.float64))
    w_box = np.where(single, w[first], w_sum.astype(np.float32).astype(np.float64))

    if conf_type in ("box_and_model_avg", "absent_model_aware_avg"):
        present = np.zeros((n, flat.n_models), dtype=bool)
        present[cid, model] = True
        present = present[exists]
    if conf_type == "box_and_model_avg":
        score = score * count / w_box
        score = score * (present * weights).sum(axis=1) / weights.sum()
    elif conf_type == "absent_model_aware_avg":
        score = score * count / (w_box + (~present * weights).sum(axis=1))
    elif conf_type == "max":
        score = score / weights.max()
    elif not allows_overflow:
        score = score * np.minimum(flat.n_models, count) / weights.sum()
    else:
        score = score * count / weights.sum()

    src = rows[first]  # image and scale of a cluster are those of its members; so is the label, by label
    labels = flat.labels[src] if by_label else _vote(cid, flat.labels[rows], s)
    return Result(fused, score, labels, flat.image[src], flat.scale[src])


def _vote(cid: np.ndarray, labels: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Per cluster (ascending cluster id), the label with the largest sum of `s` (score x
    model weight) over its boxes in the cluster; ties: the smaller label."""
    uniq, li = np.unique(labels, return_inverse=True)
    pair, inv = np.unique(cid * len(uniq) + li, return_inverse=True)  # (cluster, label) pairs, cluster ascending
    total = np.bincount(inv, weights=s)
    pair_cid, pair_label = pair // len(uniq), uniq[pair % len(uniq)]
    best = np.lexsort((pair_label, -total, pair_cid))  # each cluster's winner first
    return pair_label[best[np.flatnonzero(np.diff(pair_cid[best], prepend=-1))]]


# --------------------------------------------------------------------------- reference


def _quiet_reference(fn_name: str, *args: Any, **kwargs: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Call ensemble_boxes without its per-box prints and warnings about clipped boxes."""
    import ensemble_boxes

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return getattr(ensemble_boxes, fn_name)(*args, **kwargs)


def reference(fn_name: str, flat: Flat, weights: np.ndarray | None, **params: Any) -> Result:
    """The same fusion of one image by ensemble_boxes. `fn_name`: soft_nms, nms or weighted_boxes_fusion."""
    per_model = [np.flatnonzero(flat.model == m) for m in range(flat.n_models)]
    b = [flat.boxes[r] for r in per_model]
    s = [flat.scores[r].copy() for r in per_model]  # nms_method rescales these lists in place
    lab = [flat.labels[r] for r in per_model]
    w = None if weights is None else weights.tolist()
    none = np.zeros(0, dtype=np.int64)
    empty = Result(np.zeros((0, 4)), np.zeros(0), none, none.copy(), np.zeros((0, 4)))
    if fn_name != "weighted_boxes_fusion" and not clean_boxes(flat.boxes)[1].any():
        return empty  # nms_method fails on np.concatenate([]) when no box is left
    if len(flat.boxes) == 0:
        return empty
    out_b, out_s, out_l = _quiet_reference(fn_name, b, s, lab, weights=w, **params)
    n = len(out_b)
    scale = flat.scale[0] if len(flat.scale) else np.ones(4)
    return Result(
        np.asarray(out_b, dtype=np.float64).reshape(-1, 4),
        np.asarray(out_s, dtype=np.float64),
        np.asarray(out_l).astype(np.int64),
        np.zeros(n, dtype=np.int64),
        np.broadcast_to(scale, (n, 4)),
    )


# --------------------------------------------------------------------------- the references
# `pipeline.settings.FUSION_METHODS` names these beside the kernels above (`run_wbf`,
# `run_soft_nms`, `run_nms`): each runs one method on a `Flat` with the settings record as it
# is (validated where it was made: the CLI, the pipeline config).


def wbf_reference(flat: Flat, weights: np.ndarray | None, s: FuseSettings, allows_overflow: bool = False) -> Result:
    return reference("weighted_boxes_fusion", flat, weights, iou_thr=s.iou, skip_box_thr=s.skip_box_thr,
                     conf_type=s.conf_type, allows_overflow=allows_overflow)  # fmt: skip


def soft_nms_reference(flat: Flat, weights: np.ndarray | None, s: FuseSettings, **_: Any) -> Result:
    method = 1 if s.decay == "linear" else 2
    return reference("soft_nms", flat, weights, method=method, iou_thr=s.iou, sigma=s.sigma, thresh=s.thresh)


def nms_reference(flat: Flat, weights: np.ndarray | None, s: FuseSettings, **_: Any) -> Result:
    return reference("nms", flat, weights, iou_thr=s.iou)


# --------------------------------------------------------------------------- public API


def _output(result: Result, tensors: bool) -> tuple[Any, Any, Any]:
    boxes, scores, labels = result.pixels(), np.ascontiguousarray(result.scores), result.labels
    if tensors:
        import torch

        return torch.from_numpy(np.ascontiguousarray(boxes)), torch.from_numpy(scores), torch.from_numpy(labels)
    return boxes, scores, labels


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend: {backend!r}, expected one of {BACKENDS}")


def _checked(method: str, **params: Any) -> FuseSettings:
    """The array functions' parameters as the record the methods read. They are checked by the
    functions themselves with ensemble_boxes' ranges (an IoU threshold of 0 or 1 allowed, as in
    the library these functions stand in for), wider than a pipeline's `FuseSettings`: hence no
    second validation here."""
    return FuseSettings.model_construct(method=method, **params)


def soft_nms(
    boxes: Any,
    scores: Any,
    labels: Any,
    image_size: Sequence[float],
    *,
    method: Literal["gaussian", "linear"] = FUSE.decay,
    iou_thr: float = DEFAULT_IOU_THR["soft-nms"],
    sigma: float = FUSE.sigma,
    thresh: float = FUSE.thresh,
    weights: Sequence[float] | None = None,
    # As ensemble_boxes' soft_nms, whose drop-in this is: the input scores. The table-level
    # `fuse` and the stages rescore by default (`pipeline.settings.FuseSettings.rescore`).
    rescore: bool = False,
    backend: Backend = "vectorised",
) -> tuple[Any, Any, Any]:
    """Soft-NMS (Bodla et al. 2017) of one image, per label, over the boxes of all models.

    boxes: M arrays or tensors (N_m, 4) XYXY in absolute pixels (or one (N, 4) for one model);
    scores: M (N_m,) in [0, 1]; labels: M (N_m,) integers; image_size: (height, width).
    method: "gaussian" (decay exp(-iou^2 / sigma)) or "linear" (1 - iou where iou > iou_thr).
    Returns boxes (K, 4) float64 absolute pixels, scores (K,) float64, labels (K,) int64:
    labels ascending, each label's boxes in selection order; tensors if any input was one.

    Reference behaviour (ensemble_boxes 1.0.9), kept: boxes are clipped to the image and
    zero-area boxes dropped; the models' boxes are simply concatenated; with `weights`, each
    model's scores are multiplied by weight / sum(weights) first; a box is kept when its
    decayed score is > `thresh`, but the score returned is its (weighted) input score, not the
    decayed one. `rescore=True` returns the decayed scores instead (Bodla et al.'s output).
    """
    _check_backend(backend)
    if method not in ("gaussian", "linear"):
        raise ValueError(f"method: {method!r}, expected 'gaussian' or 'linear'")
    check_params(iou_thr, thresh=thresh)
    if not (np.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma: {sigma} must be > 0")
    flat, tensors = _image_inputs(boxes, scores, labels, image_size, unit_scores=True)
    w = check_weights(weights, flat.n_models)
    if backend == "ensemble_boxes" and rescore:
        raise ValueError("rescore: ensemble_boxes returns input scores only; use backend='vectorised'")
    settings = _checked("soft-nms", iou_thr=iou_thr, decay=method, sigma=sigma, thresh=thresh, rescore=rescore)
    run = soft_nms_reference if backend == "ensemble_boxes" else run_soft_nms
    return _output(run(flat, w, settings), tensors)


def nms(
    boxes: Any,
    scores: Any,
    labels: Any,
    image_size: Sequence[float],
    *,
    iou_thr: float = DEFAULT_IOU_THR["nms"],
    weights: Sequence[float] | None = None,
    backend: Backend = "vectorised",
) -> tuple[Any, Any, Any]:
    """Greedy NMS of one image, per label, over the boxes of all models.

    Shapes, frames and return values as `soft_nms`. A box is suppressed by a kept box of the
    same label when their IoU is > `iou_thr`. Scores may be any finite numbers.

    Reference behaviour, kept: clipping, zero-area boxes dropped, weighting as `soft_nms`.
    Equal scores are ordered by numba's quicksort, as the reference orders them (ours calls
    numba's argsort for the labels that have ties).
    """
    _check_backend(backend)
    check_params(iou_thr)
    flat, tensors = _image_inputs(boxes, scores, labels, image_size, unit_scores=False)
    w = check_weights(weights, flat.n_models)
    run = nms_reference if backend == "ensemble_boxes" else run_nms
    return _output(run(flat, w, _checked("nms", iou_thr=iou_thr)), tensors)


def weighted_boxes_fusion(
    boxes: Any,
    scores: Any,
    labels: Any,
    image_size: Sequence[float],
    *,
    weights: Sequence[float] | None = None,
    iou_thr: float = DEFAULT_IOU_THR["wbf"],
    skip_box_thr: float = FUSE.skip_box_thr,
    conf_type: ConfType = FUSE.conf_type,
    allows_overflow: bool = False,
    backend: Backend = "vectorised",
) -> tuple[Any, Any, Any]:
    """Weighted Boxes Fusion (Solovyev et al. 2021) of one image, per label, across models.

    Shapes and frames as `soft_nms`. Boxes with score < `skip_box_thr` are dropped; the rest,
    by score x model weight descending, join the first cluster whose current fused box has
    the highest IoU > `iou_thr`, or start one. A cluster's box is the score-weighted mean of
    its boxes; its score follows `conf_type` ("avg", "max", "box_and_model_avg",
    "absent_model_aware_avg"). Returns fused boxes, scores and labels, score descending.

    Reference behaviour, kept: boxes clipped to the image, zero-area boxes dropped; a fused box
    and score are rounded to float32 once a cluster has two boxes; "avg" multiplies the mean
    score by min(M, n_boxes) / sum(weights) (unless `allows_overflow`), so a box found by
    fewer models scores lower.
    """
    _check_backend(backend)
    if conf_type not in CONF_TYPES:
        raise ValueError(f"conf_type: {conf_type!r}, expected one of {CONF_TYPES}")
    check_params(iou_thr, skip_box_thr=skip_box_thr)
    flat, tensors = _image_inputs(boxes, scores, labels, image_size, unit_scores=True)
    w = check_weights(weights, flat.n_models)
    settings = _checked("wbf", iou_thr=iou_thr, skip_box_thr=skip_box_thr, conf_type=conf_type)
    if backend == "ensemble_boxes":
        return _output(wbf_reference(flat, w, settings, allows_overflow=allows_overflow), tensors)
    result = run_wbf(flat, w, settings, allows_overflow=allows_overflow)
    # The reference lists labels in order of first appearance, then sorts by score with
    # `argsort()[::-1]`; the same call on the same array gives the same order for ties.
    kept = flat.labels[clean_boxes(flat.boxes)[1] & ~(flat.scores < skip_box_thr)]
    uniq, first = np.unique(kept, return_index=True)
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(uniq))
    by_label = np.argsort(rank[np.searchsorted(uniq, result.labels)], kind="stable")
    order = by_label[np.argsort(result.scores[by_label])[::-1]]
    fields = ("boxes", "scores", "labels", "image", "scale")
    return _output(Result(*(getattr(result, f)[order] for f in fields)), tensors)
