"""The `twopass` command line. Stage packages add their own commands through `register(app)`:
`PLUGINS` is the registration list, imported when this module is (the entry point is the one
module above every stage; the stage CLIs take their printing from `pipeline.console`, never
from here).

Heavy imports (torch, models) happen inside commands so that `twopass --help` stays quick.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .settings import DISPLAY_SCORE_THRESH
from .console import error_line, print_table, progress_bar  # noqa: F401  (the commands' printing; also pipeline.cli.error_line)
from .threads import set_wait_policy

app = typer.Typer(
    name="twopass",
    help="Two-pass instance segmentation: fuse several detectors' boxes, then segment the fused boxes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Each stage package that has a `cli.py` with `register(app)` adds its commands here.
PLUGINS = ("twopass.detector.cli", "twopass.ensemble.cli", "twopass.segmenter.cli", "twopass.flows.cli")


@app.callback()
def _root(ctx: typer.Context) -> None:
    # The flow commands and the demo choose by their task runner (flows.env.configure).
    if ctx.invoked_subcommand not in ("flow", "demo"):
        set_wait_policy(parallel=False)


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Folder to write images/ and annotations.json into.")],
    images: Annotated[int, typer.Option(help="Number of images.")] = 200,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 256,
    seed: Annotated[int, typer.Option(help="Seed; use different seeds for train and val.")] = 0,
    difficulty: Annotated[
        Optional[str],
        typer.Option(
            help="easy: few large flat objects; standard (default): coherent objects, clutter, occlusion; "
            "hard: random textures on objects and background alike."
        ),
    ] = None,
) -> None:
    """Generate the synthetic COCO benchmark set (shapes, clutter, occlusion) at a difficulty level."""
    from .synth import DEFAULT_DIFFICULTY, DIFFICULTIES, generate

    difficulty = difficulty or DEFAULT_DIFFICULTY
    if difficulty not in DIFFICULTIES:
        raise typer.BadParameter(f"must be one of {', '.join(DIFFICULTIES)}, got {difficulty!r}", param_hint="--difficulty")
    with progress_bar() as bar:
        task = bar.add_task("synth", total=images)
        path = generate(out, images, size, seed, progress=lambda k: bar.update(task, completed=k), difficulty=difficulty)
    typer.echo(f"wrote {path}")


@app.command()
def evaluate(
    ann: Annotated[Path, typer.Option(help="Ground-truth COCO annotations JSON.")],
    results: Annotated[Path, typer.Option(help="Detections/instances Parquet or COCO results JSON.")],
    out: Annotated[Optional[Path], typer.Option(help="Write the metrics here as JSON.")] = None,
    backend: Annotated[str, typer.Option(help="faster | pycocotools")] = "faster",
    class_agnostic: Annotated[bool, typer.Option(help="Ignore the categories when matching (COCOeval useCats=0): the AP the labels cost.")] = False,
) -> None:
    """COCO box and mask AP of a results file, with a per-category table."""
    from .evaluate import evaluate as run_eval
    from .fileio import check_outputs, write_json

    if backend not in ("faster", "pycocotools"):
        raise ValueError(f"--backend must be 'faster' or 'pycocotools', got {backend!r}")
    check_outputs({"--out": out}, {"--ann": ann, "--results": results})
    metrics = run_eval(ann, results, backend=backend, class_agnostic=class_agnostic)  # type: ignore[arg-type]
    shown = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"]  # all twelve go to --out
    # COCOeval reports -1 where an area range has no ground truth.
    print_table(results.name, ["", *shown], [[t, *(metrics[t][k] if metrics[t][k] >= 0 else None for k in shown)]
                                             for t in ("bbox", "segm") if t in metrics])  # fmt: skip
    per_cat = metrics["per_category"]
    if per_cat:
        names = next(iter(per_cat.values())).keys()
        print_table("AP per category", ["category", *per_cat], [[n, *(per_cat[t][n] for t in per_cat)] for n in names])
    if out is not None:
        write_json(out, metrics, indent=2)
        typer.echo(f"wrote {out}")


@app.command()
def show(
    images: Annotated[Path, typer.Option(help="Image folder (root of the COCO file_names).")],
    out: Annotated[Path, typer.Option(help="Folder for the PNGs.")],
    ann: Annotated[Optional[Path], typer.Option(help="COCO annotations: draws the ground truth too.")] = None,
    results: Annotated[Optional[list[Path]], typer.Option(help="Results file(s), one panel each.")] = None,
    ids: Annotated[Optional[str], typer.Option(help="Comma-separated image ids (default: the first ones).")] = None,
    max_images: Annotated[int, typer.Option(help="How many images when --ids is not given.")] = 8,
    display_score_thresh: Annotated[float, typer.Option("--display-score-thresh", "--score-thresh", help="Hide results scoring below this.")] = DISPLAY_SCORE_THRESH,
) -> None:
    """Draw boxes, labels, scores and masks over images: ground truth beside each results file."""
    from .coco import CocoIndex, ImageSet
    from .fileio import check_output_folder
    from .tables import read_results
    from .visualize import show as run_show

    check_output_folder("--out", out, {"--images": images, "--ann": ann, "--results": results})
    gt = CocoIndex.load(ann) if ann else None
    image_set = gt.image_set(images) if gt else ImageSet.from_folder(images)
    panels, categories = [], gt.categories if gt else None
    for r in results or []:
        table, meta = read_results(r, categories, image_sizes=image_set.sizes())
        categories = categories or meta.categories
        panels.append((r.stem, table))
    if categories is None:
        raise ValueError("show: give --ann, or results files that record their categories")
    image_ids = [int(i) for i in ids.split(",")] if ids else None
    written = run_show(image_set, categories, out, panels, gt, image_ids, max_images, display_score_thresh)
    typer.echo(f"wrote {len(written)} images to {out}")


@app.command("images")
def images_cmd(
    folder: Annotated[Path, typer.Argument(help="Folder of images (searched recursively).")],
    out: Annotated[Path, typer.Option(help="Images table Parquet to write.")],
) -> None:
    """Give a bare folder of images ids (by sorted file name) once, as an images table."""
    from .coco import ImageSet
    from .fileio import check_outputs

    check_outputs({"--out": out}, {"FOLDER": folder})
    s = ImageSet.from_folder(folder)
    s.write(out)
    typer.echo(f"wrote {out}: {len(s)} images")


@app.command("convert")
def convert_cmd(
    fmt: Annotated[str, typer.Argument(metavar="FORMAT", help="Source format: yolo | labelme | voc (to COCO JSON), coco (to YOLO).")],
    source: Annotated[Path, typer.Argument(help="yolo: data.yaml; labelme: folder of LabelMe JSON; voc: the folder with "
                                                "Annotations/ and JPEGImages/; coco: annotations JSON.")],
    out: Annotated[Path, typer.Option(help="COCO JSON to write (coco: a new folder for the YOLO dataset).")],
    masks: Annotated[str, typer.Option(help="Masks in the COCO JSON: rle | polygon (polygons fill holes).")] = "rle",
    split: Annotated[Optional[str], typer.Option(help="yolo: the data.yaml entry (default train); voc: ImageSets/Main/SPLIT.txt "
                                                      "(default every XML); coco: the split name written (default train).")] = None,
    images: Annotated[Optional[Path], typer.Option(help="coco: the folder the file_names are relative to.")] = None,
) -> None:
    """Convert YOLO txt, LabelMe JSON or Pascal VOC XML (with its instance PNGs) to COCO JSON; COCO to YOLO."""
    from .convert import convert

    typer.echo(convert(source, fmt, out, masks=masks, split=split, images=images).summary())


@app.command("plot")
def plot_cmd(
    run: Annotated[Path, typer.Argument(help="A training run folder (its metrics.jsonl), or a metrics.jsonl file.")],
    out: Annotated[Optional[Path], typer.Option(help="PNG to write (default RUN/curves.png).")] = None,
    tensorboard: Annotated[bool, typer.Option("--tensorboard", help="Also write TensorBoard events to RUN/tensorboard/ "
                                              "(needs: pip install 'twopass[tensorboard]').")] = False,
) -> None:
    """Draw a training run's losses, learning rate and validation AP (from its metrics.jsonl) to a PNG."""
    from .curves import TENSORBOARD_HINT, check_tensorboard_dir, metrics_file, plot_training, read_metrics, write_tensorboard
    from .fileio import check_outputs

    metrics = metrics_file(run)
    out = out or metrics.parent / "curves.png"
    check_outputs({"--out": out}, {"RUN": metrics})
    if tensorboard:  # before anything is written
        if importlib.util.find_spec("tensorboard") is None:
            raise ValueError(f"--tensorboard needs the tensorboard package: {TENSORBOARD_HINT}")
        check_tensorboard_dir(metrics.parent / "tensorboard")
    curves = read_metrics(metrics)
    plot_training(curves, out)
    typer.echo(f"wrote {out}")
    if tensorboard:
        events = write_tensorboard(curves, metrics.parent / "tensorboard")
        typer.echo(f"wrote {events}: tensorboard --logdir {events}")


def _register_plugins() -> None:
    for name in PLUGINS:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name).register(app)


_register_plugins()


def main() -> None:
    """Console entry point: user errors print one line naming the bad input, exit code 2."""
    try:
        app()
    except (ValueError, OSError) as e:
        typer.echo(f"twopass: error: {error_line(e)}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
