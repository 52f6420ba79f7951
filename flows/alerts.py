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


def main(argv: list[str] | None = None) -> int:
    """`python -m bridgerec.flows.alerts URL`: the automation with a Slack webhook, on the Prefect server
    PREFECT_API_URL names. Refused (exit 2, one `error:` line) without that server, where it would go to
    a temporary one that is gone at exit, and for a URL that is not https."""
    import argparse
    from urllib.parse import urlparse

    from prefect.settings import PREFECT_API_URL

    parser = argparse.ArgumentParser(
        prog="python -m bridgerec.flows.alerts",
        description=f"Create (or replace) the Prefect automation {AUTOMATION_NAME!r}: a message to a Slack "
        "webhook when a nightly run fails or the quality gate refuses its run. Runs once, against the "
        "Prefect server PREFECT_API_URL names (docs/runbook.md, section 7).",
    )
    parser.add_argument(
        "webhook_url", help="the Slack incoming webhook (https://hooks.slack.com/services/...)"
    )
    parser.add_argument("--block-name", default="bridgerec-oncall", help="the notification block's name")
    args = parser.parse_args(argv)
    if urlparse(args.webhook_url).scheme != "https":
        print(f"error: {args.webhook_url!r} is not an https webhook URL", file=sys.stderr)
        return 2
    if not PREFECT_API_URL.value():
        print(
            "error: PREFECT_API_URL is not set: the automation would be saved in a temporary Prefect server "
            "that is gone when this ends; set it to the server the nightly deployment runs on",
            file=sys.stderr,
        )
        return 2
    automation = create_slack_alert(args.webhook_url, args.block_name)
    print(f"created automation {automation.name!r} ({automation.id}) with block {args.block_name!r}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
