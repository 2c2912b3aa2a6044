"""How torch's CPU threads wait, chosen before torch is imported. No torch import here."""

from __future__ import annotations

import os


def set_wait_policy(parallel: bool) -> str:
    """OpenMP's wait policy for this process, unless the user set OMP_WAIT_POLICY; call before
    torch is imported (OpenMP reads it once). ACTIVE (threads spin between parallel regions) for
    one job on the machine: a demo model's training step is ~1.7x faster than with PASSIVE.
    PASSIVE (threads sleep) where several torch jobs share the cores (parallel flow tasks), where
    spinning threads take each other's cores. Measured rows: benchmarks/wait_policy.py,
    docs/results.md ("Threads")."""
    return os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE" if parallel else "ACTIVE")
