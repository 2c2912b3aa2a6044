"""The README's command blocks run as written (each block marked `<!-- runs-as-written -->`, in
order, in one fresh folder), so a newcomer's first try works. Slow: minutes of training."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
MARK = "<!-- runs-as-written -->"


def marked_blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of each fenced block right after the marker."""
    return re.findall(re.escape(MARK) + r"\s*```(bash|python)\n(.*?)```", text, flags=re.S)


def test_the_readme_marks_its_runnable_blocks():
    blocks = marked_blocks(README.read_text())
    assert len(blocks) == README.read_text().count(MARK) >= 2  # a marker without a block right after it is a typo
    usage = next(code for lang, code in blocks if "train-segmenter" in code)
    assert not [l for l in usage.splitlines() if "..." in l.split("#")[0]]  # placeholders do not run (comments may trail off)


@pytest.mark.slow
def test_the_readme_blocks_run_as_written(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "MPLBACKEND": "Agg"}
    for i, (lang, code) in enumerate(marked_blocks(README.read_text())):
        if lang == "bash":  # `source .venv/bin/activate` stands for the PATH set above
            code = "\n".join(l for l in code.splitlines() if not l.startswith("source "))
            cmd = ["bash", "-euo", "pipefail", "-c", code]
        else:
            cmd = [sys.executable, "-c", code]
        p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert p.returncode == 0, f"README block {i} ({lang}) failed:\n{code}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    assert (tmp_path / "instances.json").is_file() and (tmp_path / "runs" / "seg" / "curves.png").is_file()
