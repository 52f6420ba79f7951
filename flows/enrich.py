"""Flow: workspace/ingest -> workspace/enrich (item embeddings, PCA tables, LLM user profiles)."""

from __future__ import annotations

import time

from bridgerec.storage.workspace import Workspace
from bridgerec.tasks.enrich import (
    EnrichPlan,
    EnrichSettings,
    EnrichSummary,
    ItemShardWork,
    ProfilePlan,
    ProfileSettings,
    ProfileShardWork,
    Shard,
    embed_item_shard,
    engine_scope,
    finish_enrich,
    plan_enrich,
    plan_profiles,
    prepare_profile_model,
    profile_shard,
)
from prefect import Flow, flow, task, unmapped
from prefect.artifacts import create_table_artifact
from prefect.task_runners import ProcessPoolTaskRunner


@task(name="check-inputs")
def check_inputs(workspace: str) -> None:
    """Fail fast, before converting or starting any model, if the ingest stage has not finished."""
    ws = Workspace(workspace)
    if ws.read_manifest("ingest") is None:
        raise FileNotFoundError(f"{ws.stage_dir('ingest')} has no finished ingest: run `bridgerec ingest`")


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


# A shard is idempotent (finished batches are checkpointed and reused), so a task retry after, say, an
# engine that failed to start redoes only the unfinished batches. Model calls retry and split inside.
@task(name="embed-items", task_run_name="embed-items-{shard.index}", retries=1, retry_delay_seconds=10)
def embed_items_task(plan: EnrichPlan, enrich: EnrichSettings, shard: Shard) -> ItemShardWork:
    return embed_item_shard(plan, enrich, shard)


@task(name="plan-profiles")
def plan_profiles_task(
    plan: EnrichPlan, enrich: EnrichSettings, profiles: ProfileSettings, item_work: list[ItemShardWork]
) -> ProfilePlan:
    return plan_profiles(plan, enrich, profiles, item_work)


@task(name="profile-users", task_run_name="profile-users-{shard.index}", retries=1, retry_delay_seconds=10)
def profile_users_task(
    plan: EnrichPlan,
    enrich: EnrichSettings,
    profiles: ProfileSettings,
    profile_plan: ProfilePlan,
    shard: Shard,
) -> ProfileShardWork:
    return profile_shard(plan, enrich, profiles, profile_plan, shard)


@task(name="finish-enrich")
def finish_task(
    plan: EnrichPlan,
    enrich: EnrichSettings,
    profiles: ProfileSettings,
    item_work: list[ItemShardWork],
    profile_plan: ProfilePlan | None,
    profile_work: list[ProfileShardWork],
    started: float,
) -> EnrichSummary:
    return finish_enrich(plan, enrich, profiles, item_work, profile_plan, profile_work, started)


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
    started = time.perf_counter()
    check_inputs(workspace)
    prepare_models(profiles)
    plan = plan_task(enrich, profiles, workspace, threads, force)
    if plan.skipped is not None:
        summary = plan.skipped
    else:
        with engine_scope():
            in_workers = enrich.task_runner == "processes"
            item_work = (
                embed_items_task.map(unmapped(plan), unmapped(enrich), plan.item_shards).result()
                if in_workers
                else [embed_items_task(plan, enrich, shard) for shard in plan.item_shards]
            )
            profile_plan, profile_work = None, []
            if profiles.mode == "llm":
                profile_plan = plan_profiles_task(plan, enrich, profiles, item_work)
                profile_work = (
                    profile_users_task.map(
                        unmapped(plan),
                        unmapped(enrich),
                        unmapped(profiles),
                        unmapped(profile_plan),
                        profile_plan.shards,
                    ).result()
                    if in_workers
                    else [
                        profile_users_task(plan, enrich, profiles, profile_plan, s)
                        for s in profile_plan.shards
                    ]
                )
            summary = finish_task(plan, enrich, profiles, item_work, profile_plan, profile_work, started)
    enrich_report(summary)
    return summary


def configured_enrich_flow(enrich: EnrichSettings) -> Flow:
    """`enrich_flow` with a process task runner of `enrich.workers` workers for `task_runner: processes`
    (any other Prefect task runner, e.g. prefect-dask's, can be set the same way)."""
    if enrich.task_runner == "processes":
        return enrich_flow.with_options(task_runner=ProcessPoolTaskRunner(max_workers=enrich.workers))
    return enrich_flow
