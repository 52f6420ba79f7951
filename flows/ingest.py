"""Flow: raw logs and catalogue -> workspace/ingest/*.parquet, with a data-quality artifact."""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_table_artifact

from bridgerec.storage.workspace import Workspace
from bridgerec.tasks.ingest import IngestSettings, IngestSummary, check_input_files, run_ingest


@task(name="check-inputs")
def check_inputs(settings: IngestSettings) -> dict[str, str]:
    """Fail fast, before any work, if a configured file is missing."""
    return {role: str(p) for role, p in check_input_files(settings).items()}


@task(name="ingest", retries=0)
def ingest_task(settings: IngestSettings, workspace_root: str, threads: int, force: bool) -> IngestSummary:
    return run_ingest(settings, Workspace(workspace_root), threads=threads, force=force)


@task(name="data-quality-report")
def data_quality_report(summary: IngestSummary) -> None:
    rows = []
    for table, acc in summary.accounting.items():
        rows.append({"table": table, "outcome": "read", "reason": "", "rows": acc["read"]})
        rows.append({"table": table, "outcome": "kept", "reason": "", "rows": acc["kept"]})
        for outcome in ("quarantined", "filtered"):
            for reason, n in acc[f"{outcome}_by_reason"].items():
                rows.append({"table": table, "outcome": outcome, "reason": reason, "rows": n})
    create_table_artifact(
        key="ingest-data-quality",
        table=rows,
        description=(
            f"Ingest: {summary.users} users, {summary.items} items, {summary.interactions} interactions, "
            f"{summary.overlap_users} overlapping users, {summary.quarantined} rows quarantined"
            + (" (skipped: inputs unchanged)" if summary.skipped else "")
        ),
    )


@flow(name="ingest", log_prints=False)
def ingest_flow(
    settings: IngestSettings, workspace: str, threads: int = 1, force: bool = False
) -> IngestSummary:
    check_inputs(settings)
    summary = ingest_task(settings, workspace, threads, force)
    data_quality_report(summary)
    return summary
