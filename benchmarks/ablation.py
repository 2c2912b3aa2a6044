"""The slides' ablation, rerun on synthetic data: every row trained with the same schedule,
evaluated with COCO metrics, averaged over seeds. Resumable row by row.

    python benchmarks/ablation.py --budget smoke|small|medium|long|easy|full [--seeds N] [--out DIR]
                                  [--rows PATTERN|key] [--device cpu|cuda] [--threads 2]
                                  [--difficulty easy|standard|hard] [--only-seed K] [--curve ITERS]

Data: the synthetic `standard` set (pipeline.synth; budget `easy`: the `easy` set); the tables
measured before the levels existed used today's `hard` (`--difficulty hard` reproduces them).

Budgets (data sizes and schedule; every row gets the same):
  smoke  a few iterations on a few images: checks the machinery in minutes, numbers mean nothing
  small  2 CPU cores, 2 seeds in 65 minutes (measured) with the `*_cpu` presets, one process a seed:
         python benchmarks/ablation.py --budget small --only-seed 0 --threads 1 &
         python benchmarks/ablation.py --budget small --only-seed 1 --threads 1   (see BUDGETS)
  medium small's data at 3x the iterations (1500)
  long   small's data at 10x the iterations: about 11 hours on 2 CPU cores (not yet run)
  easy   `easy` data (1000 train / 100 val), the schedule chosen from the baseline's learning curve
         so that its own masks reach mask AP 0.30; meant for `--rows key`, one process a seed:
         python benchmarks/ablation.py --budget easy --curve 4000 --only-seed 0      (the curve first)
         python benchmarks/ablation.py --budget easy --rows key --only-seed 0 --threads 1 &
         python benchmarks/ablation.py --budget easy --rows key --only-seed 1 --threads 1
  full   meant for a GPU (`--device cuda`): more data, a longer schedule, three seeds

Models. All configs are built in code from ONE base preset, `configs/r18_lsd_cpu.yaml`
(ResNet-18 FPN-64, 128 px inputs), normalised to the slides' baseline (two_fc box head,
standard mask head, no multi-scale RoI, no global context, no edge loss). Each row then turns
on its switches and nothing else; the ShuffleNetV2 rows take only the `backbone` section of
`configs/shufflev2_lsd_cpu.yaml`. The schedule (iterations, batch, warm-up, LR steps) comes
from the budget and is the same for every model. Models shared by several rows are trained
once per seed (e.g. the full-header segmenter serves every two-pass row).

Rows (reference row in brackets; deltas are paired per seed, then averaged):
  header     baseline; + location-sensitive box head [baseline]; + multi-scale RoI, box and
             mask [+LSD]; heavier mask head alone [baseline]; mask edge loss alone [baseline];
             full Location Sensitive Header [baseline]; the same on ShuffleNetV2 [full header];
             + global context [ShuffleNetV2]. Box AP from the segmenter's own detections.
             The LSD and the full header again with the LSD at Light-Head R-CNN's small width
             (`*_m64a10`: C_mid 64, alpha 10, as docs/method.md §6) [baseline]: the preset's C_mid 16,
             alpha 4 is a speed choice, and at 1500 iterations it cost box AP.
  header_gt  the same segmenters' masks on ground-truth boxes, same references: the mask heads
             compared without their boxes' errors (no training of their own).
  header_bb  the same segmenters' masks on the baseline segmenter's own boxes (its detections,
             pass two style), same references: the mask heads compared on the same realistic
             boxes, so a row's change is its mask head's alone.
  two_pass   the full-header segmenter alone; its masks on WBF-fused boxes of 2 detectors
             (LSD + its Cascade, `cascade_stages: 3`) and of 3 (+ ShuffleNetV2 LSD); + detection
             TTA (scales x flip); + mask TTA; masks on ground-truth boxes (upper bound).
  detection  single detector (LSD); + Soft-NMS (replacing NMS, `rescore=True`); + TTA
             (views merged by Soft-NMS); + ensemble of the 3 detectors with TTA, WBF and Soft-NMS.

`--rows key` (KEY_ROWS): the header rows on ResNet-18 with their ground-truth-box and baseline-box
twins, every two_pass and detection row (the ensemble fused by WBF, Soft-NMS and NMS); 9 models a seed.

Every evaluation keeps score > 0.001 and the top 100 per image (COCO practice, docs/method.md §15).

Resuming. Everything lives under DIR, named by a content key (model config, schedule, data,
seed, evaluation settings): DIR/models/seed<k>/<model>-<key>/ holds a training run (the
engine resumes it from its checkpoints; `done.json` marks it finished), and
DIR/rows/<row>/seed<k>.json one finished evaluation, written atomically. A rerun skips every
finished row and reuses every finished model; a changed preset or budget gets new keys and is
computed afresh. DIR/results.md and DIR/results.json are rewritten after every row.

Last line: baseline_mask_ap=<0-1> full_header_mask_ap_gain=<AP points> full_header_box_ap_gain=<> full_header_gt_boxes_mask_ap_gain=<>
full_header_baseline_boxes_mask_ap_gain=<> full_header_m64a10_mask_ap_gain=<> full_header_m64a10_box_ap_gain=<> two_pass_mask_ap_gain=<> improve_on_dets_mask_ap_gain=<> det_ensemble_box_ap_gain=<> wbf_vs_softnms_box_ap_gain=<> wbf_vs_nms_box_ap_gain=<> rows=<n> seeds=<n>
(`--curve`: curve_iters=<> final_mask_ap=<> best_mask_ap=<> first_iter_at_0.30=<>)
"""

from __future__ import annotations

import os

# Threads that sleep instead of spinning at OpenMP barriers: on a shared 2-core machine a
# spinning runtime competing with another process slows every op (benchmarks/train_speed.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import fnmatch  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

from twopass.pipeline.settings import DETECT  # noqa: E402

VERSION = 1  # bump when a row's meaning changes: old row files are then not reused
SCORE_THRESH = DETECT.score_thresh  # COCO practice, pass one's defaults
MAX_PER_IMAGE = DETECT.max_per_image
RAW_PER_VIEW = 300  # boxes a view keeps when Soft-NMS replaces the model's NMS
BASE_PRESET = "r18_lsd_cpu"
SHUFFLE_PRESET = "shufflev2_lsd_cpu"
BASELINE_SEGMENTER = "seg_baseline"  # its own boxes are the common boxes of the header_bb rows
TWO_PASS_SEGMENTER = "seg_lsh"  # the full-header segmenter (ResNet-18), pass two of every two-pass row
DETECTORS_2 = ("det_lsd", "det_cascade")
DETECTORS_3 = ("det_lsd", "det_cascade", "det_shufflev2")
STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


# --------------------------------------------------------------------------- budgets


@dataclass(frozen=True)
class Budget:
    name: str
    train_images: int
    val_images: int
    iters: int
    batch: int
    warmup_iters: int
    checkpoint_every: int
    seeds: int = 1  # default of --seeds
    image_size: int = 128
    # Synthetic data level (pipeline.synth): `standard` since the levels exist; the tables in
    # docs/results.md before it were measured on `hard` (`--difficulty hard` reruns them).
    difficulty: str = "standard"
    det_tta_scales: tuple[int, ...] = (112, 128, 160)
    mask_tta_scales: tuple[int, ...] = (128, 160)
    device: str = "cpu"


# The baseline's learning curve on the `easy` set (`--budget easy --curve 4000`, 2 threads, constant
# LR after warm-up; docs/results.md): val mask AP 0.097 / 0.196 / 0.282 / 0.359 / 0.437 / 0.460 /
# 0.524 at 250 / 500 / ... / 1750 iterations (about 1 s an iteration). 1000 iterations pass 0.30
# with a margin before the LR steps down at 800; each further 500 costs 9 models x 2 seeds more.
EASY_ITERS = 1000

BUDGETS = {
    # Same batch and input sizes as `small`, so its seconds an iteration project `small`'s time.
    "smoke": Budget("smoke", train_images=16, val_images=8, iters=6, batch=4, warmup_iters=2, checkpoint_every=3),
    # How `small` was sized (2 cores, OMP_WAIT_POLICY=PASSIVE): r18_lsd_cpu trains at 0.43 s an
    # iteration (batch 4, 112-144 px) with 2 threads, or 0.68 s in each of two processes of 1
    # thread side by side (1.26x the throughput: run one seed a process, `--only-seed`). The 11
    # models average about 1.35x r18_lsd_cpu's time (smoke run), so 500 iterations are ~8 min a
    # model, ~85 min for 11; evaluating 19 rows on 50 val images ~13 min. Two seeds side by side:
    # about 100 minutes estimated, 65 measured (2026-11-25: evaluation took ~3 min, not 13).
    "small": Budget("small", train_images=600, val_images=50, iters=500, batch=4, warmup_iters=50, checkpoint_every=100, seeds=2),
    # small's data at 3x the schedule: a first look at whether the header rows move with training.
    "medium": Budget("medium", train_images=600, val_images=50, iters=1500, batch=4, warmup_iters=50, checkpoint_every=250, seeds=2),
    # small's data and evaluation at 10x the schedule, for the header rows to leave the start
    # of their learning curves on a CPU: about 11 hours for both seeds side by side (small took
    # 65 minutes, nearly all of it training). Resumable; not yet run.
    "long": Budget("long", train_images=600, val_images=50, iters=5000, batch=4, warmup_iters=100, checkpoint_every=250, seeds=2),
    # `easy` data (pipeline.synth), where the demo's models reach box AP 0.3-0.4 in CPU-minutes, at
    # a schedule chosen from the baseline's learning curve (`--curve`, docs/results.md) so that its
    # own masks reach mask AP 0.30, where effects of 1-2 points should resolve. Run it with `--rows key`.
    "easy": Budget("easy", train_images=1000, val_images=100, iters=EASY_ITERS, batch=4, warmup_iters=100,
                   checkpoint_every=250, seeds=2, difficulty="easy"),
    # For a GPU (not measured here: no GPU was available when this was written).
    "full": Budget("full", train_images=4000, val_images=500, iters=9000, batch=8, warmup_iters=500,
                   checkpoint_every=1000, seeds=3, device="cuda"),
}  # fmt: skip


# --------------------------------------------------------------------------- model configs


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def base_dict(budget: Budget) -> dict:
    """The baseline: `configs/r18_lsd_cpu.yaml` with every slide switch off and the budget's schedule."""
    from twopass.detector.config import load_config

    d = load_config(BASE_PRESET).to_dict()
    return _merge(
        d,
        {
            "backbone": {"global_context": False},
            "box_head": {"type": "two_fc", "multi_scale_roi": False, "cascade_stages": 1},
            "mask_head": {"enabled": True, "type": "standard", "multi_scale_roi": False, "edge_loss": "none", "edge_weight": 1.0},
            "train": {"warmup_iters": budget.warmup_iters, "checkpoint_every": budget.checkpoint_every},
        },
    )


def shufflenet_backbone() -> dict:
    from twopass.detector.config import load_config

    return {"backbone": load_config(SHUFFLE_PRESET).to_dict()["backbone"]}


LSD = {"box_head": {"type": "location_sensitive"}}
# The Location Sensitive Detector at Light-Head R-CNN's small width (docs/method.md §6: C_mid 64,
# alpha 10, a 490-d RoI feature) instead of the CPU preset's C_mid 16, alpha 4 (196-d; chosen
# for speed: at this width a CPU iteration takes 1.5x as long for the LSD alone, 1.8x for the
# full header, 1 thread): at 1500 iterations the preset's width cost box AP.
LSD_M64A10 = {"box_head": {"type": "location_sensitive", "mid_channels": 64, "alpha": 10}}
MS_ROI = {"box_head": {"multi_scale_roi": True}, "mask_head": {"multi_scale_roi": True}}
HEAVIER = {"mask_head": {"type": "heavier"}}
EDGE = {"mask_head": {"edge_loss": "sobel", "edge_weight": 1.0}}
NO_MASK = {"mask_head": {"enabled": False}}


def _lsh() -> dict:
    return _merge(_merge(_merge(LSD, MS_ROI), HEAVIER), EDGE)


# name -> (kind, switches over the baseline); a callable gives switches needing other presets.
MODELS: dict[str, tuple[str, Callable[[], dict]]] = {
    "seg_baseline": ("segmenter", lambda: {}),
    "seg_lsd": ("segmenter", lambda: LSD),
    "seg_lsd_ms": ("segmenter", lambda: _merge(LSD, MS_ROI)),
    "seg_heavier": ("segmenter", lambda: HEAVIER),
    "seg_edge": ("segmenter", lambda: EDGE),
    "seg_lsh": ("segmenter", _lsh),
    "seg_lsd_m64a10": ("segmenter", lambda: LSD_M64A10),
    "seg_lsh_m64a10": ("segmenter", lambda: _merge(_lsh(), LSD_M64A10)),
    "seg_lsh_shufflev2": ("segmenter", lambda: _merge(_lsh(), _merge(shufflenet_backbone(), {"backbone": {"global_context": False}}))),
    "seg_lsh_shufflev2_gap": ("segmenter", lambda: _merge(_lsh(), _merge(shufflenet_backbone(), {"backbone": {"global_context": True}}))),
    # Pass-one detectors: the full header's box side (LSD + multi-scale RoI), no mask branch.
    "det_lsd": ("detector", lambda: _merge(_merge(LSD, {"box_head": {"multi_scale_roi": True}}), NO_MASK)),
    "det_cascade": ("detector", lambda: _merge(_merge(LSD, {"box_head": {"multi_scale_roi": True, "cascade_stages": 3}}), NO_MASK)),
    "det_shufflev2": ("detector", lambda: _merge(_merge(_merge(LSD, {"box_head": {"multi_scale_roi": True}}), NO_MASK),
                                                 _merge(shufflenet_backbone(), {"backbone": {"global_context": True}}))),
}  # fmt: skip


def model_config(name: str, budget: Budget):
    """Validated config of a model: the baseline dict plus the model's switches."""
    kind, switches = MODELS[name]
    d = _merge(base_dict(budget), switches())
    d["name"] = name
    if kind == "detector":  # the detector's MaskHeadConfig has no segmenter switches
        d["mask_head"] = {k: v for k, v in d["mask_head"].items() if k not in ("type", "multi_scale_roi", "edge_loss", "edge_weight")}
    from twopass.segmenter.api import KINDS

    return kind, KINDS[kind].config(d, f"ablation model {name}")


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Row:
    name: str
    group: str  # header | header_gt | header_bb | two_pass | detection
    label: str
    ref: str | None
    models: tuple[str, ...]
    run: str  # evaluation recipe (see `evaluate_row`)
    args: dict = field(default_factory=dict)
    slides: str = ""  # the slides' change (mask / box AP) for this row, for the reading


ROWS: tuple[Row, ...] = (
    # Location Sensitive Header and backbone: segmenters trained end to end, own boxes and masks.
    Row("baseline", "header", "Baseline (two_fc box head, standard mask head)", None, ("seg_baseline",), "own", slides="34.4 / 37.0"),
    Row("lsd", "header", "+ Location Sensitive Detector", "baseline", ("seg_lsd",), "own", slides="+1.0 / +1.7"),
    Row("lsd_ms", "header", "+ Multi-Scale RoI (box and mask)", "lsd", ("seg_lsd_ms",), "own", slides="+0.2 / +0.2"),
    Row("heavier", "header", "Heavier mask head alone", "baseline", ("seg_heavier",), "own", slides="+0.9 / -0.2"),
    Row("edge", "header", "Mask edge loss alone", "baseline", ("seg_edge",), "own", slides="+0.6 / +0.0"),
    Row("lsh", "header", "Full Location Sensitive Header", "baseline", ("seg_lsh",), "own", slides="+2.6 / +2.0 (R50)"),
    Row("lsd_m64a10", "header", "+ Location Sensitive Detector, Light-Head small width (C_mid 64, alpha 10)", "baseline",
        ("seg_lsd_m64a10",), "own", slides="+1.0 / +1.7"),
    Row("lsh_m64a10", "header", "Full Location Sensitive Header, LSD at Light-Head small width", "baseline",
        ("seg_lsh_m64a10",), "own", slides="+2.6 / +2.0 (R50)"),
    Row("lsh_shufflev2", "header", "Full header, ShuffleNetV2 backbone", "lsh", ("seg_lsh_shufflev2",), "own",
        slides="+3.8 / +5.7 (ShuffleV2 vs R50, large model)"),
    Row("lsh_shufflev2_gap", "header", "+ global context (GAP)", "lsh_shufflev2", ("seg_lsh_shufflev2_gap",), "own",
        slides="+0.7 / +0.7 (on the baseline)"),
    # The same segmenters' masks on ground-truth boxes: the mask heads compared with box quality
    # taken out (on short schedules the boxes, not the masks, bound the mask AP of the rows above).
    Row("gt_baseline", "header_gt", "Baseline", None, ("seg_baseline",), "gt_boxes"),
    Row("gt_lsd", "header_gt", "+ Location Sensitive Detector", "gt_baseline", ("seg_lsd",), "gt_boxes"),
    Row("gt_lsd_ms", "header_gt", "+ Multi-Scale RoI (box and mask)", "gt_lsd", ("seg_lsd_ms",), "gt_boxes"),
    Row("gt_heavier", "header_gt", "Heavier mask head alone", "gt_baseline", ("seg_heavier",), "gt_boxes"),
    Row("gt_edge", "header_gt", "Mask edge loss alone", "gt_baseline", ("seg_edge",), "gt_boxes"),
    Row("gt_lsh", "header_gt", "Full Location Sensitive Header", "gt_baseline", ("seg_lsh",), "gt_boxes"),
    Row("gt_lsd_m64a10", "header_gt", "+ Location Sensitive Detector, Light-Head small width", "gt_baseline",
        ("seg_lsd_m64a10",), "gt_boxes"),
    Row("gt_lsh_m64a10", "header_gt", "Full header, LSD at Light-Head small width", "gt_baseline", ("seg_lsh_m64a10",), "gt_boxes"),
    Row("gt_lsh_shufflev2", "header_gt", "Full header, ShuffleNetV2 backbone", "gt_lsh", ("seg_lsh_shufflev2",), "gt_boxes"),
    Row("gt_lsh_shufflev2_gap", "header_gt", "+ global context (GAP)", "gt_lsh_shufflev2", ("seg_lsh_shufflev2_gap",), "gt_boxes"),
    # header_bb rows (the same again, on the baseline's own boxes) are added below, one per header_gt row.
    # Two-pass pipeline: pass two is always the full-header segmenter.
    Row("tp_alone", "two_pass", "Full-header segmenter alone (own boxes)", None, (TWO_PASS_SEGMENTER,), "own", slides="-"),
    Row("tp_fused2", "two_pass", "Masks on fused boxes, 2 detectors (LSD + Cascade)", "tp_alone",
        (TWO_PASS_SEGMENTER, *DETECTORS_2), "two_pass", {"detectors": DETECTORS_2, "det_views": "single", "mask_views": "single"}),
    Row("tp_fused3", "two_pass", "Masks on fused boxes, 3 detectors (+ ShuffleNetV2)", "tp_alone",
        (TWO_PASS_SEGMENTER, *DETECTORS_3), "two_pass", {"detectors": DETECTORS_3, "det_views": "single", "mask_views": "single"},
        slides="+3.1 / +6.1 (Improve on Dets)"),
    Row("tp_det_tta", "two_pass", "+ detection TTA (scales x flip)", "tp_fused3",
        (TWO_PASS_SEGMENTER, *DETECTORS_3), "two_pass", {"detectors": DETECTORS_3, "det_views": "tta", "mask_views": "single"}),
    Row("tp_mask_tta", "two_pass", "+ mask TTA (scales x flip)", "tp_det_tta",
        (TWO_PASS_SEGMENTER, *DETECTORS_3), "two_pass", {"detectors": DETECTORS_3, "det_views": "tta", "mask_views": "tta"},
        slides="+0.5 / +0.0"),
    Row("tp_gt_boxes", "two_pass", "Upper bound: masks on ground-truth boxes", "tp_alone", (TWO_PASS_SEGMENTER,), "gt_boxes", slides="-"),
    # Detection only.
    Row("det_single", "detection", "Single detector (LSD + multi-scale RoI, NMS)", None, ("det_lsd",), "detect",
        {"detectors": ("det_lsd",), "views": "single", "method": "none"}, slides="49.3"),
    Row("det_softnms", "detection", "+ Soft-NMS (replaces NMS, rescored)", "det_single", ("det_lsd",), "detect",
        {"detectors": ("det_lsd",), "views": "single", "method": "soft-nms"}, slides="+0.5"),
    Row("det_tta", "detection", "+ TTA (scales x flip, Soft-NMS)", "det_softnms", ("det_lsd",), "detect",
        {"detectors": ("det_lsd",), "views": "tta", "method": "soft-nms"}, slides="+1.8"),
    Row("det_ens_wbf", "detection", "+ ensemble of 3 (with Cascade), WBF", "det_tta", DETECTORS_3, "detect",
        {"detectors": DETECTORS_3, "views": "tta", "method": "wbf"}, slides="+2.0, +1.8 with Cascade"),
    Row("det_ens_softnms", "detection", "+ ensemble of 3 (with Cascade), Soft-NMS", "det_tta", DETECTORS_3, "detect",
        {"detectors": DETECTORS_3, "views": "tta", "method": "soft-nms"}, slides="+2.0, +1.8 with Cascade"),
    Row("det_ens_nms", "detection", "+ ensemble of 3 (with Cascade), NMS", "det_tta", DETECTORS_3, "detect",
        {"detectors": DETECTORS_3, "views": "tta", "method": "nms"}, slides="-"),
)  # fmt: skip


def _on_baseline_boxes(gt: Row) -> Row:
    """A header_gt row's segmenter on the baseline segmenter's own boxes (the segmenter comes first)."""
    name = "bb_" + gt.name.removeprefix("gt_")
    ref = None if gt.ref is None else "bb_" + gt.ref.removeprefix("gt_")
    models = tuple(dict.fromkeys((*gt.models, BASELINE_SEGMENTER)))
    return Row(name, "header_bb", gt.label, ref, models, "baseline_boxes")


_GT = [r for r in ROWS if r.group == "header_gt"]
_AFTER_GT = ROWS.index(_GT[-1]) + 1
ROWS = ROWS[:_AFTER_GT] + tuple(_on_baseline_boxes(r) for r in _GT) + ROWS[_AFTER_GT:]
ROW_BY_NAME = {r.name: r for r in ROWS}


# The slides' key rows (`--rows key`): the header's steps on ResNet-18 (own boxes, ground-truth boxes,
# the baseline's boxes), two-pass with its TTAs, and the ensemble's three fusions. Leaves out the
# Light-Head-width and ShuffleNetV2 segmenters (4 of the 13 models).
KEY_HEADER = ("baseline", "lsd", "lsd_ms", "heavier", "edge", "lsh")
KEY_ROWS = (*KEY_HEADER, *(f"gt_{r}" for r in KEY_HEADER), *(f"bb_{r}" for r in KEY_HEADER), "tp_*", "det_*")


def select_rows(pattern: str | None) -> list[Row]:
    """Rows whose name matches any of the comma-separated glob patterns (all rows for None;
    `key` stands for KEY_ROWS)."""
    if not pattern:
        return list(ROWS)
    pats = [q for p in pattern.split(",") if p.strip() for q in (KEY_ROWS if p.strip() == "key" else [p.strip()])]
    rows = [r for r in ROWS if any(fnmatch.fnmatchcase(r.name, p) for p in pats)]
    if not rows:
        raise SystemExit(f"--rows {pattern!r}: matches no row; rows are {', '.join(r.name for r in ROWS)}")
    return rows


# --------------------------------------------------------------------------- helpers


def fmt_s(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "?"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _jsonl_train_stats(path: Path, iters: int) -> tuple[float, float]:
    """(training seconds, median seconds an iteration) of a run from its metrics.jsonl: the
    engine trims lines after the checkpoint it resumes from, so the sum covers the whole run."""
    total, times = 0.0, []
    if path.is_file():
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            if "loss" in r and r.get("iter", 0) <= iters:
                total += float(r.get("time", 0.0)) + float(r.get("data_time", 0.0))
                times.append(float(r.get("time", 0.0)))
    return total, (statistics.median(times) if times else float("nan"))


def prune_checkpoints(run: Path) -> None:
    """Delete every checkpoint of a finished run but the last (about 130 MB each for the
    `*_cpu` presets with optimizer state); `last.json` names the one kept."""
    from twopass.detector.checkpoint import resolve

    last = resolve(run)
    for p in last.parent.glob("iter_*"):
        if not p.name.startswith(last.stem + "."):
            p.unlink(missing_ok=True)


# --------------------------------------------------------------------------- the run


class Ablation:
    def __init__(self, out: Path, budget: Budget, seeds: int, rows: list[Row], device: str = "cpu",
                 log: Callable[[str], None] = print, only_seed: int | None = None):  # fmt: skip
        self.out = Path(out)
        self.budget = budget
        self.seeds = seeds
        self.only_seed = only_seed  # compute this seed only; results still aggregate every finished seed
        self.rows = rows
        self.device = device
        self.log = log
        self.stats = {"rows_computed": 0, "rows_skipped": 0, "models_trained": 0, "models_reused": 0}
        self._train_walls: list[float] = []
        self._eval_walls: list[float] = []
        self._models: dict[str, tuple[Any, Any]] = {}
        self._dets: dict[tuple, Any] = {}
        self._cfg_cache: dict[str, tuple[str, Any]] = {}
        self._seed: int | None = None

    # ----------------------------------------------------------------- data

    def prepare_data(self) -> None:
        from twopass.pipeline.coco import CocoIndex
        from twopass.pipeline.synth import generate

        b = self.budget
        self.train_dir = self.out / "data" / f"train-{b.train_images}x{b.image_size}-{b.difficulty}-seed0"
        self.val_dir = self.out / "data" / f"val-{b.val_images}x{b.image_size}-{b.difficulty}-seed1"
        for d, n, seed in ((self.train_dir, b.train_images, 0), (self.val_dir, b.val_images, 1)):
            if not (d / "annotations.json").is_file():
                # Generated aside, then renamed into place: processes started side by side
                # (`--only-seed`) never read a half-written set; the loser of the rename drops its copy.
                t0 = time.perf_counter()
                tmp = d.with_name(f"{d.name}.tmp-{os.getpid()}")
                generate(tmp, n, b.image_size, seed=seed, difficulty=b.difficulty)
                try:
                    tmp.rename(d)
                except OSError:
                    if not (d / "annotations.json").is_file():
                        raise
                    shutil.rmtree(tmp)
                self.log(f"data: {n} {b.difficulty} images of {b.image_size} px (seed {seed}) -> {d} in {fmt_s(time.perf_counter() - t0)}")
        self.val_index = CocoIndex.load(self.val_dir / "annotations.json")
        self.val_images = self.val_index.image_set(self.val_dir / "images")
        self.data_key = {"train": self.train_dir.name, "val": self.val_dir.name, "synth": "pipeline.synth.generate"}

    # ----------------------------------------------------------------- models

    def config(self, name: str):
        if name not in self._cfg_cache:
            self._cfg_cache[name] = model_config(name, self.budget)
        return self._cfg_cache[name]

    def model_key(self, name: str, seed: int) -> str:
        from twopass.pipeline.fileio import stable_hash

        kind, cfg = self.config(name)
        b = self.budget
        return stable_hash({"kind": kind, "config": cfg.to_dict(), "iters": b.iters, "batch": b.batch, "seed": seed, "data": self.data_key["train"]})

    def run_dir(self, name: str, seed: int) -> Path:
        return self.out / "models" / f"seed{seed}" / f"{name}-{self.model_key(name, seed)}"

    def model_done(self, name: str, seed: int) -> dict | None:
        from twopass.pipeline.fileio import read_json

        p = self.run_dir(name, seed) / "done.json"
        return read_json(p) if p.is_file() else None

    def ensure_trained(self, name: str, seed: int) -> dict:
        """Train (or finish training) a model; returns its done.json record."""
        from twopass.detector.api import train_model
        from twopass.detector.checkpoint import last_meta
        from twopass.detector.train import TrainOptions
        from twopass.pipeline.fileio import write_json
        from twopass.segmenter.api import KINDS

        done = self.model_done(name, seed)
        if done is not None:
            return done
        kind, cfg = self.config(name)
        b = self.budget
        run = self.run_dir(name, seed)
        meta = last_meta(run)
        t0 = time.perf_counter()
        if meta is None or meta.iteration < b.iters:
            start = 0 if meta is None else meta.iteration
            self.log(f"  train {name} (seed {seed}): {b.iters} iterations, batch {b.batch}"
                     + (f", resuming at {start}" if start else "") + f" -> {run}")
            options = TrainOptions(
                out=run, iters=b.iters, batch=b.batch, device=self.device, resume=True,
                checkpoint_every=b.checkpoint_every, seed=seed, progress=sys.stdout.isatty(),
            )  # fmt: skip
            result = train_model(KINDS[kind], cfg, self.train_dir / "annotations.json", self.train_dir / "images", options)
            if result.iteration < b.iters or result.checkpoint is None:
                raise RuntimeError(f"{run}: training stopped at iteration {result.iteration} of {b.iters}")
            self.stats["models_trained"] += 1
            self._train_walls.append(time.perf_counter() - t0)
        train_s, s_iter = _jsonl_train_stats(run / "metrics.jsonl", b.iters)
        done = {"model": name, "kind": kind, "seed": seed, "iters": b.iters, "batch": b.batch,
                "train_seconds": train_s, "seconds_per_iter": s_iter, "run": str(run)}  # fmt: skip
        write_json(run / "done.json", done, indent=1)
        prune_checkpoints(run)
        self.log(f"  trained {name} (seed {seed}): {train_s:.0f} s training, median {s_iter:.3f} s/iter")
        return done

    def model(self, name: str, seed: int):
        """(model optimised for inference, checkpoint meta), trained if needed, cached per seed."""
        if name not in self._models:
            from twopass.detector.api import load_for_inference
            from twopass.segmenter.api import KINDS

            self.ensure_trained(name, seed)
            kind, _ = self.config(name)
            loaded = load_for_inference(KINDS[kind], self.run_dir(name, seed), self.device)
            self._models[name] = loaded
        return self._models[name]

    # ----------------------------------------------------------------- inference

    def views(self, loaded, which: str):
        from twopass.detector.api import views_of

        scales = {"single": None, "det_tta": self.budget.det_tta_scales, "mask_tta": self.budget.mask_tta_scales}[which]
        return views_of(loaded.meta.path, scales, flip=scales is not None)  # single: the model's own test size

    def detections(self, name: str, seed: int, views: str, raw: bool):
        """Detections of a model on the val set, cached per seed. raw: NMS off (for Soft-NMS)."""
        from twopass.detector.api import detect_images
        from twopass.pipeline.settings import DetectSettings

        key = (name, views, raw)
        if key not in self._dets:
            loaded = self.model(name, seed)
            v = self.views(loaded, "det_tta" if views == "tta" else "single")
            settings = DetectSettings(score_thresh=SCORE_THRESH, max_per_image=RAW_PER_VIEW if raw else MAX_PER_IMAGE)
            # raw: per-class NMS off (IoU 1.0), for the Soft-NMS rows to replace it
            self._dets[key] = detect_images(loaded, self.val_images, v, settings, name=name, device=self.device,
                                            nms_thresh=1.0 if raw else None)[0]  # fmt: skip
        return self._dets[key]

    def evaluate_row(self, row: Row, seed: int):
        """The row's results table (detections or instances) on the val set."""
        from twopass.detector.api import detect_images
        from twopass.ensemble.api import fuse_files
        from twopass.pipeline.settings import DetectSettings, FuseSettings
        from twopass.pipeline.tables import from_coco_results
        from twopass.segmenter.api import segment_images

        a = row.args
        if row.run == "own":
            (name,) = row.models
            loaded = self.model(name, seed)
            kind, _ = self.config(name)
            settings = DetectSettings(score_thresh=SCORE_THRESH, max_per_image=MAX_PER_IMAGE)
            return detect_images(loaded, self.val_images, self.views(loaded, "single"), settings, name=name, device=self.device,
                                 with_masks=kind == "segmenter")[0]  # fmt: skip
        if row.run == "detect":
            raw = a["method"] == "soft-nms"
            tables = [self.detections(d, seed, a["views"], raw) for d in a["detectors"]]
            if a["method"] == "none":
                (t,) = tables
                return t
            # the fusion defaults: Soft-NMS rescored, the best 100 an image
            return fuse_files(tables, FuseSettings(method=a["method"]), image_sizes=self.val_images.table)[0]
        seg = self.model(row.models[0], seed)  # the segmenter comes first
        if row.run == "two_pass":
            tables = [self.detections(d, seed, a["det_views"], False) for d in a["detectors"]]
            boxes = fuse_files(tables, FuseSettings(method="wbf"), image_sizes=self.val_images.table)[0]
            mask_views = self.views(seg, "mask_tta" if a["mask_views"] == "tta" else "single")
        elif row.run == "gt_boxes":
            gt = [{"image_id": x["image_id"], "category_id": x["category_id"], "bbox": x["bbox"], "score": 1.0}
                  for x in self.val_index.raw["annotations"] if not x.get("iscrowd", 0)]  # fmt: skip
            boxes = from_coco_results(gt, source="ground_truth")
            mask_views = None
        elif row.run == "baseline_boxes":
            boxes = self.detections(BASELINE_SEGMENTER, seed, "single", False)
            mask_views = None
        else:
            raise ValueError(f"row {row.name}: unknown recipe {row.run!r}")
        if mask_views is None:
            mask_views = self.views(seg, "single")
        return segment_images(seg, self.val_images, boxes, mask_views, device=self.device)[0]

    # ----------------------------------------------------------------- rows

    def row_key(self, row: Row, seed: int) -> str:
        from twopass.pipeline.fileio import stable_hash

        b = self.budget
        return stable_hash({
            "version": VERSION, "row": row.name, "run": row.run, "args": row.args,
            "models": {m: self.model_key(m, seed) for m in row.models}, "val": self.data_key["val"],
            "score_thresh": SCORE_THRESH, "max_per_image": MAX_PER_IMAGE, "raw_per_view": RAW_PER_VIEW,
            "det_tta": b.det_tta_scales, "mask_tta": b.mask_tta_scales,
        })  # fmt: skip

    def row_path(self, row: Row, seed: int) -> Path:
        return self.out / "rows" / row.name / f"seed{seed}.json"

    def row_result(self, row: Row, seed: int) -> dict | None:
        """The finished result of (row, seed) if it matches the current key."""
        from twopass.pipeline.fileio import read_json

        p = self.row_path(row, seed)
        if not p.is_file():
            return None
        try:
            r = read_json(p)
        except ValueError:
            return None
        return r if r.get("key") == self.row_key(row, seed) else None

    def compute_row(self, row: Row, seed: int) -> dict:
        from twopass.pipeline.evaluate import evaluate
        from twopass.pipeline.fileio import write_json
        from twopass.pipeline.tables import TableMeta, write_table

        self.stats["models_reused"] += sum(self.model_done(m, seed) is not None for m in row.models)
        trained = {m: self.ensure_trained(m, seed) for m in row.models}
        t0 = time.perf_counter()
        table = self.evaluate_row(row, seed)
        has_masks = "mask_counts" in table.column_names
        iou_types = ("bbox", "segm") if has_masks else ("bbox",)
        metrics = evaluate(self.val_index.raw, table, iou_types=iou_types, per_category=False)
        wall = time.perf_counter() - t0
        result = {
            "row": row.name, "seed": seed, "key": self.row_key(row, seed), "budget": self.budget.name,
            "bbox": {k: metrics["bbox"][k] for k in STATS},
            "segm": {k: metrics["segm"][k] for k in STATS} if "segm" in metrics else None,
            "detections": table.num_rows, "eval_seconds": wall,
            "train_seconds": sum(t["train_seconds"] for t in trained.values()),
            "models": {m: {k: t[k] for k in ("train_seconds", "seconds_per_iter", "run")} for m, t in trained.items()},
        }  # fmt: skip
        kind = "instances" if has_masks else "detections"
        meta = TableMeta(kind, f"benchmarks/ablation.py {row.name}", self.val_index.categories, dataset=str(self.val_dir))
        write_table(self.row_path(row, seed).with_suffix(".parquet"), table, meta)  # for pictures and a closer look
        write_json(self.row_path(row, seed), result, indent=1)  # last: marks the row finished
        self._eval_walls.append(wall)
        return result

    def comparison_picture(self, seed: int = 0, rows: tuple[str, str] = ("baseline", "lsh"), name: str = "comparison.png",
                           title: str = "full header", top: int = 10) -> Path | None:  # fmt: skip
        """DIR/<name>: ground truth | baseline | `title` (`rows`) masks on one val image (the one with
        most objects among the first 10), the `top` best-scoring results each."""
        from twopass.pipeline.fileio import atomic_path
        from twopass.pipeline.tables import read_table
        from twopass.pipeline.visualize import best_per_image, render_image

        if not all(r in ROW_BY_NAME and self.row_result(ROW_BY_NAME[r], seed) for r in rows):
            return None
        ids = sorted(self.val_images.image_ids)[:10]
        image_id = max(ids, key=lambda i: len(self.val_index.anns_by_image.get(i, [])))
        panels = [("ground truth", self.val_index.anns_by_image.get(image_id, []))]
        for label, r in zip(("baseline", title), rows):
            table, _ = read_table(self.row_path(ROW_BY_NAME[r], seed).with_suffix(".parquet"), "instances")
            boxes = "ground-truth boxes" if ROW_BY_NAME[r].run == "gt_boxes" else f"own boxes, best {top}"
            panels.append((f"{label} ({boxes})", best_per_image(table, top)))
        picture = render_image(self.val_images, image_id, self.val_index.categories, panels, display_score_thresh=0.0)
        out = self.out / name
        with atomic_path(out) as tmp:
            picture.save(tmp, format="PNG")
        return out

    # ----------------------------------------------------------------- learning curve

    def curve(self, name: str, iters: int, every: int, seed: int = 0) -> list[dict]:
        """Learning curve of model `name` on the budget's data: `iters` iterations at the budget's
        batch and warm-up, then a constant LR (no step down: a point reads low for a schedule of
        that length, which steps down before its end), and its own box and mask AP on the val set every
        `every` iterations (the engine's validation: COCO practice, scores down to 0.001).
        Resumable; DIR/curves/<name>-seed<k>-<iters>/curve.json."""
        from twopass.detector.api import train_model
        from twopass.detector.train import TrainOptions
        from twopass.pipeline.fileio import read_json, write_json
        from twopass.segmenter.api import KINDS

        run = self.out / "curves" / f"{name}-seed{seed}-{iters}"
        if (run / "curve.json").is_file():  # finished: read back, nothing trained or parsed again
            points = read_json(run / "curve.json")["points"]
        else:
            self.prepare_data()
            kind, cfg = self.config(name)
            cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": []})})
            self.log(f"curve of {name} (seed {seed}): {iters} iterations, val every {every} -> {run}")
            options = TrainOptions(out=run, iters=iters, batch=self.budget.batch, device=self.device, resume=True,
                                   checkpoint_every=every, val_every=every, seed=seed, progress=sys.stdout.isatty())  # fmt: skip
            train_model(KINDS[kind], cfg, self.train_dir / "annotations.json", self.train_dir / "images", options,
                        val_ann=self.val_dir / "annotations.json", val_images=self.val_dir / "images")  # fmt: skip
            points, train_s = [], 0.0
            for line in (run / "metrics.jsonl").read_text().splitlines():
                r = json.loads(line)
                if "loss" in r:
                    train_s += float(r.get("time", 0.0)) + float(r.get("data_time", 0.0))
                elif "val" in r:
                    points.append({"iter": r["iter"], "train_seconds": round(train_s, 1),
                                   "mask_ap": r["val"]["segm"]["AP"], "box_ap": r["val"]["bbox"]["AP"]})  # fmt: skip
            write_json(run / "curve.json", {"model": name, "seed": seed, "budget": asdict(self.budget), "points": points}, indent=1)
        for p in points:
            self.log(f"  iter {p['iter']:5d}  {fmt_s(p['train_seconds']):>7}  mask AP {p['mask_ap']:.3f}  box AP {p['box_ap']:.3f}")
        return points

    # ----------------------------------------------------------------- ETA

    def _eta(self, pending: list[tuple[Row, int]]) -> float | None:
        """Seconds left: untrained models x mean training wall time + rows x mean evaluation time.
        Means from this process, else from what DIR holds; None while nothing is measured."""
        need = {(m, s) for r, s in pending for m in r.models if self.model_done(m, s) is None}
        train_walls = self._train_walls or [d["train_seconds"] for d in self._done_records()]
        eval_walls = self._eval_walls or [r["eval_seconds"] for r in self._row_records()]
        if (need and not train_walls) or (pending and not eval_walls):
            return None
        t = statistics.mean(train_walls) * len(need) if need else 0.0
        return t + (statistics.mean(eval_walls) * len(pending) if pending else 0.0)

    def _done_records(self) -> list[dict]:
        from twopass.pipeline.fileio import read_json

        return [read_json(p) for p in (self.out / "models").glob("seed*/*/done.json")]

    def _row_records(self) -> list[dict]:
        from twopass.pipeline.fileio import read_json

        return [read_json(p) for p in (self.out / "rows").glob("*/seed*.json")]

    # ----------------------------------------------------------------- main loop

    def run(self) -> dict:
        self.prepare_data()
        b = self.budget
        self.log(f"ablation: budget {b.name} ({b.train_images} train / {b.val_images} val images of {b.image_size} px, "
                 f"{b.iters} iterations at batch {b.batch}), {self.seeds} seed(s), {len(self.rows)} rows, device {self.device}, "
                 f"base preset {BASE_PRESET} -> {self.out}")  # fmt: skip
        seeds = range(self.seeds) if self.only_seed is None else [self.only_seed]
        tasks = [(r, s) for s in seeds for r in self.rows]
        finished = sum(self.row_result(r, s) is not None for r, s in tasks)
        if finished:
            self.log(f"{finished} of {len(tasks)} row/seed(s) already finished in {self.out}: skipping them")
        t_start = time.perf_counter()
        for k, (row, seed) in enumerate(tasks):
            if self.row_result(row, seed) is not None:
                self.stats["rows_skipped"] += 1
                continue
            if seed != self._seed:  # loaded models and detections belong to one seed
                self._models.clear()
                self._dets.clear()
                self._seed = seed
            result = self.compute_row(row, seed)
            self.stats["rows_computed"] += 1
            self.write_results()
            pending = [(r, s) for r, s in tasks[k + 1 :] if self.row_result(r, s) is None]
            segm = f"{result['segm']['AP'] * 100:.1f}" if result["segm"] else "—"
            self.log(
                f"[{k + 1}/{len(tasks)}] seed {seed} {row.name}: mask AP {segm} box AP {result['bbox']['AP'] * 100:.1f} "
                f"(eval {fmt_s(result['eval_seconds'])}) elapsed {fmt_s(time.perf_counter() - t_start)} ETA {fmt_s(self._eta(pending))}"
            )
        self._models.clear()
        self._dets.clear()
        summary = self.write_results()
        summary["stats"] = dict(self.stats)
        wide = "full header, Light-Head-width LSD"
        pictures = {
            "comparison.png": (("baseline", "lsh"), "full header"),
            "comparison_gt_boxes.png": (("gt_baseline", "gt_lsh"), "full header"),
            "comparison_m64a10.png": (("baseline", "lsh_m64a10"), wide),
            "comparison_m64a10_gt_boxes.png": (("gt_baseline", "gt_lsh_m64a10"), wide),
        }
        for name, (rows, title) in pictures.items():
            picture = self.comparison_picture(self.only_seed or 0, rows, name, title)
            if picture is not None:
                self.log(f"picture: {picture}")
        st = self.stats
        self.log(f"rows computed {st['rows_computed']}, skipped (already finished) {st['rows_skipped']}; "
                 f"models trained {st['models_trained']}; total {fmt_s(time.perf_counter() - t_start)}")
        return summary

    # ----------------------------------------------------------------- results

    def aggregate(self) -> list[dict]:
        """One entry per row with at least one finished seed (current keys): means, spreads, deltas."""
        out = []
        results = {r.name: {s: self.row_result(r, s) for s in range(self.seeds)} for r in ROWS}
        for row in ROWS:
            per_seed = {s: v for s, v in results[row.name].items() if v is not None}
            if not per_seed:
                continue
            entry: dict[str, Any] = {
                "row": row.name, "group": row.group, "label": row.label, "ref": row.ref, "slides": row.slides,
                "models": list(row.models), "seeds": sorted(per_seed),
            }  # fmt: skip
            for t in ("segm", "bbox"):
                vals = [v[t]["AP"] * 100 for v in per_seed.values() if v.get(t)]
                entry[t] = _spread(vals)
                entry[t]["per_seed"] = {s: v[t]["AP"] * 100 for s, v in per_seed.items() if v.get(t)}
                if row.ref is not None:
                    ref = results[row.ref]
                    deltas = [v[t]["AP"] * 100 - ref[s][t]["AP"] * 100 for s, v in per_seed.items()
                              if v.get(t) and ref.get(s) and ref[s].get(t)]  # fmt: skip
                    entry[f"delta_{t}"] = _spread(deltas)
            entry["train_seconds"] = statistics.mean(v["train_seconds"] for v in per_seed.values())
            entry["eval_seconds"] = statistics.mean(v["eval_seconds"] for v in per_seed.values())
            out.append(entry)
        return out

    def write_results(self) -> dict:
        from twopass.pipeline.fileio import atomic_path, write_json

        rows = self.aggregate()
        by = {r["row"]: r for r in rows}

        def delta(name: str, t: str) -> float:
            d = by.get(name, {}).get(f"delta_{t}")
            return d["mean"] if d and d["n"] else float("nan")

        def diff(a: str, b_: str, t: str) -> float:  # mean paired difference of two rows
            ra, rb = by.get(a), by.get(b_)
            if not ra or not rb:
                return float("nan")
            common = set(ra[t]["per_seed"]) & set(rb[t]["per_seed"])
            vals = [ra[t]["per_seed"][s] - rb[t]["per_seed"][s] for s in common]
            return statistics.mean(vals) if vals else float("nan")

        baseline = by.get("baseline", {}).get("segm")
        headline = {
            "baseline_mask_ap": baseline["mean"] / 100 if baseline and baseline["n"] else float("nan"),
            "full_header_mask_ap_gain": delta("lsh", "segm"),
            "full_header_box_ap_gain": delta("lsh", "bbox"),
            "full_header_gt_boxes_mask_ap_gain": delta("gt_lsh", "segm"),
            "full_header_baseline_boxes_mask_ap_gain": delta("bb_lsh", "segm"),
            "full_header_m64a10_mask_ap_gain": delta("lsh_m64a10", "segm"),
            "full_header_m64a10_box_ap_gain": delta("lsh_m64a10", "bbox"),
            "two_pass_mask_ap_gain": diff("tp_mask_tta", "tp_alone", "segm"),
            "improve_on_dets_mask_ap_gain": delta("tp_fused3", "segm"),
            "det_ensemble_box_ap_gain": diff("det_ens_wbf", "det_single", "bbox"),
            "wbf_vs_softnms_box_ap_gain": diff("det_ens_wbf", "det_ens_softnms", "bbox"),
            "wbf_vs_nms_box_ap_gain": diff("det_ens_wbf", "det_ens_nms", "bbox"),
        }
        b = self.budget
        summary = {
            "budget": asdict(b), "seeds": self.seeds, "device": self.device, "base_preset": BASE_PRESET,
            "shufflenet_preset": SHUFFLE_PRESET, "two_pass_segmenter": TWO_PASS_SEGMENTER,
            "score_thresh": SCORE_THRESH, "max_per_image": MAX_PER_IMAGE, "raw_per_view": RAW_PER_VIEW,
            "data": {"train": str(self.train_dir), "val": str(self.val_dir)},
            "headline": headline, "rows": rows,
        }  # fmt: skip
        write_json(self.out / "results.json", summary, indent=1)
        with atomic_path(self.out / "results.md") as tmp:
            tmp.write_text(render_markdown(summary))
        return summary


def headline_line(h: dict[str, float]) -> str:
    """`name=value` pairs: gains in AP points, `baseline_mask_ap` as COCO gives it (0-1)."""
    return " ".join(f"{k}={v:.3f}" if k == "baseline_mask_ap" else f"{k}={v:.2f}" for k, v in h.items())


def _spread(vals: list[float]) -> dict:
    if not vals:
        return {"n": 0, "mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan")}
    return {
        "n": len(vals), "mean": statistics.mean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "min": min(vals), "max": max(vals),
    }  # fmt: skip


def _cell(s: dict | None, signed: bool = False) -> str:
    if not s or not s["n"]:
        return "—"
    f = "{:+.1f}" if signed else "{:.1f}"
    txt = f.format(s["mean"])
    if s["n"] > 1:
        txt += f" ± {s['std']:.1f} [{f.format(s['min'])}, {f.format(s['max'])}]"
    return txt


GROUP_TITLES = {
    "header": "Location Sensitive Header and backbone (segmenters trained end to end, own boxes)",
    "header_gt": "The same segmenters' masks on ground-truth boxes (mask heads without the boxes' errors)",
    "header_bb": "The same segmenters' masks on the baseline's own boxes (mask heads on the same realistic boxes)",
    "two_pass": "Two-pass pipeline (masks of the full-header segmenter)",
    "detection": "Detection only (box AP)",
}


def render_markdown(summary: dict) -> str:
    b = summary["budget"]
    lines = [
        "# Ablation results",
        "",
        f"Budget `{b['name']}`: {b['train_images']} train / {b['val_images']} val synthetic images of {b['image_size']} px "
        f"(`pipeline.synth`, seeds 0 / 1), {b['iters']} iterations at batch {b['batch']} for every model, "
        f"{summary['seeds']} seed(s), device {summary['device']}. Base preset `{summary['base_preset']}` "
        f"(ShuffleNetV2 rows: backbone of `{summary['shufflenet_preset']}`). AP in points (0-100); "
        "cells are mean ± std [min, max] over seeds; Δ is paired per seed against the row named in `vs`.",
        "",
    ]
    for group, title in GROUP_TITLES.items():
        rows = [r for r in summary["rows"] if r["group"] == group]
        if not rows:
            continue
        lines += [f"## {title}", "", "| row | vs | mask AP | Δ mask | box AP | Δ box | slides (mask / box) | train s | eval s | seeds |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for r in rows:
            lines.append(
                f"| {r['label']} (`{r['row']}`) | {r['ref'] or '—'} | {_cell(r['segm'])} | {_cell(r.get('delta_segm'), True)} | "
                f"{_cell(r['bbox'])} | {_cell(r.get('delta_bbox'), True)} | {r['slides'] or '—'} | {r['train_seconds']:.0f} | "
                f"{r['eval_seconds']:.0f} | {len(r['seeds'])} |"
            )
        lines.append("")
    lines += [
        "`train s`: training seconds of every model the row uses (shared models counted in each row that uses them), "
        "mean over seeds. `eval s`: inference + fusion + COCO evaluation of the row (detections shared within a "
        "seed are computed by the first row that needs them).",
        "",
        "Headline: " + headline_line(summary["headline"]),
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", choices=list(BUDGETS), default="smoke")
    ap.add_argument("--seeds", type=int, default=None, help="training seeds 0..N-1 (default: the budget's)")
    ap.add_argument("--out", type=Path, default=None, help="run folder (default runs/ablation-<budget>)")
    ap.add_argument("--rows", default=None, help="comma-separated glob patterns of row names (default: all)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: the budget's)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--difficulty", choices=("easy", "standard", "hard"), default=None,
                    help="synthetic data level (default: the budget's, standard)")
    ap.add_argument("--only-seed", type=int, default=None,
                    help="compute only this seed (0..N-1): run one process a seed side by side, e.g. two with "
                         "--threads 1 on 2 cores, about 1.3x the throughput of one with --threads 2 (measured)")
    ap.add_argument("--list", action="store_true", help="list the rows and models, then exit")
    ap.add_argument("--curve", type=int, default=None, metavar="ITERS",
                    help="instead of the rows: the baseline segmenter's learning curve over ITERS iterations (constant LR "
                         "after warm-up), val box and mask AP every --curve-every; to choose a budget's iterations")
    ap.add_argument("--curve-every", type=int, default=250)
    args = ap.parse_args(argv)

    budget = BUDGETS[args.budget]
    if args.difficulty is not None:
        budget = replace(budget, difficulty=args.difficulty)
    if args.list:
        for r in ROWS:
            print(f"{r.name:<18} {r.group:<10} vs {r.ref or '-':<14} models {', '.join(r.models)}")
        return
    import torch

    torch.set_num_threads(args.threads)
    seeds = budget.seeds if args.seeds is None else args.seeds
    if seeds < 1:
        raise SystemExit("--seeds must be at least 1")
    out = args.out or Path("runs") / f"ablation-{budget.name}"
    device = args.device or budget.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: no CUDA device here (budget {budget.name} defaults to cuda; pass --device cpu)")
    if args.only_seed is not None and not 0 <= args.only_seed < seeds:
        raise SystemExit(f"--only-seed {args.only_seed}: not among the seeds 0..{seeds - 1}")
    abl = Ablation(out, budget, seeds, select_rows(args.rows), device=device, only_seed=args.only_seed)
    if args.curve is not None:
        points = abl.curve(BASELINE_SEGMENTER, args.curve, args.curve_every, seed=args.only_seed or 0)
        best = max(points, key=lambda p: p["mask_ap"])
        first = next((p for p in points if p["mask_ap"] >= 0.30), None)
        print(f"curve_iters={args.curve} final_mask_ap={points[-1]['mask_ap']:.3f} best_mask_ap={best['mask_ap']:.3f} "
              f"first_iter_at_0.30={first['iter'] if first else 'none'}")
        return
    summary = abl.run()
    print(f"results: {out / 'results.md'}, {out / 'results.json'}")
    h = summary["headline"]
    print(headline_line(h) + f" rows={len(summary['rows'])} seeds={seeds}")


if __name__ == "__main__":
    main()
