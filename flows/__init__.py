"""The Prefect layer, and only that: thin flows and tasks over the plain stage functions.

Importing this package sets Prefect's defaults for this project *before* Prefect is imported
(`os.environ.setdefault`, so anything the user sets wins):

- `PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120`: the embedded (ephemeral) server
  that runs when no `PREFECT_API_URL` is set gets 120 s to start (Prefect's 20 s timed out on
  a busy 2-core machine);
- `PREFECT_SERVER_ANALYTICS_ENABLED=false`: no telemetry (and no errors on offline machines);
- `PREFECT_LOGGING_LEVEL=INFO`.

`PREFECT_HOME` (database, local results) is set by the `twopass` commands to a folder under
the run folder unless the user has set it; see `flows.env.configure`.

Modules: `tasks` (one Prefect task per stage execution, each calling the plain stage function
of its package: `detector.stage`, `ensemble.stage`, `segmenter.stage`, `pipeline.runfolder`),
`prefect_flows` (the Prefect flows; `prefect.yaml` deploys them), `runners` (their task runner
parameter, which the CLI checks before Prefect starts), `demo` (the demo's config), `cli`
(`twopass demo`, `twopass flow ...`), `env` (the settings above). Nothing outside this
package imports Prefect; the same pipeline without Prefect is `segmenter.two_pass.two_pass_plain`.
"""

from __future__ import annotations

from .env import configure as _configure

_configure()
