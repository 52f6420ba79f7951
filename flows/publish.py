"""Flow: the latest trained run -> FAISS top-k -> DuckDB warehouse (atomic swap) + per-run indexes."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_table_artifact

from bridgerec.storage.warehouse import list_runs
from bridgerec.storage.workspace import Workspace
from bridgerec.tasks.publish import PublishSettings, PublishSummary, resolve_trained_run, run_publish


@task(name="check-trained-run")
def check_trained_run(workspace: str) -> str:
    """Fail fast, before any work, when there is no complete trained run."""
    return resolve_trained_run(Workspace(workspace)).run_id


@task(name="publish", retries=0)
def publish_task(
    settings: PublishSettings, workspace: str, warehouse: str, threads: int, force: bool, run_id: str | None
) -> PublishSummary:
    return run_publish(settings, Workspace(workspace), Path(warehouse), threads, force, run_id)


@task(name="publish-report")
def publish_report(summary: PublishSummary) -> None:
    runs = list_runs(summary.warehouse, limit=20)
    create_table_artifact(
        key="publish-runs",
        table=[
            {
                "run_id": r["run_id"],
                "status": r["status"],
                "model": r["model"],
                "finished_at": str(r["finished_at"]),
                "rows": r["n_recommendations"],
                "retained": r["retained"],
            }
            for r in runs
        ],
        description=(
            f"Published run {summary.run_id} ({summary.model}): {summary.rows:,} rows for {summary.users:,} "
            f"users, k={summary.k}, in {summary.seconds:.1f} s"
            + (" (skipped: already published)" if summary.skipped else "")
            + (f"; purged {', '.join(summary.purged_runs)}" if summary.purged_runs else "")
        ),
    )


@flow(name="publish", log_prints=False)
def publish_flow(
    settings: PublishSettings,
    workspace: str,
    warehouse: str,
    threads: int = 1,
    force: bool = False,
    run_id: str | None = None,
) -> PublishSummary:
    check_trained_run(workspace)
    summary = publish_task(settings, workspace, warehouse, threads, force, run_id)
    publish_report(summary)
    return summary
