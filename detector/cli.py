"""`twopass train-detector` and `twopass detect`. Torch is imported inside the commands so
that `twopass --help` stays quick. User errors raise ValueError subclasses naming the file or
field; `pipeline.cli.main` prints them on one line and exits 2."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Callable, Optional

import typer


def _parse_scales(text: Optional[str]) -> list[int] | None:
    if not text:
        return None
    try:
        scales = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--tta-scales: expected comma-separated integers, got {text!r}") from None
    if not scales or min(scales) < 16:
        raise ValueError(f"--tta-scales: scales must be at least 16 px, got {text!r}")
    return scales


def make_train_command(kind: str, load: Callable[[], tuple[Callable, Callable]]) -> Callable[..., None]:
    """The `train-<kind>` command: same options, engine and checkpoints for every model kind.

    load() -> (load_config(path_or_name), build_model(config, num_classes, backbone_weights)),
    imported only when the command runs.
    """

    def command(
        config: Annotated[str, typer.Option(help="Model config YAML, or a name in configs/.")],
        train_ann: Annotated[Path, typer.Option(help="Training COCO annotations JSON.")],
        train_images: Annotated[Path, typer.Option(help="Training image folder.")],
        out: Annotated[Path, typer.Option(help="Run folder: checkpoints/, metrics.jsonl.")],
        iters: Annotated[int, typer.Option(help="Total iterations.")] = 1000,
        batch: Annotated[int, typer.Option(help="Images per process and iteration.")] = 2,
        lr: Annotated[Optional[float], typer.Option(help="LR for the config's train.base_batch images; scaled linearly with the real total batch. Default: the config's base_lr.")] = None,
        device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
        val_ann: Annotated[Optional[Path], typer.Option(help="Validation COCO annotations JSON.")] = None,
        val_images: Annotated[Optional[Path], typer.Option(help="Validation image folder.")] = None,
        val_every: Annotated[Optional[int], typer.Option(help="Validate every N iterations (0: at the end only).")] = None,
        checkpoint_every: Annotated[Optional[int], typer.Option(help="Checkpoint every N iterations (always at the end).")] = None,
        resume: Annotated[bool, typer.Option(help="Continue from the run folder's last checkpoint.")] = False,
        backbone_weights: Annotated[Optional[Path], typer.Option(help="Local torchvision classification state dict (.pth or .safetensors).")] = None,
        seed: Annotated[Optional[int], typer.Option(help="Seed (default: the config's).")] = None,
        workers: Annotated[Optional[int], typer.Option(help="Data loader worker processes.")] = None,
        time_budget: Annotated[Optional[float], typer.Option(help="Stop (and save) after this many seconds of training.")] = None,
        progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    ) -> None:
        import torch

        from pipeline.coco import CocoDataset

        from .checkpoint import last_meta
        from .infer import make_validator
        from .train import TrainOptions, train

        load_config, build_model = load()

        cfg = load_config(config)
        if (val_ann is None) != (val_images is None):
            raise ValueError("--val-ann and --val-images go together")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {device!r}")
        dataset = CocoDataset(train_ann, train_images, with_masks=cfg.mask_head.enabled)
        categories = dataset.categories
        weights = backbone_weights
        meta = last_meta(out) if resume else None
        if meta is not None:
            # through the config class: a checkpoint from before a config field existed has its default
            if type(cfg).model_validate(meta.config).to_dict() != cfg.to_dict():
                raise ValueError(f"--resume: config {config} differs from the one in {meta.path}")
            weights = None  # the checkpoint holds them
        torch.manual_seed(cfg.train.seed if seed is None else seed)
        model = build_model(cfg, categories.num_classes, weights)
        validate = None
        if val_ann is not None:
            validate = make_validator(val_ann, val_images, categories, batch=batch, device=device, with_masks=cfg.mask_head.enabled)
        options = TrainOptions(
            out=out,
            iters=iters,
            batch=batch,
            lr=lr,
            device=device,
            resume=resume,
            checkpoint_every=checkpoint_every,
            val_every=val_every,
            seed=seed,
            num_workers=workers,
            progress=progress,
            sync_bn=cfg.norm.backbone == "sync_bn",
            time_budget_s=time_budget,
        )
        result = train(model, dataset, options, cfg.train, kind=kind, config=cfg.to_dict(), categories=categories, validate=validate)
        if int(__import__("os").environ.get("RANK", "0")) == 0:
            typer.echo(f"trained {cfg.name} to iteration {result.iteration}: {result.checkpoint}")

    command.__doc__ = f"Train a {kind} (one process, or several under torchrun: gloo on CPU, NCCL on GPU)."
    return command


def _load_detector_builders():
    from .config import load_config
    from .model import build_detector

    return load_config, build_detector


train_detector = make_train_command("detector", _load_detector_builders)


def detect(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint JSON or .safetensors, or a run folder (its last checkpoint).")],
    images: Annotated[Path, typer.Option(help="Image folder.")],
    out: Annotated[Path, typer.Option(help="Detections Parquet to write.")],
    ann: Annotated[Optional[Path], typer.Option(help="COCO annotations naming the images (ids, sizes); else every image in the folder, ids by sorted name.")] = None,
    tta_scales: Annotated[Optional[str], typer.Option(help="Comma-separated shorter sides, e.g. 480,640,800 (default: the config's test size).")] = None,
    tta_flip: Annotated[bool, typer.Option(help="Add a mirrored view of every scale.")] = False,
    score_thresh: Annotated[float, typer.Option(help="Keep detections scoring above this.")] = 0.001,
    max_per_image: Annotated[int, typer.Option(help="Detections kept per image and view.")] = 100,
    batch: Annotated[int, typer.Option(help="Images per forward pass.")] = 2,
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    name: Annotated[Optional[str], typer.Option(help="Model name in the source column (default: the config's name).")] = None,
    fast: Annotated[bool, typer.Option(help="Fold frozen BatchNorm into convolutions, channels-last on CPU.")] = True,
) -> None:
    """Run a trained detector over images with test-time augmentation; write a detections table."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from pipeline.coco import CocoIndex, ImageSet
    from pipeline.tables import TableMeta, write_table

    from .checkpoint import load_detector
    from .infer import detect as run_detect
    from .infer import make_views
    from .speed import optimize_for_inference

    scales = _parse_scales(tta_scales)
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {device!r}")
    model, meta = load_detector(checkpoint, device)
    if ann is not None:
        index = CocoIndex.load(ann)
        meta.categories.check_same(index.categories, f"{ann} against checkpoint {meta.path}")
        image_set = index.image_set(images)
    else:
        image_set = ImageSet.from_folder(images)
    if fast:
        model = optimize_for_inference(model)
    model_name = name or model.config.name
    views = make_views(scales or [model.config.input.test_size], tta_flip)
    with Progress(TextColumn("detect"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()) as bar:
        task = bar.add_task("detect", total=len(image_set))
        table = run_detect(
            model,
            image_set,
            meta.categories,
            model_name=model_name,
            views=views,
            batch=batch,
            device=device,
            score_thresh=score_thresh,
            max_per_image=max_per_image,
            progress=lambda k: bar.update(task, completed=k),
        )
    tmeta = TableMeta(
        kind="detections",
        producer=f"detector:{model_name}",
        categories=meta.categories,
        config=meta.config,
        dataset=str(ann or images),
        extra={"checkpoint": str(meta.path), "iteration": meta.iteration, "views": [v.source(model_name) for v in views]},
    )
    write_table(out, table, tmeta)
    typer.echo(f"wrote {out}: {table.num_rows} detections, {len(image_set)} images, views {', '.join(tmeta.extra['views'])}")


def register(app: typer.Typer) -> None:
    app.command("train-detector")(train_detector)
    app.command("detect")(detect)
