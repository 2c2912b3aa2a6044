"""Lock-step kernels: Soft-NMS, NMS and WBF over many independent groups at once.

A group is one (image, category). Soft-NMS, NMS and WBF clustering are sequential inside a
group (each step depends on the previous one), but groups are independent, so we run step
`i` of every group in one numpy call on padded (G, L) arrays: the number of Python-level
steps is the size of the largest group, not the number of boxes. No library does this
(torchvision's batched_nms is hard NMS only and offsets boxes by category, which changes
IoUs in the last bits); hence this module.

Every kernel works on boxes normalised to [0, 1] (XYXY, float64), already cleaned by
`ensemble.fusion` as ensemble_boxes cleans them, and reproduces ensemble_boxes' arithmetic
operation by operation (same formulas, same dtypes, same order of float operations), so the
decisions at `iou == iou_thr` and the float32 roundings of WBF are bit-identical.

Input layout for all kernels: the boxes of a group are contiguous, in the order the
reference algorithm sees them; `sizes` (G,) gives the group lengths in that order.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

# Padded cells per chunk (G x L). Bounds memory (a few (G, L, 4) float64 arrays) while
# keeping the number of numpy calls per step independent of the number of groups.
CHUNK_CELLS = 1 << 18


def _chunks(sizes: np.ndarray, cells: int = CHUNK_CELLS) -> Iterator[np.ndarray]:
    """Group indices in chunks of similar size, largest first, at most `cells` padded cells each."""
    order = np.argsort(-sizes, kind="stable")
    order = order[sizes[order] > 0]
    start = 0
    while start < len(order):
        longest = int(sizes[order[start]])
        stop = min(len(order), start + max(1, cells // longest))
        yield order[start:stop]
        start = stop


def _pad(
    starts: np.ndarray, sizes: np.ndarray, groups: np.ndarray, right: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lay `groups` (sizes descending) out as rows of a (G, L) array.

    Returns the flat index of the box in each cell (0 in padding), the mask of real cells,
    and each cell's rank within its group. `right=True` puts each group at the end of its
    row, so that "the positions after i" hold no padding.
    """
    length = int(sizes[groups[0]])
    n = sizes[groups][:, None]
    rank = np.arange(length)[None, :] - (length - n if right else 0)
    valid = (rank >= 0) & (rank < n)
    index = np.where(valid, starts[groups][:, None] + rank, 0)
    return index, valid, rank


def _planes(boxes: np.ndarray, index: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(5, G, L) planes x1, y1, x2, y2, area of the padded boxes; padding cells hold (0, 0, 0, 0).

    Planes (not (G, L, 4)) so that every step works on contiguous rows: about 3x faster.
    """
    p = np.empty((5, *index.shape))
    p[:4] = np.ascontiguousarray(boxes.T)[:, index]
    p[:4] *= valid  # padding: zero box (x 1.0 leaves real boxes exact)
    p[4] = (p[2] - p[0]) * (p[3] - p[1])
    return p


def _active_counts(sizes_desc: np.ndarray, length: int, offset: int) -> list[int]:
    """For each step i < length: how many leading groups (sizes descending) have > i + offset boxes."""
    return np.searchsorted(-sizes_desc, -(np.arange(length) + offset), side="left").tolist()


def _started(sizes_desc: np.ndarray, length: int) -> list[int]:
    """For right-aligned rows, each step i < length - 1: how many groups have started (>= L - i boxes).

    Those are the leading rows (sizes descending), and their positions i.. are all real boxes:
    a step never computes on padding.
    """
    return np.searchsorted(-sizes_desc, -(length - np.arange(length - 1)), side="right").tolist()


def _starts(sizes: np.ndarray) -> np.ndarray:
    return (np.cumsum(sizes) - sizes).astype(np.int64)


# --------------------------------------------------------------------------- Soft-NMS


def soft_nms_groups(
    boxes: np.ndarray, scores: np.ndarray, sizes: np.ndarray, linear: bool, iou_thr: float, sigma: float
) -> tuple[np.ndarray, np.ndarray]:
    """Soft-NMS (Bodla et al. 2017) in every group, as ensemble_boxes' `cpu_soft_nms_float`.

    boxes: (N, 4) normalised XYXY; scores: (N,) float64 >= 0; sizes: (G,) group lengths.
    Returns `order` (N,): flat box indices, group by group in selection order, and
    `decayed` (N,): each box's score when it was selected. The caller filters on `thresh`.

    Selection as the reference does it: at step i the box at position i is swapped with
    the first maximum of the positions after it if its score is strictly lower, then every
    later position is decayed by the selected box's IoU.
    """
    starts = _starts(sizes)
    order = np.empty(len(scores), dtype=np.int64)
    decayed = np.empty(len(scores), dtype=np.float64)
    for groups in _chunks(sizes):
        index, valid, rank = _pad(starts, sizes, groups, right=True)
        length = index.shape[1]
        # Planes y1, x1, y2, x2 (the reference's order in its IoU), area, score, box index:
        # one fancy-index call swaps them all; lows 0:2 and highs 2:4 are plane slices.
        p = np.empty((7, *index.shape))
        p[:5] = _planes(boxes, index, valid)[[1, 0, 3, 2, 4]]
        p[5] = scores[index]
        p[6] = index
        rows = np.arange(len(groups))
        for i, k in enumerate(_started(sizes[groups], length)):
            r = rows[:k]
            rest = p[5, :k, i + 1 :]
            best = rest.argmax(axis=1)
            # Swap position i with the first best later one where it scores strictly lower;
            # elsewhere j == i, a no-op, so that all groups take one code path.
            j = np.where(p[5, :k, i] < rest[r, best], best + (i + 1), i)
            sel = p[:, r, j]
            p[:, r, j] = p[:, :k, i]
            p[:, :k, i] = sel
            # IoU of the selected box with every later one, as the reference computes it:
            # overlap (y, x) = max(0, min(high) - max(low)); inter = y overlap * x overlap.
            later = p[:, :k, i + 1 :]
            overlap = np.minimum(sel[2:4, :, None], later[2:4])
            overlap -= np.maximum(sel[0:2, :, None], later[0:2])
            np.maximum(overlap, 0.0, out=overlap)
            inter = overlap[0] * overlap[1]
            union = sel[4, :, None] + later[4]
            union -= inter
            ovr = np.divide(inter, union, out=inter)
            if linear:
                weight = np.where(ovr > iou_thr, 1.0 - ovr, 1.0)
            else:  # exp(-(ovr * ovr) / sigma); -(a) / b == a / -b exactly
                weight = np.multiply(ovr, ovr, out=ovr)
                np.divide(weight, -sigma, out=weight)
                np.exp(weight, out=weight)
            rest *= weight
        out = (starts[groups][:, None] + rank)[valid]
        order[out] = p[6][valid].astype(np.int64)
        decayed[out] = p[5][valid]
    return order, decayed


# --------------------------------------------------------------------------- NMS


def nms_groups(boxes: np.ndarray, sizes: np.ndarray, iou_thr: float) -> np.ndarray:
    """Greedy NMS in every group, as ensemble_boxes' `nms_float_fast`.

    boxes: (N, 4) normalised XYXY, each group already sorted in selection order (score
    descending); sizes: (G,). Returns a (N,) bool mask of kept boxes. A box is suppressed
    by a kept one when `not iou <= iou_thr`.
    """
    starts = _starts(sizes)
    keep = np.zeros(len(boxes), dtype=bool)
    for groups in _chunks(sizes):
        index, valid, _ = _pad(starts, sizes, groups, right=True)
        length = index.shape[1]
        p = _planes(boxes, index, valid)
        suppressed = ~valid
        for i, k in enumerate(_started(sizes[groups], length)):
            live = ~suppressed[:k, i]
            if not live.any():
                continue
            # IoU of box i with every later one, as nms_float_fast: inter = x overlap * y overlap.
            later = p[:, :k, i + 1 :]
            overlap = np.minimum(p[2:4, :k, i, None], later[2:4])
            overlap -= np.maximum(p[0:2, :k, i, None], later[0:2])
            np.maximum(overlap, 0.0, out=overlap)
            inter = overlap[0] * overlap[1]
            union = p[4, :k, i, None] + later[4]
            union -= inter
            ovr = np.divide(inter, union, out=inter)
            suppressed[:k, i + 1 :] |= live[:, None] & ~(ovr <= iou_thr)
        keep[index[~suppressed]] = True
    return keep


# --------------------------------------------------------------------------- WBF


def wbf_groups(
    boxes: np.ndarray,
    scores: np.ndarray,
    sizes: np.ndarray,
    iou_thr: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted Boxes Fusion clustering (Solovyev et al.) in every group, as ensemble_boxes.

    boxes: (N, 4) normalised XYXY; scores: (N,) weighted scores (score x model weight), each
    group sorted as the reference sorts it; sizes: (G,).
    Returns `cluster` (N,): each box's cluster number in its group (clusters numbered in
    creation order); `fused` (N, 4) and `conf` (N,): the fused box and the sum of weighted
    scores of cluster c of the group that starts at row r, stored at row r + c.

    Bit for bit as ensemble_boxes: a one-box cluster keeps the raw float64 box; once a
    second box joins, the fused box is float32(float32 running sum of score * box / conf),
    as its `get_weighted_box` computes it in a float32 array.
    """
    starts = _starts(sizes)
    cluster = np.empty(len(scores), dtype=np.int64)
    fused_out = np.zeros((len(scores), 4), dtype=np.float64)
    conf_out = np.zeros(len(scores), dtype=np.float64)
    for groups in _chunks(sizes):
        index, valid, _ = _pad(starts, sizes, groups)
        g_count, length = index.shape
        # Box planes x1, y1, x2, y2, 1, area: the 1 makes `conf += score` part of the sum update.
        b = np.empty((6, g_count, length))
        b[[0, 1, 2, 3, 5]] = _planes(boxes, index, valid)
        b[4] = 1.0
        s = scores[index]
        # Cluster planes x1, y1, x2, y2, area. Clusters not yet made hold a box outside
        # [0, 1]: IoU 0 with every box, so never matched.
        fused = np.empty((5, g_count, length))
        fused[:4] = np.array([2.0, 2.0, 3.0, 3.0])[:, None, None]
        fused[4] = 1.0
        # Running sums of score * (x1, y1, x2, y2) (float32 values) and of scores (conf).
        sums = np.zeros((5, g_count, length))
        n_clusters = np.zeros(g_count, dtype=np.int64)
        assign = np.zeros((g_count, length), dtype=np.int64)
        rows = np.arange(g_count)
        with np.errstate(invalid="ignore", divide="ignore"):  # clusters of 0 scores: NaN, as the reference
            for j, k in enumerate(_active_counts(sizes[groups], length, 0)):
                r = rows[:k]
                nb = b[:, :k, j]
                ns = s[:k, j]
                made = int(n_clusters[:k].max())
                # IoU with every cluster's current box, as find_matching_box_fast computes it.
                f = fused[:, :k, :made]
                overlap = np.minimum(f[2:4], nb[2:4, :, None])
                overlap -= np.maximum(f[0:2], nb[0:2, :, None])
                np.maximum(overlap, 0.0, out=overlap)
                inter = overlap[0] * overlap[1]
                union = f[4] + nb[5, :, None]
                union -= inter
                iou = np.divide(inter, union, out=inter)
                best = iou.argmax(axis=1) if made else np.zeros(k, dtype=np.int64)
                new = iou[r, best] <= iou_thr if made else np.ones(k, dtype=bool)
                c = np.where(new, n_clusters[:k], best)
                # Join cluster c; a new cluster starts from zero sums, which gives the same numbers.
                acc = sums[:, r, c]
                acc += ns * nb[:5]
                acc[:4] = acc[:4].astype(np.float32)  # get_weighted_box sums in a float32 array
                sums[:, r, c] = acc
                box = np.where(new, nb[:4], (acc[:4] / acc[4]).astype(np.float32))
                fused[:4, r, c] = box
                fused[4, r, c] = (box[2] - box[0]) * (box[3] - box[1])
                assign[:k, j] = c
                n_clusters[:k] += new
        cluster[index[valid]] = assign[valid]
        made = np.arange(length)[None, :] < n_clusters[:, None]
        rows_out = (starts[groups][:, None] + np.arange(length)[None, :])[made]
        fused_out[rows_out] = fused[:4].transpose(1, 2, 0)[made]
        conf_out[rows_out] = sums[4][made]
    return cluster, fused_out, conf_out
