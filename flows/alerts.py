"""A Prefect automation that notifies people when a night fails: a stage failed or crashed, or the quality
gate refused the new run (then the nightly flow run ends Failed with the message `quality gate refused:
...`). See docs/runbook.md, "Notifications".

    python -m bridgerec.flows.alerts https://hooks.slack.com/services/...   # once, against PREFECT_API_URL
"""

from __future__ import annotations

import sys
from typing import cast
from uuid import UUID

from prefect.automations import Automation
from prefect.events.actions import SendNotification
from prefect.events.schemas.automations import EventTrigger, Posture
from pydantic import SecretStr

AUTOMATION_NAME = "bridgerec: night failed or refused by the gate"
# The events an automation keys on: the nightly flow run's final state (the flow's name is `nightly`).
FAILED_NIGHT_EVENTS = {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}


def failed_night_automation(block_document_id: UUID) -> Automation:
    """The automation: any Failed or Crashed run of flow `nightly` -> a message through the notification
    block `block_document_id` (Slack, Teams, PagerDuty, e-mail, ... any Prefect notification block)."""
    return Automation(
        name=AUTOMATION_NAME,
        description="A bridgerec night did not publish: see the message and the nightly-summary artifact.",
        trigger=EventTrigger(
            expect=FAILED_NIGHT_EVENTS,
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": "nightly"},
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[
            SendNotification(
                block_document_id=block_document_id,
                subject="bridgerec night {{ flow_run.name }}: {{ flow_run.state.name }}",
                body="{{ flow_run.state.message }}\n\nFlow run {{ flow_run.id }}; nightly-summary artifact "
                "and `bridgerec runs list` for the night's figures.",
            )
        ],
    )


def create_slack_alert(webhook_url: str, block_name: str = "bridgerec-oncall") -> Automation:
    """Save a Slack webhook block and create (or replace) the automation with it; returns the automation."""
    from prefect.blocks.notifications import SlackWebhook

    # Prefect's block and automation methods are sync in a sync context (typed as sync-or-async).
    block_id = cast(UUID, SlackWebhook(url=SecretStr(webhook_url)).save(block_name, overwrite=True))
    for _ in range(_MAX_OLD_AUTOMATIONS):  # replace earlier ones of the same name
        try:
            cast(Automation, Automation.read(name=AUTOMATION_NAME)).delete()
        except ValueError:  # none left
            break
    else:
        raise RuntimeError(
            f"more than {_MAX_OLD_AUTOMATIONS} automations named {AUTOMATION_NAME!r} would not go away; "
            "delete them in the Prefect UI (Automations) and run this again"
        )
    return cast(Automation, failed_night_automation(block_id).create())


_MAX_OLD_AUTOMATIONS = 100  # the loop deletes one per pass: bounded, and says why it stopped


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) != 2:
        sys.exit("usage: python -m bridgerec.flows.alerts SLACK_WEBHOOK_URL")
    print(create_slack_alert(sys.argv[1]).id)
