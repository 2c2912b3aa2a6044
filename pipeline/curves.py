"""Curves to look at: a training run's losses, learning rate and validation AP (RUN/metrics.jsonl)
as a PNG or as TensorBoard events, and the precision-recall curves of an evaluation.

The charts are drawn with PIL, as every other picture of the project (`visualize.py`): a line
chart with ticks and a legend is a page of code, where matplotlib would be a new required
dependency (with its compiled ones) for three charts. TensorBoard is optional (the
`tensorboard` extra), imported only by `write_tensorboard`.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .fileio import atomic_path

TENSORBOARD_HINT = "pip install 'twopass[tensorboard]'"

# The PNG's loss lines are trailing means over this share of the run's iterations (at least
# 1, at most SMOOTH_MAX): one iteration's loss is one batch's, too noisy to read a trend from.
SMOOTH_SHARE = 1 / 50
SMOOTH_MAX = 100

# The validation numbers the PNG draws (all of them go to TensorBoard).
VAL_SHOWN = ("bbox/AP", "bbox/AP50", "segm/AP", "segm/AP50")

# tab10's colours: told apart by most readers, colour-blind ones included.
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]  # fmt: skip


@dataclass
class Series:
    """One scalar over iterations: `x` Int[N] iterations (1-based, as metrics.jsonl counts), `y` Float[N]."""

    x: np.ndarray
    y: np.ndarray


@dataclass
class TrainingCurves:
    """What a run's metrics.jsonl holds, by field. `train`: every number of the iteration
    records (`loss`, `loss_*`, `lr`, `time`, `grad_norm`, ...); `val`: every number of the
    validation records, nested keys joined by "/" (`bbox/AP`, `per_category/segm/cat`), COCO's
    -1 (no ground truth in that area range) left out; `error`: (iteration, message) of a run
    that failed."""

    path: Path
    train: dict[str, Series] = field(default_factory=dict)
    val: dict[str, Series] = field(default_factory=dict)
    error: tuple[int, str] | None = None

    @property
    def losses(self) -> dict[str, Series]:
        return {k: v for k, v in self.train.items() if k == "loss" or k.startswith("loss_")}


def metrics_file(run: str | Path) -> Path:
    """RUN/metrics.jsonl of a training run folder (or `run` itself, a metrics.jsonl file)."""
    run = Path(run)
    if run.is_file():
        return run
    path = run / "metrics.jsonl"
    if path.is_file():
        return path
    if not run.exists():
        raise FileNotFoundError(f"{run}: no such run folder")
    under = sorted(p.parent for p in run.glob("models/*/metrics.jsonl"))
    hint = f"; the training runs under it: {', '.join(str(p) for p in under)}" if under else " (is it a training run's --out folder?)"
    raise FileNotFoundError(f"{run}: no metrics.jsonl{hint}")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _flatten(d: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        elif _number(v) and v != -1:
            out[f"{prefix}{k}"] = float(v)
    return out


def read_metrics(run: str | Path) -> TrainingCurves:
    """Read a run's metrics.jsonl (`run`: the run folder or the file). A line that is not a JSON
    object with an integer "iter", or a field of an iteration record that is not a number, is
    named (file, line, field); a last line cut short (a run writing it now) is left out."""
    path = metrics_file(run)
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    train: dict[str, list[tuple[int, float]]] = {}  # field -> (iteration, value) in file order
    val: dict[str, list[tuple[int, float]]] = {}
    error = None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) and not text.endswith("\n"):
                break  # the line being written
            raise ValueError(f"{path}, line {i}: not JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("iter"), int) or isinstance(rec["iter"], bool):
            raise ValueError(f"{path}, line {i}: not a record with an integer \"iter\"")
        it = rec["iter"]
        if "error" in rec:
            error = (it, str(rec["error"]))
        elif "val" in rec:
            if not isinstance(rec["val"], dict):
                raise ValueError(f"{path}, line {i}: \"val\" is not an object")
            for k, v in _flatten(rec["val"]).items():
                val.setdefault(k, []).append((it, v))
        else:
            for k, v in rec.items():
                if k == "iter":
                    continue
                if not _number(v):
                    raise ValueError(f"{path}, line {i}: \"{k}\" is {v!r}, not a number")
                train.setdefault(k, []).append((it, float(v)))
    if not train:
        what = f"the run failed at iteration {error[0]}: {error[1]}" if error else "the run was stopped in its first iteration?"
        raise ValueError(f"{path}: no training iteration recorded ({what})")

    def series(d):
        return {k: Series(np.asarray([p[0] for p in v], np.int64), np.asarray([p[1] for p in v], np.float64)) for k, v in d.items()}

    return TrainingCurves(path, series(train), series(val), error)


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean of the last `window` finite values at each point (fewer at the start);
    NaN where none of them is finite. Float[N] -> Float[N]."""
    y = np.asarray(y, np.float64)
    ok = np.isfinite(y)
    s = np.concatenate([[0.0], np.cumsum(np.where(ok, y, 0.0))])
    n = np.concatenate([[0], np.cumsum(ok)])
    hi = np.arange(1, len(y) + 1)
    lo = np.maximum(hi - window, 0)
    count = n[hi] - n[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, (s[hi] - s[lo]) / np.maximum(count, 1), np.nan)


def smooth_window(n: int) -> int:
    return int(min(SMOOTH_MAX, max(1, round(n * SMOOTH_SHARE))))


# --------------------------------------------------------------------------- drawing


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About `n` round tick values (1, 2, 2.5 or 5 times a power of ten apart) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    mag = 10 ** math.floor(math.log10((hi - lo) / n))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10)), key=lambda st: abs((hi - lo) / st - n))  # the count nearest n
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + k * step, 12) for k in range(int((hi - first) / step + 1e-9) + 1)]


def tick_labels(ticks: Sequence[float]) -> list[str]:
    """Tick values with as many decimals as their step needs (0.00025 steps: 0.00075, not
    7.5e-04); scientific below 1e-4 steps."""
    step = min((b - a for a, b in zip(ticks, ticks[1:])), default=abs(ticks[0]) if ticks else 1.0) or 1.0
    if step < 1e-4:
        return [f"{t:.1e}" if t else "0" for t in ticks]
    decimals = max(0, -math.floor(math.log10(step) + 1e-9) + (1 if round(step / 10 ** math.floor(math.log10(step)), 6) == 2.5 else 0))
    return [f"{t:.{decimals}f}" for t in ticks]


@dataclass
class Line:
    """One line of a chart: `y` over `x`; gaps where `y` is not finite."""

    label: str
    x: np.ndarray
    y: np.ndarray
    color: tuple[int, int, int]
    width: int = 2
    dots: bool = False  # mark each point (sparse series: validation every N iterations)


def draw_chart(im: Image.Image, box: tuple[int, int, int, int], title: str, lines: Sequence[Line], x_label: str,
               y_range: tuple[float, float] | None = None, x_range: tuple[float, float] | None = None,
               note: str | None = None) -> None:  # fmt: skip
    """A line chart in `box` (x0, y0, x1, y1 pixels of `im`): title, axes with ticks and grid,
    the lines, the legend in a column on the right (labels of lines whose label is empty are
    not listed). `note` is written in the plot area (when there is nothing to draw)."""
    draw = ImageDraw.Draw(im)
    small, big = _font(11), _font(13)
    x0, y0, x1, y1 = box
    legend_w = 190
    px0, py0, px1, py1 = x0 + 62, y0 + 24, x1 - legend_w, y1 - 36  # the plot area
    draw.text((px0, y0 + 4), title, fill=(0, 0, 0), font=big)
    finite = [(ln.x[np.isfinite(ln.y)], ln.y[np.isfinite(ln.y)]) for ln in lines]
    xs = np.concatenate([f[0] for f in finite]) if finite else np.zeros(0)
    ys = np.concatenate([f[1] for f in finite]) if finite else np.zeros(0)
    if x_range is None:
        x_range = (float(xs.min()), float(xs.max())) if xs.size else (0.0, 1.0)
    if y_range is None:
        y_range = (float(ys.min()), float(ys.max())) if ys.size else (0.0, 1.0)
        pad = (y_range[1] - y_range[0]) * 0.05 or abs(y_range[0]) * 0.1 or 1.0
        y_range = (y_range[0] - pad, y_range[1] + pad)
    if x_range[1] <= x_range[0]:
        x_range = (x_range[0] - 1, x_range[1] + 1)

    def to_px(x, y):
        u = px0 + (np.asarray(x, np.float64) - x_range[0]) / (x_range[1] - x_range[0]) * (px1 - px0)
        v = py1 - (np.asarray(y, np.float64) - y_range[0]) / (y_range[1] - y_range[0]) * (py1 - py0)
        return u, v

    ticks = [t for t in nice_ticks(*y_range) if y_range[0] <= t <= y_range[1]]
    for t, text in zip(ticks, tick_labels(ticks)):
        _, v = to_px(0, t)
        draw.line((px0, v, px1, v), fill=(225, 225, 225))
        draw.text((px0 - 4, v), text, fill=(60, 60, 60), font=small, anchor="rm")
    ticks = [t for t in nice_ticks(*x_range, n=6) if x_range[0] <= t <= x_range[1]]
    for t, text in zip(ticks, tick_labels(ticks)):
        u, _ = to_px(t, 0)
        draw.line((u, py0, u, py1), fill=(235, 235, 235))
        draw.text((u, py1 + 4), text, fill=(60, 60, 60), font=small, anchor="mt")
    draw.rectangle((px0, py0, px1, py1), outline=(80, 80, 80))
    draw.text(((px0 + px1) / 2, py1 + 20), x_label, fill=(0, 0, 0), font=small, anchor="mt")
    if note:
        draw.text(((px0 + px1) / 2, (py0 + py1) / 2), note, fill=(120, 120, 120), font=big, anchor="mm")
    for ln in lines:
        u, v = to_px(ln.x, ln.y)
        ok = np.isfinite(v)
        # clip to the plot area (a diverged loss is drawn at its edge) and break at gaps
        v = np.clip(v, py0, py1)
        start = 0
        for end in [*np.flatnonzero(~ok), len(v)]:
            seg = list(zip(u[start:end].tolist(), v[start:end].tolist()))
            if len(seg) > 1:
                draw.line(seg, fill=ln.color, width=ln.width, joint="curve")
            elif len(seg) == 1:
                draw.point(seg, fill=ln.color)
            start = end + 1
        if ln.dots:
            for a, b in zip(u[ok].tolist(), v[ok].tolist()):
                draw.ellipse((a - 3, b - 3, a + 3, b + 3), fill=ln.color)
    ly = py0
    for ln in lines:
        if not ln.label:
            continue
        draw.line((px1 + 12, ly + 7, px1 + 32, ly + 7), fill=ln.color, width=3)
        draw.text((px1 + 38, ly), ln.label, fill=(0, 0, 0), font=small)
        ly += 16


def _tint(c: tuple[int, int, int], keep: float = 0.3) -> tuple[int, int, int]:
    return tuple(int(255 - (255 - v) * keep) for v in c)  # type: ignore[return-value]


PANEL_W, PANEL_H = 900, 280


def plot_training(curves: TrainingCurves, out: str | Path, title: str | None = None) -> dict[str, dict[str, Series]]:
    """Write a PNG of three charts: the losses (trailing means, `smooth_window`; the total's
    every iteration faint behind), the learning rate, the validation AP. Returns what was
    drawn: {"losses" | "lr" | "val": {label: Series}}."""
    losses = curves.losses
    n = max((len(s.x) for s in losses.values()), default=0)
    w = smooth_window(n)
    drawn: dict[str, dict[str, Series]] = {"losses": {}, "lr": {}, "val": {}}
    im = Image.new("RGB", (PANEL_W, PANEL_H * 3 + 30), (255, 255, 255))
    head = title or str(curves.path.parent)
    if curves.error:
        head += f"  (failed at iteration {curves.error[0]}: {curves.error[1][:80]})"
    ImageDraw.Draw(im).text((10, 8), head, fill=(0, 0, 0), font=_font(14))

    lines = []
    order = sorted(losses, key=lambda k: (k != "loss", k))  # the total first
    for k, name in enumerate(order):
        s = losses[name]
        color = PALETTE[k % len(PALETTE)]
        y = smooth(s.y, w)
        if name == "loss" and w > 1:
            lines.insert(0, Line("", s.x, s.y, _tint(color), 1))
        lines.append(Line("loss (total)" if name == "loss" else name, s.x, y, color))
        drawn["losses"][name] = Series(s.x, y)
    x_range = (1.0, float(max(int(s.x.max()) for s in curves.train.values())))
    mean = f"mean of {w} iterations" if w > 1 else "each iteration"
    draw_chart(im, (0, 30, PANEL_W, 30 + PANEL_H), f"training losses ({mean})", lines, "iteration", x_range=x_range)

    lr = curves.train.get("lr")
    lines = [Line("learning rate", lr.x, lr.y, PALETTE[0])] if lr is not None else []
    if lr is not None:
        drawn["lr"]["lr"] = lr
        top = float(np.nanmax(lr.y)) if np.isfinite(lr.y).any() else 1.0
        y_range = (0.0, top * 1.05 or 1.0)
    else:
        y_range = None
    draw_chart(im, (0, 30 + PANEL_H, PANEL_W, 30 + 2 * PANEL_H), "learning rate", lines, "iteration", y_range=y_range,
               x_range=x_range, note=None if lr is not None else "no learning rate recorded")  # fmt: skip

    lines = []
    for k, name in enumerate(n for n in VAL_SHOWN if n in curves.val):
        s = curves.val[name]
        label = name.replace("bbox/", "box ").replace("segm/", "mask ")
        lines.append(Line(label, s.x, s.y, PALETTE[k % len(PALETTE)], dots=True))
        drawn["val"][name] = s
    top = max((float(np.nanmax(ln.y)) for ln in lines), default=0.0)
    note = None if lines else "no validation recorded (train with validation data to see AP here)"
    draw_chart(im, (0, 30 + 2 * PANEL_H, PANEL_W, 30 + 3 * PANEL_H), "validation AP", lines, "iteration",
               y_range=(0.0, max(0.05, min(1.0, top * 1.15))), x_range=x_range, note=note)  # fmt: skip
    with atomic_path(out) as tmp:
        im.save(tmp, format="PNG")
    return drawn


# --------------------------------------------------------------------------- TensorBoard


def check_tensorboard_dir(out_dir: str | Path) -> Path:
    """Refuse an events folder that holds anything but TensorBoard events (it is replaced whole)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        other = [p.name for p in out_dir.iterdir()] if out_dir.is_dir() else [out_dir.name]
        other = [n for n in other if not n.startswith("events.out.tfevents.")]
        if other:
            raise ValueError(f"{out_dir}: holds files that are not TensorBoard events ({', '.join(sorted(other)[:3])}); "
                             "not replacing it")  # fmt: skip
    return out_dir


def write_tensorboard(curves: TrainingCurves, out_dir: str | Path) -> Path:
    """TensorBoard event files in `out_dir` (replaced whole, so a rerun adds no duplicate
    points): every training number as `train/<field>` and validation number as `val/<key>`,
    at its iteration. Needs the `tensorboard` package (the extra of that name)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError(f"--tensorboard needs the tensorboard package: {TENSORBOARD_HINT}") from None
    out_dir = check_tensorboard_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # written beside, then renamed onto out_dir: a reader never sees half the events
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        writer = SummaryWriter(log_dir=str(tmp))
        for prefix, group in (("train", curves.train), ("val", curves.val)):
            for name, s in group.items():
                for x, y in zip(s.x.tolist(), s.y.tolist()):
                    writer.add_scalar(f"{prefix}/{name}", y, global_step=x)
        writer.close()
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-old-", dir=out_dir.parent))
            os.replace(out_dir, old / "x")
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# --------------------------------------------------------------------------- precision-recall


@dataclass
class PRCurves:
    """Precision at COCO's 101 recall points (0, 0.01, ..., 1) for one IoU type, averaged over
    the categories that have ground truth, all areas, the last max-detections setting: at IoU
    0.50 and 0.75, and averaged over IoU 0.50:0.95. The mean of each curve is AP50, AP75, AP."""

    recall: np.ndarray  # Float[101]
    iou50: np.ndarray  # Float[101]
    iou75: np.ndarray  # Float[101]
    mean: np.ndarray  # Float[101]


def pr_from_precision(precision: np.ndarray, iou_thrs: Sequence[float], rec_thrs: Sequence[float]) -> PRCurves:
    """The curves of COCOeval's accumulated `eval["precision"]`, Float[T, R, K, A, M] (IoU
    thresholds, recall points, categories, area ranges, max detections; -1 where a category has
    no ground truth)."""
    p = np.asarray(precision, np.float64)[:, :, :, 0, -1]  # [T, R, K]: all areas, most detections
    thrs = np.asarray(iou_thrs, np.float64)

    def mean_over(ts: np.ndarray) -> np.ndarray:
        sub = p[ts]  # [t, R, K]
        valid = sub > -1
        with np.errstate(invalid="ignore"):
            return np.where(valid.any(axis=(0, 2)), np.where(valid, sub, 0).sum(axis=(0, 2)) / np.maximum(valid.sum(axis=(0, 2)), 1), np.nan)

    def at(t: float) -> np.ndarray:
        return mean_over(np.flatnonzero(np.isclose(thrs, t)))

    return PRCurves(np.asarray(rec_thrs, np.float64), at(0.5), at(0.75), mean_over(np.arange(len(thrs))))


def pr_curves(gt, results, iou_types: Sequence[str] = ("bbox", "segm")) -> dict[str, PRCurves]:
    """Precision-recall curves of `results` (a table, a Parquet or COCO results JSON path, a
    results list) against the ground truth `gt`, by IoU type (`segm` skipped when the results
    have no masks), from the same COCOeval run as `evaluate.evaluate` (its default backend)."""
    # one evaluation code: evaluate.py's checks and its faster-coco-eval COCOeval
    from .evaluate import _check_ids, _columns, _eval_class, _load_gt, _results_coco
    from .tables import read_results

    what = str(results) if isinstance(results, (str, Path)) else "results"
    gt_coco = _load_gt(gt, "faster")
    if isinstance(results, (str, Path)):
        sizes = {int(im["id"]): (im["height"], im["width"]) for im in gt_coco.dataset["images"]}
        results, _ = read_results(results, image_sizes=sizes)
    cols = _columns(results, what)
    _check_ids(cols, gt_coco, what)
    out = {}
    for iou_type in iou_types:
        if iou_type == "segm" and cols.segmentation is None:
            continue
        if not cols.score:  # nothing found: precision 0 everywhere
            r = np.linspace(0, 1, 101)
            out[iou_type] = PRCurves(r, np.zeros(101), np.zeros(101), np.zeros(101))
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            ev = _eval_class()(gt_coco, _results_coco(gt_coco, cols, with_masks=iou_type == "segm"), iou_type,
                               print_function=lambda *a, **k: None)  # fmt: skip
            ev.evaluate()
            ev.accumulate()
        out[iou_type] = pr_from_precision(ev.eval["precision"], ev.params.iouThrs, ev.params.recThrs)
    return out


def plot_pr(curves: dict[str, PRCurves], out: str | Path, title: str) -> Path:
    """A PNG with one chart per IoU type (box, mask): precision over recall at IoU 0.50, 0.75
    and averaged over 0.50:0.95, each labelled with its AP."""
    names = {"bbox": "box", "segm": "mask"}
    w, h = 620, 360
    im = Image.new("RGB", (w * max(1, len(curves)), h + 30), (255, 255, 255))
    ImageDraw.Draw(im).text((10, 8), title, fill=(0, 0, 0), font=_font(14))
    for k, (iou_type, c) in enumerate(curves.items()):
        ap = lambda y: float(np.nanmean(y)) if np.isfinite(y).any() else float("nan")  # noqa: E731
        # drawn widest first: where curves coincide (precision 1 at low recall) each still shows
        lines = [Line(f"IoU 0.50 (AP50 {ap(c.iou50):.3f})", c.recall, c.iou50, PALETTE[0], 6),
                 Line(f"IoU 0.75 (AP75 {ap(c.iou75):.3f})", c.recall, c.iou75, PALETTE[1], 4),
                 Line(f"IoU .50:.95 (AP {ap(c.mean):.3f})", c.recall, c.mean, PALETTE[2], 2)]  # fmt: skip
        draw_chart(im, (k * w, 30, (k + 1) * w, 30 + h), f"{names.get(iou_type, iou_type)}: precision-recall", lines,
                   "recall", y_range=(0.0, 1.0), x_range=(0.0, 1.0))  # fmt: skip
    out = Path(out)
    with atomic_path(out) as tmp:
        im.save(tmp, format="PNG")
    return out
