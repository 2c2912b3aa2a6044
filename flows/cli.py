"""`twopass demo` and `twopass flow ...`: the Prefect flows from the command line.

Prefect is imported inside the commands, after `flows.env.configure(out)` has put its home
under the run folder (unless `PREFECT_HOME` or `PREFECT_API_URL` is set), so `twopass --help`
stays quick and a run leaves nothing outside its folder.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

flow_app = typer.Typer(
    name="flow",
    help="Run the pipeline's Prefect flows (embedded server unless PREFECT_API_URL is set).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Pipeline config YAML (see pipeline/config.py).")]
OutOpt = Annotated[Path, typer.Option(help="Run folder: every output, the ledger, Prefect's home and results.")]
RunnerOpt = Annotated[str, typer.Option(help="threads | processes | dask")]
WorkersOpt = Annotated[Optional[int], typer.Option(help="Tasks at once (threads, processes, or workers of a local Dask cluster). Default 1.")]
DaskOpt = Annotated[Optional[str], typer.Option(help="tcp://HOST:PORT of an existing Dask scheduler (--task-runner dask).")]


def _start(out: Path):
    """Prefect settings for this run folder, then the flows module (imports Prefect)."""
    from .env import configure

    configure(out)
    from . import prefect_flows

    return prefect_flows


def _runner(task_runner: str, workers: int | None, dask_address: str | None):
    """The task runner the options name (`flows.runners.TaskRunnerSpec`), checked before
    anything is written: a bad value is a ValueError naming its option."""
    from .runners import from_options

    return from_options(task_runner, workers, dask_address)


def _run(out: Path, names: list[str], spec, *args: Any) -> Any:
    """Run the flows `names` one after the other on the task runner `spec` (`_runner`) with
    `args`; the result of the last. A flow whose shards failed exits 1, naming them."""
    pf = _start(out)
    try:
        for name in names:
            result = pf.FLOWS[name](*args, task_runner=spec)
    except pf.FlowFailed as e:
        _fail(e)
    return result


def _load(config: Path, out: Path, workers: int = 1, parallel: bool = False, spec=None):
    """The pipeline config, checked before anything is written under `out`; with `spec` (the
    task runner of a flow that computes) its device too, where the tasks run on this machine
    (on an existing Dask cluster's workers each task checks it where it runs)."""
    from twopass.pipeline.config import load_pipeline_config
    from twopass.pipeline.devices import check_device
    from twopass.pipeline.threads import set_wait_policy

    from .env import configure

    parallel = parallel or workers > 1
    set_wait_policy(parallel)  # before anything imports torch (check_device does)
    cfg = load_pipeline_config(config)
    if spec is not None and spec.dask_address is None:
        check_device(cfg.device, f"{config}: device")
    configure(out, parallel=parallel)  # before anything imports Prefect; makes OUT/prefect
    return cfg


def _fail(e: Exception) -> None:
    typer.echo(f"twopass: {e}", err=True)
    raise typer.Exit(1)


def print_ap_table(rows: list[dict], title: str) -> None:
    """The AP table on the terminal (report.md has every column and what each row is)."""
    from twopass.pipeline.console import print_table

    cols = ["box AP", "box AP50", "mask AP", "mask AP50"]
    print_table(title, ["stage", *cols], [[r["stage"], *(r[c] for c in cols)] for r in rows])


def _summary(result: dict[str, Any], out: Path, seconds: float) -> None:
    if result.get("table"):
        print_ap_table(result["table"], f"AP per stage ({out})")
    typer.echo(f"computed this run: {result.get('ran') or 'nothing (all reused)'}")
    typer.echo(f"report:  {result['report']}")
    for k, v in result.get("outputs", {}).items():
        typer.echo(f"{k + ':':<9} {v}")
    typer.echo(f"done in {seconds:.0f} s; everything is under {out}")


@flow_app.command("train")
def train_cmd(
    config: ConfigOpt,
    out: OutOpt,
    parallel: Annotated[bool, typer.Option(help="Train every model at once (no progress bars).")] = False,
    task_runner: RunnerOpt = "threads",
    workers: WorkersOpt = None,
    dask_address: DaskOpt = None,
) -> None:
    """train_flow: train the configured detectors and the segmenter (finished ones are reused)."""
    spec = _runner(task_runner, workers, dask_address)
    cfg = _load(config, out, spec.workers, parallel, spec)
    result = _run(out, ["train"], spec, cfg, str(out), parallel)
    for name, path in result.items():
        typer.echo(f"{name}: {path}")


@flow_app.command("run")
def run_cmd(
    config: ConfigOpt,
    out: OutOpt,
    train: Annotated[bool, typer.Option(help="Run train_flow first (models without a checkpoint).")] = False,
    task_runner: RunnerOpt = "threads",
    workers: WorkersOpt = None,
    dask_address: DaskOpt = None,
) -> None:
    """two_pass_flow: detect (all detectors and views) -> fuse -> segment -> evaluate, per shard."""
    spec = _runner(task_runner, workers, dask_address)
    cfg = _load(config, out, spec.workers, spec=spec)
    t0 = time.perf_counter()
    result = _run(out, ["train", "two-pass"] if train else ["two-pass"], spec, cfg, str(out))
    _summary(result, out, time.perf_counter() - t0)


@flow_app.command("detect")
def detect_cmd(config: ConfigOpt, out: OutOpt, task_runner: RunnerOpt = "threads", workers: WorkersOpt = None, dask_address: DaskOpt = None) -> None:
    """detect_flow: every detector (all its views) on every shard; one detections file each."""
    spec = _runner(task_runner, workers, dask_address)
    cfg = _load(config, out, spec.workers, spec=spec)
    result = _run(out, ["detect"], spec, cfg, str(out))
    for name, path in result.items():
        typer.echo(f"{name}: {path}")


def _parse_named(items: list[str] | None, what: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{what}: expected NAME=PATH, got {item!r}")
        if not Path(path).is_file():
            raise FileNotFoundError(f"{what} {name}: {path}: no such file")
        out[name] = str(Path(path).resolve())
    return out


@flow_app.command("fuse")
def fuse_cmd(
    config: ConfigOpt,
    out: OutOpt,
    detections: Annotated[Optional[list[str]], typer.Option(help="NAME=PATH per detector (default: OUT/outputs/detections_NAME.parquet).")] = None,
    task_runner: RunnerOpt = "threads",
    workers: WorkersOpt = None,
    dask_address: DaskOpt = None,
) -> None:
    """fuse_flow: fuse the detectors' detections files, shard by shard."""
    spec = _runner(task_runner, workers, dask_address)
    cfg = _load(config, out, spec.workers)
    named = _parse_named(detections, "--detections")
    if not named:
        named = {d.name: str(out / "outputs" / f"detections_{d.name}.parquet") for d in cfg.detectors}
        missing = [p for p in named.values() if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"{missing[0]}: no such file; run `twopass flow detect` first or give --detections NAME=PATH")
    path = _run(out, ["fuse"], spec, cfg, named, str(out))
    typer.echo(f"fused: {path}")


@flow_app.command("segment")
def segment_cmd(
    config: ConfigOpt,
    out: OutOpt,
    detections: Annotated[Path, typer.Option(help="Detections Parquet or COCO results JSON, from any source.")],
    checkpoint: Annotated[Optional[Path], typer.Option(help="Segmenter checkpoint (default: the config's, else train_flow's).")] = None,
    task_runner: RunnerOpt = "threads",
    workers: WorkersOpt = None,
    dask_address: DaskOpt = None,
) -> None:
    """segment_flow: pass two alone on a detections file (the rerun path when new boxes arrive)."""
    spec = _runner(task_runner, workers, dask_address)
    cfg = _load(config, out, spec.workers, spec=spec)
    if not detections.is_file():
        raise FileNotFoundError(f"--detections {detections}: no such file")
    path = _run(out, ["segment"], spec, cfg, str(detections.resolve()), str(out),
                str(checkpoint) if checkpoint else None)  # fmt: skip
    typer.echo(f"instances: {path}")


@flow_app.command("evaluate")
def evaluate_cmd(
    config: ConfigOpt,
    out: OutOpt,
    detections: Annotated[Optional[list[str]], typer.Option(help="NAME=PATH per detector (default: OUT/outputs/detections_NAME.parquet).")] = None,
    fused: Annotated[Optional[Path], typer.Option(help="Fused detections (default: OUT/outputs/fused.parquet if present).")] = None,
    instances: Annotated[Optional[Path], typer.Option(help="Instances (default: OUT/outputs/instances.parquet if present).")] = None,
) -> None:
    """evaluate_flow: AP per stage as Prefect artifacts and OUT/report.md with pictures."""
    cfg = _load(config, out)
    named = _parse_named(detections, "--detections") or {
        d.name: str(out / "outputs" / f"detections_{d.name}.parquet")
        for d in cfg.detectors
        if (out / "outputs" / f"detections_{d.name}.parquet").is_file()
    }
    fused = fused or (out / "outputs" / "fused.parquet" if (out / "outputs" / "fused.parquet").is_file() else None)
    instances = instances or (out / "outputs" / "instances.parquet" if (out / "outputs" / "instances.parquet").is_file() else None)
    for p in (fused, instances):
        if p is not None and not Path(p).is_file():
            raise FileNotFoundError(f"{p}: no such file")
    pf = _start(out)
    result = pf.evaluate_flow(cfg, named, str(fused) if fused else None, str(instances) if instances else None, run_dir=str(out))
    if result["table"]:
        print_ap_table(result["table"], f"AP per stage ({out})")
    typer.echo(f"report: {result['report']}")


@flow_app.command("crash-detection")
def crash_detection_cmd(
    silence: Annotated[int, typer.Option(help="Seconds without a heartbeat after which a flow run is marked Crashed.")] = 90,
) -> None:
    """Mark flow runs whose worker died as Crashed: create the automation on the Prefect server of
    PREFECT_API_URL (once per server; again to change --silence). Workers need
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30 (prefect.yaml sets it on the work pool)."""
    import os

    if not os.environ.get("PREFECT_API_URL"):
        raise ValueError("crash-detection: set PREFECT_API_URL to your Prefect server (the embedded one keeps no automations)")
    from .recovery import ensure_crash_automation

    typer.echo(f"automation {ensure_crash_automation(silence)}: flow runs silent for {silence} s become Crashed")


@flow_app.command("example-config")
def example_config_cmd(
    out: Annotated[Path, typer.Argument(help="Where to write the YAML.")],
    data: Annotated[Path, typer.Option(help="Data folder with train/ and val/ (as `twopass synth` makes them).")] = Path("data"),
    smoke: Annotated[bool, typer.Option(help="A first try: 10 iterations a model and one view each (a minute or two on a CPU).")] = False,
) -> None:
    """Write the demo's pipeline config as a starting point for your own."""
    from twopass.pipeline.config import write_pipeline_config

    from .demo import demo_config, smoke_config

    write_pipeline_config(out, smoke_config(data) if smoke else demo_config(data))
    typer.echo(f"wrote {out}")


def demo(
    out: Annotated[Path, typer.Option(help="Run folder: data, models, outputs, report.md, Prefect's home.")] = Path("runs/demo"),
    train_images: Annotated[int, typer.Option(help="Synthetic training images.")] = 1000,
    val_images: Annotated[int, typer.Option(help="Synthetic validation images (pass one and two run on these).")] = 50,
    budget: Annotated[float, typer.Option(help="Training time of the three models together, seconds.")] = 540.0,
    difficulty: Annotated[str, typer.Option(help="Synthetic data level: easy (calm backgrounds, distinct shapes) | standard | hard.")] = "easy",
    precision: Annotated[str, typer.Option(help="fp32 | bf16 | fp16 for every model's training and inference (bf16 pays on CPUs with native bfloat16).")] = "fp32",
    task_runner: RunnerOpt = "threads",
    workers: WorkersOpt = None,
    dask_address: DaskOpt = None,
) -> None:
    """The main job: synthetic data, two detectors and a segmenter, the two-pass flow, AP table, report.

    Generates the synthetic shapes set (`--difficulty`, easy by default), trains two small detectors and
    one segmenter within a share of the time budget each (train_flow), runs two_pass_flow on
    Prefect's embedded server (the segmenter's own boxes fused with the detectors'), and prints
    the AP of each model, the fused boxes and the final masks; report.md and pictures go to --out.
    """
    from twopass.pipeline.console import progress_bar
    from twopass.pipeline.config import write_pipeline_config
    from twopass.pipeline.fileio import read_json
    from twopass.pipeline.synth import DIFFICULTIES, description, generate

    from .demo import SIZE, demo_config
    from .env import configure

    if difficulty not in DIFFICULTIES:
        raise ValueError(f"--difficulty: expected one of {', '.join(DIFFICULTIES)}, got {difficulty!r}")
    spec = _runner(task_runner, workers, dask_address)
    t0 = time.perf_counter()
    out = out.resolve()
    configure(out, parallel=spec.workers > 1)  # before anything imports torch or Prefect
    data = out / "data"
    for split, n, seed in (("train", train_images, 0), ("val", val_images, 1)):
        ann = data / split / "annotations.json"
        if ann.is_file() and read_json(ann).get("info", {}).get("description") == description(n, SIZE, seed, difficulty):
            continue  # image i depends only on (seed, i, level): what is there is what would be made
        with progress_bar() as bar:
            task = bar.add_task(f"synth {split} ({difficulty})", total=n)
            generate(data / split, n, SIZE, seed, difficulty=difficulty, progress=lambda k: bar.update(task, completed=k))
    cfg = demo_config(data, train_budget_s=budget, precision=precision)
    write_pipeline_config(out / "pipeline.yaml", cfg)
    typer.echo(f"config: {out / 'pipeline.yaml'} (rerun with `twopass flow run --config {out / 'pipeline.yaml'} --out {out}`)")
    result = _run(out, ["train", "two-pass"], spec, cfg, str(out))
    _summary(result, out, time.perf_counter() - t0)
    typer.echo(f"pictures: {out / 'pictures'}")
    final = next((r for r in result.get("table") or [] if r["stage"] == "final masks"), None)
    if final is not None and final["mask AP"] is not None:
        typer.echo(f"final mask AP ({difficulty}): {final['mask AP']:.3f} (pycocotools on {out / 'outputs' / 'instances.json'} "
                   f"against {data / 'val' / 'annotations.json'} gives the same)")  # fmt: skip


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
    app.add_typer(flow_app, name="flow")

