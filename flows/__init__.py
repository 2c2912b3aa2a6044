"""The Prefect layer: thin flows and tasks over the plain stage functions.

Importing this package sets Prefect's defaults for this project *before* Prefect is imported
(`os.environ.setdefault`, so anything the user sets wins):

- `PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120`: the embedded (ephemeral) server
  that runs when no `PREFECT_API_URL` is set gets 120 s to start (Prefect's 20 s timed out on
  a busy 2-core machine);
- `PREFECT_SERVER_ANALYTICS_ENABLED=false`: no telemetry (and no errors on offline machines);
- `PREFECT_LOGGING_LEVEL=INFO`.

`PREFECT_HOME` (database, local results) is set by the `twopass` commands to a folder under
the run folder unless the user has set it; see `flows.env.configure`.

Modules: `stages` (plain functions: keys, ledger, detect/fuse/segment/merge/train/evaluate),
`models` (loading and training models), `report` (report.md, pictures), `tasks` (Prefect
tasks), `prefect_flows` (the Prefect flows; `prefect.yaml` deploys them), `plain` (the same
pipeline as a plain loop, no Prefect), `demo` (the demo's config), `cli` (`twopass demo`,
`twopass flow ...`), `env` (the settings above).
"""

from __future__ import annotations

from .env import configure as _configure

_configure()
