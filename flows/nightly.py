"""Flow: the nightly pipeline. Each stage is a subflow; a stage whose inputs and config are unchanged
skips itself (its manifest), a failing stage fails the run and leaves the published warehouse as it was,
and a rerun after a crash resumes from the finished stages. Between train and publish the quality gate
(tasks/quality/gate.py) keeps a worse run from replacing the published one.

Deployed from prefect.yaml (`nightly` on a cron, and one ad-hoc deployment per stage via `stage_flow`);
run in-process by `bridgerec run`.
"""

from __future__ import annotations

import contextlib
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from bridgerec.config import Settings, load_settings
from bridgerec.flows.enrich import configured_enrich_flow
from bridgerec.flows.ingest import ingest_flow
from bridgerec.flows.publish import publish_flow
from bridgerec.flows.train import train_flow
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
        args = (settings.publish, workspace, str(settings.warehouse_path), threads)
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


class NightFailed(RuntimeError):
    """The night did not publish: a stage failed or the quality gate refused the new run. `summary` is the
    night's summary (the same object `nightly_flow` returns), for the morning read of a failed night."""

    def __init__(self, message: str, summary: dict) -> None:
        super().__init__(message)
        self.summary = summary


def _rows(stage: str, r: dict) -> int | None:
    """The one count that says how much a stage did (or holds, when it skipped)."""
    if stage == "ingest":
        return r.get("interactions")
    if stage == "enrich":
        return (r.get("items_embedded") or 0) + (r.get("profiles_generated") or 0)
    if stage == "train":
        return r.get("users")
    return r.get("rows")


def _did(r: dict) -> str:
    if "status" in r:
        return str(r["status"])
    if r.get("skipped"):
        return "skipped (unchanged)"
    return "did"


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def summary_markdown(summary: dict) -> str:
    """The morning read: one table of the stages, the headline metric and its change, the gate's
    decision, where to look next. The nightly-summary artifact and `bridgerec run` print it."""
    head = "completed" if summary["status"] == "completed" else "FAILED"
    lines = [
        f"# bridgerec nightly run {summary['night_id']}: {head}",
        "",
        "| stage | did | seconds | rows |",
        "|---|---|---:|---:|",
    ]
    for stage in ("ingest", "checks", "enrich", "train", "gate", "publish"):
        if stage == "gate":
            if summary.get("gate"):
                lines.append(
                    f"| quality gate | {summary['gate']['decision']} | {summary['seconds'].get('gate', 0):.1f} | |"
                )
            continue
        if stage == "checks":
            checks = summary.get("data_checks")
            if checks is not None:
                state = "passed" if checks["passed"] else "STOPPED the night"
                lines.append(f"| data checks | {state} | {summary['seconds'].get('checks', 0):.1f} | |")
            continue
        r = summary["stages"].get(stage)
        if r is None:
            state = "failed" if summary.get("failed_stage") == stage else "not run"
            lines.append(f"| {stage} | {state} | {summary['seconds'].get(stage, 0):.1f} | |")
            continue
        rows = _rows(stage, r)
        lines.append(
            f"| {stage} | {_did(r)} | {summary['seconds'].get(stage, 0):.1f} | "
            f"{'' if rows is None else f'{rows:,}'} |"
        )
    gate = summary.get("gate") or {}
    new, published = gate.get("new_ndcg10"), gate.get("published_ndcg10")
    train = summary["stages"].get("train") or {}
    lines.append("")
    if train.get("run_id"):
        start = train.get("init") or "cold"
        lines.append(f"- run `{train['run_id']}` ({train.get('model')}, {start} start)")
    if new is not None:
        change = (
            f", {new - published:+.4f} vs the published run ({_fmt(published)})"
            if published is not None
            else ""
        )
        lines.append(
            f"- validation NDCG@10 (full ranking) {_fmt(new)}{change}; popularity floor "
            f"{_fmt(gate.get('popularity_ndcg10'))}"
        )
    if summary.get("data_checks"):
        lines.append(f"- {summary['data_checks']['message']}")
    if summary.get("list_stability_text"):
        lines.append(f"- {summary['list_stability_text']}")
    if gate:
        lines.append(f"- gate: **{gate['decision']}**: {gate['message']}")
        if gate.get("churn"):
            figures = ", ".join(f"{d} {c:.0%}" for d, c in sorted(gate["churn"].items()))
            lines.append(f"- lists would change by (mean per user): {figures}; {gate.get('churn_note')}")
    if summary.get("message"):
        lines.append(f"- failed: {summary['message']}")
    lines.append(f"- serving: run `{summary.get('published_run_id') or 'none'}`")
    lines += [
        "",
        f"Next: `bridgerec runs list --warehouse {summary['warehouse']}`; Prefect artifacts "
        "(data quality, train metrics); workspace `" + summary["workspace"] + "`.",
    ]
    if gate.get("decision") == "refused":
        lines.append(
            f"To publish the refused run anyway: `bridgerec publish --run-id {gate['new_run_id']}` "
            "(with the night's config)."
        )
    return "\n".join(lines)


def _night_id() -> tuple[str, str | None]:
    """The night's row id in `runs` and its Prefect flow run id (a retry keeps both)."""
    from prefect.runtime import flow_run

    flow_run_id = flow_run.get_id()
    if flow_run_id:
        return f"night-{flow_run_id}", str(flow_run_id)
    return f"night-{datetime.now(UTC):%Y%m%dT%H%M%S}", None


def _record(settings: Settings, record: Any) -> None:
    """Write the night's row; a bookkeeping failure never hides the night's own outcome."""
    from bridgerec.storage.warehouse import record_night

    try:
        record_night(
            settings.warehouse_path, record, storage_compatibility=settings.publish.storage_compatibility
        )
    except Exception as exc:
        get_logger().warning("nightly: could not record the night in %s: %s", settings.warehouse_path, exc)


@flow(name="nightly", log_prints=False)
def nightly_flow(config_file: str | None = None, overrides: dict[str, Any] | None = None) -> dict:
    """ingest -> enrich -> train -> quality gate -> publish; unchanged stages skip themselves.

    The night is one row of the warehouse's `runs` (kind 'night'): 'running' at the start, 'completed'
    or 'failed' at the end. A stage failure or a refusal by the gate raises NightFailed (the flow run is
    Failed: what automations key on) after writing the row and the nightly-summary artifact."""
    from bridgerec.storage.warehouse import NightRecord, published_run
    from bridgerec.storage.workspace import Workspace
    from bridgerec.tasks.publish import resolve_trained_run
    from bridgerec.tasks.quality import PublishedLists, run_gate

    log = get_logger()
    settings = resolve_settings(config_file, overrides)
    warehouse = settings.warehouse_path
    night_id, flow_run_id = _night_id()
    started = datetime.now(UTC)
    _record(settings, NightRecord(night_id, flow_run_id, "running", started))
    results: dict[str, dict] = {}
    timings: dict[str, float] = {}
    summary: dict[str, Any] = {
        "night_id": night_id,
        "flow_run_id": flow_run_id,
        "status": "running",
        "stages": results,
        "seconds": timings,
        "gate": None,
        "published_run_id": None,
        "workspace": str(settings.workspace),
        "warehouse": str(warehouse),
    }
    stage: str = "ingest"
    try:
        for stage in ("ingest", "checks", "enrich", "train"):
            t0 = time.perf_counter()
            if stage == "checks":
                _data_checks(settings, summary)
            else:
                results[stage] = run_stage(stage, settings)  # type: ignore[arg-type]
            timings[stage] = round(time.perf_counter() - t0, 2)
            log.info("nightly: %s finished in %.1f s", stage, timings[stage])
        stage = "gate"
        t0 = time.perf_counter()
        before = published_run(warehouse)
        # The candidate is what publish would publish: the train stage's best run on tonight's inputs.
        candidate = resolve_trained_run(Workspace(settings.workspace)).run_id
        gate = run_gate(
            settings.gate,
            settings.train,
            Workspace(settings.workspace),
            candidate,
            before["train_run_id"] if before else None,
            log,
            PublishedLists(warehouse, before["run_id"], settings.publish) if before else None,
        )
        summary["gate"] = gate.model_dump(mode="json")
        timings["gate"] = round(time.perf_counter() - t0, 2)
        log.info("nightly: gate %s: %s", gate.decision, gate.message)
        stage = "publish"
        if gate.publish:
            t0 = time.perf_counter()
            results["publish"] = run_stage("publish", settings)
            timings["publish"] = round(time.perf_counter() - t0, 2)
            summary["published_run_id"] = results["publish"]["run_id"]
            if before is not None and before["run_id"] != summary["published_run_id"]:
                _stability(summary, warehouse, before["run_id"])
            elif before is None:
                _stability(summary, warehouse, None)
        else:
            results["publish"] = {"status": "held by the gate"}
            summary["published_run_id"] = before["run_id"] if before else None
    except Exception as exc:
        summary |= {"status": "failed", "failed_stage": stage, "message": f"stage {stage}: {exc}"[:2000]}
        with contextlib.suppress(Exception):  # the stage's own error is what matters
            serving = published_run(warehouse)
            summary["published_run_id"] = serving["run_id"] if serving else None
        _finish(settings, summary, started)
        raise NightFailed(summary["message"], summary) from exc
    gate_dict = summary["gate"] or {}
    if not gate_dict.get("publish", True):
        summary |= {"status": "failed", "message": f"quality gate refused: {gate_dict['message']}"}
        _finish(settings, summary, started)
        raise NightFailed(summary["message"], summary)
    summary["status"] = "completed"
    _finish(settings, summary, started)
    return summary


def _stability(summary: dict, warehouse: Path, previous_run_id: str | None) -> None:
    """Churn, coverage and concentration of the lists just published (tasks/quality/stability.py)."""
    from bridgerec.tasks.quality import describe_stability, list_stability

    run_id = summary["published_run_id"]
    try:
        rows = list_stability(warehouse, run_id, previous_run_id)
    except Exception as exc:  # a report: never fail a night that published for it
        get_logger().warning("nightly: could not compute list stability: %s", exc)
        return
    summary["list_stability"] = [r | {"run_id": run_id, "previous_run_id": previous_run_id} for r in rows]
    summary["list_stability_text"] = describe_stability(rows)
    get_logger().info("nightly: %s", summary["list_stability_text"])


def _data_checks(settings: Settings, summary: dict) -> None:
    """Tonight's ingest output against the last checked night's (tasks/quality/datachecks.py): figures in
    the summary (then the warehouse's `data_checks`) and a table artifact; a large drop stops the night."""
    from prefect.artifacts import create_table_artifact

    from bridgerec.storage.workspace import Workspace
    from bridgerec.tasks.quality import DataCheckFailed, check_data

    if not settings.checks.enabled:
        summary["data_checks"] = {"passed": True, "message": "data checks off (checks.enabled)", "rows": []}
        return
    checks = check_data(settings.checks, Workspace(settings.workspace))
    summary["data_checks"] = checks.model_dump(mode="json")
    get_logger().info("nightly: %s", checks.message)
    try:
        create_table_artifact(
            key="nightly-data-checks",
            table=list(checks.rows),
            description=checks.message,
        )
    except Exception as exc:
        get_logger().warning("nightly: could not write the data-checks artifact: %s", exc)
    if not checks.passed:
        raise DataCheckFailed(checks.message)


def _finish(settings: Settings, summary: dict, started: datetime) -> None:
    """The night's final row in `runs` and its nightly-summary artifact (failed nights get one too)."""
    from bridgerec.storage.warehouse import NightRecord

    gate = summary.get("gate") or {}
    train = summary["stages"].get("train") or {}
    _record(
        settings,
        NightRecord(
            run_id=summary["night_id"],
            flow_run_id=summary["flow_run_id"],
            status=summary["status"],
            started_at=started,
            finished_at=datetime.now(UTC),
            model=train.get("model"),
            train_run_id=train.get("run_id"),
            published_run_id=summary.get("published_run_id"),
            gate=gate.get("decision"),
            gate_message=gate.get("message"),
            valid_ndcg10=gate.get("new_ndcg10"),
            published_valid_ndcg10=gate.get("published_ndcg10"),
            popularity_valid_ndcg10=gate.get("popularity_ndcg10"),
            message=summary.get("message"),
            data_checks=(summary.get("data_checks") or {}).get("rows") or None,
            data_checks_passed=(summary.get("data_checks") or {}).get("passed", True),
            list_stability=summary.get("list_stability"),
        ),
    )
    try:
        create_markdown_artifact(
            key="nightly-summary",
            markdown=summary_markdown(summary),
            description=f"bridgerec night {summary['night_id']}: {summary['status']}",
        )
    except Exception as exc:  # the artifact is a convenience; the row above is the record
        get_logger().warning("nightly: could not write the summary artifact: %s", exc)


@flow(name="stage", log_prints=False)
def stage_flow(stage: Stage, config_file: str | None = None, overrides: dict[str, Any] | None = None) -> dict:
    """Run a single stage ad hoc (e.g. republish, or a backfill with other settings)."""
    return run_stage(stage, resolve_settings(config_file, overrides))
