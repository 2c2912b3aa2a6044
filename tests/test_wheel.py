"""The installed distribution: one top-level import package (`twopass`), the presets inside it,
and (slow) a wheel installed into a fresh venv without the source tree trains by preset name."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the source tree (the checkout stays untouched)."""
    src = tmp_path_factory.mktemp("src") / "twopass"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", "runs", ".git", "*.egg-info", "build", "__pycache__", ".pytest_cache"))
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    (path,) = out.glob("twopass-*.whl")
    return path


def test_wheel_has_one_top_level_package_and_the_presets(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"twopass"}
    for package in ("pipeline", "detector", "segmenter", "ensemble", "flows"):
        assert f"twopass/{package}/__init__.py" in names
    presets = sorted(Path(n).stem for n in names if n.startswith("twopass/configs/") and n.endswith(".yaml"))
    assert presets == sorted(p.stem for p in (REPO / "configs").glob("*.yaml")) and "r18_lsd_cpu" in presets
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "twopass = twopass.pipeline.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


@pytest.mark.slow
def test_installed_wheel_trains_by_preset_name(wheel, synth_small, tmp_path):
    """A fresh venv sees the project's dependencies (this environment's site-packages, added as
    a path: its .pth files, among them the editable install of the checkout, are not run) and the
    wheel, nothing of the source tree; run from a folder outside it."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    vpy = venv / "bin" / "python"
    site = subprocess.run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True,
                          text=True, check=True).stdout.strip()  # fmt: skip
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = subprocess.run([str(vpy), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    where = subprocess.run([str(vpy), "-c", "import twopass.detector; print(twopass.detector.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert where.startswith(site) and str(REPO) not in where
    run = tmp_path / "run"
    r = subprocess.run([str(venv / "bin" / "twopass"), "train-detector", "--config", "r18_lsd_cpu", "--train-ann",
                        synth_small / "annotations.json", "--train-images", synth_small / "images", "--out", run,
                        "--iters", "2", "--batch", "2", "--no-progress"], cwd=work, env=env, capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "trained r18_lsd_cpu to iteration 2" in r.stdout and (run / "checkpoints").is_dir()
