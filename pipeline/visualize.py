"""Overlay pictures: boxes, labels, scores and masks over images, one colour per category."""

from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils

from .categories import Categories
from .coco import CocoIndex, ImageSet, annotation_mask
from .settings import DISPLAY_SCORE_THRESH
from .tables import boxes_of, rles_of

# Result boxes of different categories overlapping at least this much are taken for one object
# in the pictures (fusion per category leaves one box per label the members gave an object).
ONE_BOX_IOU = 0.7


def category_color(category_id: int) -> tuple[int, int, int]:
    """A fixed, well-spread colour for a COCO category id (golden-ratio hue steps)."""
    h = (category_id * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_instances(
    image: np.ndarray,
    boxes: np.ndarray,
    category_ids: Sequence[int],
    categories: Categories,
    scores: Sequence[float] | None = None,
    masks: Sequence[np.ndarray] | None = None,
    alpha: float = 0.45,
    scale: int = 1,
) -> Image.Image:
    """Draw on a copy of `image` (UInt8[H, W, 3]). `boxes`: (N, 4) XYXY pixels; `masks`: Bool[H, W] each.

    `scale` enlarges the picture (nearest neighbour) so labels stay readable on small images.
    """
    up = (lambda a: a.repeat(scale, 0).repeat(scale, 1)) if scale > 1 else (lambda a: a)
    canvas = up(image).astype(np.float32)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4) * scale
    if masks is not None:
        for m, c in zip(masks, category_ids):
            m = up(m.astype(bool))
            canvas[m] = (1 - alpha) * canvas[m] + alpha * np.array(category_color(c), np.float32)
    im = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    font = ImageFont.load_default()
    for k, (box, c) in enumerate(zip(boxes, category_ids)):
        color = category_color(int(c))
        x1, y1, x2, y2 = (float(v) for v in box)
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), outline=color, width=1)
        text = categories.name(int(c)) if int(c) in categories.ids else str(c)
        if scores is not None:
            text += f" {scores[k]:.2f}"
        tx, ty = x1, max(0.0, y1 - 11)
        l, t, r, b = draw.textbbox((tx, ty), text, font=font)
        draw.rectangle((l - 1, t - 1, r + 1, b + 1), fill=(0, 0, 0))
        draw.text((tx, ty), text, fill=color, font=font)
    return im


def _panel(title: str, im: Image.Image) -> Image.Image:
    out = Image.new("RGB", (im.width, im.height + 14), (0, 0, 0))
    out.paste(im, (0, 14))
    ImageDraw.Draw(out).text((2, 1), title, fill=(255, 255, 255), font=ImageFont.load_default())
    return out


def keep_one_box_per_object(
    boxes: np.ndarray, category_ids: Sequence[int], scores: Sequence[float], iou_thr: float = ONE_BOX_IOU
) -> np.ndarray:
    """(N,) bool: the boxes to draw. By score descending, a box is dropped when its IoU with a
    higher-scoring box already kept, of another category, is >= `iou_thr`; boxes of one
    category are left as they are (what the results hold)."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    cats = np.asarray(category_ids).reshape(-1)
    lo, hi = np.maximum(b[:, None, :2], b[None, :, :2]), np.minimum(b[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=2)
    area = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area[:, None] + area[None, :] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    keep = np.zeros(len(b), dtype=bool)
    for i in np.argsort(-np.asarray(scores, np.float64).reshape(-1), kind="stable"):  # a picture's boxes: a few dozen
        keep[i] = not (keep & (cats != cats[i]) & (iou[i] >= iou_thr)).any()
    return keep


def best_per_image(table: pa.Table, k: int) -> pa.Table:
    """The k best-scoring rows of each image (pictures of low-scoring results stay readable)."""
    if table.num_rows == 0:
        return table
    ids = table.column("image_id").to_numpy()
    order = np.lexsort((-table.column("score").to_numpy(), ids))
    first = np.searchsorted(ids[order], ids[order], side="left")
    keep = order[np.arange(len(order)) - first < k]
    return table.take(pa.array(np.sort(keep)))


def render_image(
    image_set: ImageSet,
    image_id: int,
    categories: Categories,
    panels: Sequence[tuple[str, pa.Table | list[dict]]],
    display_score_thresh: float = DISPLAY_SCORE_THRESH,
    one_box_per_object: bool = True,
) -> Image.Image:
    """Side-by-side panels for one image. Each panel: (title, results table or GT annotation list).

    `one_box_per_object`: a result box overlapping a better one of another category
    (`keep_one_box_per_object`) is not drawn, so an object shows one box."""
    img = image_set.read(image_id).permute(1, 2, 0).numpy()
    scale = max(1, 512 // max(img.shape[:2]))
    out = []
    for title, data in panels:
        if isinstance(data, list):  # ground-truth annotations
            boxes = np.array([a["bbox"] for a in data], np.float32).reshape(-1, 4)
            boxes[:, 2:] += boxes[:, :2]
            h, w = img.shape[:2]
            masks = [annotation_mask(a, h, w, title) for a in data if "segmentation" in a]
            pic = draw_instances(img, boxes, [a["category_id"] for a in data], categories, None, masks or None, scale=scale)
        else:
            rows = data.filter(pc.and_(pc.equal(data["image_id"], image_id), pc.greater_equal(data["score"], display_score_thresh)))
            if one_box_per_object and rows.num_rows > 1:
                cats, scores = rows.column("category_id").to_numpy(), rows.column("score").to_numpy()
                rows = rows.filter(pa.array(keep_one_box_per_object(boxes_of(rows), cats, scores)))
            masks = [mask_utils.decode(r) for r in rles_of(rows)] if "mask_counts" in rows.column_names else None
            pic = draw_instances(
                img,
                boxes_of(rows),
                rows.column("category_id").to_pylist(),
                categories,
                rows.column("score").to_pylist(),
                masks,
                scale=scale,
            )
        out.append(_panel(title, pic))
    grid = Image.new("RGB", (sum(p.width for p in out) + 4 * (len(out) - 1), out[0].height), (40, 40, 40))
    x = 0
    for p in out:
        grid.paste(p, (x, 0))
        x += p.width + 4
    return grid


def show(
    image_set: ImageSet,
    categories: Categories,
    out_dir: str | Path,
    results: Sequence[tuple[str, pa.Table]] = (),
    gt: CocoIndex | None = None,
    image_ids: Sequence[int] | None = None,
    max_images: int = 8,
    display_score_thresh: float = DISPLAY_SCORE_THRESH,
    one_box_per_object: bool = True,
) -> list[Path]:
    """Write `out_dir/<image_id>.png` per image: ground truth (if `gt`) beside each named results
    table; `one_box_per_object` as `render_image`."""
    ids = list(image_ids) if image_ids else image_set.image_ids[:max_images]
    panels: list = list(results)
    if not panels and gt is None:
        raise ValueError("show: nothing to draw (no ground truth and no results)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for iid in ids:
        gt_panel = [("ground truth", gt.anns_by_image.get(iid, []))] if gt is not None else []
        path = out_dir / f"{iid}.png"
        render_image(image_set, iid, categories, gt_panel + panels, display_score_thresh, one_box_per_object).save(path)
        written.append(path)
    return written
