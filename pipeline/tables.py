"""Data contracts: the detections, instances and images tables, their Parquet files and COCO JSON.

This module is the one home of the schemas and of the box format. Every stage imports it.

Box format: XYXY, float32, absolute pixels of the original image (x2, y2 exclusive edges,
as in torchvision and COCO's `bbox = [x, y, w, h]` with w = x2 - x1).
Category: the dataset's COCO `category_id`, never a contiguous training label.
Masks: COCO compressed RLE of the full original image, as pycocotools encodes it.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .categories import Categories, CategoryMap
from .fileio import atomic_path, read_json, stable_hash

Kind = Literal["detections", "instances", "images"]

BOX_COLUMNS = ("x1", "y1", "x2", "y2")

DETECTIONS_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("category_id", pa.int32()),
        ("score", pa.float32()),
        *[(c, pa.float32()) for c in BOX_COLUMNS],
        ("source", pa.string()),
    ]
)
INSTANCES_SCHEMA = pa.schema(
    list(DETECTIONS_SCHEMA)
    + [
        pa.field("mask_height", pa.int32()),
        pa.field("mask_width", pa.int32()),
        pa.field("mask_counts", pa.string()),
    ]
)
IMAGES_SCHEMA = pa.schema(
    [("image_id", pa.int64()), ("file_name", pa.string()), ("height", pa.int32()), ("width", pa.int32())]
)
SCHEMAS: dict[str, pa.Schema] = {
    "detections": DETECTIONS_SCHEMA,
    "instances": INSTANCES_SCHEMA,
    "images": IMAGES_SCHEMA,
}
_META_KEY = b"twopass"


@dataclass
class TableMeta:
    """What a Parquet file records about how it was made (stored as JSON in the file's metadata)."""

    kind: Kind
    producer: str
    categories: Categories | None = None
    config: dict[str, Any] | None = None
    dataset: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def config_hash(self) -> str | None:
        return None if self.config is None else stable_hash(self.config)

    def to_json(self) -> bytes:
        d = asdict(self)
        d["categories"] = None if self.categories is None else self.categories.to_coco()
        d["config_hash"] = self.config_hash
        return json.dumps(d, default=str).encode()

    @classmethod
    def from_json(cls, blob: bytes) -> "TableMeta":
        d = json.loads(blob)
        d.pop("config_hash", None)
        cats = d.pop("categories", None)
        return cls(**d, categories=None if cats is None else Categories.from_coco(cats))


# --------------------------------------------------------------------------- construction


def detections_table(
    image_id: Sequence[int] | np.ndarray,
    category_id: Sequence[int] | np.ndarray,
    score: Sequence[float] | np.ndarray,
    boxes: np.ndarray,
    source: str | Sequence[str],
) -> pa.Table:
    """Build a detections table. `boxes`: (N, 4) XYXY in original-image pixels."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    n = len(boxes)
    if isinstance(source, str):
        source = [source] * n
    cols = {
        "image_id": np.asarray(image_id, dtype=np.int64).reshape(-1),
        "category_id": np.asarray(category_id, dtype=np.int32).reshape(-1),
        "score": np.asarray(score, dtype=np.float32).reshape(-1),
        **{c: boxes[:, i] for i, c in enumerate(BOX_COLUMNS)},
        "source": list(source),
    }
    for name, col in cols.items():
        if len(col) != n:
            raise ValueError(f"detections: column {name!r} has {len(col)} rows, boxes have {n}")
    return pa.table(cols, schema=DETECTIONS_SCHEMA)


def instances_table(detections: pa.Table, rles: Sequence[dict]) -> pa.Table:
    """Add masks to a detections table. `rles`: pycocotools compressed RLEs, one per row."""
    if len(rles) != detections.num_rows:
        raise ValueError(f"instances: {len(rles)} masks for {detections.num_rows} detections")
    h = np.fromiter((r["size"][0] for r in rles), dtype=np.int32, count=len(rles))
    w = np.fromiter((r["size"][1] for r in rles), dtype=np.int32, count=len(rles))
    counts = [r["counts"].decode() if isinstance(r["counts"], bytes) else r["counts"] for r in rles]
    t = detections.select(DETECTIONS_SCHEMA.names)
    t = t.append_column("mask_height", pa.array(h, pa.int32()))
    t = t.append_column("mask_width", pa.array(w, pa.int32()))
    t = t.append_column("mask_counts", pa.array(counts, pa.string()))
    return t.cast(INSTANCES_SCHEMA)


def images_table(
    image_id: Sequence[int], file_name: Sequence[str], height: Sequence[int], width: Sequence[int]
) -> pa.Table:
    return pa.table(
        {"image_id": list(image_id), "file_name": list(file_name), "height": list(height), "width": list(width)},
        schema=IMAGES_SCHEMA,
    )


def empty_table(kind: Kind) -> pa.Table:
    return SCHEMAS[kind].empty_table()


def boxes_of(table: pa.Table) -> np.ndarray:
    """(N, 4) float32 XYXY boxes of a detections or instances table."""
    if table.num_rows == 0:
        return np.zeros((0, 4), dtype=np.float32)
    return np.stack([table.column(c).to_numpy() for c in BOX_COLUMNS], axis=1).astype(np.float32, copy=False)


def rles_of(table: pa.Table) -> list[dict]:
    """The masks of an instances table as pycocotools RLE dicts (counts as bytes)."""
    h = table.column("mask_height").to_pylist()
    w = table.column("mask_width").to_pylist()
    c = table.column("mask_counts").to_pylist()
    return [{"size": [hh, ww], "counts": cc.encode()} for hh, ww, cc in zip(h, w, c)]


def check_values(table: pa.Table, what: str, score_range: tuple[float, float] | None = None) -> None:
    """Raise on non-finite boxes or scores, inverted boxes, or scores outside `score_range`.

    The message names `what` (usually the file), the field, the row and its image id.
    """
    if table.num_rows == 0:
        return
    cols = {c: table.column(c).to_numpy() for c in ("score", *BOX_COLUMNS)}
    check_arrays(table.column("image_id").to_numpy(), cols, what, score_range)


def check_arrays(ids: np.ndarray, cols: dict[str, np.ndarray], what: str, score_range: tuple[float, float] | None = None) -> None:
    """`check_values` on arrays: `cols` holds score, x1, y1, x2, y2 (one value a row)."""
    for name, col in cols.items():
        bad = np.flatnonzero(~np.isfinite(col))
        if bad.size:
            i = bad[0]
            raise ValueError(f"{what}: field {name!r} is {col[i]} at row {i} (image_id {ids[i]}); {bad.size} such rows")
    for lo, hi in (("x1", "x2"), ("y1", "y2")):
        bad = np.flatnonzero(cols[hi] < cols[lo])
        if bad.size:
            i = bad[0]
            raise ValueError(
                f"{what}: {hi} < {lo} ({cols[hi][i]} < {cols[lo][i]}) at row {i} (image_id {ids[i]}); {bad.size} such rows"
            )
    if score_range is not None:
        lo, hi = score_range
        s = cols["score"]
        bad = np.flatnonzero((s < lo) | (s > hi))
        if bad.size:
            i = bad[0]
            raise ValueError(f"{what}: field 'score' is {s[i]} at row {i} (image_id {ids[i]}), outside [{lo}, {hi}]")


# --------------------------------------------------------------------------- Parquet


def write_table(path: str | Path, table: pa.Table, meta: TableMeta) -> Path:
    """Write `table` atomically with `meta` in the file metadata. Returns the path."""
    schema = SCHEMAS[meta.kind]
    try:
        table = table.select(schema.names).cast(schema)
    except (KeyError, pa.ArrowInvalid) as e:
        raise ValueError(f"{path}: table does not fit the {meta.kind} schema ({e})") from e
    table = table.replace_schema_metadata({_META_KEY: meta.to_json()})
    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


def write_results(path: str | Path, table: pa.Table, meta: TableMeta, coco_json: str | Path | None = None) -> Path:
    """`write_table`, and with `coco_json` the same rows as a COCO results JSON (`to_coco_results`):
    both files or neither, each written to a temp file and renamed once both are written."""
    with contextlib.ExitStack() as stack:
        tmp_out = stack.enter_context(atomic_path(path))
        tmp_json = stack.enter_context(atomic_path(coco_json)) if coco_json is not None else None
        write_table(tmp_out, table, meta)
        if tmp_json is not None:
            tmp_json.write_text(json.dumps(to_coco_results(table)))
    return Path(path)


def read_meta(path: str | Path) -> TableMeta:
    path = Path(path)
    try:
        md = pq.read_schema(path).metadata or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path}: not a Parquet file ({e})") from e
    if _META_KEY not in md:
        raise ValueError(f"{path}: no twopass metadata; was it written by twopass?")
    return TableMeta.from_json(md[_META_KEY])


def read_table(path: str | Path, kind: Kind, categories: Categories | None = None) -> tuple[pa.Table, TableMeta]:
    """Read and check a table file: its kind, its schema and (if given) its category list."""
    path = Path(path)
    meta = read_meta(path)
    if meta.kind != kind and not (kind == "detections" and meta.kind == "instances"):
        raise ValueError(f"{path}: holds a {meta.kind} table, expected {kind}")
    table = pq.read_table(path)
    expected = SCHEMAS[kind]
    for f in expected:
        if f.name not in table.schema.names:
            raise ValueError(f"{path}: missing column {f.name!r}")
        got = table.schema.field(f.name).type
        if got != f.type:
            raise ValueError(f"{path}: column {f.name!r} is {got}, expected {f.type}")
    if categories is not None and meta.categories is not None:
        categories.check_same(meta.categories, str(path))
    return table.select(expected.names).replace_schema_metadata(None), meta


# --------------------------------------------------------------------------- COCO results JSON


def coco_columns(table: pa.Table) -> dict[str, list]:
    """Detections or instances -> the COCO results fields as lists: image_id, category_id, bbox
    (XYWH float lists), score, source, and segmentation (RLE dicts) if the table has masks."""
    boxes = boxes_of(table).astype(np.float64)
    cols = {
        "image_id": table.column("image_id").to_pylist(),
        "category_id": table.column("category_id").to_pylist(),
        "bbox": np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).tolist(),
        "score": table.column("score").to_numpy().astype(np.float64).tolist(),
        "source": table.column("source").to_pylist(),
    }
    if "mask_counts" in table.column_names:
        cols["segmentation"] = [
            {"size": [h, w], "counts": c}
            for h, w, c in zip(*(table.column(k).to_pylist() for k in ("mask_height", "mask_width", "mask_counts")))
        ]
    return cols


def to_coco_results(table: pa.Table) -> list[dict]:
    """Detections or instances -> COCO results list (`bbox` XYWH; `segmentation` RLE if masks).

    Each entry also keeps its `source`; COCO tools ignore the extra key.
    """
    cols = coco_columns(table)
    return [dict(zip(cols, values)) for values in zip(*cols.values())]


def image_sizes_of(images: pa.Table) -> dict[int, tuple[int, int]]:
    """{image_id: (height, width)} of an images table."""
    ids, h, w = (images.column(c).to_pylist() for c in ("image_id", "height", "width"))
    return dict(zip(ids, zip(h, w)))


def result_rle(seg: Any, image_id: int, image_sizes: Mapping[int, tuple[float, float]] | None, where: str) -> dict:
    """A COCO result's `segmentation` as compressed RLE, as pycocotools' `COCO.annToRLE` makes
    it: polygons rasterised at the image's size (from `image_sizes`, {image_id: (height, width)})
    and merged, uncompressed RLE compressed. `where` names the entry in errors."""
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):
        if not seg or any(not isinstance(p, list) or len(p) < 6 or len(p) % 2 for p in seg):
            raise ValueError(f"{where}: a polygon segmentation is a list of [x1, y1, x2, y2, ...] lists of at least 3 points")
        size = None if image_sizes is None else image_sizes.get(int(image_id))
        if size is None:
            known = ("no image sizes are given (give the images' COCO annotations or images table)" if image_sizes is None
                     else f"image_id {image_id} is not among the {len(image_sizes)} images given")  # fmt: skip
            raise ValueError(f"{where}: segmentation is a polygon, which needs its image's height and width, and {known}")
        h, w = (int(round(float(v))) for v in size)
        return mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    if not (isinstance(seg, dict) and "size" in seg and "counts" in seg):
        raise ValueError(f"{where}: segmentation must be RLE or polygons")
    if isinstance(seg["counts"], list):  # uncompressed RLE -> compressed
        return mask_utils.frPyObjects(seg, *seg["size"])
    return seg


def from_coco_results(results: list[dict], source: str, what: str = "results", category_map: CategoryMap | None = None,
                      image_sizes: Mapping[int, tuple[float, float]] | None = None) -> pa.Table:  # fmt: skip
    """COCO results list -> detections table, or instances table if every entry has a segmentation.

    XYWH is converted in float64 from float32 inputs, so Parquet -> JSON -> Parquet is exact.
    `category_map`: the entries' `category_id`s are another tool's class indices, mapped through it.
    `image_sizes` ({image_id: (height, width)}): what polygon masks are rasterised at (`result_rle`).
    """
    from pycocotools import mask as mask_utils

    if not isinstance(results, list):
        raise ValueError(f"{what}: a COCO results file holds a JSON list, got {type(results).__name__}")
    n = len(results)
    boxes = np.zeros((n, 4), dtype=np.float64)
    rles: list[dict] = []
    for i, r in enumerate(results):
        for key in ("image_id", "category_id", "score"):
            if key not in r:
                raise ValueError(f"{what}: entry {i} has no {key!r}")
        seg = r.get("segmentation")
        if seg is not None:
            seg = result_rle(seg, r["image_id"], image_sizes, f"{what}: entry {i} (image_id {r['image_id']})")
            rles.append(seg)
        bbox = r.get("bbox")
        if bbox is None:
            if seg is None:
                raise ValueError(f"{what}: entry {i} (image_id {r['image_id']}) has neither bbox nor segmentation")
            bbox = mask_utils.toBbox(seg).tolist()
        if len(bbox) != 4:
            raise ValueError(f"{what}: entry {i} (image_id {r['image_id']}): bbox must have 4 numbers, got {bbox}")
        x, y, w, h = (float(v) for v in bbox)
        boxes[i] = (x, y, x + w, y + h)
    image_ids = [r["image_id"] for r in results]
    category_ids = [r["category_id"] for r in results]
    if category_map is not None:
        category_ids = category_map.apply(category_ids, what, image_ids)
    table = detections_table(
        image_ids,
        category_ids,
        [r["score"] for r in results],
        boxes,
        [str(r.get("source", source)) for r in results],
    )
    if n and len(rles) == n:
        return instances_table(table, rles)
    if rles:
        raise ValueError(f"{what}: {len(rles)} of {n} entries have a segmentation; all or none must")
    return table


def read_results(path: str | Path, categories: Categories | None = None, category_map: CategoryMap | None = None,
                 image_sizes: Mapping[int, tuple[float, float]] | None = None) -> tuple[pa.Table, TableMeta]:  # fmt: skip
    """Read detections or instances from a twopass Parquet file or a COCO results JSON (whose
    class indices `category_map` maps to category ids, when given, and whose polygon masks are
    rasterised at `image_sizes`, {image_id: (height, width)})."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        table = from_coco_results(read_json(path), source=path.stem, what=str(path), category_map=category_map,
                                  image_sizes=image_sizes)  # fmt: skip
        kind: Kind = "instances" if "mask_counts" in table.column_names else "detections"
        if categories is not None and table.num_rows:
            categories.to_labels(table.column("category_id").to_numpy(), source=str(path))
        return table, TableMeta(kind=kind, producer=f"coco-json:{path.name}", categories=categories)
    if category_map is not None:
        raise ValueError(f"{path}: a twopass Parquet file holds the dataset's category ids already; "
                         f"--category-map {category_map.source} is for other tools' COCO results JSON")
    meta = read_meta(path)
    kind = "instances" if meta.kind == "instances" else "detections"
    return read_table(path, kind, categories)
