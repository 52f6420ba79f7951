"""Flow: workspace/ingest -> workspace/enrich (item embeddings, PCA tables, LLM user profiles)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from prefect import Flow, Task, flow, task, unmapped
from prefect.artifacts import create_table_artifact
from prefect.task_runners import ProcessPoolTaskRunner

from bridgerec.storage.workspace import Workspace
from bridgerec.tasks.enrich import (
    EnrichPlan,
    EnrichSettings,
    EnrichSummary,
    ProfileSettings,
    Shard,
    embed_item_shard,
    finish_enrich,
    plan_enrich,
    plan_profiles,
    prepare_profile_model,
    profile_shard,
    run_shards,
)
from bridgerec.tasks.ingest import IngestOutputs

R = TypeVar("R")


@task(name="check-inputs")
def check_inputs(workspace: str) -> None:
    """Fail fast, before converting or starting any model, if the ingest stage has not finished."""
    IngestOutputs(Workspace(workspace)).manifest()  # raises IngestMissing


@task(name="prepare-models")
def prepare_models(profiles: ProfileSettings) -> None:
    """Convert the packaged GGUF once (a no-op when the folder exists or profiles are off)."""
    if profiles.mode == "llm":
        prepare_profile_model(profiles)


@task(name="plan-enrich")
def plan_task(
    enrich: EnrichSettings, profiles: ProfileSettings, workspace: str, threads: int, force: bool
) -> EnrichPlan:
    return plan_enrich(enrich, profiles, Workspace(workspace), threads=threads, force=force)


# The stage's shard functions as Prefect tasks. A shard is idempotent (finished batches are checkpointed
# and reused), so a task retry after, say, an engine that failed to start redoes only the unfinished
# batches. Model calls retry and split inside.
SHARD_TASKS: dict[Callable[..., Any], Task] = {
    embed_item_shard: task(
        name="embed-items", task_run_name="embed-items-{shard.index}", retries=1, retry_delay_seconds=10
    )(embed_item_shard),
    plan_profiles: task(name="plan-profiles")(plan_profiles),
    profile_shard: task(
        name="profile-users", task_run_name="profile-users-{shard.index}", retries=1, retry_delay_seconds=10
    )(profile_shard),
    finish_enrich: task(name="finish-enrich")(finish_enrich),
}


class TaskRuns:
    """Runs the stage's shard functions (`run_shards`) as task runs of the current flow: one after another
    in the flow's thread, or mapped onto the flow's task runner (`in_workers`)."""

    def __init__(self, in_workers: bool) -> None:
        self.in_workers = in_workers

    def call(self, fn: Callable[..., R], *args: Any) -> R:
        return SHARD_TASKS[fn](*args)

    def map(self, fn: Callable[..., R], shards: list[Shard], *args: Any) -> list[R]:
        if self.in_workers:
            return SHARD_TASKS[fn].map(*(unmapped(a) for a in args), shards).result()
        return [SHARD_TASKS[fn](*args, shard) for shard in shards]


@task(name="enrich-report")
def enrich_report(summary: EnrichSummary) -> None:
    rows = [
        {"what": "items embedded (new)", "count": summary.items_embedded},
        {"what": "items cached", "count": summary.items_cached},
        {"what": "profiles generated (new)", "count": summary.profiles_generated},
        {"what": "profiles cached", "count": summary.profiles_cached},
        {"what": "errors", "count": summary.errors},
    ]
    rows += [{"what": f"errors: {step}", "count": n} for step, n in summary.errors_by_step.items()]
    create_table_artifact(
        key="enrich-summary",
        table=rows,
        description=(
            f"Enrich: {summary.items} items, {summary.embedding_dim}-d {summary.embed_model_id}; "
            f"profiles {summary.profile_mode} ({summary.llm_model_id})"
            + (" (skipped: inputs unchanged)" if summary.skipped else f" in {summary.seconds:.0f} s")
        ),
    )
    if summary.shards:
        create_table_artifact(
            key="enrich-shards",
            table=summary.shards,
            description="Enrich shards: one task run each (rows [start, stop), new work, seconds, worker)",
        )


@flow(name="enrich", log_prints=False)
def enrich_flow(
    enrich: EnrichSettings,
    profiles: ProfileSettings,
    workspace: str,
    threads: int = 1,
    force: bool = False,
) -> EnrichSummary:
    """Item shards, then profile shards, one task run each (`enrich.items_per_shard`,
    `profiles.users_per_shard`); the finish task assembles them into WORKSPACE/enrich atomically.

    `enrich.task_runner: sequential` runs the shards one after another in this thread, sharing its
    engines (an engine runs fastest on the thread that started it); `processes` maps them onto the
    flow's task runner (`configured_enrich_flow`), whose workers start engines of their own.
    """
    check_inputs(workspace)
    prepare_models(profiles)
    plan = plan_task(enrich, profiles, workspace, threads, force)
    summary = plan.skipped
    if summary is None:
        summary = run_shards(plan, TaskRuns(in_workers=enrich.task_runner == "processes"))
    enrich_report(summary)
    return summary


def configured_enrich_flow(enrich: EnrichSettings) -> Flow:
    """`enrich_flow` with a process task runner of `enrich.workers` workers for `task_runner: processes`
    (any other Prefect task runner, e.g. prefect-dask's, can be set the same way)."""
    if enrich.task_runner == "processes":
        return enrich_flow.with_options(task_runner=ProcessPoolTaskRunner(max_workers=enrich.workers))
    return enrich_flow
