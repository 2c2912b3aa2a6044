"""Prefect settings chosen before Prefect is imported. No Prefect import here."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from twopass.pipeline.fileio import check_free_space
from twopass.pipeline.threads import set_wait_policy

# What a flow run needs free in its folder before it starts: Prefect's database and logs, the
# first shards. Below it, the embedded server fails in tracebacks and timeouts, not one line.
FLOW_MIN_FREE_BYTES = 100_000_000

# The run folders this process holds (run folder -> open lock file): one flow run per folder at a
# time; a second process would start a second embedded server on the same SQLite database.
_HELD: dict[Path, int] = {}

DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "INFO",
}


def configure(run_dir: str | Path | None = None, parallel: bool = False) -> dict[str, str]:
    """Set this project's Prefect defaults where the user has not set them.

    With `run_dir` (the `twopass demo` and `twopass flow` commands) and no `PREFECT_HOME` and no
    `PREFECT_API_URL` (the embedded server), Prefect's home (its SQLite database, default local
    result storage) goes to `run_dir/prefect`, so a run leaves nothing outside its folder; and
    OpenMP's wait policy (`pipeline.cli.set_wait_policy`): PASSIVE when `parallel` (tasks that
    run at once share the cores), else ACTIVE. Returns the values now in effect. Must run
    before the first `import prefect` (and `import torch`) of the process to take effect.
    """
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    if run_dir is not None:
        check_free_space(run_dir, FLOW_MIN_FREE_BYTES, "a flow run")
        hold(run_dir)
        set_wait_policy(parallel)
    if run_dir is not None and not os.environ.get("PREFECT_API_URL"):
        os.environ.setdefault("PREFECT_HOME", str((Path(run_dir) / "prefect").resolve()))
    if os.environ.get("PREFECT_HOME"):
        # The embedded server cannot create its SQLite database in a folder that does not exist
        # (it then waits out the whole startup timeout).
        Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    return {k: os.environ[k] for k in (*DEFAULTS, "PREFECT_HOME", "OMP_WAIT_POLICY") if k in os.environ}


def hold(run_dir: str | Path) -> None:
    """Lock `run_dir` for this process (an advisory `flock` on `run_dir/.twopass.lock`, released
    when the process ends, killed or not): a second process refused with one line naming the
    folder and the holder's pid. A process may hold the same folder again."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _HELD:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / ".twopass.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
            raise
        raise OSError(errno.EBUSY, f"in use by another run (pid {holder}); wait for it to end or choose another --out",
                      str(run_dir)) from None  # fmt: skip
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _HELD[run_dir] = fd
