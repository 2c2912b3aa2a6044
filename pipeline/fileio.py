"""Atomic file writes (a reader never sees a half-written file, and a crash leaves the old one),
and the guards every command runs on its outputs before any compute."""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

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
    left as it was. On success the temp files of `path` that killed writers left are removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the writer's pid in the name: `sweep_temp_files` removes what a killed writer left
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
        except OSError as e:
            if is_disk_full(e) and e.filename in (None, str(tmp_path)):  # name the file, not its temp
                raise disk_full(path, tmp_path.stat().st_size if tmp_path.exists() else 0) from None
            raise
        # mkstemp makes 0600 files; give the mode a plain open() would (0666 less the umask), so
        # datasets and checkpoints stay readable to the other users of a shared machine.
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, path)
        with contextlib.suppress(OSError):  # the file is written; a copy a killed writer left would stay forever
            sweep_temp_files(path.parent, path.name)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def is_disk_full(e: BaseException) -> bool:
    """A full disk or quota, from the OS or from a library that words it (pyarrow, safetensors)."""
    return getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(e)


def disk_full(path: Path, need: int, at_least: bool = True) -> OSError:
    """One line for a write of `path` that filled the disk: what it needs (`need` bytes; with
    `at_least`, those written when it failed) and what is free there."""
    parts = [f"needs {'more than ' if at_least else ''}{need / 1e6:.1f} MB"] if need else []
    with contextlib.suppress(OSError):
        parts.append(f"{shutil.disk_usage(path.parent).free / 1e6:.1f} MB free there")
    return OSError(errno.ENOSPC, "No space left on device" + (f" ({', '.join(parts)})" if parts else ""), str(path))


def check_free_space(folder: str | os.PathLike, need: int, what: str) -> None:
    """Refuse, before any work, to start `what` in `folder` (or its nearest existing parent) with
    fewer than `need` bytes free there: one line instead of the tracebacks of whatever first fails
    to write (for a flow, Prefect's SQLite database and its embedded server)."""
    folder = Path(folder).resolve()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < need:
        raise OSError(errno.ENOSPC, f"No space left on device ({what} needs at least {need / 1e6:.0f} MB free, "
                                    f"{free / 1e6:.1f} MB free there)", str(folder))  # fmt: skip


def sweep_temp_files(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove the temp files that writers which no longer run (killed mid-write) left under
    `folder` (`name`: those of the file `folder/name` only); returns them. A live writer's temp
    file is never touched."""
    removed = []
    found = Path(folder).rglob(".*.tmp") if name is None else Path(folder).glob(f".{glob.escape(name)}.*.tmp")
    for p in found:
        parts = p.name.rsplit(".", 3)  # ".<name>", "<pid>", "<random>", "tmp"
        if len(parts) != 4 or not parts[1].isdigit() or (name is not None and parts[0] != f".{name}") or _alive(int(parts[1])):
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


# an input of `check_outputs`: a path, several paths, or None
Inputs = str | os.PathLike | Sequence[str | os.PathLike] | None


def check_outputs(outputs: Mapping[str, str | os.PathLike | None], inputs: Mapping[str, Inputs]) -> None:
    """Refuse, before any compute, an output file that is one of the inputs or lies inside an
    input folder (an image folder, the checkpoints/ of a run in use), an output file that is an
    existing folder, and an output whose folder cannot be written. Keys name the options
    (`--out`); an input is a path, a list of paths (a checkpoint and its run's files:
    `detector.checkpoint.files_in_use`) or None (skipped)."""
    given = _inputs(inputs)
    outs = {k: Path(v) for k, v in outputs.items() if v is not None}
    for (a, pa_), (b, pb) in ((x, y) for i, x in enumerate(outs.items()) for y in list(outs.items())[i + 1 :]):
        if pa_.resolve() == pb.resolve():
            raise OutputError(f"{a} and {b} are the same file {pa_}")
    for name, out in outs.items():
        _refuse_inputs(name, out, given)
        if out.is_dir():
            raise OutputError(f"{name} {out}: is a folder; give a file path")
        folder = out.resolve().parent
        while not folder.exists():
            folder = folder.parent
        if not os.access(folder, os.W_OK | os.X_OK):
            raise OutputError(f"{name} {out}: folder {folder} is not writable")


def check_output_folder(name: str, folder: str | os.PathLike, inputs: Mapping[str, Inputs]) -> None:
    """`check_outputs` for an output folder (files are written into it): refused when it is an
    input file, an input folder or lies inside one, or is an existing file."""
    folder = Path(folder)
    _refuse_inputs(name, folder, _inputs(inputs))
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{name} {folder}: is a file; give a folder")


def _inputs(inputs: Mapping[str, Inputs]) -> list[tuple[str, Path]]:
    given = []
    for name, value in inputs.items():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None:
                given.append((name, Path(v)))
    return given


def _refuse_inputs(name: str, out: Path, given: list[tuple[str, Path]]) -> None:
    for in_name, src in given:
        if _same_file(out, src) or out.resolve() == src.resolve():
            raise OutputError(f"{name} {out} is the input {in_name} {src}: refusing to overwrite an input")
        # a file written into an image folder becomes one of its images, or replaces one
        if src.is_dir() and out.resolve().is_relative_to(src.resolve()):
            raise OutputError(f"{name} {out} lies inside the input {in_name} {src}: refusing to write into an input folder")


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
