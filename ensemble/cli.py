"""`twopass fuse`: fuse the detections files of several models and test-time views."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from twopass.pipeline.settings import FUSE, FuseSettings, help_of, settings_from_options


def _parse_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise ValueError(f"--weights: {text!r} is not a comma-separated list of numbers, e.g. 2,1,1") from None


def _read_images(path: Path) -> tuple[Any, Any]:
    """({image_id: (height, width)}, categories or None) from a COCO annotations JSON (its
    categories too, when it has them), or (an images table, None) from an images table Parquet."""
    from twopass.pipeline.categories import Categories
    from twopass.pipeline.fileio import read_json
    from twopass.pipeline.tables import read_table

    if path.suffix.lower() != ".json":
        return read_table(path, "images")[0], None
    data = read_json(path)
    if not (isinstance(data, dict) and isinstance(data.get("images"), list)):
        raise ValueError(f"{path}: expected COCO annotations with an 'images' list")
    sizes = {}
    for i, im in enumerate(data["images"]):
        if not all(k in im for k in ("id", "height", "width")):
            raise ValueError(f"{path}: images[{i}] needs 'id', 'height' and 'width'")
        sizes[int(im["id"])] = (float(im["height"]), float(im["width"]))
    categories = Categories.from_coco(data["categories"], source=str(path)) if isinstance(data.get("categories"), list) else None
    return sizes, categories


def register(app: typer.Typer) -> None:
    """Add `twopass fuse` to the project's CLI."""

    @app.command("fuse")
    def fuse_command(
        inputs: Annotated[list[Path], typer.Argument(help="Detections Parquet or COCO results JSON files (models, views).")],
        out: Annotated[Path, typer.Option(help="Fused detections Parquet to write.")],
        method: Annotated[str, typer.Option(help=help_of(FuseSettings, "method"))] = FUSE.method,
        weights: Annotated[Optional[str], typer.Option(help="One weight per input file, e.g. 2,1,1 (default: 1 each).")] = None,
        iou_thr: Annotated[Optional[float], typer.Option(help=help_of(FuseSettings, "iou_thr"))] = FUSE.iou_thr,
        skip_box_thr: Annotated[float, typer.Option(help=help_of(FuseSettings, "skip_box_thr"))] = FUSE.skip_box_thr,
        conf_type: Annotated[str, typer.Option(help="wbf: avg | max | box_and_model_avg | absent_model_aware_avg")] = FUSE.conf_type,
        sigma: Annotated[float, typer.Option(help=help_of(FuseSettings, "sigma"))] = FUSE.sigma,
        decay: Annotated[str, typer.Option(help="soft-nms: gaussian | linear")] = FUSE.decay,
        thresh: Annotated[float, typer.Option(help=help_of(FuseSettings, "thresh"))] = FUSE.thresh,
        rescore: Annotated[Optional[bool], typer.Option(help=help_of(FuseSettings, "rescore"))] = FUSE.rescore,
        images: Annotated[
            Optional[Path], typer.Option(help="Image sizes: COCO annotations JSON or images table. Default: box extents.")
        ] = None,
        max_per_image: Annotated[int, typer.Option(help=help_of(FuseSettings, "max_per_image"))] = FUSE.max_per_image,
        labels: Annotated[str, typer.Option(help=help_of(FuseSettings, "labels"))] = FUSE.labels,
        source: Annotated[Optional[str], typer.Option(help="`source` of the output rows (default: method:a+b+...).")] = None,
        category_map: Annotated[
            Optional[Path], typer.Option(help="JSON or YAML map from another tool's class indices to category ids (or names), "
                                              "for the COCO results JSON inputs; see the README.")
        ] = None,
        coco_json: Annotated[Optional[Path], typer.Option(help="Also write the fused detections as a COCO results JSON.")] = None,
    ) -> None:
        """Fuse detections of several models and test-time views: WBF, Soft-NMS or NMS per image and category (--labels vote: across them)."""
        from twopass.pipeline.fileio import check_outputs
        from twopass.pipeline.tables import write_results

        from .api import fuse_files

        try:
            # validated as the pipeline config's `fusion:` is (the same ranges), before any file is read
            settings = settings_from_options(FuseSettings, dict(
                method=method, iou_thr=iou_thr, skip_box_thr=skip_box_thr, conf_type=conf_type, sigma=sigma, decay=decay,
                thresh=thresh, rescore=rescore, max_per_image=max_per_image, labels=labels))  # fmt: skip
            check_outputs({"--out": out, "--coco-json": coco_json},
                          {**{f"#{i + 1}": p for i, p in enumerate(inputs)}, "--images": images, "--category-map": category_map})
            # --images as COCO annotations: every input's images and categories are checked against it
            sizes, categories = _read_images(images) if images is not None else (None, None)
            fused, meta = fuse_files(inputs, settings, weights=_parse_weights(weights), source=source, producer="twopass fuse",
                                     image_sizes=sizes, categories=categories, dataset=None if images is None else str(images),
                                     category_map=category_map, extra={"images": None if images is None else str(images)})  # fmt: skip
            write_results(out, fused, meta, coco_json)  # both outputs or neither
        except (ValueError, OSError) as e:
            from twopass.pipeline.console import error_line

            typer.echo(f"twopass: error: {error_line(e)}", err=True)
            raise typer.Exit(2) from None
        # COCO results JSON name no image set and no category list: say what nothing checked
        json_inputs = [str(p) for p in inputs if p.suffix.lower() == ".json"]
        unchecked = [w for w, known in (("image ids", images is not None), ("category ids", meta.categories is not None)) if not known]
        if json_inputs and unchecked:
            typer.echo(f"twopass: warning: {', '.join(json_inputs)}: {' and '.join(unchecked)} not checked "
                       "(give --images with the COCO annotations)", err=True)  # fmt: skip
        n_images = len(set(fused.column("image_id").to_pylist()))
        typer.echo(f"wrote {out}: {fused.num_rows} boxes in {n_images} images, fused from {meta.extra['boxes_in']} boxes in {len(inputs)} files")
