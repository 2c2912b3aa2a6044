"""`twopass train-detector` and `twopass detect`. Torch is imported inside the commands so
that `twopass --help` stays quick. User errors raise ValueError subclasses naming the file or
field; `pipeline.cli.main` prints them on one line and exits 2."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from twopass.pipeline.devices import DEVICE_HELP
from twopass.pipeline.settings import DETECT, DetectSettings, help_of


def parse_scales(text: Optional[str]) -> list[int] | None:
    if not text:
        return None
    try:
        scales = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--tta-scales: expected comma-separated integers, got {text!r}") from None
    if not scales or min(scales) < 16:
        raise ValueError(f"--tta-scales: scales must be at least 16 px, got {text!r}")
    return scales


def make_train_command(kind: str, load_kind: Callable[[], Any]) -> Callable[..., None]:
    """The `train-<kind>` command: same options, engine and checkpoints for every model kind.

    load_kind() -> the kind's `detector.api.ModelKind`, imported only when the command runs.
    """

    def command(
        train_ann: Annotated[Path, typer.Option(help="Training COCO annotations JSON.")],
        train_images: Annotated[Path, typer.Option(help="Training image folder.")],
        out: Annotated[Path, typer.Option(help="Run folder: checkpoints/, metrics.jsonl.")],
        iters: Annotated[int, typer.Option(help="Total iterations.")] = 1000,
        batch: Annotated[int, typer.Option(help="Images per process and iteration.")] = 2,
        lr: Annotated[Optional[float], typer.Option(help="LR for the config's train.base_batch images; scaled linearly with the real total batch. Default: the config's base_lr.")] = None,
        device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "cpu",
        val_ann: Annotated[Optional[Path], typer.Option(help="Validation COCO annotations JSON.")] = None,
        val_images: Annotated[Optional[Path], typer.Option(help="Validation image folder.")] = None,
        val_every: Annotated[Optional[int], typer.Option(help="Validate every N iterations (0: at the end only).")] = None,
        checkpoint_every: Annotated[Optional[int], typer.Option(help="Checkpoint every N iterations (always at the end).")] = None,
        resume: Annotated[bool, typer.Option(help="Continue from the run folder's last checkpoint.")] = False,
        overwrite: Annotated[bool, typer.Option(help="Replace a run already in the run folder (its checkpoints and metrics).")] = False,
        config: Annotated[Optional[str], typer.Option(help="Model config YAML, or a name in configs/ (default with --init: that run's config).")] = None,
        init: Annotated[Optional[Path], typer.Option(help="Start from another run's weights (e.g. `twopass import-torchvision`); classes move by category name, new ones start fresh.")] = None,
        backbone_weights: Annotated[Optional[Path], typer.Option(help="Local torchvision classification state dict (.pth or .safetensors).")] = None,
        seed: Annotated[Optional[int], typer.Option(help="Seed (default: the config's).")] = None,
        workers: Annotated[Optional[int], typer.Option(help="Data loader worker processes.")] = None,
        time_budget: Annotated[Optional[float], typer.Option(help="Stop (and save) after this many seconds of training.")] = None,
        progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
        precision: Annotated[Optional[str], typer.Option(help="fp32 | bf16 | fp16 (mixed precision; default: the config's train.precision).")] = None,
    ) -> None:
        import os

        from .api import train_model
        from .checkpoint import read_meta
        from .train import TrainOptions

        model_kind = load_kind()
        if config is not None:
            cfg = model_kind.config(config, "--config")
        elif init is not None:
            init_meta = read_meta(init)
            if init_meta.kind != model_kind.name:  # its config would not parse as this kind's
                raise ValueError(f"--init {init}: a {init_meta.kind} run, and train-{model_kind.name} takes its config from it; "
                                 f"give --config (a {model_kind.name} config) to start from its weights")  # fmt: skip
            cfg = model_kind.config(init_meta.config, f"--init {init} (config)")
        else:
            raise ValueError("--config: required (or --init RUN, to fine-tune with that run's config)")
        options = TrainOptions(out=out, iters=iters, batch=batch, lr=lr, device=device, resume=resume, overwrite=overwrite,
                               checkpoint_every=checkpoint_every,
                               val_every=val_every, seed=seed, num_workers=workers, progress=progress, time_budget_s=time_budget,
                               precision=precision)  # fmt: skip
        result = train_model(model_kind, cfg, train_ann, train_images, options, backbone_weights=backbone_weights, init=init,
                             val_ann=val_ann, val_images=val_images)  # fmt: skip
        if int(os.environ.get("RANK", "0")) == 0:
            typer.echo(f"trained {cfg.name} to iteration {result.iteration}: {result.checkpoint}")

    command.__doc__ = f"Train a {kind} (one process, or several under torchrun: gloo on CPU, NCCL on GPU)."
    return command


def _detector_kind():
    from .api import DETECTOR

    return DETECTOR


train_detector = make_train_command("detector", _detector_kind)


def detect(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint JSON or .safetensors, or a run folder (its last checkpoint).")],
    images: Annotated[Path, typer.Option(help="Image folder.")],
    out: Annotated[Path, typer.Option(help="Detections Parquet to write.")],
    ann: Annotated[Optional[Path], typer.Option(help="COCO annotations naming the images (ids, sizes); else every image in the folder, ids by sorted name.")] = None,
    tta_scales: Annotated[Optional[str], typer.Option(help="Comma-separated shorter sides, e.g. 480,640,800 (default: the config's test size).")] = None,
    tta_flip: Annotated[bool, typer.Option(help="Add a mirrored view of every scale.")] = False,
    score_thresh: Annotated[float, typer.Option(help=help_of(DetectSettings, "score_thresh"))] = DETECT.score_thresh,
    max_per_image: Annotated[int, typer.Option(help=help_of(DetectSettings, "max_per_image"))] = DETECT.max_per_image,
    batch: Annotated[int, typer.Option(help=help_of(DetectSettings, "batch"))] = DETECT.batch,
    precision: Annotated[str, typer.Option(help=help_of(DetectSettings, "precision"))] = DETECT.precision,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "cpu",
    name: Annotated[Optional[str], typer.Option(help="Model name in the source column (default: the config's name).")] = None,
    fast: Annotated[bool, typer.Option(help="Fold frozen BatchNorm into convolutions, channels-last on CPU.")] = True,
    with_masks: Annotated[bool, typer.Option(help="A segmenter checkpoint only: write its end-to-end instances (boxes and masks).")] = False,
    mask_thresh: Annotated[float, typer.Option(help=help_of(DetectSettings, "mask_thresh"))] = DETECT.mask_thresh,
    coco_json: Annotated[Optional[Path], typer.Option(help="Also write the detections (or instances) as a COCO results JSON.")] = None,
) -> None:
    """Run a trained detector, or a segmenter end to end, over images with test-time augmentation;
    write a detections (or, --with-masks, instances) table."""
    from twopass.pipeline.console import progress_bar
    from twopass.pipeline.coco import ImageSet
    from twopass.pipeline.config import validate_mapping
    from twopass.pipeline.fileio import check_outputs
    from twopass.pipeline.tables import write_results

    from twopass.segmenter.api import load_any  # either kind: the kind map is the segmenter package's

    from .api import detect_images, views_of
    from .checkpoint import files_in_use

    settings = validate_mapping(DetectSettings, dict(score_thresh=score_thresh, max_per_image=max_per_image, batch=batch,
                                                         precision=precision, mask_thresh=mask_thresh),
                                "twopass detect", ValueError, "setting")  # fmt: skip
    scales = parse_scales(tta_scales)
    check_outputs({"--out": out, "--coco-json": coco_json}, {"--ann": ann, "--images": images, "--checkpoint": files_in_use(checkpoint)})
    loaded = load_any(checkpoint, device, fast)
    if with_masks and loaded.meta.kind != "segmenter":
        raise ValueError(f"--with-masks: {loaded.meta.path} is a {loaded.meta.kind!r} checkpoint, which has no mask head")
    image_set = ImageSet.open(images, ann=ann)
    views = views_of(loaded.meta.path, scales, tta_flip)
    with progress_bar() as bar:
        task = bar.add_task("detect", total=len(image_set))
        table, meta = detect_images(loaded, image_set, views, settings, name=name, device=device, with_masks=with_masks,
                                    progress=lambda k: bar.update(task, completed=k))  # fmt: skip
    write_results(out, table, meta, coco_json)  # both outputs or neither
    typer.echo(f"wrote {out}: {table.num_rows} {meta.kind}, {len(image_set)} images, views {', '.join(meta.extra['views'])}")


def import_torchvision(
    arch: Annotated[str, typer.Option(help="fasterrcnn_resnet50_fpn | fasterrcnn_resnet50_fpn_v2 | maskrcnn_resnet50_fpn | maskrcnn_resnet50_fpn_v2")],
    weights: Annotated[Path, typer.Option(help="torchvision state dict (.pth, read with weights_only=True; or .safetensors).")],
    out: Annotated[Path, typer.Option(help="Run folder to write (checkpoints/, config.yaml).")],
    categories: Annotated[str, typer.Option(help="coco (the 80 COCO categories, label == COCO id), or a JSON list of {id, name[, label]} (label defaults to id).")] = "coco",
    overwrite: Annotated[bool, typer.Option(help="Replace a run already in the run folder.")] = False,
) -> None:
    """Import a torchvision Faster / Mask R-CNN as a detector / segmenter run folder (nothing is downloaded)."""
    from .importer import import_torchvision as run_import

    path = run_import(arch, weights, out, categories, overwrite=overwrite)
    typer.echo(f"imported {arch} -> {path}")


def register(app: typer.Typer) -> None:
    app.command("train-detector")(train_detector)
    app.command("detect")(detect)
    app.command("import-torchvision")(import_torchvision)
