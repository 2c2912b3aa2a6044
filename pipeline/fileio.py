"""Atomic file writes (a reader never sees a half-written file, and a crash leaves the old one),
and the guards every command runs on its outputs before any compute."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

# The process umask, read once at import (reading it means setting it, which is not thread-safe).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class OutputError(ValueError):
    """An output would destroy an input or cannot be written; the message names both paths."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the same folder as `path`; rename it onto `path` on success.

    The temp file lives in the destination folder so the final `os.replace` is a rename on one
    file system (atomic on POSIX). On any exception the temp file is removed and `path` is
    left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the writer's pid in the name: `sweep_temp_files` removes what a killed writer left
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600 files; give the mode a plain open() would (0666 less the umask), so
        # datasets and checkpoints stay readable to the other users of a shared machine.
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def sweep_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Remove the temp files that writers which no longer run (killed mid-write) left under
    `folder`; returns them. A live writer's temp file is never touched."""
    removed = []
    for p in Path(folder).rglob(".*.tmp"):
        parts = p.name.rsplit(".", 3)  # ".<name>", "<pid>", "<random>", "tmp"
        if len(parts) != 4 or not parts[1].isdigit() or _alive(int(parts[1])):
            continue
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def check_outputs(outputs: Mapping[str, str | os.PathLike | None], inputs: Mapping[str, str | os.PathLike | None]) -> None:
    """Refuse, before any compute, an output file that is one of the inputs, an output file that
    is an existing folder, and an output whose folder cannot be written. Keys name the options
    (`--out`); None values are skipped."""
    given = {k: Path(v) for k, v in inputs.items() if v is not None}
    outs = {k: Path(v) for k, v in outputs.items() if v is not None}
    for (a, pa_), (b, pb) in ((x, y) for i, x in enumerate(outs.items()) for y in list(outs.items())[i + 1 :]):
        if pa_.resolve() == pb.resolve():
            raise OutputError(f"{a} and {b} are the same file {pa_}")
    for name, value in outputs.items():
        if value is None:
            continue
        out = Path(value)
        for in_name, src in given.items():
            if _same_file(out, src) or out.resolve() == src.resolve():
                raise OutputError(f"{name} {out} is the input {in_name} {src}: refusing to overwrite an input")
        if out.is_dir():
            raise OutputError(f"{name} {out}: is a folder; give a file path")
        folder = out.resolve().parent
        while not folder.exists():
            folder = folder.parent
        if not os.access(folder, os.W_OK | os.X_OK):
            raise OutputError(f"{name} {out}: folder {folder} is not writable")


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = None) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent))


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def stable_hash(obj: Any) -> str:
    """Short content hash of a JSON-serialisable object (key order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_hash(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]
