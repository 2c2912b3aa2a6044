"""Shared fixtures: small synthetic COCO sets generated once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Two threads at most: CI machines have 2 cores and tests run beside other work. Passive
# OpenMP waits: threads that spin for a busy core made training steps 4x slower here.
# Both must be set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory) -> Path:
    """8 images of 128 px (seed 0): `root/images/*.png`, `root/annotations.json`."""
    from twopass.pipeline.synth import generate

    root = tmp_path_factory.mktemp("synth_small")
    generate(root, num_images=8, size=128, seed=0)
    return root
