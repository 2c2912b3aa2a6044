"""Fixtures of the flow tests."""

from __future__ import annotations

import pytest

import twopass.flows  # noqa: F401  (Prefect defaults set before Prefect is imported)


@pytest.fixture(scope="session")
def harness():
    """One temporary Prefect server for the session (about 10 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
