"""Flow: the nightly pipeline. Each stage is a subflow (flows/stage.py); a stage whose inputs and config
are unchanged skips itself (its manifest), a failing stage fails the run and leaves the published
warehouse as it was, and a rerun after a crash resumes from the finished stages. Between train and publish
the quality gate (tasks/quality/gate.py) keeps a worse run from replacing the published one.

Deployed from prefect.yaml (`nightly` on a cron, and one ad-hoc deployment per stage via `stage_flow`);
run in-process by `bridgerec run`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from prefect import flow
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from bridgerec.config import Settings, load_settings
from bridgerec.flows.night import Held, NightSummary, summary_markdown
from bridgerec.flows.stage import TaskRuns, one_cluster, run_name, run_stage, tag_flow_run, workspace_tag
from bridgerec.runtime.errors import is_transient
from bridgerec.runtime.logs import DETAIL, get_logger
from bridgerec.runtime.signals import process_alive, stop_signal, this_process
from bridgerec.stages import STAGE
from bridgerec.storage.warehouse import mark_crashed, published_run, record_night, running_nights
from bridgerec.storage.workspace import Workspace
from bridgerec.tasks.ingest import check_input_files
from bridgerec.tasks.publish import resolve_trained_run
from bridgerec.tasks.quality import (
    DataCheckFailed,
    DataChecks,
    GateResult,
    PublishedLists,
    check_data,
    describe_stability,
    keep_data_snapshot,
    list_stability,
    run_gate,
)
from bridgerec.tasks.report import build_report, collect_night, save_night

Stage = Literal["ingest", "enrich", "train", "publish"]
T = TypeVar("T")

__all__ = ["NightFailed", "NightSummary", "nightly_flow", "stage_flow", "summary_markdown"]


def resolve_settings(config_file: str | None, overrides: dict[str, Any] | None) -> Settings:
    """Config file + env vars, then `overrides` (nested, e.g. {"train": {"epochs": 2}}, or dotted) on top."""
    return load_settings(config_file or None, overrides)


def call_with_retries(stage: str, fn: Callable[[], T], retries: int, delay_s: float) -> T:
    """Run a stage's subflow; retry only transient failures (an engine that fails to start, an I/O
    error, a lost worker), each stage being idempotent and atomic so a retry never sees half of a
    previous attempt. Input, config and contract errors (`InputError`) fail at once: the same file
    gives the same error after any delay. (Prefect's `retry_condition_fn` exists for tasks only; a
    flow's `retries` retry every exception, so the condition is applied here.)"""
    for attempt in range(retries + 1):
        try:
            return fn()
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

    def __init__(self, message: str, summary: NightSummary) -> None:
        super().__init__(message)
        self.summary = summary


def _night_id() -> tuple[str, str | None]:
    """The night's row id in `runs` and its Prefect flow run id (a retry keeps both)."""
    from prefect.runtime import flow_run

    flow_run_id = flow_run.get_id()
    if flow_run_id:
        return f"night-{flow_run_id}", str(flow_run_id)
    return f"night-{datetime.now(UTC):%Y%m%dT%H%M%S}", None


class Night:
    """One night's steps and its summary; every step is timed into `summary.seconds`, and the step that
    raises is the night's `failed_stage`."""

    def __init__(self, settings: Settings, force: Sequence[Stage] = ()) -> None:
        self.settings = settings
        self.force = frozenset(force)
        self.warehouse = settings.warehouse_path
        self.workspace = Workspace(settings.workspace)
        night_id, flow_run_id = _night_id()
        self.summary = NightSummary(
            night_id=night_id,
            flow_run_id=flow_run_id,
            workspace=str(settings.workspace),
            warehouse=str(self.warehouse),
            forced=[stage for stage in STAGE if stage in self.force],  # the night's order
        )
        self.started = datetime.now(UTC)
        self.step = "ingest"
        self.previous_run_id: str | None = None  # the published run before tonight's gate
        self.process = this_process()
        self._mark_crashed()
        self._record()  # 'running'

    @contextlib.contextmanager
    def timed(self, step: str) -> Iterator[None]:
        self.step = step
        t0 = time.perf_counter()
        try:
            yield
        finally:  # a step that fails (or is interrupted) keeps the seconds it ran, for the night's table
            self.summary.seconds[step] = round(time.perf_counter() - t0, 2)
        get_logger().info("nightly: %s finished in %.1f s", step, self.summary.seconds[step], extra=DETAIL)

    def stage(self, name: Stage) -> None:
        """Run a stage's subflow (retrying transient failures) and keep its summary."""
        runtime = self.settings.runtime
        with self.timed(name):
            result = call_with_retries(
                name,
                lambda: run_stage(name, self.settings, force=name in self.force),
                runtime.stage_retries,
                runtime.retry_delay_seconds,
            )
            setattr(self.summary.stages, name, result)
        if name == "publish":
            self.summary.published_run_id = result.run_id

    def data_checks(self) -> None:
        """Tonight's ingest output against the last checked night's (tasks/quality/datachecks.py): figures
        in the summary (then the warehouse's `data_checks`) and a table artifact; a large drop stops it."""
        with self.timed("checks"):
            if not self.settings.checks.enabled:
                off = "data checks off (checks.enabled)"
                self.summary.data_checks = DataChecks(rows=[], passed=True, message=off)
                return
            checks = TaskRuns(concurrent=False).call(check_data, self.settings.checks, self.workspace)
            self.summary.data_checks = checks
            get_logger().info("nightly: %s", checks.message, extra=DETAIL)
            _artifact(
                lambda: create_table_artifact(
                    key="nightly-data-checks", table=list(checks.rows), description=checks.message
                )
            )
            if not checks.passed:
                raise DataCheckFailed(checks.message)

    def quality_gate(self) -> GateResult:
        """The run publish would publish (the train stage's best on tonight's inputs) against the published
        run and popularity; a refused run is held back (`Held`)."""
        with self.timed("gate"):
            before = published_run(self.warehouse)
            best = resolve_trained_run(self.workspace)
            self.summary.best_run_id, self.summary.best_valid_ndcg10 = best.run_id, best.valid_ndcg10
            gate = TaskRuns(concurrent=False).call(  # a task run of its own, as the data checks
                run_gate,
                self.settings.gate,
                self.settings.train,
                self.workspace,
                best.run_id,
                before["train_run_id"] if before else None,
                get_logger(),
                PublishedLists(self.warehouse, before["run_id"], self.settings.publish) if before else None,
            )
            self.summary.gate = gate
            get_logger().info("nightly: gate %s: %s", gate.decision, gate.message, extra=DETAIL)
        self.previous_run_id = before["run_id"] if before else None
        if not gate.publish:
            self.summary.stages.publish = Held()
            self.summary.published_run_id = self.previous_run_id
        return gate

    def list_stability(self) -> None:
        """Churn, coverage and concentration of the lists just published (tasks/quality/stability.py);
        a report: it never fails a night that published."""
        run_id = self.summary.published_run_id
        previous = self.previous_run_id if self.previous_run_id != run_id else None
        if self.previous_run_id is not None and previous is None:
            return  # republished the serving run: nothing changed
        try:
            rows = list_stability(self.warehouse, run_id, previous)
        except Exception as exc:
            get_logger().warning("nightly: could not compute list stability: %s", exc)
            return
        self.summary.list_stability = [r | {"run_id": run_id, "previous_run_id": previous} for r in rows]
        self.summary.list_stability_text = describe_stability(rows)
        get_logger().info("nightly: %s", self.summary.list_stability_text, extra=DETAIL)

    @contextlib.contextmanager
    def failing_on_error(self) -> Iterator[None]:
        """A step that raises fails the night: its row and artifact say which step and why, the serving
        run is read back, and `NightFailed` carries the summary. A stop signal (SIGTERM, SIGINT) fails
        it too, naming the signal, and goes on unwinding (Prefect marks the flow run Crashed); the
        exception carries the summary as `night_summary`."""
        try:
            yield
        except Exception as exc:
            self._fail(f"stage {self.step}: {exc}")
            raise NightFailed(self.summary.message or "", self.summary) from exc
        except BaseException as exc:
            signum = stop_signal(exc)
            if signum is None:
                raise
            self._fail(
                f"stopped by {signum.name} during stage {self.step}; the stages it finished are kept and "
                "the next run resumes from them"
            )
            exc.night_summary = self.summary  # type: ignore[attr-defined]  # for the command line
            raise

    def _fail(self, message: str) -> None:
        self.summary.status, self.summary.failed_stage = "failed", self.step
        self.summary.message = message[:2000]
        with contextlib.suppress(Exception):  # the stage's own error is what matters
            serving = published_run(self.warehouse)
            self.summary.published_run_id = serving["run_id"] if serving else None
        self._finish()

    def finish(self) -> NightSummary:
        """Completed, or failed when the gate refused the night's run (`NightFailed`)."""
        gate = self.summary.gate
        if gate is not None and not gate.publish:
            self.summary.status, self.summary.message = "failed", f"quality gate refused: {gate.message}"
            self._finish()
            raise NightFailed(self.summary.message, self.summary)
        self.summary.status = "completed"
        keep_data_snapshot(self.workspace)  # tonight's data becomes the next night's "last night"
        self._finish()
        return self.summary

    def _finish(self) -> None:
        """The night's final row in `runs`, its report page and its nightly-summary artifact, which links
        the report (failed nights get all three too)."""
        self._record(datetime.now(UTC))
        self._report()
        _artifact(
            lambda: create_markdown_artifact(
                key="nightly-summary",
                markdown=summary_markdown(self.summary),
                description=f"bridgerec night {self.summary.night_id}: {self.summary.status}",
            )
        )
        report = self.summary.report
        if report:
            _artifact(
                lambda: create_link_artifact(
                    key="night-report",
                    link=Path(report).as_uri(),
                    link_text=f"night report {self.summary.night_id}",
                    description="The night's report: quality against popularity across nights, the lists, "
                    "data checks, costs, example users (a self-contained HTML page in the workspace)",
                )
            )

    def _report(self) -> None:
        """The night's record (WORKSPACE/nights/) and report page (WORKSPACE/reports/; tasks/report); a
        report never fails a night."""
        settings = self.settings
        if not settings.report.enabled:
            return
        try:
            record = collect_night(
                self.summary.model_dump(mode="json"),
                self.workspace,
                self.warehouse,
                settings.report,
                settings.train,
                self.started,
            )
            save_night(settings.workspace, record, settings.report.keep)
            page = build_report(settings.workspace, self.summary.night_id, settings.report)
            self.summary.report = str(page.resolve())
        except Exception as exc:
            get_logger().warning("nightly: could not write the night report: %s", exc)

    def _record(self, finished: datetime | None = None) -> None:
        """Write the night's row; a bookkeeping failure never hides the night's own outcome."""
        host, pid, process_started = self.process
        record = dataclasses.replace(
            self.summary.record(self.started, finished),
            host=host,
            pid=pid,
            process_started_at=process_started,
        )
        try:
            record_night(
                self.warehouse, record, storage_compatibility=self.settings.publish.storage_compatibility
            )
        except Exception as exc:
            get_logger().warning("nightly: could not record the night in %s: %s", self.warehouse, exc)

    def _mark_crashed(self) -> None:
        """Earlier nights still recorded 'running' whose process is gone (killed with SIGKILL, a machine
        lost) or whose Prefect flow run has ended: marked 'crashed', saying who found them and why. A
        night whose process may still run (on another machine, say, with no ended flow run) is left."""
        try:
            stale = [n for n in running_nights(self.warehouse) if n["run_id"] != self.summary.night_id]
        except Exception as exc:  # an unreadable warehouse fails the night later, where it is used
            get_logger().warning("nightly: could not look for crashed nights in %s: %s", self.warehouse, exc)
            return
        found = f"found still 'running' by night {self.summary.night_id} at {self.started:%Y-%m-%d %H:%M} UTC"
        messages = {}
        for night in stale:
            why = _why_gone(night)
            if why is not None:
                messages[night["run_id"]] = (
                    f"{why}; {found}. The stages it finished are kept; later nights resume from them"
                )
        if not messages:
            return
        try:
            marked = mark_crashed(
                self.warehouse, messages, storage_compatibility=self.settings.publish.storage_compatibility
            )
        except Exception as exc:
            get_logger().warning("nightly: could not mark crashed nights in %s: %s", self.warehouse, exc)
            return
        for run_id in marked:
            get_logger().warning("nightly: night %s %s", run_id, messages[run_id])


def _why_gone(night: dict[str, Any]) -> str | None:
    """Why a night recorded 'running' is not running any more, or None when it may still be."""
    alive = process_alive(night.get("host"), night.get("pid"), night.get("process_started_at"))
    if alive is False:
        return f"its process (PID {night['pid']} on {night['host']}) is gone"
    if alive is True or not night.get("flow_run_id"):
        return None
    state = _flow_run_state(night["flow_run_id"])
    if state is not None and state.is_final():
        return f"its Prefect flow run {night['flow_run_id']} is {state.name}"
    return None


def _flow_run_state(flow_run_id: str) -> Any:
    """The state of a flow run on the current Prefect API, or None when it is not there to ask."""
    from uuid import UUID

    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            return client.read_flow_run(UUID(flow_run_id)).state
    except Exception:  # not on this API (another server, a temporary one since gone), or unreachable
        return None


def _artifact(create: Callable[[], object]) -> None:
    """Artifacts are a convenience for ops; the warehouse row is the record."""
    try:
        create()
    except Exception as exc:
        get_logger().warning("nightly: could not write an artifact: %s", exc)


def _night_run_name() -> str:
    """`night 2026-12-06 02:00:13 UTC (force: train)`: the night's flow run name (flows/stage.py `run_name`)."""
    from prefect.runtime import flow_run

    return run_name("night", [str(s) for s in (flow_run.parameters or {}).get("force") or ()])


@flow(name="nightly", flow_run_name=_night_run_name, log_prints=False)
def nightly_flow(
    config_file: str | None = None,
    overrides: dict[str, Any] | None = None,
    force: list[Stage] | None = None,
) -> NightSummary:
    """ingest -> data checks -> enrich -> train -> quality gate -> publish; unchanged stages skip themselves.

    `force` names stages rebuilt even on unchanged inputs (`bridgerec run --force train`; a deployment's
    parameter, e.g. a weekly run with `force: [train]`: a forced train starts cold, the periodic cold
    retrain that warm starts need). The stages after a forced one rerun where its output changed; the
    quality gate still decides whether the result is published. Prefect checks the names against
    `Stage` before the flow starts (ParameterTypeError: "force.0: Input should be 'ingest', ...").

    The night is one row of the warehouse's `runs` (kind 'night'): 'running' at the start, 'completed'
    or 'failed' at the end. A stage failure or a refusal by the gate raises NightFailed (the flow run is
    Failed: what automations key on) after writing the row and the nightly-summary artifact."""
    settings = resolve_settings(config_file, overrides)
    tag_flow_run(workspace_tag(settings))
    if not settings.workspace.exists():
        # A first night whose inputs are missing fails here, before its workspace and its row are made;
        # on later nights a missing export is that night's recorded failure (as from `bridgerec run`).
        check_input_files(settings.ingest)
    # One writer per workspace: a second night (cron overlapping a slow one) stops here, before its row.
    with Workspace(settings.workspace).writing("nightly"):
        night = Night(settings, force or ())
        with night.failing_on_error(), one_cluster(settings.runtime):  # runtime.runner: ray: one cluster
            night.stage("ingest")
            night.data_checks()
            night.stage("enrich")
            night.stage("train")
            if night.quality_gate().publish:
                night.stage("publish")
                night.list_stability()
        return night.finish()


@flow(name="stage", log_prints=False)
def stage_flow(
    stage: Stage, config_file: str | None = None, overrides: dict[str, Any] | None = None, force: bool = False
) -> Any:
    """Run a single stage ad hoc (e.g. republish, or a backfill with other settings); `force` rebuilds it
    on unchanged inputs (a train starts cold)."""
    settings = resolve_settings(config_file, overrides)
    tag_flow_run(workspace_tag(settings))
    return run_stage(stage, settings, force=force)
