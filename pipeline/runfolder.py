"""The run folder: content keys, the ledger, shards, merging and publishing. No models here.

Every stage that runs inside a run folder (`detector.stage`, `ensemble.stage`,
`segmenter.stage`) names its output by a key: a hash of the content of its input files, the
stage's settings and the shard's image ids, so

- a finished shard is found by its file alone, even if the process that wrote it was killed
  before anything else was recorded (the stage returns at once, computing nothing);
- a cached result (Prefect's, keyed on the same key) can never point at another run's file.

Input tables are identified by their rows (`data_hash`), not their file metadata, so a stage's
key does not depend on where its inputs were written.

Every execution that actually computes appends one line to `RUN/ledger.jsonl` (stage, name,
key, output, seconds), so what ran can be counted.

Run folder layout:

    RUN/ledger.jsonl                       one line per stage execution that computed
    RUN/models/<name>-<key>/               training runs (checkpoints/, metrics.jsonl, done.json)
    RUN/detections/<detector>/<key>.parquet    one per shard (all views of that detector)
    RUN/fused/<key>.parquet                one per shard
    RUN/instances/<segmenter>/<key>.parquet    one per shard
    RUN/<stage>/...-all-<key>.parquet      shards merged
    RUN/evaluation/metrics-<key>.json      AP per stage
    RUN/outputs/                           the latest merged files under plain names
    RUN/report.md, RUN/pictures/*.png      the report
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .config import DataConfig, safe_name
from .fileio import atomic_path, file_hash, stable_hash, write_json

# Bump when a stage's output for the same inputs changes meaning: old files are then not reused.
STAGE_VERSION = 1

Log = Callable[[str], None] | None


@dataclass(frozen=True)
class Planned:
    """A stage execution decided before it runs: its key and the file it writes."""

    key: str
    out: Path

    def done(self, log: Log = None) -> bool:
        """Whether the output exists and reads (for Parquet: its footer). A damaged one (a disk
        that filled, a copy cut short) is removed with a warning, so the stage computes it again
        instead of failing every rerun."""
        if not self.out.is_file():
            return False
        if self.out.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                pq.read_metadata(self.out)
            except (pa.ArrowInvalid, OSError) as e:
                say(log, f"warning: {self.out} is unreadable ({e}); computing it again")
                self.out.unlink(missing_ok=True)
                return False
        return True


# --------------------------------------------------------------------------- hashing


_HASHES: dict[tuple, str] = {}


_HASH_LOCK = threading.Lock()


def content_hash(path: str | Path) -> str:
    """Content hash of a file, remembered per (path, size, mtime) within the process."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    with _HASH_LOCK:
        hit = _HASHES.get(key)
    if hit is None:
        hit = file_hash(p)
        with _HASH_LOCK:
            _HASHES[key] = hit
    return hit


def data_hash(path: str | Path) -> str:
    """Identity of a table file: the hash of its rows for Parquet (its metadata, which records
    paths of the run that wrote it, left out), of its bytes otherwise (COCO results JSON).
    Remembered per (path, size, mtime) within the process."""
    p = Path(path)
    if p.suffix.lower() != ".parquet":
        return content_hash(p)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns, "rows")
    with _HASH_LOCK:
        hit = _HASHES.get(key)  # type: ignore[call-overload]
    if hit is None:
        import hashlib

        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(p).replace_schema_metadata(None)
        except (pa.ArrowInvalid, OSError) as e:
            raise ValueError(f"{p}: not a readable Parquet file ({e})") from None
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table.combine_chunks())
        hit = hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()[:16]
        with _HASH_LOCK:
            _HASHES[key] = hit  # type: ignore[index]
    return hit


def checkpoint_hash(checkpoint_json: Path) -> str:
    """A checkpoint's identity: its JSON and its weights file, by content."""
    weights = checkpoint_json.with_suffix(".safetensors")
    return stable_hash([content_hash(checkpoint_json), content_hash(weights) if weights.is_file() else None])


def key_of(stage: str, /, **parts: Any) -> str:
    return stable_hash({"stage": stage, "version": STAGE_VERSION, **parts})



# --------------------------------------------------------------------------- ledger


_LEDGER_LOCK = threading.Lock()


def ledger_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "ledger.jsonl"


def record(run_dir: str | Path, **entry: Any) -> None:
    """Append one line to the ledger (one write call in append mode: lines from threads and
    processes do not interleave)."""
    path = ledger_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"time": round(time.time(), 3), "pid": os.getpid(), **entry}, default=str) + "\n"
    with _LEDGER_LOCK:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def read_ledger(run_dir: str | Path) -> list[dict]:
    path = ledger_path(run_dir)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut by a kill
    return out


def stage_counts(entries: Iterable[dict]) -> dict[str, int]:
    """How many executions of each stage computed (from ledger lines)."""
    counts: dict[str, int] = {}
    for e in entries:
        counts[e["stage"]] = counts.get(e["stage"], 0) + 1
    return counts



# --------------------------------------------------------------------------- shards


def open_images(data: DataConfig):
    """The image set of a pipeline config's `data` section."""
    from .coco import ImageSet

    return ImageSet.open(data.images, ann=data.ann, images_table=data.images_table)


def dataset_label(data: DataConfig) -> str:
    """What a table's metadata records as its dataset."""
    return str(data.ann or data.images_table or data.images)


def shards(data: DataConfig) -> list[list[int]]:
    """The image ids, sorted, in shards of `data.shard_size`."""
    ids = sorted(open_images(data).image_ids)
    n = data.shard_size
    return [ids[i : i + n] for i in range(0, len(ids), n)]


def images_digest(image_set, ids: Sequence[int]) -> str:
    """Hash of the shard's images: id, declared size and file content (a missing file hashes as
    missing, so it fails in the stage, which names it)."""
    items = []
    for i in ids:
        path = image_set.path(i)
        items.append([int(i), list(image_set.size(i)), content_hash(path) if path.is_file() else "missing"])
    return stable_hash(items)


def shard_label(ids: Sequence[int]) -> str:
    return f"images {ids[0]}..{ids[-1]} ({len(ids)})" if ids else "no images"



# --------------------------------------------------------------------------- merging and outputs


def merge_plan(run_dir, stage: str, label: str, parts: Sequence[str | Path]) -> Planned:
    # Parts are named by their content keys, so their names identify them.
    key = key_of("merge", of=stage, label=label, parts=[Path(p).name for p in parts])
    return Planned(key, Path(run_dir) / stage / f"{safe_name(label)}-all-{key}.parquet")


def merge(run_dir, stage: str, label: str, parts: Sequence[str | Path], plan: Planned | None = None, log: Log = None) -> str:
    """Concatenate the shards of one stage into one file (`RUN/<stage>/<label>-all-<key>.parquet`)."""
    import pyarrow as pa

    from .tables import TableMeta, read_meta, read_table, write_table

    if not parts:
        raise ValueError(f"merge {stage} {label}: no shards to merge")
    plan = plan or merge_plan(run_dir, stage, label, parts)
    if plan.done(log):
        return str(plan.out)
    first = read_meta(parts[0])
    tables = [read_table(p, first.kind, first.categories)[0] for p in parts]
    table = pa.concat_tables(tables)
    meta = TableMeta(
        kind=first.kind,
        producer=first.producer,
        categories=first.categories,
        config=first.config,
        dataset=first.dataset,
        extra={"shards": [str(p) for p in parts], "key": plan.key},
    )
    write_table(plan.out, table, meta)
    record(run_dir, stage="merge", name=f"{stage}/{label}", key=plan.key, output=str(plan.out), rows=table.num_rows, seconds=0)
    say(log, f"merged {len(parts)} shards of {stage} {label}: {plan.out}")
    return str(plan.out)


def publish(run_dir, path: str | Path, name: str) -> Path:
    """Give an output file a plain name under RUN/outputs (a hard link, else a copy), atomically."""
    import shutil

    dest = Path(run_dir) / "outputs" / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        tmp.unlink()
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)
    return dest


def write_coco_json(run_dir, path: str | Path, name: str) -> Path:
    from .tables import read_results, to_coco_results

    table, _ = read_results(path)
    dest = Path(run_dir) / "outputs" / name
    write_json(dest, to_coco_results(table))
    return dest



# --------------------------------------------------------------------------- AP tables


def ap_table(metrics: dict) -> list[dict]:
    """Rows of the AP-per-stage table (what the artifact and the report show)."""
    out = []
    for r in metrics["stages"]:
        b, s = r.get("bbox", {}), r.get("segm", {})
        fmt = lambda d, k: round(d[k], 3) if k in d and d[k] >= 0 else None  # noqa: E731
        out.append({
            "stage": r["stage"], "what": r["what"],
            "box AP": fmt(b, "AP"), "box AP50": fmt(b, "AP50"), "box AP75": fmt(b, "AP75"),
            "mask AP": fmt(s, "AP"), "mask AP50": fmt(s, "AP50"), "mask AP75": fmt(s, "AP75"),
        })  # fmt: skip
    return out


def format_ap_table(rows: list[dict]) -> str:
    cols = ("box AP", "box AP50", "box AP75", "mask AP", "mask AP50")
    width = max([len("stage")] + [len(r["stage"]) for r in rows])
    lines = [f"{'stage':<{width}}" + "".join(f"{c:>10}" for c in cols)]
    for r in rows:
        lines.append(f"{r['stage']:<{width}}" + "".join(f"{r[c]:10.3f}" if r[c] is not None else f"{'-':>10}" for c in cols))
    return "\n".join(lines)



def computed(run_dir, plan: Planned, t0: float, log: Log, message: str, *, stage: str, name: str, **fields: Any) -> str:
    """The end of a stage execution that computed: its ledger line, its log line (`message` and
    the seconds since `t0`), its output's path."""
    seconds = time.perf_counter() - t0
    record(run_dir, stage=stage, name=name, key=plan.key, output=str(plan.out), **fields, seconds=round(seconds, 3))
    say(log, f"{message} in {seconds:.2f} s")
    return str(plan.out)


def say(log: Log, message: str) -> None:
    if log is not None:
        log(message)
