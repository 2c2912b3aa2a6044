"""The task runner of a flow run, as a flow parameter. No Prefect import at module level: the
CLI checks its --task-runner options against this model before anything is written."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class TaskRunnerSpec(BaseModel):
    """How a flow run runs its shard tasks: a flow parameter, so a deployment run (the UI's
    Quick Run and `-p task_runner=...`) and the CLI's --task-runner options choose it. Prefect
    validates it before a deployment run is created."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["threads", "processes", "dask"] = Field(
        "threads", description="threads: a pool in the flow's process; processes: a pool of processes; dask: a Dask cluster."
    )
    workers: int = Field(1, ge=1, description="Tasks at once: threads, processes, or single-threaded workers of a local Dask cluster.")
    dask_address: str | None = Field(None, description="dask: tcp://HOST:PORT of an existing scheduler (its workers need PREFECT_API_URL).")

    @field_validator("dask_address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("tcp://", "tls://", "inproc://", "ucx://")):
            raise ValueError(f"dask_address: expected tcp://HOST:PORT, got {value!r}")
        return value

    @model_validator(mode="after")
    def _check(self) -> "TaskRunnerSpec":
        if self.dask_address is not None and self.kind != "dask":
            raise ValueError("dask_address needs kind 'dask'")
        return self

    def build(self):
        """A fresh Prefect task runner (one CPU model at a time uses every core: 1 worker by default)."""
        from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

        if self.kind == "threads":
            return ThreadPoolTaskRunner(max_workers=self.workers)
        if self.kind == "processes":
            return ProcessPoolTaskRunner(max_workers=self.workers)
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise ValueError("task runner dask needs prefect-dask: pip install 'twopass[dask]'") from None
        if self.dask_address:
            return DaskTaskRunner(address=self.dask_address)
        # Worker processes, each single-threaded (threads of this process would share its
        # interpreter lock: 1.29x for 2 workers, measured 2026-12-02 at c42008e). They report to this run's API, the
        # embedded server's too (without PREFECT_API_URL each would start a server of its own).
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            api_url = str(client.api_url).rstrip("/")
        env = {"PREFECT_API_URL": api_url, "OMP_NUM_THREADS": "1"}
        return DaskTaskRunner(
            cluster_class="distributed.LocalCluster",
            cluster_kwargs={"n_workers": self.workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None, "env": env},
        )


# The CLI's option for each field, so a bad value is named as the user gave it.
OPTIONS = {"kind": "--task-runner", "workers": "--workers", "dask_address": "--dask-address"}


def from_options(task_runner: str, workers: int | None, dask_address: str | None) -> TaskRunnerSpec:
    """The spec of the CLI's options (None: the spec's default), or a ValueError naming the option."""
    from pydantic import ValidationError

    given = {"kind": task_runner, "dask_address": dask_address, **({} if workers is None else {"workers": workers})}
    try:
        return TaskRunnerSpec(**given)
    except ValidationError as e:
        err = e.errors()[0]
        field = err["loc"][0] if err["loc"] else None
        msg = err["msg"].removeprefix("Value error, ").removeprefix(f"{field}: ")
        if field is None:  # a rule between options
            raise ValueError(f"--task-runner {task_runner!r} with --dask-address {dask_address!r}: {msg}") from None
        raise ValueError(f"{OPTIONS[field]} {given[field]!r}: {msg}") from None
