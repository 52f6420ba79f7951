"""Flow: workspace/ingest (+ enrich) -> workspace/runs/<run_id>/, with a metrics table artifact."""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_table_artifact

from bridgerec.storage.workspace import Workspace
from bridgerec.tasks.train import TrainSettings, TrainSummary, run_train


@task(name="train", retries=0)
def train_task(settings: TrainSettings, workspace_root: str, threads: int, force: bool) -> TrainSummary:
    return run_train(settings, Workspace(workspace_root), threads=threads, force=force)


@task(name="metrics-report")
def metrics_report(summary: TrainSummary) -> None:
    rows = []
    for split in ("valid", "test"):
        result = getattr(summary, split)
        groups = {"sampled": {k: v for k, v in result.items() if k != "full"}, "full": result.get("full", {})}
        for protocol, by_group in groups.items():
            for group, metrics in by_group.items():
                rows.append(
                    {"split": split, "protocol": protocol, "group": group}
                    | {k: round(v, 4) for k, v in metrics.items()}
                )
    create_table_artifact(
        key=f"train-metrics-{summary.model}",
        table=rows,
        description=(
            f"{summary.model} ({summary.run_id}): best epoch {summary.best_epoch} of {summary.epochs}, "
            f"{summary.epoch_seconds:.1f} s/epoch"
            + (f", warm start from {summary.warm_start_from}" if summary.init == "warm" else "")
            + (" (skipped: already trained)" if summary.skipped else "")
        ),
    )


@flow(name="train", log_prints=False)
def train_flow(
    settings: TrainSettings, workspace: str, threads: int = 1, force: bool = False
) -> TrainSummary:
    summary = train_task(settings, workspace, threads, force)
    metrics_report(summary)
    return summary
