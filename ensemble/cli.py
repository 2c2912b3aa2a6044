"""`twopass fuse`: fuse the detections files of several models and test-time views."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer


def _parse_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise ValueError(f"--weights: {text!r} is not a comma-separated list of numbers, e.g. 2,1,1") from None


def _read_inputs(paths: list[Path]) -> tuple[list[Any], Any]:
    """Tables of all inputs and their category list; Parquet category lists must agree.

    COCO results JSON files record no categories: their ids are checked against the list.
    """
    from pipeline.tables import read_results

    tables: list[Any] = [None] * len(paths)
    categories, first = None, None
    for i, path in enumerate(paths):
        if path.suffix.lower() != ".json":
            tables[i], meta = read_results(path)
            if meta.categories is not None and categories is None:
                categories, first = meta.categories, path
            elif meta.categories is not None:
                categories.check_same(meta.categories, f"{path} (against {first})")
    for i, path in enumerate(paths):
        if tables[i] is None:
            tables[i], _ = read_results(path, categories)
        elif categories is not None and tables[i].num_rows:
            categories.to_labels(tables[i].column("category_id").to_numpy(), source=str(path))
    return tables, categories


def _read_image_sizes(path: Path) -> Any:
    """{image_id: (height, width)} from a COCO annotations JSON, or an images table Parquet."""
    from pipeline.fileio import read_json
    from pipeline.tables import read_table

    if path.suffix.lower() != ".json":
        return read_table(path, "images")[0]
    data = read_json(path)
    if not (isinstance(data, dict) and isinstance(data.get("images"), list)):
        raise ValueError(f"{path}: expected COCO annotations with an 'images' list")
    sizes = {}
    for i, im in enumerate(data["images"]):
        if not all(k in im for k in ("id", "height", "width")):
            raise ValueError(f"{path}: images[{i}] needs 'id', 'height' and 'width'")
        sizes[int(im["id"])] = (float(im["height"]), float(im["width"]))
    return sizes


def register(app: typer.Typer) -> None:
    """Add `twopass fuse` to the project's CLI."""

    @app.command("fuse")
    def fuse_command(
        inputs: Annotated[list[Path], typer.Argument(help="Detections Parquet or COCO results JSON files (models, views).")],
        out: Annotated[Path, typer.Option(help="Fused detections Parquet to write.")],
        method: Annotated[str, typer.Option(help="wbf | soft-nms | nms")] = "wbf",
        weights: Annotated[Optional[str], typer.Option(help="One weight per input file, e.g. 2,1,1.")] = None,
        iou_thr: Annotated[Optional[float], typer.Option(help="IoU threshold (default: 0.55 for wbf, 0.5 for soft-nms and nms).")] = None,
        skip_box_thr: Annotated[float, typer.Option(help="wbf: ignore boxes scoring below this.")] = 0.0,
        conf_type: Annotated[str, typer.Option(help="wbf: avg | max | box_and_model_avg | absent_model_aware_avg")] = "avg",
        sigma: Annotated[float, typer.Option(help="soft-nms: Gaussian decay exp(-iou^2 / sigma).")] = 0.5,
        decay: Annotated[str, typer.Option(help="soft-nms: gaussian | linear")] = "gaussian",
        thresh: Annotated[float, typer.Option(help="soft-nms: drop boxes whose decayed score is <= this.")] = 0.001,
        rescore: Annotated[
            bool, typer.Option(help="soft-nms: write decayed scores (Bodla et al.), not ensemble_boxes' input scores.")
        ] = False,
        images: Annotated[
            Optional[Path], typer.Option(help="Image sizes: COCO annotations JSON or images table. Default: box extents.")
        ] = None,
        max_per_image: Annotated[int, typer.Option(help="Keep the best N boxes an image.")] = 100,
        source: Annotated[Optional[str], typer.Option(help="`source` of the output rows (default: method:a+b+...).")] = None,
    ) -> None:
        """Fuse detections of several models and test-time views: WBF, Soft-NMS or NMS per image and category."""
        settings = dict(
            method=method, iou_thr=iou_thr, skip_box_thr=skip_box_thr, conf_type=conf_type, sigma=sigma, decay=decay,
            thresh=thresh, rescore=rescore, max_per_image=max_per_image, source=source,
        )  # fmt: skip
        try:
            _fuse(inputs, out, weights, images, settings)
        except (ValueError, FileNotFoundError) as e:
            typer.echo(f"twopass: error: {e}", err=True)
            raise typer.Exit(2) from None


def _fuse(inputs: list[Path], out: Path, weights: str | None, images: Path | None, settings: dict[str, Any]) -> None:
    from pipeline.tables import TableMeta, write_table

    from .table_fusion import DEFAULT_IOU_THR, fuse

    parsed = _parse_weights(weights)
    tables, categories = _read_inputs(inputs)
    image_sizes = _read_image_sizes(images) if images is not None else None
    if settings["iou_thr"] is None and settings["method"] in DEFAULT_IOU_THR:
        settings["iou_thr"] = DEFAULT_IOU_THR[settings["method"]]
    fused = fuse(tables, weights=parsed, names=[str(p) for p in inputs], image_sizes=image_sizes, **settings)
    config = dict(settings, weights=parsed, inputs=[str(p) for p in inputs], images=None if images is None else str(images))
    write_table(out, fused, TableMeta(kind="detections", producer="twopass fuse", categories=categories, config=config))
    n_in = sum(t.num_rows for t in tables)
    n_images = len(set(fused.column("image_id").to_pylist()))
    typer.echo(f"wrote {out}: {fused.num_rows} boxes in {n_images} images, fused from {n_in} boxes in {len(inputs)} files")
