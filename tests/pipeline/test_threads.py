"""OpenMP's wait policy: spinning threads for one job, sleeping ones for parallel tasks, and the
user's own setting kept (benchmarks/wait_policy.py measured the rows behind the choice)."""

from __future__ import annotations

import os

from typer.testing import CliRunner

from twopass.flows.env import configure
from twopass.pipeline.cli import app
from twopass.pipeline.threads import set_wait_policy


def test_one_job_spins_parallel_tasks_sleep_and_the_users_choice_wins(monkeypatch, tmp_path):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert set_wait_policy(parallel=False) == "ACTIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert configure(tmp_path, parallel=True)["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert configure(tmp_path, parallel=False)["OMP_WAIT_POLICY"] == "PASSIVE"


def test_stage_commands_choose_active_flow_commands_leave_it_to_their_runner(monkeypatch, tmp_path):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    CliRunner().invoke(app, ["evaluate", "--help"])
    assert os.environ.get("OMP_WAIT_POLICY") == "ACTIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    CliRunner().invoke(app, ["flow", "run", "--help"])
    assert "OMP_WAIT_POLICY" not in os.environ
