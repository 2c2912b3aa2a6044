"""Crashed-run detection on a self-hosted Prefect server.

A flow run whose worker (or machine) dies stops reporting and would show `Running` forever.
Prefect's flow runs send heartbeat events (every `PREFECT_FLOWS_HEARTBEAT_FREQUENCY` seconds,
which `prefect.yaml` sets to 30 on the work pool); this automation marks a run Crashed when no
heartbeat and no final state has come for `silence_s` seconds (Prefect's documented recipe,
"detect zombie flows"; Prefect Cloud has it built in as "Unresponsive run detection"). A
rerun of the same config and run folder then computes only the shards the crashed run had not
finished. `twopass flow crash-detection` creates it once per server.
"""

from __future__ import annotations

from datetime import timedelta

NAME = "twopass: crash runs without heartbeats"


def crash_automation(silence_s: int = 90):
    """The automation (not yet saved): a flow run silent for `silence_s` s becomes Crashed."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return Automation(
        name=NAME,
        description=f"Marks a flow run Crashed after {silence_s} s without a heartbeat or a final state.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},  # fmt: skip
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=silence_s),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message=f"no heartbeat for {silence_s} s: its worker or machine died")],
    )


def ensure_crash_automation(silence_s: int = 90) -> str:
    """Create the automation on the server in PREFECT_API_URL, replacing an earlier one of this
    project (so the silence can be changed by running it again); returns its id."""
    from prefect.automations import Automation

    if silence_s < 60:
        raise ValueError(f"--silence {silence_s}: at least 60 s (heartbeats come every 30 s at best)")
    try:
        Automation.read(name=NAME).delete()
    except ValueError:  # none yet
        pass
    return str(crash_automation(silence_s).create().id)
