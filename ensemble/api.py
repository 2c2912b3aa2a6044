"""Fusion's front door: several detections files (models, test-time views) in, one fused table out.

`twopass fuse`, the run-folder stage (`ensemble.stage`) and the benchmarks call `fuse_files`
with a `pipeline.settings.FuseSettings`, the one home of the fusion defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from twopass.pipeline.categories import Categories, CategoryMap
from twopass.pipeline.settings import FUSE, FuseSettings
from twopass.pipeline.tables import TableMeta, image_sizes_of, read_results, write_table

from .table_fusion import fuse_tables


def read_inputs(inputs: Sequence[str | Path | pa.Table], categories: Categories | None = None, source: str = "",
                category_map: str | Path | None = None,
                image_sizes: Mapping[int, Any] | None = None) -> tuple[list[pa.Table], Categories | None]:  # fmt: skip
    """Tables of all inputs (files, or tables as they are) and their category list; Parquet
    category lists must agree (with `categories`, from `source`, when given). COCO results JSON
    files record no categories: their ids are checked against the list. `category_map`: a map
    file (`CategoryMap.load`) for the COCO results JSON inputs, whose `category_id`s are another
    tool's class indices; Parquet files and tables hold category ids already. `image_sizes`
    ({image_id: (height, width)}): what the COCO results JSON's polygon masks are rasterised at."""
    tables: list[Any] = [t if isinstance(t, pa.Table) else None for t in inputs]
    paths = [None if isinstance(p, pa.Table) else Path(p) for p in inputs]
    first = source if categories is not None else None
    for i, path in enumerate(paths):
        if path is not None and path.suffix.lower() != ".json":
            tables[i], meta = read_results(path)
            if meta.categories is not None and categories is None:
                categories, first = meta.categories, path
            elif meta.categories is not None:
                categories.check_same(meta.categories, f"{path} (against {first})")
    cmap = None
    if category_map is not None:
        if all(t is not None for t in tables):
            first_input = next((str(p) for p in paths if p is not None), "tables[0]")
            raise ValueError(f"{first_input}: holds the dataset's category ids already; --category-map {category_map} "
                             "is for other tools' COCO results JSON, and no input is one")
        cmap = CategoryMap.load(category_map, categories)
    for i, path in enumerate(paths):
        if tables[i] is None:
            tables[i], _ = read_results(path, categories, cmap, image_sizes)
        elif path is not None and categories is not None and tables[i].num_rows:
            categories.to_labels(tables[i].column("category_id").to_numpy(), source=str(path))
    return tables, categories


def check_image_ids(tables: Sequence[pa.Table], names: Sequence[str], image_sizes: Mapping[int, Any] | pa.Table, where: str) -> None:
    """Every row's image_id is an image of `image_sizes` ({id: (h, w)} or an images table, from
    `where`); the first input with others is named, with its first unknown id."""
    known = image_sizes.column("image_id") if isinstance(image_sizes, pa.Table) else None
    for name, t in zip(names, tables):
        ids = t.column("image_id")
        if known is not None:
            unknown = pc.unique(ids.filter(pc.invert(pc.is_in(ids, value_set=known.cast(ids.type))))).to_pylist()
        else:  # a mapping is asked about the ids at hand only (a shard's, of a large image set's sizes)
            unknown = [i for i in pc.unique(ids).to_pylist() if i not in image_sizes]
        if unknown:
            raise ValueError(f"{name}: image_id {sorted(unknown)[0]} is not an image of {where} ({len(unknown)} unknown image id(s))")


def fuse_files(
    inputs: Sequence[str | Path | pa.Table],
    settings: FuseSettings = FUSE,
    *,
    weights: Sequence[float] | None = None,
    image_sizes: Mapping[int, tuple[float, float]] | pa.Table | None = None,
    image_ids: Sequence[int] | None = None,
    source: str | None = None,
    dataset: str | None = None,
    producer: str = "fuse",
    out: str | Path | None = None,
    extra: dict[str, Any] | None = None,
    categories: Categories | None = None,
    category_map: str | Path | None = None,
) -> tuple[pa.Table, TableMeta]:
    """Fuse the rows of every input (a file or a table; of `image_ids` only, when given) per image and
    category (per image with `settings.labels="vote"`): one fusion member per (file, source).
    `image_sizes` ({id: (h, w)} or an images table) normalise and clip the boxes; without them
    each image's box extent stands in.
    `weights`: one per input file (its sources share it); None: 1.0 each. `categories`: the
    dataset's list, which every input must use (`dataset` names it). `category_map`: a map file
    from another tool's class indices to category ids, for the COCO results JSON inputs
    (`read_inputs`). Written to `out` when given; returns (fused detections, meta)."""
    sizes = image_sizes_of(image_sizes) if isinstance(image_sizes, pa.Table) else image_sizes
    tables, categories = read_inputs(inputs, categories, dataset or "", category_map, sizes)
    if image_ids is not None:
        wanted = pa.array(list(map(int, image_ids)), pa.int64())
        tables = [t.filter(pc.is_in(t.column("image_id"), value_set=wanted)) for t in tables]
    # A weight of 1.0 for every input (the pipeline config's default) is the same as no weights.
    # ensemble_boxes' NMS and Soft-NMS divide every score by the sum of the weights whenever
    # weights are given, which would make the default of the flows differ from the command's.
    given = None if weights is None or all(float(w) == 1.0 for w in weights) else list(weights)
    names = [f"tables[{i}]" if isinstance(p, pa.Table) else str(p) for i, p in enumerate(inputs)]
    if image_sizes is not None:
        check_image_ids(tables, names, image_sizes, dataset or "image_sizes")
    fused = fuse_tables(tables, settings, given, names=names, image_sizes=image_sizes, source=source)
    meta = TableMeta(
        kind="detections",
        producer=producer,
        categories=categories,
        config=dict(settings.resolved(), weights=None if weights is None else list(map(float, weights)), inputs=names,
                    **({} if category_map is None else {"category_map": str(category_map)})),
        dataset=dataset,
        extra={"boxes_in": sum(t.num_rows for t in tables), **(extra or {})},
    )
    if out is not None:
        write_table(out, fused, meta)
    return fused, meta
