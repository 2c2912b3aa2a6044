"""COCO datasets and image sets, checked on load.

Every bad input raises `DataError` naming the file and the image (or annotation) id: nothing
is skipped silently. Images come back as RGB whatever their mode (grayscale, RGBA, palette,
16-bit), turned upright by their EXIF orientation as Detectron2's `read_image` does (a
camera's portrait JPEG is stored sideways with a tag saying so); image sizes read from file
headers are the upright sizes too.
"""

from __future__ import annotations

import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch
from PIL import ExifTags, Image, ImageOps
from pycocotools import mask as mask_utils

from .categories import Categories
from .fileio import read_json
from .tables import TableMeta, images_table, read_table, write_table

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# COCO's own annotations overshoot the image by up to a pixel here and there.
_BOX_TOLERANCE = 1.0


class DataError(ValueError):
    """A dataset file or image is malformed; the message names the file and the id."""


def safe_image_path(root: Path, file_name: str, where: str) -> Path:
    """Join `file_name` under `root`, refusing absolute paths and anything that escapes `root`."""
    if os.path.isabs(file_name) or Path(file_name).is_absolute():
        raise DataError(f"{where}: file_name {file_name!r} is an absolute path; it must be relative to the image root")
    root_resolved = root.resolve()
    path = (root / file_name).resolve()
    if not path.is_relative_to(root_resolved):
        raise DataError(f"{where}: file_name {file_name!r} escapes the image root {root}")
    return path


# EXIF orientations that swap height and width (transpose, rotate 270, transverse, rotate 90)
_SWAPS_AXES = (5, 6, 7, 8)


def image_header(path: Path) -> tuple[int, int, int]:
    """(height, width, EXIF orientation) of an image file as stored, read without decoding its
    pixels; the orientation is the one `ImageOps.exif_transpose` applies (1: none)."""
    with Image.open(path) as im:
        if im.format == "PNG" and "exif" not in im.info:
            # PIL looks for a PNG's eXIf chunk after the image data only once the pixels are
            # decoded: walk the chunks instead. An empty exif keeps getexif() from decoding.
            im.info["exif"] = _png_exif_after_data(path) or b""
        return im.height, im.width, int(im.getexif().get(ExifTags.Base.Orientation, 1) or 1)


def _png_exif_after_data(path: Path) -> bytes | None:
    """A PNG's eXIf chunk that follows its IDAT chunks (as PIL keeps it in `info`), if any."""
    with open(path, "rb") as f:
        f.seek(8)  # the signature
        while len(header := f.read(8)) == 8:
            length, kind = struct.unpack(">I4s", header)
            if kind == b"eXIf":
                return b"Exif\x00\x00" + f.read(length)
            if kind == b"IEND":
                return None
            f.seek(length + 4, os.SEEK_CUR)  # the data and the CRC
    return None


def upright_size(height: int, width: int, orientation: int) -> tuple[int, int]:
    """(height, width) of a stored image once its EXIF orientation is applied."""
    return (width, height) if orientation in _SWAPS_AXES else (height, width)


def image_to_tensor(im: Image.Image, in_place: bool = False) -> torch.Tensor:
    """A decoded PIL image as a UInt8Tensor[3, H, W] RGB, upright by its EXIF orientation
    (`ImageOps.exif_transpose`, as Detectron2's `read_image`). 16-bit data is scaled to 8 bits.
    What every image read goes through, from a file (`load_image`) or held in memory (the
    predictor); `in_place`: `im` may be turned in place (no copy when there is nothing to turn)."""
    if in_place:
        ImageOps.exif_transpose(im, in_place=True)
    else:
        im = ImageOps.exif_transpose(im)  # a copy: the caller's image is left as it is
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, dtype=np.float64)
        # 16-bit images (PNG "I;16" or "I" holding 0..65535) scale to 0..255.
        a = np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8)
        a = np.repeat(a[..., None], 3, axis=2)
    elif im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        a = np.clip(np.round(a * (255.0 if a.max() <= 1.0 else 1.0)), 0, 255).astype(np.uint8)
        a = np.repeat(a[..., None], 3, axis=2)
    else:
        a = np.array(im.convert("RGB"))
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)


def load_image(path: Path, where: str = "") -> torch.Tensor:
    """Read an image file as a UInt8Tensor[3, H, W] RGB, upright (`image_to_tensor`)."""
    label = where or str(path)
    try:
        with Image.open(path) as im:
            im.load()
            img = image_to_tensor(im, in_place=True)
    except FileNotFoundError:
        raise DataError(f"{label}: image file {path} is missing") from None
    except Image.DecompressionBombError as e:  # not an OSError: it would reach the user as a traceback
        raise DataError(f"{label}: image file {path} is too large to decode safely ({e}); downscale it") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{label}: cannot read image file {path} ({e})") from e
    return img


_INDEX_CACHE: dict[tuple, "CocoIndex"] = {}
_INDEX_LOCK = threading.Lock()


@dataclass
class ImageSet:
    """Images known by id: an images table plus the folder they live in.

    `table` columns: image_id, file_name (relative to `root`), height, width.
    """

    table: pa.Table
    root: Path
    source: str = ""
    # The categories of the annotations the set was opened from (None for a folder or images
    # table): the stages check a model's categories against them before any compute.
    categories: Categories | None = None

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        ids = self.table.column("image_id").to_pylist()
        self._row = {int(i): r for r, i in enumerate(ids)}
        if len(self._row) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise DataError(f"{self.source}: duplicate image ids {dup}")
        self._names = self.table.column("file_name").to_pylist()
        self._h = self.table.column("height").to_pylist()
        self._w = self.table.column("width").to_pylist()

    @classmethod
    def open(cls, images: str | Path, ann: str | Path | None = None, images_table: str | Path | None = None) -> "ImageSet":
        """The one way every command and stage opens images: the ids and sizes of COCO
        annotations `ann`, else of an images table (`twopass images`), else every image file of
        the folder, ids by sorted name."""
        if ann is not None and images_table is not None:
            raise DataError(f"{ann}, {images_table}: give annotations or an images table, not both")
        if ann is not None:
            return CocoIndex.cached(ann).image_set(images)
        if images_table is not None:
            return cls.from_table(images_table, images)
        return cls.from_folder(images)

    @classmethod
    def from_folder(cls, root: str | Path) -> "ImageSet":
        """Every image file under `root`, ids 1..N by sorted relative path."""
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: no such image folder")
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DataError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
        sizes = []
        for f in files:
            try:
                sizes.append(upright_size(*image_header(root / f)))
            except Image.DecompressionBombError as e:
                raise DataError(f"{root / f}: image is too large to decode safely ({e}); downscale it") from None
            except (OSError, SyntaxError, ValueError) as e:  # SyntaxError: PIL's word for a malformed EXIF block
                raise DataError(f"{root / f}: cannot read image header ({e})") from e
        table = images_table(range(1, len(files) + 1), files, [s[0] for s in sizes], [s[1] for s in sizes])
        return cls(table, root, source=str(root))

    @classmethod
    def from_table(cls, path: str | Path, image_root: str | Path) -> "ImageSet":
        table, _ = read_table(path, "images")
        return cls(table, Path(image_root), source=str(path))

    def write(self, path: str | Path) -> Path:
        """Write the images table once so every later stage agrees on the ids."""
        return write_table(path, self.table, TableMeta(kind="images", producer="twopass", dataset=str(self.root)))

    @property
    def image_ids(self) -> list[int]:
        return list(self._row)

    def __len__(self) -> int:
        return len(self._row)

    def __contains__(self, image_id: int) -> bool:
        return int(image_id) in self._row

    def _index(self, image_id: int) -> int:
        try:
            return self._row[int(image_id)]
        except KeyError:
            raise DataError(f"{self.source}: image_id {image_id} is not in the image set") from None

    def size(self, image_id: int) -> tuple[int, int]:
        """(height, width) as declared in the table."""
        r = self._index(image_id)
        return int(self._h[r]), int(self._w[r])

    def sizes(self) -> Mapping[int, tuple[int, int]]:
        """{image_id: (height, width)} as declared in the table: a view, looked up on demand (a
        shard of a large set takes it without copying every image's size)."""
        return _Sizes(self)

    def path(self, image_id: int) -> Path:
        r = self._index(image_id)
        return safe_image_path(self.root, self._names[r], f"{self.source}: image_id {image_id}")

    def read(self, image_id: int) -> torch.Tensor:
        """UInt8Tensor[3, H, W]; raises if the file's size differs from the table's."""
        where = f"{self.source}: image_id {image_id}"
        img = load_image(self.path(image_id), where)
        h, w = self.size(image_id)
        if tuple(img.shape[1:]) != (h, w):
            sh, sw, orientation = image_header(self.path(image_id))
            if orientation in _SWAPS_AXES:  # the sizes were likely taken from the stored pixels
                raise DataError(f"{where}: image file is {sh}x{sw} (HxW) as stored but its EXIF orientation {orientation} turns it "
                                f"to {img.shape[1]}x{img.shape[2]}; annotations say {h}x{w} (made on the unturned pixels? "
                                "turn the file upright and drop its orientation tag, or fix the annotations)")  # fmt: skip
            raise DataError(f"{where}: image file is {img.shape[1]}x{img.shape[2]} (HxW), annotations say {h}x{w}")
        return img


class _Sizes(Mapping):
    """`ImageSet.sizes`: {image_id: (height, width)}."""

    def __init__(self, images: ImageSet):
        self._images = images

    def __getitem__(self, image_id: int) -> tuple[int, int]:
        if image_id not in self._images:
            raise KeyError(image_id)
        return self._images.size(image_id)

    def __iter__(self) -> Iterator[int]:
        return iter(self._images.image_ids)

    def __len__(self) -> int:
        return len(self._images)


@dataclass
class CocoIndex:
    """A parsed and checked COCO instances file."""

    path: Path
    images: list[dict]
    categories: Categories
    anns_by_image: dict[int, list[dict]]
    raw: dict[str, Any]

    @classmethod
    def cached(cls, ann_file: str | Path) -> "CocoIndex":
        """`load`, remembered per (path, size, mtime) within the process: the stages of a run
        open the same annotations once per shard."""
        path = Path(ann_file)
        try:
            st = path.stat()
        except FileNotFoundError:
            return cls.load(path)  # names the missing file
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        with _INDEX_LOCK:
            hit = _INDEX_CACHE.get(key)
        if hit is None:
            hit = cls.load(path)
            with _INDEX_LOCK:
                if len(_INDEX_CACHE) > 8:
                    _INDEX_CACHE.clear()
                _INDEX_CACHE[key] = hit
        return hit

    @classmethod
    def clear_cache(cls) -> None:
        with _INDEX_LOCK:
            _INDEX_CACHE.clear()

    @classmethod
    def load(cls, ann_file: str | Path) -> "CocoIndex":
        path = Path(ann_file)
        try:
            data = read_json(path)
        except (FileNotFoundError, ValueError) as e:
            raise DataError(str(e)) from None
        return cls.from_dict(data, path)

    @classmethod
    def from_dict(cls, data: Any, path: str | Path) -> "CocoIndex":
        """Check COCO annotations (`path` names them in errors): every image with an id, file and
        size; every annotation on a known image and category, with a finite box of positive size
        inside its image and polygons of at least three points."""
        src = str(path)
        path = Path(path)
        if not isinstance(data, dict):
            raise DataError(f"{src}: COCO annotations are a mapping, got {type(data).__name__}")
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                raise DataError(f"{src}: missing list {key!r}")
        categories = Categories.from_coco(data["categories"], source=src)
        cat_ids = set(categories.ids)
        images: list[dict] = []
        seen: set[int] = set()
        for i, im in enumerate(data["images"]):
            for key in ("id", "file_name", "height", "width"):
                if key not in im:
                    raise DataError(f"{src}: images[{i}] has no {key!r}")
            iid = int(im["id"])
            if iid in seen:
                raise DataError(f"{src}: image id {iid} appears twice")
            if int(im["height"]) <= 0 or int(im["width"]) <= 0:
                raise DataError(f"{src}: image id {iid} has size {im['height']}x{im['width']}")
            seen.add(iid)
            images.append(im)
        sizes = {int(im["id"]): (int(im["height"]), int(im["width"])) for im in images}
        anns: dict[int, list[dict]] = {iid: [] for iid in sizes}
        for a in data["annotations"]:
            aid = a.get("id", "?")
            iid = a.get("image_id")
            if iid not in sizes:
                raise DataError(f"{src}: annotation {aid} points at unknown image_id {iid}")
            if a.get("category_id") not in cat_ids:
                raise DataError(f"{src}: annotation {aid} (image_id {iid}) has unknown category_id {a.get('category_id')}")
            bbox = a.get("bbox")
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(np.isfinite(v) for v in bbox)):
                raise DataError(f"{src}: annotation {aid} (image_id {iid}) has bad bbox {bbox}")
            x, y, w, h = bbox
            if w <= 0 or h <= 0:
                raise DataError(f"{src}: annotation {aid} (image_id {iid}) has degenerate bbox {bbox} (w or h <= 0)")
            H, W = sizes[iid]
            t = _BOX_TOLERANCE
            if x < -t or y < -t or x + w > W + t or y + h > H + t:
                raise DataError(f"{src}: annotation {aid} (image_id {iid}) bbox {bbox} lies outside the {W}x{H} image")
            seg = a.get("segmentation")
            if isinstance(seg, list) and any(not isinstance(p, list) or len(p) < 6 or len(p) % 2 for p in seg):
                raise DataError(f"{src}: annotation {aid} (image_id {iid}) has a polygon of fewer than 3 points (or an odd count)")
            anns[iid].append(a)
        return cls(path, images, categories, anns, data)

    def image_set(self, image_root: str | Path) -> ImageSet:
        t = images_table(
            [int(im["id"]) for im in self.images],
            [str(im["file_name"]) for im in self.images],
            [int(im["height"]) for im in self.images],
            [int(im["width"]) for im in self.images],
        )
        return ImageSet(t, Path(image_root), source=str(self.path), categories=self.categories)


def annotation_mask(ann: dict, height: int, width: int, where: str) -> np.ndarray:
    """UInt8[H, W] mask of one annotation from polygons, compressed or uncompressed RLE."""
    seg = ann.get("segmentation")
    try:
        if isinstance(seg, list):
            if not seg:
                raise ValueError("empty polygon list")
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
        elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):
            rle = mask_utils.frPyObjects(seg, height, width)
        elif isinstance(seg, dict):
            if list(seg.get("size", [])) != [height, width]:
                raise ValueError(f"RLE size {seg.get('size')} is not the image's {[height, width]}")
            rle = seg
        else:
            raise ValueError("no segmentation")
        return mask_utils.decode(rle)
    except (ValueError, TypeError, KeyError) as e:
        raise DataError(f"{where}: annotation {ann.get('id', '?')} has a bad segmentation ({e})") from e


class CocoDataset(torch.utils.data.Dataset):
    """COCO instances as (image, target) pairs in torchvision's detection format.

    image: FloatTensor[3, H, W] in [0, 1].
    target: boxes FloatTensor[N, 4] XYXY pixels, labels Int64Tensor[N] (contiguous 1..K),
    masks UInt8Tensor[N, H, W] (if `with_masks`), iscrowd Int64Tensor[N], area FloatTensor[N],
    image_id int.
    """

    def __init__(self, ann_file: str | Path, image_root: str | Path, with_masks: bool = True, check_files: bool = True):
        self.index = CocoIndex.load(ann_file)
        self.images = self.index.image_set(image_root)
        self.categories = self.index.categories
        self.with_masks = with_masks
        self.ann_file = Path(ann_file)
        self.image_ids = self.images.image_ids
        if check_files:
            missing = [i for i in self.image_ids if not self.images.path(i).is_file()]
            if missing:
                raise DataError(
                    f"{ann_file}: image file {self.images.path(missing[0])} (image_id {missing[0]}) is missing"
                    + (f", and {len(missing) - 1} more" if len(missing) > 1 else "")
                )

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image_id = self.image_ids[i]
        img = self.images.read(image_id)
        h, w = img.shape[1:]
        anns = self.index.anns_by_image[image_id]
        where = f"{self.ann_file}: image_id {image_id}"
        boxes = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        target: dict[str, Any] = {
            "boxes": torch.from_numpy(boxes),
            "labels": torch.from_numpy(self.categories.to_labels([a["category_id"] for a in anns], where)),
            "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64),
            "area": torch.tensor([float(a.get("area", 0.0)) for a in anns], dtype=torch.float32),
            "image_id": image_id,
        }
        if self.with_masks:
            masks = np.zeros((len(anns), h, w), dtype=np.uint8)
            for k, a in enumerate(anns):
                masks[k] = annotation_mask(a, h, w, where)
            target["masks"] = torch.from_numpy(masks)
        return img.float().div_(255.0), target


def collate(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Keep images of different sizes as a list, as torchvision's detection models expect."""
    images, targets = zip(*batch)
    return list(images), list(targets)
