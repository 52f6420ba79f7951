"""Flow: the nightly pipeline. Each stage is a subflow; a stage whose inputs and config are unchanged
skips itself (its manifest), a failing stage fails the run and leaves the published warehouse as it was,
and a rerun after a crash resumes from the finished stages.

Deployed from prefect.yaml (`nightly` on a cron, and one ad-hoc deployment per stage via `stage_flow`);
run in-process by `bridgerec run`.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any, Literal

from bridgerec.flows.enrich import configured_enrich_flow
from bridgerec.flows.ingest import ingest_flow
from bridgerec.flows.publish import publish_flow
from bridgerec.flows.train import train_flow
from prefect import flow
from prefect.artifacts import create_markdown_artifact

from bridgerec.config import Settings, load_settings
from bridgerec.runtime.errors import is_transient
from bridgerec.runtime.logs import get_logger

Stage = Literal["ingest", "enrich", "train", "publish"]
STAGES: tuple[Stage, ...] = ("ingest", "enrich", "train", "publish")


def resolve_settings(config_file: str | None, overrides: dict[str, Any] | None) -> Settings:
    """Config file + env vars, then `overrides` (nested, e.g. {"train": {"epochs": 2}}, or dotted) on top."""
    return load_settings(config_file or None, overrides)


def run_stage(stage: Stage, settings: Settings) -> dict:
    """Run one stage's subflow with its own settings section; returns its JSON-able summary."""
    fn = {
        "ingest": ingest_flow,
        "enrich": configured_enrich_flow(settings.enrich),
        "train": train_flow,
        "publish": publish_flow,
    }[stage]
    threads = settings.runtime.resolved_threads()
    workspace = str(settings.workspace)
    if stage == "ingest":
        args: tuple = (settings.ingest, workspace, threads)
    elif stage == "enrich":
        args = (settings.enrich, settings.profiles, workspace, threads)
    elif stage == "train":
        args = (settings.train, workspace, threads)
    else:
        args = (settings.publish, workspace, str(settings.warehouse), threads)
    result = call_with_retries(
        stage, fn, args, settings.runtime.stage_retries, settings.runtime.retry_delay_seconds
    )
    return result.model_dump(mode="json") if hasattr(result, "model_dump") else dict(result)


def call_with_retries(stage: str, fn: Any, args: tuple, retries: int, delay_s: float) -> Any:
    """Run a stage's subflow; retry only transient failures (an engine that fails to start, an I/O
    error, a lost worker), each stage being idempotent and atomic so a retry never sees half of a
    previous attempt. Input, config and contract errors (`InputError`) fail at once: the same file
    gives the same error after any delay. (Prefect's `retry_condition_fn` exists for tasks only; a
    flow's `retries` retry every exception, so the condition is applied here.)"""
    for attempt in range(retries + 1):
        try:
            return fn(*args)
        except Exception as exc:
            if attempt >= retries or not is_transient(exc):
                raise
            get_logger().warning(
                "nightly: stage %s failed (%s: %s); retry %d of %d in %.0f s",
                stage,
                type(exc).__name__,
                exc,
                attempt + 1,
                retries,
                delay_s,
            )
            time.sleep(delay_s)
    raise AssertionError("unreachable")


def _summary_markdown(settings: Settings, results: dict[str, dict], timings: dict[str, float]) -> str:
    lines = ["# bridgerec nightly run", "", "| stage | status | seconds | key figures |", "|---|---|---|---|"]
    for stage in STAGES:
        if stage not in results:
            continue
        r = results[stage]
        status = r.get("status") or ("skipped (unchanged)" if r.get("skipped") else "done")
        figures = ", ".join(
            f"{k}={v}"
            for k, v in r.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k != "seconds"
        )
        lines.append(f"| {stage} | {status} | {timings.get(stage, 0):.1f} | {figures[:300]} |")
    lines += ["", f"Workspace: `{settings.workspace}`", f"Warehouse: `{settings.warehouse}`"]
    return "\n".join(lines)


def _record_failure(settings: Settings, stage: str, exc: Exception, started: datetime) -> None:
    """A failed night leaves the published tables as they were, plus one 'failed' row in `runs`."""
    from bridgerec.storage.warehouse import record_run_status
    from prefect.runtime import flow_run

    run_id = f"nightly-{flow_run.get_id() or started.strftime('%Y%m%dT%H%M%S')}"
    try:
        record_run_status(
            settings.warehouse,
            run_id,
            "failed",
            started_at=started,
            message=f"stage {stage}: {exc}"[:2000],
            storage_compatibility=settings.publish.storage_compatibility,
        )
    except Exception as record_exc:  # never hide the stage's own error behind a bookkeeping one
        get_logger().warning(
            "nightly: could not record the failure in %s: %s", settings.warehouse, record_exc
        )


@flow(name="nightly", log_prints=False)
def nightly_flow(config_file: str | None = None, overrides: dict[str, Any] | None = None) -> dict:
    """ingest -> enrich -> train -> publish; unchanged stages skip themselves."""
    log = get_logger()
    settings = resolve_settings(config_file, overrides)
    results: dict[str, dict] = {}
    timings: dict[str, float] = {}
    started = datetime.now(UTC)
    for stage in STAGES:
        t0 = time.perf_counter()
        try:
            results[stage] = run_stage(stage, settings)
        except Exception as exc:
            _record_failure(settings, stage, exc, started)
            raise
        timings[stage] = round(time.perf_counter() - t0, 2)
        log.info("nightly: %s finished in %.1f s", stage, timings[stage])
    create_markdown_artifact(
        key="nightly-summary",
        markdown=_summary_markdown(settings, results, timings),
        description="bridgerec nightly run: stages, timings, counts, warehouse path",
    )
    return {
        "stages": results,
        "seconds": timings,
        "workspace": str(settings.workspace),
        "warehouse": str(settings.warehouse),
    }


@flow(name="stage", log_prints=False)
def stage_flow(stage: Stage, config_file: str | None = None, overrides: dict[str, Any] | None = None) -> dict:
    """Run a single stage ad hoc (e.g. republish, or a backfill with other settings)."""
    return run_stage(stage, resolve_settings(config_file, overrides))
