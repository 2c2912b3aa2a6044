"""Other tools' annotations to COCO JSON (`convert`), and COCO to YOLO.

Read: YOLO txt (Ultralytics: detect `class cx cy w h` and segment `class x1 y1 x2 y2 ...` lines,
normalised, with `data.yaml`), LabelMe JSON (one file per image) and Pascal VOC (XML boxes, with
the instance masks of `SegmentationObject/` where present). Written: COCO instances JSON whose
masks are RLE or polygons, categories named as the source names them, image sizes read from the
image files (upright by their EXIF orientation, as Ultralytics and LabelMe see them). Every
malformed line is named (file and line, or file and field) in one error, and nothing is written.

Coordinate conventions, as the tools that read these formats use them:
- YOLO: fractions of the upright image's width and height; a box line is centre and size.
- LabelMe: pixel coordinates of the upright image, polygons kept as drawn.
- VOC: 1-based inclusive pixel boxes; XYXY = (xmin - 1, ymin - 1, xmax, ymax) as Detectron2's
  `load_voc_instances` reads them.
"""

from __future__ import annotations

import base64
import io
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable
from xml.parsers import expat

import numpy as np
import yaml
from PIL import Image
from pycocotools import mask as mask_utils

from .categories import _DuplicateKey, _UniqueKeyLoader
from .coco import IMAGE_EXTENSIONS, CocoIndex, DataError, annotation_mask, image_header, upright_size
from .fileio import check_output_folder, check_outputs, read_json, write_json

FORMATS = ("yolo", "labelme", "voc", "coco")
MASKS = ("rle", "polygon")
# A box or point may overshoot the image by this many pixels (drawing tools let one click past
# the edge); it is clipped. Further out is an error. Same tolerance as `CocoIndex.from_dict`.
_TOLERANCE = 1.0
# Lines of an error listing malformed lines; the rest are counted.
_MAX_LISTED = 20


@dataclass
class Converted:
    """What `convert` wrote: `out` (a COCO JSON, or a YOLO folder), counts, and the folder the
    written file names are relative to (`--images` of the other commands)."""

    out: Path
    images: int
    annotations: int
    categories: int
    image_root: Path
    skipped: int = 0  # COCO -> YOLO: crowd annotations, which YOLO cannot hold

    def summary(self) -> str:
        text = f"wrote {self.out}: {self.images} images, {self.annotations} annotations, {self.categories} categories"
        if self.skipped:
            text += f"; {self.skipped} crowd annotations left out (YOLO has no crowd regions)"
        return text + f"; image root {self.image_root}"


def convert(source: str | os.PathLike, fmt: str, out: str | os.PathLike, masks: str = "rle", split: str | None = None,
            images: str | os.PathLike | None = None) -> Converted:  # fmt: skip
    """Convert annotations; the one front door of the CLI's `twopass convert`.

    fmt "yolo" (source: data.yaml; split: its key, default "train"), "labelme" (source: a folder
    of LabelMe JSON files), "voc" (source: a VOC root with Annotations/ and JPEGImages/; split:
    ImageSets/Main/<split>.txt, default every XML): `out` is a COCO JSON whose masks are `masks`
    ("rle" | "polygon"). fmt "coco" (source: COCO JSON, images: their folder; split: the name of
    the split written, default "train"): `out` is a new YOLO folder (data.yaml, images/, labels/).
    """
    source, out = Path(source), Path(out)
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if masks not in MASKS:
        raise ValueError(f"--masks must be one of {', '.join(MASKS)}, got {masks!r}")
    if fmt == "coco":
        if images is None:
            raise ValueError("convert coco: give --images, the folder the COCO file_names are relative to")
        return export_yolo(source, images, out, split or "train")
    if images is not None:
        raise ValueError(f"convert {fmt}: --images is for coco (the source names its own images)")
    if fmt == "labelme" and split is not None:
        raise ValueError("convert labelme: --split does not apply (a folder of LabelMe files is one split)")
    check_outputs({"--out": out}, {"SOURCE": source})
    if fmt == "yolo":
        data = _read_yolo(source, split or "train")
    elif fmt == "labelme":
        data = _read_labelme(source)
    else:
        data = _read_voc(source, split)
    coco = data.to_coco(masks, f"{fmt} {source}")
    CocoIndex.from_dict(coco, out)  # what every stage checks on load, checked before writing
    write_json(out, coco)
    return Converted(out, len(coco["images"]), len(coco["annotations"]), len(coco["categories"]), data.root)


# --------------------------------------------------------------------------- the dataset being read


@dataclass
class _Instance:
    """One object: a category index into `_Dataset.names`, a box XYXY in pixels, and its mask as
    polygons (flat [x1, y1, ...] lists in pixels), or as a compressed RLE, or none (a box only)."""

    cat: int
    box: tuple[float, float, float, float]
    polygons: list[list[float]] | None = None
    rle: dict | None = None


@dataclass
class _Image:
    file_name: str  # relative to `_Dataset.root`
    height: int
    width: int
    instances: list[_Instance] = field(default_factory=list)


class _Errors:
    """Malformed lines and fields, gathered over every file so that one error names them all."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.lines.append(f"{where}: {message}")

    def raise_any(self) -> None:
        if not self.lines:
            return
        n = len(self.lines)
        listed = "; ".join(self.lines[:_MAX_LISTED]) + (f"; and {n - _MAX_LISTED} more" if n > _MAX_LISTED else "")
        raise DataError(f"{n} malformed {'entry' if n == 1 else 'entries'}, nothing written: {listed}")


@dataclass
class _Dataset:
    root: Path
    names: list[str]
    images: list[_Image]

    def to_coco(self, masks: str, description: str) -> dict:
        """COCO instances: image ids 1..N by sorted file name, annotation ids 1..M in image order,
        category ids 1..K in the order of `names`."""
        images, anns = [], []
        for image_id, im in enumerate(sorted(self.images, key=lambda i: i.file_name), start=1):
            images.append({"id": image_id, "file_name": im.file_name, "height": im.height, "width": im.width})
            for inst in im.instances:
                x0, y0, x1, y1 = inst.box
                ann: dict[str, Any] = {"id": len(anns) + 1, "image_id": image_id, "category_id": inst.cat + 1,
                                       "bbox": [_r(x0), _r(y0), _r(x1 - x0), _r(y1 - y0)], "iscrowd": 0}  # fmt: skip
                rle = inst.rle
                if inst.polygons is not None:
                    rle = mask_utils.merge(mask_utils.frPyObjects(inst.polygons, im.height, im.width))
                if rle is None:
                    ann["area"] = _r((x1 - x0) * (y1 - y0))
                else:
                    ann["area"] = float(mask_utils.area(rle))
                    if masks == "rle":
                        ann["segmentation"] = {"size": list(rle["size"]), "counts": _counts_text(rle)}
                    elif inst.polygons is not None:
                        ann["segmentation"] = [[_r(v) for v in p] for p in inst.polygons]
                    else:
                        ann["segmentation"] = mask_polygons(mask_utils.decode(rle))
                anns.append(ann)
        return {
            "info": {"description": f"converted by twopass convert from {description}"},
            "images": images,
            "annotations": anns,
            "categories": [{"id": k + 1, "name": n} for k, n in enumerate(self.names)],
        }


def _named_dataset(root: Path, found: list[tuple[_Image, list[tuple[str, _Instance]]]]) -> _Dataset:
    """A dataset of sources that label instances by name (LabelMe, VOC): categories sorted by name."""
    names = sorted({name for _, insts in found for name, _ in insts})
    for im, insts in found:
        for name, inst in insts:
            inst.cat = names.index(name)
            im.instances.append(inst)
    return _Dataset(root, names, [im for im, _ in found])


def _r(v: float) -> float:
    # a thousandth of a pixel: the float noise of fractions times sizes goes, the geometry stays
    return round(float(v), 3)


def _counts_text(rle: dict) -> str:
    c = rle["counts"]
    return c.decode("ascii") if isinstance(c, bytes) else c


def _image_size(path: Path, where: str) -> tuple[int, int]:
    """(height, width) of an image file, upright by its EXIF orientation."""
    if not path.is_file():
        raise DataError(f"{where}: image file {path} is missing")
    try:
        return upright_size(*image_header(path))
    except Image.DecompressionBombError as e:
        raise DataError(f"{where}: image file {path} is too large to decode safely ({e}); downscale it") from None
    except (OSError, SyntaxError, ValueError) as e:  # SyntaxError: PIL's word for a malformed EXIF block
        raise DataError(f"{where}: cannot read image file {path} ({e})") from None


def _relative(path: Path, root: Path, where: str) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        raise DataError(f"{where}: image {path} lies outside the image root {root}") from None


def _box_in_image(box: Iterable[float], h: int, w: int) -> tuple[tuple[float, float, float, float] | None, str]:
    """(box clipped to the image, "") for a box of positive size inside the image (give or take
    `_TOLERANCE`), else (None, what is wrong)."""
    x0, y0, x1, y1 = box
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        return None, f"box {[x0, y0, x1, y1]} is not finite"
    if x1 <= x0 or y1 <= y0:
        return None, f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) (XYXY pixels) has no area"
    t = _TOLERANCE
    if x0 < -t or y0 < -t or x1 > w + t or y1 > h + t:
        return None, f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) (XYXY pixels) lies outside the {w}x{h} image"
    return (max(x0, 0.0), max(y0, 0.0), min(x1, float(w)), min(y1, float(h))), ""


def _polygon_box(flat: list[float]) -> tuple[float, float, float, float]:
    xs, ys = flat[0::2], flat[1::2]
    return min(xs), min(ys), max(xs), max(ys)


def _load_yaml(path: Path) -> Any:
    """YAML the project's safe way: no Python tags, a key given twice refused."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        return yaml.load(path.read_text(), _UniqueKeyLoader)
    except _DuplicateKey as e:
        raise DataError(f"{path}: key {e.key!r} appears twice{e.where}") from None
    except yaml.YAMLError as e:
        raise DataError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None


# --------------------------------------------------------------------------- YOLO


def yolo_label_path(image: Path) -> Path:
    """The label file of an image, by Ultralytics' rule (`img2label_paths`): the last
    `/images/` of the path becomes `/labels/`, the suffix `.txt`."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    s = str(image)
    return Path(sb.join(s.rsplit(sa, 1)).rsplit(".", 1)[0] + ".txt")


def _yolo_names(data: dict, where: Path) -> list[str]:
    names = data.get("names")
    if isinstance(names, dict):
        keys = list(names)
        if not all(isinstance(k, int) and not isinstance(k, bool) for k in keys) or sorted(keys) != list(range(len(keys))):
            raise DataError(f"{where}: names: a mapping's keys are the class indices 0..{len(keys) - 1}, got {keys}")
        names = [names[k] for k in range(len(keys))]
    if not isinstance(names, list) or not names:
        raise DataError(f"{where}: names: give the class names, a list or a mapping {{0: name, ...}}")
    if "nc" in data and data["nc"] != len(names):
        raise DataError(f"{where}: nc is {data['nc']} but names has {len(names)} entries")
    return [str(n) for n in names]


def _yolo_images(entry: Any, root: Path, where: str) -> list[Path]:
    """The image files of a data.yaml split entry: folders (searched recursively), text files
    listing images, or a list of either."""
    files: list[Path] = []
    for item in entry if isinstance(entry, list) else [entry]:
        if not isinstance(item, str):
            raise DataError(f"{where}: {item!r} is neither a folder nor a list file")
        p = root / item
        if not p.exists() and item.startswith("../"):  # Ultralytics' fallback for Roboflow's exports
            p = root / item[3:]
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
        elif p.is_file():
            for line in p.read_text().splitlines():
                if line.strip():
                    f = Path(line.strip())
                    files.append(f if f.is_absolute() else p.parent / f)
        else:
            raise DataError(f"{where}: {item!r}: no such folder or list file under {root}")
    if not files:
        raise DataError(f"{where}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def _read_yolo(yaml_path: Path, split: str) -> _Dataset:
    data = _load_yaml(yaml_path)
    if not isinstance(data, dict):
        raise DataError(f"{yaml_path}: a data.yaml holds a mapping (path, train, val, names), got {type(data).__name__}")
    names = _yolo_names(data, yaml_path)
    root = yaml_path.parent
    if data.get("path"):
        root = Path(str(data["path"]))
        root = root if root.is_absolute() else yaml_path.parent / root
        if not root.is_dir():
            raise DataError(f"{yaml_path}: path: {data['path']!r}: no such folder (relative paths are from the data.yaml's folder)")
    if data.get(split) is None:
        splits = [k for k in ("train", "val", "test") if data.get(k) is not None]
        raise DataError(f"{yaml_path}: no {split!r} entry (it has {', '.join(splits) or 'none'}); choose one with --split")
    errors = _Errors()
    images = []
    for path in _yolo_images(data[split], root, f"{yaml_path}: {split}"):
        label = yolo_label_path(path)
        h, w = _image_size(path, str(label))
        im = _Image(_relative(path, root, f"{yaml_path}: {split}"), h, w)
        if label.is_file():
            for n, line in enumerate(label.read_text().splitlines(), start=1):
                if line.strip():
                    inst, problem = _yolo_line(line.split(), len(names), h, w)
                    if inst is None:
                        errors.add(f"{label}:{n}", problem)
                    else:
                        im.instances.append(inst)
        images.append(im)
    errors.raise_any()
    return _Dataset(root, names, images)


def _yolo_line(tokens: list[str], nc: int, h: int, w: int) -> tuple[_Instance | None, str]:
    """(instance, "") of one label line, or (None, what is wrong with it)."""
    if not tokens[0].isdecimal():
        return None, f"class {tokens[0]!r} is not a class index (0..{nc - 1})"
    cls = int(tokens[0])
    if cls >= nc:
        return None, f"class {cls} is not among data.yaml's {nc} names (0..{nc - 1})"
    try:
        v = [float(t) for t in tokens[1:]]
    except ValueError:
        return None, f"not a number among {' '.join(tokens[1:])!r}"
    if not (len(v) == 4 or (len(v) >= 6 and len(v) % 2 == 0)):
        return None, f"{len(tokens)} values; a line is 'class cx cy w h' (5) or 'class x1 y1 x2 y2 x3 y3 ...' (3 or more points)"
    if not all(math.isfinite(x) and -1e-6 <= x <= 1 + 1e-6 for x in v):
        return None, "coordinates are fractions of the image size, 0..1; got " + " ".join(tokens[1:])
    if len(v) == 4:
        cx, cy, bw, bh = v[0] * w, v[1] * h, v[2] * w, v[3] * h
        box, problem = _box_in_image((cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2), h, w)
        return (_Instance(cls, box) if box else None), problem
    flat = [min(max(x, 0.0), 1.0) * (w if k % 2 == 0 else h) for k, x in enumerate(v)]
    box, problem = _box_in_image(_polygon_box(flat), h, w)
    return (_Instance(cls, box, polygons=[flat]) if box else None), problem


def export_yolo(ann: str | os.PathLike, images: str | os.PathLike, out: str | os.PathLike, split: str = "train") -> Converted:
    """COCO annotations -> a new YOLO folder `out`: data.yaml (names by category id order),
    images/<split>/ (hard links to the images, copies across file systems) and
    labels/<split>/*.txt. Masks become segment lines (one polygon per object: the parts of a
    mask are joined by zero-width bridges, as Ultralytics' `merge_multi_segment` does; holes are
    filled); objects without a mask become box lines. The folder appears whole or not at all."""
    ann, images, out = Path(ann), Path(images), Path(out)
    check_output_folder("--out", out, {"SOURCE": ann, "--images": images})
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out}: folder is not empty; give a new folder")
    if not split or os.sep in split or split.startswith("."):
        raise ValueError(f"--split {split!r}: give a plain name such as train or val")
    index = CocoIndex.load(ann)
    image_set = index.image_set(images)
    class_of = {cid: k for k, cid in enumerate(index.categories.ids)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    n_anns = skipped = 0
    try:
        seen: dict[Path, str] = {}
        for im in index.images:
            iid = int(im["id"])
            src = image_set.path(iid)
            where = f"{ann}: image_id {iid}"
            h, w = _image_size(src, where)
            if (h, w) != image_set.size(iid):
                raise DataError(f"{where}: image file {src} is {h}x{w} (HxW, upright), annotations say {image_set.size(iid)[0]}x{image_set.size(iid)[1]}")
            dst = tmp / "images" / split / im["file_name"]
            label = yolo_label_path(dst)
            if label in seen:
                raise DataError(f"{where}: {im['file_name']} and {seen[label]} share the label file {label.relative_to(tmp)}; rename one")
            seen[label] = im["file_name"]
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
            lines = []
            for a in index.anns_by_image[iid]:
                if a.get("iscrowd"):
                    skipped += 1
                    continue
                lines.append(_yolo_text(class_of[a["category_id"]], a, h, w, where))
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text("".join(line + "\n" for line in lines))
            n_anns += len(lines)
        names = dict(enumerate(index.categories.names))
        (tmp / "data.yaml").write_text(yaml.safe_dump({split: f"images/{split}", "names": names}, sort_keys=False))
        os.replace(tmp, out)  # onto a missing or empty folder: one rename
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Converted(out, len(index.images), n_anns, len(names), out, skipped)


def _yolo_text(cls: int, a: dict, h: int, w: int, where: str) -> str:
    seg = a.get("segmentation")
    if seg:  # polygons as given; an RLE traced along its pixel edges
        polys = seg if isinstance(seg, list) else mask_polygons(annotation_mask(a, h, w, where))
        if len(polys) > 1 and isinstance(seg, list):
            # drawn parts may overlap, which even-odd joining would cut out: join their outlines instead
            union = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
            joined = mask_utils.frPyObjects([_join_polygons(polys)], h, w)[0]
            if mask_utils.area(mask_utils.merge([union, joined], intersect=True)) != mask_utils.area(union) or \
                    mask_utils.area(joined) != mask_utils.area(union):
                polys = mask_polygons(mask_utils.decode(union))
        flat = _join_polygons(polys) if polys else None
        if flat:
            return f"{cls} " + " ".join(f"{v / (w if k % 2 == 0 else h):.6g}" for k, v in enumerate(flat))
    x, y, bw, bh = a["bbox"]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + bw, w), min(y + bh, h)
    return f"{cls} {(x0 + x1) / 2 / w:.6g} {(y0 + y1) / 2 / h:.6g} {(x1 - x0) / w:.6g} {(y1 - y0) / h:.6g}"


def _join_polygons(polys: list[list[float]]) -> list[float]:
    """Several polygons as one, each later one joined to the nearest vertex of what is joined so
    far by a bridge walked there and back. pycocotools fills by the even-odd rule, so a bridge
    (crossed twice) adds no pixel: the one polygon fills what the parts fill."""
    out = np.asarray(polys[0], dtype=np.float64).reshape(-1, 2)
    for p in polys[1:]:
        q = np.asarray(p, dtype=np.float64).reshape(-1, 2)
        d = ((out[:, None, :] - q[None, :, :]) ** 2).sum(-1)
        i, j = np.unravel_index(int(d.argmin()), d.shape)
        loop = np.concatenate([q[j:], q[: j + 1]])  # q from vertex j round to j again
        out = np.concatenate([out[: i + 1], loop, out[i : i + 1], out[i + 1 :]])
    return out.reshape(-1).tolist()


def mask_polygons(mask: np.ndarray) -> list[list[float]]:
    """The outlines of a mask (UInt8/Bool[H, W]) as COCO polygons along pixel edges, one per
    4-connected part; holes are filled (a COCO polygon list is a union: it cannot hold one).

    pycocotools fills a polygon on pixel edges with exactly the pixels inside, so the polygons
    give back the mask (holes filled). Written here because no declared dependency traces
    contours (OpenCV's findContours would be the library; too heavy to add for this).
    """
    m = np.pad(np.asarray(mask, dtype=bool), 1)
    inner = m[1:-1, 1:-1]
    nxt: dict[tuple[int, int], list[tuple[int, int]]] = {}
    # Each object pixel side facing background is a directed edge with the object on its right
    # (x right, y down): outer outlines run clockwise on screen, holes anticlockwise.
    sides = (
        (~m[:-2, 1:-1], (0, 0), (1, 0)),  # top
        (~m[1:-1, 2:], (1, 0), (1, 1)),  # right
        (~m[2:, 1:-1], (1, 1), (0, 1)),  # bottom
        (~m[1:-1, :-2], (0, 1), (0, 0)),  # left
    )
    for open_side, (ax, ay), (bx, by) in sides:
        for r, c in zip(*np.nonzero(inner & open_side)):
            nxt.setdefault((int(c) + ax, int(r) + ay), []).append((int(c) + bx, int(r) + by))
    polygons = []
    while nxt:
        # the top-left vertex left: one edge leaves it, so the loop starts off no corner it shares
        start = min(nxt, key=lambda v: (v[1], v[0]))
        loop, v, d = [start], start, None
        while True:
            outs = nxt[v]
            if len(outs) == 1 or d is None:
                w = outs.pop(0)
            else:  # two outlines touch at a corner: turn right, keeping each part's outline its own
                right = (-d[1], d[0])
                w = min(outs, key=lambda o: 0 if (o[0] - v[0], o[1] - v[1]) == right else 1)
                outs.remove(w)
            if not outs:
                del nxt[v]
            d, v = (w[0] - v[0], w[1] - v[1]), w
            if v == start:
                break
            loop.append(v)
        pts = np.asarray(loop, dtype=np.float64)
        x, y = pts[:, 0], pts[:, 1]
        if (x * np.roll(y, -1) - np.roll(x, -1) * y).sum() <= 0:  # a hole (anticlockwise on screen)
            continue
        # keep the corners only
        prev, after = np.roll(pts, 1, axis=0), np.roll(pts, -1, axis=0)
        corner = ((pts - prev) != (after - pts)).any(axis=1)
        polygons.append(pts[corner].reshape(-1).tolist())
    return _drop_nested(polygons, *mask.shape)


def _drop_nested(polygons: list[list[float]], h: int, w: int) -> list[list[float]]:
    """The polygons that lie inside no other one (a part in another's hole, once the hole is
    filled): joined by even-odd filling, a nested part would cut a hole again."""
    if len(polygons) < 2:
        return polygons
    rles = mask_utils.frPyObjects(polygons, h, w)
    areas = mask_utils.area(rles)
    boxes = [_polygon_box(p) for p in polygons]
    keep = []
    for i, p in enumerate(polygons):
        inside = any(
            j != i and boxes[j][0] <= boxes[i][0] and boxes[j][1] <= boxes[i][1] and boxes[j][2] >= boxes[i][2]
            and boxes[j][3] >= boxes[i][3] and areas[j] > areas[i]
            and mask_utils.area(mask_utils.merge([rles[i], rles[j]], intersect=True)) == areas[i]
            for j in range(len(polygons))
        )  # fmt: skip
        if not inside:
            keep.append(p)
    return keep


# --------------------------------------------------------------------------- LabelMe


def _read_labelme(folder: Path) -> _Dataset:
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder (give the folder of LabelMe JSON files)")
    files = sorted(folder.rglob("*.json"))
    if not files:
        raise DataError(f"{folder}: no LabelMe JSON files")
    errors = _Errors()
    found: list[tuple[_Image, list[tuple[str, _Instance]]]] = []
    for f in files:
        data = read_json(f)
        if not isinstance(data, dict) or not isinstance(data.get("shapes"), list) or not isinstance(data.get("imagePath"), str):
            raise DataError(f"{f}: not a LabelMe file (it needs a 'shapes' list and an 'imagePath')")
        # LabelMe on Windows writes backslashes
        path = f.parent / data["imagePath"].replace("\\", "/")
        h, w = _image_size(path, f"{f}: imagePath")
        declared = (data.get("imageHeight"), data.get("imageWidth"))
        if None not in declared and tuple(declared) != (h, w):
            raise DataError(f"{f}: imageHeight x imageWidth {declared[0]}x{declared[1]}, but image file {path} is {h}x{w} (upright)")
        im = _Image(_relative(path, folder, f"{f}: imagePath"), h, w)
        groups: dict[Any, tuple[str, _Instance]] = {}
        for i, shape in enumerate(data["shapes"]):
            label = shape.get("label") if isinstance(shape, dict) else None
            where = f"{f}: shapes[{i}]" + (f" ({label!r})" if isinstance(label, str) else "")
            if not isinstance(label, str) or not label.strip():
                errors.add(where, "has no label")
                continue
            inst, problem = _labelme_shape(shape, h, w)
            if inst is None:
                errors.add(where, problem)
                continue
            # LabelMe's group_id: the shapes of one label and group are one object
            key = (label, shape["group_id"]) if shape.get("group_id") is not None else i
            groups[key] = (label, _merge(groups[key][1], inst, h, w)) if key in groups else (label, inst)
        found.append((im, list(groups.values())))
    errors.raise_any()
    return _named_dataset(folder, found)


def _labelme_shape(shape: dict, h: int, w: int) -> tuple[_Instance | None, str]:
    kind = shape.get("shape_type") or "polygon"
    pts = shape.get("points")
    try:
        p = np.asarray(pts, dtype=np.float64)
    except (TypeError, ValueError):
        p = np.zeros((0, 0))
    if p.ndim != 2 or p.shape[1:] != (2,) or not np.isfinite(p).all():
        return None, f"points {pts!r} are not a list of [x, y] pairs"
    need = {"polygon": 3, "rectangle": 2, "circle": 2, "mask": 2}.get(kind)
    if need is None:
        return None, f"shape_type {kind!r} outlines no object (polygon, rectangle, circle or mask); delete the shape or redraw it"
    if len(p) < need or (kind != "polygon" and len(p) != need):
        return None, f"a {kind} has {'at least ' if kind == 'polygon' else ''}{need} points, got {len(p)}"
    if kind == "rectangle":
        (x0, y0), (x1, y1) = p.min(0), p.max(0)
        p = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    elif kind == "circle":  # centre and a point on the rim; 64 sides
        r = float(np.hypot(*(p[1] - p[0])))
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        p = p[0] + r * np.stack([np.cos(t), np.sin(t)], 1)
    elif kind == "mask":  # a PNG of the box points[0]..points[1], both inclusive (LabelMe's own reading)
        try:
            m = np.array(Image.open(io.BytesIO(base64.b64decode(shape.get("mask") or "", validate=True)))).astype(bool)
        except (ValueError, OSError) as e:
            return None, f"mask is not a base64 PNG ({e})"
        (x0, y0), (x1, y1) = p.astype(int)
        if m.ndim != 2 or m.shape != (y1 - y0 + 1, x1 - x0 + 1):
            return None, f"mask is {m.shape[0]}x{m.shape[1]} (HxW), its box {x0},{y0}..{x1},{y1} is {y1 - y0 + 1}x{x1 - x0 + 1}"
        if x0 < 0 or y0 < 0 or x1 >= w or y1 >= h:
            return None, f"mask box {x0},{y0}..{x1},{y1} lies outside the {w}x{h} image"
        full = np.zeros((h, w), dtype=np.uint8)
        full[y0 : y1 + 1, x0 : x1 + 1] = m
        if not full.any():
            return None, "mask is empty"
        rle = mask_utils.encode(np.asfortranarray(full))
        bx, by, bw, bh = mask_utils.toBbox(rle)
        return _Instance(-1, (float(bx), float(by), float(bx + bw), float(by + bh)), rle=rle), ""
    flat = p.reshape(-1).tolist()
    box, problem = _box_in_image(_polygon_box(flat), h, w)
    return (_Instance(-1, box, polygons=[flat]) if box else None), problem


def _merge(a: _Instance, b: _Instance, h: int, w: int) -> _Instance:
    """Two shapes of one LabelMe group as one object: the union of boxes and masks."""
    box = (min(a.box[0], b.box[0]), min(a.box[1], b.box[1]), max(a.box[2], b.box[2]), max(a.box[3], b.box[3]))
    if a.rle is None and b.rle is None:
        return _Instance(a.cat, box, polygons=(a.polygons or []) + (b.polygons or []))
    rles = [x.rle if x.rle is not None else mask_utils.merge(mask_utils.frPyObjects(x.polygons, h, w)) for x in (a, b)]
    return _Instance(a.cat, box, rle=mask_utils.merge(rles))


# --------------------------------------------------------------------------- Pascal VOC


@dataclass
class _Node:
    """An XML element with the line it starts on (ElementTree keeps no line numbers)."""

    tag: str
    line: int
    text: str = ""
    children: list["_Node"] = field(default_factory=list)

    def find(self, tag: str) -> "_Node | None":
        return next((c for c in self.children if c.tag == tag), None)

    def findall(self, tag: str) -> list["_Node"]:
        return [c for c in self.children if c.tag == tag]


def _parse_xml(path: Path) -> _Node:
    parser = expat.ParserCreate()
    stack: list[_Node] = [_Node("", 0)]

    def start(tag: str, attrs: dict) -> None:
        node = _Node(tag, parser.CurrentLineNumber)
        stack[-1].children.append(node)
        stack.append(node)

    def end(tag: str) -> None:
        stack.pop()

    def text(data: str) -> None:
        stack[-1].text += data

    parser.StartElementHandler, parser.EndElementHandler, parser.CharacterDataHandler = start, end, text
    try:
        parser.Parse(path.read_bytes(), True)
    except expat.ExpatError as e:
        raise DataError(f"{path}:{e.lineno}: not valid XML ({expat.ErrorString(e.code)})") from None
    if not stack[0].children:
        raise DataError(f"{path}: empty XML")
    return stack[0].children[0]


def _read_voc(root: Path, split: str | None) -> _Dataset:
    ann_dir, img_dir = root / "Annotations", root / "JPEGImages"
    if not ann_dir.is_dir() or not img_dir.is_dir():
        raise DataError(f"{root}: not a VOC folder (it needs Annotations/ and JPEGImages/)")
    if split is None:
        xmls = sorted(ann_dir.glob("*.xml"))
    else:
        lst = root / "ImageSets" / "Main" / f"{split}.txt"
        if not lst.is_file():
            lst = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not lst.is_file():
            raise DataError(f"{root}: --split {split}: no ImageSets/Main/{split}.txt or ImageSets/Segmentation/{split}.txt")
        xmls = [ann_dir / f"{line.split()[0]}.xml" for line in lst.read_text().splitlines() if line.strip()]
    if not xmls:
        raise DataError(f"{ann_dir}: no XML files")
    errors = _Errors()
    found: list[tuple[_Image, list[tuple[str, _Instance]]]] = []
    class_values: dict[int, tuple[str, str]] = {}  # SegmentationClass value -> (name, where first seen)
    for xml in xmls:
        if not xml.is_file():
            raise DataError(f"{xml}: no such file (listed in --split {split})")
        doc = _parse_xml(xml)
        fn = doc.find("filename")
        file_name = fn.text.strip() if fn is not None and fn.text.strip() else f"{xml.stem}.jpg"
        path = img_dir / file_name
        h, w = _image_size(path, f"{xml}:{fn.line if fn else 1}")
        size = doc.find("size")
        if size is not None:
            dh, dw = (size.find(k) for k in ("height", "width"))
            try:
                declared = (int(float(dh.text)), int(float(dw.text))) if dh and dw else None
            except ValueError:
                declared = None
                errors.add(f"{xml}:{size.line}", "size: height and width are not numbers")
            # 0 x 0: some tools write no size
            if declared and declared != (0, 0) and declared != (h, w):
                errors.add(f"{xml}:{size.line}", f"size {declared[0]}x{declared[1]} (HxW), but image file {path} is {h}x{w} (upright)")
        im = _Image(_relative(path, img_dir, str(xml)), h, w)
        insts: list[tuple[str, _Instance]] = []
        for k, obj in enumerate(doc.findall("object"), start=1):
            name_node = obj.find("name")
            name = name_node.text.strip() if name_node is not None else ""
            where = f"{xml}:{obj.line}"
            if not name:
                errors.add(where, f"object {k} has no <name>")
                continue
            bb = obj.find("bndbox")
            try:
                x0, y0, x1, y1 = (float(bb.find(t).text) for t in ("xmin", "ymin", "xmax", "ymax"))  # type: ignore[union-attr]
            except (AttributeError, ValueError):
                errors.add(f"{xml}:{bb.line if bb else obj.line}", f"object {k} ({name!r}): <bndbox> needs numbers xmin, ymin, xmax, ymax")
                continue
            box, problem = _box_in_image((x0 - 1, y0 - 1, x1, y1), h, w)
            if box is None:
                errors.add(f"{xml}:{bb.line}", f"object {k} ({name!r}): {problem} (from 1-based xmin {x0:g}, ymin {y0:g}, xmax {x1:g}, ymax {y1:g})")
                continue
            insts.append((name, _Instance(-1, box)))
        seg = root / "SegmentationObject" / f"{xml.stem}.png"
        if seg.is_file() and len(insts) == len(doc.findall("object")):
            _voc_masks(seg, root / "SegmentationClass" / f"{xml.stem}.png", insts, h, w, errors, class_values)
        found.append((im, insts))
    errors.raise_any()
    return _named_dataset(img_dir, found)


def _read_png(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as png:
            if png.mode not in ("P", "L"):
                raise DataError(f"{path}: mode {png.mode}; VOC's segmentation PNGs hold indices (palette or grayscale)")
            return np.array(png)
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: cannot read PNG ({e})") from None


def _voc_masks(seg: Path, cls_png: Path, insts: list[tuple[str, _Instance]], h: int, w: int, errors: _Errors,
               class_values: dict[int, tuple[str, str]]) -> None:  # fmt: skip
    """Masks from VOC's SegmentationObject PNG: value k is the k-th object of the XML, 0 the
    background, 255 the unlabelled border. Where SegmentationClass is there too, each object's
    class value must agree with its name, the same value for the same name across the set."""
    obj = _read_png(seg)
    if obj.shape != (h, w):
        errors.add(str(seg), f"is {obj.shape[0]}x{obj.shape[1]} (HxW), its image {h}x{w}")
        return
    stray = sorted(set(np.unique(obj).tolist()) - {0, 255} - set(range(1, len(insts) + 1)))
    if stray:
        errors.add(str(seg), f"values {stray} are no object of its XML ({len(insts)} objects; 0 background, 255 border)")
        return
    cls = _read_png(cls_png) if cls_png.is_file() else None
    if cls is not None and cls.shape != (h, w):
        errors.add(str(cls_png), f"is {cls.shape[0]}x{cls.shape[1]} (HxW), its image {h}x{w}")
        cls = None
    for k, (name, inst) in enumerate(insts, start=1):
        m = obj == k
        if not m.any():
            errors.add(str(seg), f"object {k} ({name!r}) has no pixels")
            continue
        inst.rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        if cls is None:
            continue
        values = sorted(set(np.unique(cls[m]).tolist()) - {0, 255})
        if len(values) != 1:
            errors.add(str(cls_png), f"object {k} ({name!r}) covers class values {values}; one expected")
            continue
        first = class_values.setdefault(values[0], (name, str(cls_png)))
        if first[0] != name:
            errors.add(str(cls_png), f"object {k} is {name!r} in its XML but has class value {values[0]}, which is {first[0]!r} in {first[1]}")
