"""Synthetic COCO benchmark data: textured shapes on cluttered, noisy backgrounds.

Hard enough to separate models: 8 outlines (some with holes or concavities), random colours
and textures, unlabelled clutter of the same colours, objects from COCO-small to COCO-large,
partial occlusion (the hidden part removed from the lower object's mask), objects cut by the
border, 4 to 14 objects an image. Image i depends only on (seed, i), so any subset of a set
can be regenerated and train/val differ by seed.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from .fileio import write_json

CATEGORIES = ("ellipse", "rectangle", "triangle", "star", "cross", "ring", "hexagon", "crescent")
# Side lengths as fractions of the image size: COCO small (< 32^2 px at 256), medium, large.
_SIZE_CLASSES = ((0.05, 0.12), (0.13, 0.4), (0.6, 1.1))
_SIZE_PROBS = (0.35, 0.35, 0.3)
MIN_VISIBLE_FRACTION = 0.35  # objects hidden more than this are not drawn at all
MIN_VISIBLE_PIXELS = 12


def _polygon(cat: str, r: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Outline(s) of a shape of radius ~r around the origin: [outer, hole?] as (K, 2) arrays."""
    def circle(n: int, ax: float, ay: float, cx: float = 0.0) -> np.ndarray:
        t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        return np.stack([cx + ax * np.cos(t), ay * np.sin(t)], 1)

    if cat == "ellipse":
        return [circle(40, r, r * rng.uniform(0.45, 1.0))]
    if cat == "rectangle":
        w, h = r, r * rng.uniform(0.35, 1.0)
        return [np.array([[-w, -h], [w, -h], [w, h], [-w, h]])]
    if cat == "triangle":
        t = np.array([90, 210, 330]) + rng.uniform(-20, 20, 3)
        t = np.deg2rad(t)
        return [np.stack([r * np.cos(t), r * np.sin(t)], 1)]
    if cat == "star":
        t = np.linspace(0, 2 * np.pi, 10, endpoint=False)
        rad = np.where(np.arange(10) % 2 == 0, r, r * rng.uniform(0.35, 0.55))
        return [np.stack([rad * np.cos(t), rad * np.sin(t)], 1)]
    if cat == "cross":
        a = r * rng.uniform(0.25, 0.4)
        return [np.array([[-a, -r], [a, -r], [a, -a], [r, -a], [r, a], [a, a], [a, r], [-a, r], [-a, a], [-r, a], [-r, -a], [-a, -a]])]
    if cat == "ring":
        return [circle(40, r, r), circle(32, r * rng.uniform(0.45, 0.65), r * rng.uniform(0.45, 0.65))]
    if cat == "hexagon":
        t = np.linspace(0, 2 * np.pi, 6, endpoint=False)
        return [np.stack([r * np.cos(t), r * np.sin(t) * rng.uniform(0.7, 1.0)], 1)]
    if cat == "crescent":
        return [circle(40, r, r), circle(40, r * 0.85, r * 0.85, cx=r * rng.uniform(0.35, 0.6))]
    raise ValueError(cat)


def _shape_mask(cat: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Bool[S, S] mask of one randomly placed, scaled and rotated shape (may leave the image)."""
    cls = rng.choice(3, p=_SIZE_PROBS)
    lo, hi = _SIZE_CLASSES[cls]
    r = 0.5 * size * rng.uniform(lo, hi)
    cx, cy = rng.uniform(-0.1 * size, 1.1 * size, 2)  # centres off the image cut objects at the border
    angle = rng.uniform(0, 2 * np.pi)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    rings = [p @ rot.T + (cx, cy) for p in _polygon(cat, r, rng)]
    im = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(im)
    draw.polygon([tuple(p) for p in rings[0]], fill=1)
    for hole in rings[1:]:
        draw.polygon([tuple(p) for p in hole], fill=0)
    return np.asarray(im, dtype=bool)


def _texture(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Float32[h, w, 3] in [0, 1]: flat, striped, checked or graded colour, with grain."""
    c1, c2 = rng.uniform(0, 1, 3).astype(np.float32), rng.uniform(0, 1, 3).astype(np.float32)
    kind = rng.integers(4)
    if kind == 0:
        return c1 + rng.normal(0, 0.03, (h, w, 1)).astype(np.float32)
    theta = rng.uniform(0, np.pi)
    yy, xx = np.ogrid[0:h, 0:w]
    u = (xx * math.cos(theta) + yy * math.sin(theta)).astype(np.float32)
    if kind == 1:
        t = (np.sin(u * (2 * np.pi / rng.uniform(4, 14))) > 0).astype(np.float32)
    elif kind == 2:
        p = rng.uniform(4, 12)
        v = (-xx * math.sin(theta) + yy * math.cos(theta)).astype(np.float32)
        t = ((np.floor(u / p) + np.floor(v / p)) % 2).astype(np.float32)
    else:
        t = (u - u.min()) / max(float(np.ptp(u)), 1e-6)
    return c1 * (1 - t[..., None]) + c2 * t[..., None]


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """Float[S, S, 3]: smooth coloured noise plus unlabelled clutter (lines and blobs)."""
    low = rng.uniform(0, 1, (4, 4, 3)).astype(np.float32)
    bg = np.asarray(Image.fromarray((low * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC), np.float32) / 255
    im = Image.fromarray((bg * 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(rng.integers(3, 10)):  # thin lines: edges that are no object's
        xy = rng.uniform(0, size, 4)
        draw.line(tuple(xy), fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=int(rng.integers(1, 4)))
    for _ in range(rng.integers(2, 7)):  # irregular blobs: object-like colour and texture, no label
        c = rng.uniform(0, size, 2)
        k = int(rng.integers(5, 9))
        t = np.sort(rng.uniform(0, 2 * np.pi, k))
        rad = rng.uniform(0.02, 0.12) * size * rng.uniform(0.4, 1.0, k)
        pts = [(float(c[0] + r * math.cos(a)), float(c[1] + r * math.sin(a))) for r, a in zip(rad, t)]
        draw.polygon(pts, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return np.array(im, np.float32) / 255


def make_image(size: int, seed: int, index: int, min_objects: int = 4, max_objects: int = 14):
    """One image and its objects, bottom to top: (UInt8[S, S, 3], [(category index, visible, full)]).

    `visible` and `full` are Bool[S, S]: the annotated mask (full shape minus what lies above
    it, clipped to the image) and the whole shape as drawn.
    """
    rng = np.random.default_rng([seed, index])
    n = int(rng.integers(min_objects, max_objects + 1))
    cats = rng.integers(len(CATEGORIES), size=n)
    masks = [_shape_mask(CATEGORIES[c], size, rng) for c in cats]
    # Mostly large objects below small ones, as in photographs, with some out of order so
    # that large objects are occluded too.
    order = np.argsort(-np.array([m.sum() for m in masks]) * rng.uniform(0.3, 1.0, n), kind="stable")
    cats, masks = cats[order], [masks[j] for j in order]
    # Paint order = list order; later objects hide earlier ones. Drop the mostly hidden ones
    # first, so that no drawn object goes unlabelled.
    keep: list[int] = []
    above = np.zeros((size, size), dtype=bool)
    visible: dict[int, np.ndarray] = {}
    for i in reversed(range(n)):
        full = masks[i].sum()
        vis = masks[i] & ~above
        if full == 0 or vis.sum() < max(MIN_VISIBLE_PIXELS, MIN_VISIBLE_FRACTION * full):
            continue
        keep.append(i)
        visible[i] = vis
        above |= masks[i]
    keep.reverse()
    img = _background(size, rng)
    for i in keep:  # texture only the shape's bounding box: most of the cost otherwise
        ys, xs = np.nonzero(masks[i].any(1))[0], np.nonzero(masks[i].any(0))[0]
        y0, y1, x0, x1 = ys[0], ys[-1] + 1, xs[0], xs[-1] + 1
        crop = masks[i][y0:y1, x0:x1, None]
        img[y0:y1, x0:x1] = np.where(crop, _texture(y1 - y0, x1 - x0, rng), img[y0:y1, x0:x1])
    img = img + rng.normal(0, rng.uniform(0.01, 0.06), img.shape).astype(np.float32)
    img8 = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    return img8, [(int(cats[i]), visible[i], masks[i]) for i in keep]


def generate(out_dir: str | Path, num_images: int, size: int = 256, seed: int = 0, progress=None) -> Path:
    """Write `out_dir/images/NNNNNN.png` and `out_dir/annotations.json`; return the latter.

    `progress`, if given, is called with the number of images done so far.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for k in range(num_images):
        img, objects = make_image(size, seed, k)
        name = f"{k + 1:06d}.png"
        Image.fromarray(img).save(out / "images" / name, compress_level=1)
        images.append({"id": k + 1, "file_name": name, "height": size, "width": size})
        for cat, vis, _ in objects:
            rle = mask_utils.encode(np.asfortranarray(vis.astype(np.uint8)))
            x, y, w, h = mask_utils.toBbox(rle).tolist()
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": k + 1,
                    "category_id": cat + 1,
                    "bbox": [x, y, w, h],
                    "area": float(mask_utils.area(rle)),
                    "iscrowd": 0,
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                }
            )
        if progress is not None:
            progress(k + 1)
    ann_path = out / "annotations.json"
    write_json(
        ann_path,
        {
            "info": {"description": f"twopass synthetic shapes, seed {seed}, {num_images} images of {size}px"},
            "images": images,
            "annotations": anns,
            "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CATEGORIES)],
        },
    )
    return ann_path
