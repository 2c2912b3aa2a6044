"""The run report: `RUN/report.md` with overlay pictures in `RUN/pictures/`, and the same
content as markdown for a Prefect artifact (pictures inlined as small thumbnails)."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

from .coco import CocoIndex
from .config import PipelineConfig
from .fileio import atomic_path, read_json
from .runfolder import ap_table, open_images

EXPLAIN = """\
**How to read this.** Pass one runs each detector on every image, once per test-time view
(scale, mirror); the views and the detectors are then fused into one set of boxes. Pass two
runs the segmenter's mask head on those fused boxes. AP is COCO's average precision
(0 to 1, higher is better) averaged over IoU thresholds 0.50 to 0.95; AP50 and AP75 use one
threshold each. "box" rows score the boxes; "mask" scores the masks of the final instances."""

PR_EXPLAIN = """\
Precision at each recall from 0 to 1 (COCO's 101 points), averaged over the categories, for
the boxes and the masks of the final instances: at IoU 0.50, at 0.75, and averaged over the ten
thresholds 0.50 to 0.95. The area under each curve (its mean) is AP50, AP75 and AP. A curve
that falls early: confident results that are wrong; one that stops short of recall 1: objects
never found."""


# RUN/pr_curves.png: the precision-recall curves of the final instances (beside report.md, not in
# pictures/, which holds one overlay per image).
PR_CURVES = "pr_curves.png"


def render_pictures(run_dir: str | Path, config: PipelineConfig, fused: str | None, instances: str | None) -> list[Path]:
    """Ground truth | fused boxes | final masks, for the first `evaluation.overlays` images
    (RUN/pictures/<image id>.png; returned). Also the precision-recall curves of the final
    instances (`render_pr_curves`), which `build_report` links when RUN/pr_curves.png is there."""
    render_pr_curves(run_dir, config, instances)
    return _render_overlays(run_dir, config, fused, instances)


def render_pr_curves(run_dir: str | Path, config: PipelineConfig, instances: str | None) -> Path | None:
    """RUN/pr_curves.png: precision over recall of the final instances (boxes, masks) at IoU
    0.50, 0.75 and averaged over 0.50:0.95 (`curves.pr_curves`). Without annotations, with
    evaluation off or without instances: None, and an earlier run's file is removed (the
    report would show curves of other results)."""
    path = Path(run_dir) / PR_CURVES
    if not instances or config.data.ann is None or not config.evaluation.enabled:
        path.unlink(missing_ok=True)
        return None
    from .curves import plot_pr, pr_curves

    curves = pr_curves(config.data.ann, instances)
    return plot_pr(curves, path, f"{config.name}: final instances, {Path(instances).name}")


def _render_overlays(run_dir: str | Path, config: PipelineConfig, fused: str | None, instances: str | None) -> list[Path]:
    from .tables import read_results
    from .visualize import best_per_image, render_image

    n = config.evaluation.overlays
    if n <= 0:
        return []
    image_set = open_images(config.data)
    gt = CocoIndex.cached(config.data.ann) if config.data.ann else None
    panels: list[tuple[str, Any]] = []
    categories = gt.categories if gt else None
    top = config.evaluation.overlay_top
    for title, path in (("fused boxes", fused), ("final masks", instances)):
        if path:
            table, meta = read_results(path)
            categories = categories or meta.categories
            panels.append((f"{title} (best {top})", best_per_image(table, top)))
    if categories is None or (not panels and gt is None):
        return []
    out_dir = Path(run_dir) / "pictures"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for image_id in sorted(image_set.image_ids)[:n]:
        gt_panel = [("ground truth", gt.anns_by_image.get(image_id, []))] if gt else []
        picture = render_image(image_set, image_id, categories, gt_panel + panels, config.evaluation.display_score_thresh)
        path = out_dir / f"{image_id}.png"
        with atomic_path(path) as tmp:
            picture.save(tmp, format="PNG")
        written.append(path)
    return written


def _thumbnail(path: Path, width: int = 720) -> str:
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        ImageOps.exif_transpose(im, in_place=True)  # every image read is upright (pipeline.coco.load_image)
        im = im.convert("RGB")
        if im.width > width:
            im = im.resize((width, round(im.height * width / im.width)))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _views(tta) -> str:
    """A model's test-time views in words: `scales [128, 160] + mirror`."""
    return f"scales {tta.scales or 'model test size'}" + (" + mirror" if tta.flip else "")


def build_report(
    run_dir: str | Path,
    config: PipelineConfig,
    metrics_path: str | None,
    outputs: dict[str, str],
    pictures: list[Path],
    ran: dict[str, int] | None = None,
    inline_pictures: bool = False,
) -> str:
    run_dir = Path(run_dir)
    lines = [f"# twopass report: {config.name}", "", EXPLAIN, ""]
    lines += ["## Setup", ""]
    lines.append(f"- images: `{config.data.images}`" + (f" ({config.data.ann})" if config.data.ann else ""))
    for d in config.detectors:
        lines.append(f"- detector **{d.name}**: {_views(d.tta)}, fusion weight {d.weight}")
    f = config.fusion.resolved()
    lines.append(f"- fusion: **{f['method']}**, IoU threshold {f['iou_thr']}, at most {f['max_per_image']} boxes an image")
    s = config.segmenter
    lines.append(f"- segmenter **{s.name}**: mask views {_views(s.tta)}")
    if s.own_boxes is not None:
        lines.append(f"- the segmenter's own boxes join the fusion: {_views(s.own_boxes.tta)}, fusion weight {s.own_boxes.weight}")
    lines.append("")
    if metrics_path:
        metrics = read_json(metrics_path)
        rows = ap_table(metrics)
        lines += [f"## AP per stage ({metrics['images']} images)", ""]
        lines.append(markdown_table(rows, ["stage", "what", "box AP", "box AP50", "box AP75", "mask AP", "mask AP50", "mask AP75"]))
        lines.append("")
        final = next((r for r in metrics["stages"] if r["stage"] == "final masks"), None)
        if final and final.get("per_category", {}).get("segm"):
            per = final["per_category"]
            cats = list(per["segm"])
            lines += ["## AP per category (final instances)", ""]
            table = [{"category": c, "box AP": per.get("bbox", {}).get(c), "mask AP": per["segm"][c]} for c in cats]
            lines += [markdown_table(table, ["category", "box AP", "mask AP"]), ""]
    else:
        why = "the data has no annotations (`data.ann`)" if config.data.ann is None else "`evaluation.enabled` is false"
        lines += ["## AP per stage", "", f"Not evaluated: {why}.", ""]
    if (run_dir / PR_CURVES).is_file():  # render_pictures wrote it for these results, or removed it
        src = _thumbnail(run_dir / PR_CURVES, width=1240) if inline_pictures else PR_CURVES
        lines += ["## Precision-recall curves (final instances)", "", PR_EXPLAIN, "", f"![precision-recall curves]({src})", ""]
    if pictures:
        e = config.evaluation
        lines += ["## Pictures", "", f"Ground truth, then the fused boxes and the final masks: the {e.overlay_top} best of each image "
                  f"scoring at least {e.display_score_thresh}.", ""]  # fmt: skip
        for p in pictures:
            src = _thumbnail(p) if inline_pictures else p.relative_to(run_dir).as_posix()
            lines += [f"![image {p.stem}]({src})", ""]
    lines += ["## Files", ""]
    for label, path in outputs.items():
        shown = Path(path)
        shown = shown.relative_to(run_dir) if shown.is_relative_to(run_dir) else shown
        lines.append(f"- {label}: `{shown}`")
    lines.append("- ledger of every stage execution that computed: `ledger.jsonl`")
    if ran is not None:
        lines += ["", "## This run", ""]
        lines.append("Stage executions that computed (the others were reused from earlier runs): "
                     + (", ".join(f"{k} {v}" for k, v in ran.items()) if ran else "none"))  # fmt: skip
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | Path, markdown: str) -> Path:
    path = Path(run_dir) / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text(markdown)
    return path
