"""Flow: workspace/ingest -> workspace/enrich (item embeddings, PCA tables, LLM user profiles)."""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_table_artifact

from storage.workspace import Workspace
from tasks.enrich.models import prepare_profile_model
from tasks.enrich.settings import EnrichSettings, ProfileSettings
from tasks.enrich.stage import EnrichSummary, run_enrich


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


@task(name="enrich", retries=0)
def enrich_task(
    enrich: EnrichSettings, profiles: ProfileSettings, workspace: str, threads: int, force: bool
) -> EnrichSummary:
    # Model calls retry and split batches inside; a task-level retry would redo the whole stage.
    return run_enrich(enrich, profiles, Workspace(workspace), threads=threads, force=force)


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


@flow(name="enrich", log_prints=False)
def enrich_flow(
    enrich: EnrichSettings,
    profiles: ProfileSettings,
    workspace: str,
    threads: int = 1,
    force: bool = False,
) -> EnrichSummary:
    check_inputs(workspace)
    prepare_models(profiles)
    summary = enrich_task(enrich, profiles, workspace, threads, force)
    enrich_report(summary)
    return summary
