"""Synthetic COCO benchmark data: shapes on backgrounds, at three levels of difficulty.

Every level has 8 outlines (some with holes or concavities), partial occlusion (the hidden
part removed from the lower object's mask) and objects cut by the border. The levels differ
in what makes an object visible:

- `hard`: random colours and textures on objects and background alike, unlabelled clutter of
  the same colours and textures, 4 to 14 objects from COCO-small to COCO-large. Telling an
  object from the background is itself the problem; a few CPU-minutes learn little.
- `standard` (the default): the same outlines, sizes, counts, occlusion and clutter, but each
  object has one coherent appearance (one colour family, one texture) that stands out from a
  calmer background, as real objects do; clutter is drawn in the background's own colours.
- `easy`: 2 to 5 medium and large objects, flat colours on a plain background, no clutter.

Image i depends only on (seed, i, difficulty), so any subset of a set can be regenerated and
train/val differ by seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

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


def _shape_mask(cat: str, size: int, rng: np.random.Generator, level: "Difficulty") -> np.ndarray:
    """Bool[S, S] mask of one randomly placed, scaled and rotated shape (may leave the image)."""
    cls = rng.choice(len(level.size_probs), p=level.size_probs)
    lo, hi = level.size_classes[cls]
    r = 0.5 * size * rng.uniform(lo, hi)
    a, b = level.centres
    cx, cy = rng.uniform(a * size, b * size, 2)  # centres off the image cut objects at the border
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
    return _pattern(h, w, rng, c1, c2, grain=0.03)


def _pattern(h: int, w: int, rng: np.random.Generator, c1: np.ndarray, c2: np.ndarray, grain: float) -> np.ndarray:
    """Float32[h, w, 3]: colour c1 with grain, or stripes, checks or a gradient from c1 to c2."""
    kind = rng.integers(4)
    if kind == 0:
        return c1 + rng.normal(0, grain, (h, w, 1)).astype(np.float32)
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


def _clutter(im: Image.Image, rng: np.random.Generator, colour: Callable[[], tuple[int, ...]]) -> np.ndarray:
    """Float[S, S, 3]: `im` with unlabelled clutter drawn on it, thin lines (edges that are no
    object's) and irregular blobs, each in `colour()`."""
    size = im.width
    draw = ImageDraw.Draw(im)
    for _ in range(rng.integers(3, 10)):
        xy = rng.uniform(0, size, 4)
        draw.line(tuple(xy), fill=colour(), width=int(rng.integers(1, 4)))
    for _ in range(rng.integers(2, 7)):
        c = rng.uniform(0, size, 2)
        k = int(rng.integers(5, 9))
        t = np.sort(rng.uniform(0, 2 * np.pi, k))
        rad = rng.uniform(0.02, 0.12) * size * rng.uniform(0.4, 1.0, k)
        pts = [(float(c[0] + r * math.cos(a)), float(c[1] + r * math.sin(a))) for r, a in zip(rad, t)]
        draw.polygon(pts, fill=colour())
    return np.array(im, np.float32) / 255


def _smooth(low: np.ndarray, size: int) -> np.ndarray:
    """Float[S, S, 3]: a Float[4, 4, 3] grid of colours in [0, 1], bicubically enlarged."""
    return np.asarray(Image.fromarray((low * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC), np.float32) / 255


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """Float[S, S, 3]: smooth coloured noise plus clutter in random colours (object-like, no label)."""
    bg = _smooth(rng.uniform(0, 1, (4, 4, 3)).astype(np.float32), size)
    return _clutter(Image.fromarray((bg * 255).astype(np.uint8)), rng, lambda: tuple(int(v) for v in rng.integers(0, 256, 3)))


def _calm_background(size: int, rng: np.random.Generator, clutter: bool) -> tuple[np.ndarray, np.ndarray]:
    """(Float[S, S, 3], its base colour [3]): a muted colour with gentle low-frequency shading
    and, with `clutter`, lines and flat blobs in shades of that colour (edges that are no
    object's, but never an object's colour or texture)."""
    grey = rng.uniform(0.25, 0.75)
    base = (0.7 * grey + 0.3 * rng.uniform(0, 1, 3)).astype(np.float32)
    bg = _smooth(np.clip(base + rng.normal(0, 0.05, (4, 4, 3)), 0, 1).astype(np.float32), size)
    if not clutter:
        return bg, base

    def shade() -> tuple[int, ...]:
        return tuple(int(v) for v in np.clip((base + rng.uniform(-0.15, 0.15, 3)) * 255, 0, 255))

    return _clutter(Image.fromarray((bg * 255).astype(np.uint8)), rng, shade), base


def _object_colour(base: np.ndarray, rng: np.random.Generator, min_distance: float = 0.45) -> np.ndarray:
    """A saturated colour at least `min_distance` (Euclidean, RGB in [0, 1]) from `base`."""
    for _ in range(32):
        c = rng.uniform(0, 1, 3).astype(np.float32)
        c = c / max(float(c.max()), 1e-6) * rng.uniform(0.6, 1.0)  # saturated: at least one channel high
        if rng.uniform() < 0.3:
            c = c * 0.35  # some dark objects too
        if float(np.linalg.norm(c - base)) >= min_distance:
            return c.astype(np.float32)
    return (1.0 - base).astype(np.float32)  # the complement is always far enough


def _coherent_texture(h: int, w: int, rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    """Float32[h, w, 3]: one colour family that stands out from `base` (flat, striped, checked
    or graded between two close shades of it), with grain."""
    c1 = _object_colour(base, rng)
    c2 = np.clip(c1 + rng.uniform(-0.15, 0.15, 3), 0, 1).astype(np.float32)
    return _pattern(h, w, rng, c1, c2, grain=0.02)


def _flat_colour(h: int, w: int, rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    return np.broadcast_to(_object_colour(base, rng), (h, w, 3))


@dataclass(frozen=True)
class Difficulty:
    """What one difficulty level draws: object count, sizes, placement, background, texture."""

    objects: tuple[int, int]  # inclusive range of objects an image (before hidden ones are dropped)
    size_classes: tuple[tuple[float, float], ...]  # side ranges, fractions of the image side
    size_probs: tuple[float, ...]
    centres: tuple[float, float]  # object centres, fractions of the image side
    background: Callable[[int, np.random.Generator], tuple[np.ndarray, np.ndarray | None]]
    texture: Callable[[int, int, np.random.Generator, np.ndarray | None], np.ndarray]
    noise: tuple[float, float]  # range of the image noise's standard deviation


DifficultyName = Literal["easy", "standard", "hard"]
DEFAULT_DIFFICULTY: DifficultyName = "standard"
DIFFICULTIES: dict[str, Difficulty] = {
    "hard": Difficulty(
        (4, 14), _SIZE_CLASSES, _SIZE_PROBS, (-0.1, 1.1),
        lambda size, rng: (_background(size, rng), None),
        lambda h, w, rng, base: _texture(h, w, rng),
        (0.01, 0.06),
    ),  # fmt: skip
    "standard": Difficulty(
        (4, 14), _SIZE_CLASSES, _SIZE_PROBS, (-0.1, 1.1),
        lambda size, rng: _calm_background(size, rng, clutter=True),
        _coherent_texture,
        (0.01, 0.04),
    ),  # fmt: skip
    "easy": Difficulty(
        (2, 5), ((0.2, 0.35), (0.35, 0.6)), (0.5, 0.5), (0.1, 0.9),
        lambda size, rng: _calm_background(size, rng, clutter=False),
        _flat_colour,
        (0.005, 0.02),
    ),  # fmt: skip
}


def make_image(size: int, seed: int, index: int, difficulty: DifficultyName = DEFAULT_DIFFICULTY):
    """One image and its objects, bottom to top: (UInt8[S, S, 3], [(category index, visible, full)]).

    `visible` and `full` are Bool[S, S]: the annotated mask (full shape minus what lies above
    it, clipped to the image) and the whole shape as drawn.
    """
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {sorted(DIFFICULTIES)}, got {difficulty!r}")
    level = DIFFICULTIES[difficulty]
    rng = np.random.default_rng([seed, index])
    n = int(rng.integers(level.objects[0], level.objects[1] + 1))
    cats = rng.integers(len(CATEGORIES), size=n)
    masks = [_shape_mask(CATEGORIES[c], size, rng, level) for c in cats]
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
    img, base = level.background(size, rng)
    for i in keep:  # texture only the shape's bounding box: most of the cost otherwise
        ys, xs = np.nonzero(masks[i].any(1))[0], np.nonzero(masks[i].any(0))[0]
        y0, y1, x0, x1 = ys[0], ys[-1] + 1, xs[0], xs[-1] + 1
        crop = masks[i][y0:y1, x0:x1, None]
        img[y0:y1, x0:x1] = np.where(crop, level.texture(y1 - y0, x1 - x0, rng, base), img[y0:y1, x0:x1])
    img = img + rng.normal(0, rng.uniform(*level.noise), img.shape).astype(np.float32)
    img8 = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    return img8, [(int(cats[i]), visible[i], masks[i]) for i in keep]


def description(num_images: int, size: int, seed: int, difficulty: DifficultyName = DEFAULT_DIFFICULTY) -> str:
    """The `info.description` of a generated set: what it holds, so a set on disk can be
    recognised (`hard` keeps the text it had before the levels existed: its files stay
    byte-identical)."""
    level = "" if difficulty == "hard" else f", {difficulty}"
    return f"twopass synthetic shapes{level}, seed {seed}, {num_images} images of {size}px"


def generate(
    out_dir: str | Path,
    num_images: int,
    size: int = 256,
    seed: int = 0,
    progress=None,
    difficulty: DifficultyName = DEFAULT_DIFFICULTY,
) -> Path:
    """Write `out_dir/images/NNNNNN.png` and `out_dir/annotations.json`; return the latter.

    `progress`, if given, is called with the number of images done so far.
    """
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {sorted(DIFFICULTIES)}, got {difficulty!r}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for k in range(num_images):
        img, objects = make_image(size, seed, k, difficulty)
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
            "info": {"description": description(num_images, size, seed, difficulty)},
            "images": images,
            "annotations": anns,
            "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CATEGORIES)],
        },
    )
    return ann_path
