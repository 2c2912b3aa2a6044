"""The orchestration layer: the two-pass pipeline described once, run by plain calls or by Prefect.

Importing this package sets Prefect's defaults for this project *before* Prefect is imported
(`os.environ.setdefault`, so anything the user sets wins):

- `PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120`: the embedded (ephemeral) server
  that runs when no `PREFECT_API_URL` is set gets 120 s to start (Prefect's 20 s timed out on
  a busy 2-core machine);
- `PREFECT_SERVER_ANALYTICS_ENABLED=false`: no telemetry (and no errors on offline machines);
- `PREFECT_LOGGING_LEVEL=INFO`.

`PREFECT_HOME` (database, local results) is set by the `twopass` commands to a folder under
the run folder unless the user has set it; see `flows.env.configure`.

Modules: `steps` (the two-pass pipeline described once: its shard steps, their arguments and
cache keys; the evaluation of every stage) and `plain` (its executor without Prefect), which do
not import Prefect; `tasks` (the Prefect tasks: one per step execution, each a call of the plain
stage function of its package), `prefect_flows` (the Prefect flows, the other executor of
`steps`; `prefect.yaml` deploys them), `runners` (their task runner parameter, which the CLI
checks before Prefect starts), `demo` (the demo's config), `cli` (`twopass demo`,
`twopass flow ...`), `env` (the settings above). Nothing outside this package imports Prefect.
"""

from __future__ import annotations

from .env import configure as _configure

_configure()
