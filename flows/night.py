"""The night's summary (`NightSummary`): what `bridgerec run` prints (markdown, or `--json`), what the
nightly-summary artifact shows, and what the warehouse's `runs` row of the night records."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from bridgerec.storage.warehouse import NightRecord
from bridgerec.tasks.enrich import EnrichSummary
from bridgerec.tasks.ingest import IngestSummary
from bridgerec.tasks.publish import PublishSummary
from bridgerec.tasks.quality import DataChecks, GateResult, change_text
from bridgerec.tasks.train import TrainSummary


class Held(BaseModel):
    """Publish did not run: the gate held the night's run back."""

    status: Literal["held by the gate"] = "held by the gate"


class NightStages(BaseModel):
    """Each stage's summary, for the stages that ran (or skipped themselves) tonight."""

    ingest: IngestSummary | None = None
    enrich: EnrichSummary | None = None
    train: TrainSummary | None = None
    publish: PublishSummary | Held | None = None


class NightSummary(BaseModel):
    """One night: its stages, the data checks, the gate's decision, what serves now. `seconds` holds
    each step's wall time (ingest, checks, enrich, train, gate, publish)."""

    night_id: str
    flow_run_id: str | None = None
    status: Literal["running", "completed", "failed"] = "running"
    stages: NightStages = Field(default_factory=NightStages)
    seconds: dict[str, float] = Field(default_factory=dict)
    data_checks: DataChecks | None = None
    gate: GateResult | None = None
    published_run_id: str | None = None
    list_stability: list[dict[str, Any]] | None = None
    list_stability_text: str | None = None
    failed_stage: str | None = None
    message: str | None = None
    workspace: str
    warehouse: str
    report: str | None = None  # the night report's HTML page (tasks/report), when written
    forced: list[str] = Field(default_factory=list)  # stages rebuilt on unchanged inputs (`force`)
    # The train stage's best run on tonight's inputs (what the gate judges and publish publishes), with its
    # validation NDCG@10 from the leaderboard: not tonight's run where an earlier one on the same inputs
    # scored higher.
    best_run_id: str | None = None
    best_valid_ndcg10: float | None = None

    @property
    def held(self) -> bool:
        """The quality gate held tonight's run back (nothing else failed): the serving run is unchanged."""
        return self.failed_stage is None and self.gate is not None and not self.gate.publish

    def unchanged_ndcg10(self) -> float | None:
        """On a night the gate scored nothing (`unchanged`: the published run is still the best on its
        inputs), that run's own validation NDCG@10 (full ranking): the morning read's headline and the
        night row's `valid_ndcg10`, so a trend read from `nights` has no gap; None otherwise. Tonight's
        train run is that run only where it is the best: a run trained tonight that scored lower (a
        forced retrain, other settings) is not what serves, so the figure is then the best run's from
        the leaderboard (a new user's trial saw tonight's lower figure reported as the served run's)."""
        gate, train = self.gate, self.stages.train
        if gate is None or gate.decision != "unchanged" or train is None:
            return None
        if self.best_run_id is not None and train.run_id != self.best_run_id:
            return self.best_valid_ndcg10
        figure = train.valid.get("full", train.valid).get("overall", {}).get("ndcg@10")
        return float(figure) if figure is not None else None

    def record(self, started: datetime, finished: datetime | None = None) -> NightRecord:
        """The night's row in the warehouse's `runs`."""
        gate, train, checks = self.gate, self.stages.train, self.data_checks
        valid = gate.new_ndcg10 if gate else None  # the gate's score of the night's run
        if valid is None:
            valid = self.unchanged_ndcg10()  # the gate scored nothing: the published run's own figure
        return NightRecord(
            run_id=self.night_id,
            flow_run_id=self.flow_run_id,
            status=self.status,
            started_at=started,
            finished_at=finished,
            model=train.model if train else None,
            train_run_id=train.run_id if train else None,
            published_run_id=self.published_run_id,
            gate=gate.decision if gate else None,
            gate_message=gate.message if gate else None,
            valid_ndcg10=valid,
            published_valid_ndcg10=gate.published_ndcg10 if gate else None,
            popularity_valid_ndcg10=gate.popularity_ndcg10 if gate else None,
            message=self.message,
            data_checks=(checks.rows or None) if checks else None,
            data_checks_passed=checks.passed if checks else True,
            list_stability=self.list_stability,
        )


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _stage_row(summary: NightSummary, stage: str) -> str:
    """One row of the stages table: what the stage did, its seconds and the count that says how much it
    made or holds, with what it counts (enrich counts tonight's work, the others what they hold)."""
    seconds = f"{summary.seconds.get(stage, 0):.1f}"
    r = getattr(summary.stages, stage)
    if r is None:
        return f"| {stage} | {'failed' if summary.failed_stage == stage else 'not run'} | {seconds} | |"
    if isinstance(r, Held):
        return f"| {stage} | {r.status} | {seconds} | |"
    count: str = {
        "ingest": lambda: f"{r.interactions:,} interactions",
        "enrich": lambda: f"{r.items_embedded:,} items embedded, {r.profiles_generated:,} profiles written",
        "train": lambda: f"{r.users:,} users",
        "publish": lambda: f"{r.rows:,} rows",
    }[stage]()
    did = "skipped (unchanged)" if r.skipped else ("did (forced)" if stage in summary.forced else "did")
    return f"| {stage} | {did} | {seconds} | {count} |"


def _headlines(summary: NightSummary) -> list[str]:
    """The bullets under the table: the run, its metric against the published run and popularity, the
    checks, list stability, the gate, the failure, what serves now."""
    gate, train, lines = summary.gate, summary.stages.train, []
    if train is not None and train.run_id:
        lines.append(f"- run `{train.run_id}` ({train.model}, {train.init or 'cold'} start)")
        if summary.best_run_id and summary.best_run_id != train.run_id:
            tonight = train.valid.get("full", train.valid).get("overall", {}).get("ndcg@10")
            best = summary.best_valid_ndcg10
            if tonight is not None and best is not None and _fmt(tonight) == _fmt(best):
                lines.append(
                    f"- it ties the best run on these inputs, `{summary.best_run_id}`, trained earlier on the "
                    f"same inputs ({_fmt(best)} on validation; a tie keeps the earlier run): the gate judges "
                    f"and publish publishes `{summary.best_run_id}`"
                )
            else:
                lines.append(
                    f"- it is not the best run on these inputs: `{summary.best_run_id}`, trained earlier on "
                    f"the same inputs, scored {_fmt(best)} on validation against its {_fmt(tonight)}; the "
                    f"gate judges and publish publishes `{summary.best_run_id}`"
                )
    if gate is not None and gate.new_ndcg10 is not None:
        new, published = gate.new_ndcg10, gate.published_ndcg10
        change = (
            f", {change_text(new, published)} against the published run scored again on tonight's users "
            f"({_fmt(published)})"
            if published is not None
            else ""
        )
        lines.append(
            f"- validation NDCG@10 (full ranking) {_fmt(new)}{change}; popularity floor "
            f"{_fmt(gate.popularity_ndcg10)} (the same users)"
        )
    elif (figure := summary.unchanged_ndcg10()) is not None:  # the gate scored nothing
        lines.append(
            f"- validation NDCG@10 (full ranking) {_fmt(figure)}: the published run's, its inputs unchanged "
            "(not scored again)"
        )
    if summary.data_checks is not None:
        lines.append(f"- {summary.data_checks.message}")
    if summary.list_stability_text:
        lines.append(f"- {summary.list_stability_text}")
    if gate is not None:
        lines.append(f"- gate: **{gate.decision}**: {gate.message}")
        if gate.churn:
            figures = ", ".join(f"{d} {c:.0%}" for d, c in sorted(gate.churn.items()))
            lines.append(f"- lists would change by (mean per user): {figures}; {gate.churn_note}")
    if summary.message:
        lines.append(f"- failed: {summary.message}")
    lines.append(f"- serving: run `{summary.published_run_id or 'none'}`")
    return lines


def summary_markdown(summary: NightSummary) -> str:
    """The morning read: one table of the stages, the headline metric and its change, the gate's
    decision, the night report (a Markdown link), where to look next. The nightly-summary artifact shows
    it; `bridgerec run` prints `summary_sections` with the report's path as plain text between them."""
    head, tail = summary_sections(summary)
    report = (
        f"- night report: [{summary.report}]({Path(summary.report).as_uri()})\n" if summary.report else ""
    )
    return f"{head}\n{report}\n{tail}"


def summary_sections(summary: NightSummary) -> tuple[str, str]:
    """`summary_markdown` less its report bullet, in two parts: the title, the stages' table and the
    headline bullets; then the `Next:` paragraph (and how to publish a refused run)."""
    head = "completed" if summary.status == "completed" else "FAILED"
    lines = [
        f"# bridgerec nightly run {summary.night_id}: {head}",
        "",
        "| stage | did | seconds | count |",
        "|---|---|---:|---|",
        _stage_row(summary, "ingest"),
    ]
    if summary.data_checks is not None:
        state = "passed" if summary.data_checks.passed else "STOPPED the night"
        lines.append(f"| data checks | {state} | {summary.seconds.get('checks', 0):.1f} | |")
    lines += [_stage_row(summary, "enrich"), _stage_row(summary, "train")]
    if summary.gate is not None:
        lines.append(f"| quality gate | {summary.gate.decision} | {summary.seconds.get('gate', 0):.1f} | |")
    lines += [_stage_row(summary, "publish"), "", *_headlines(summary)]
    tail = [
        f"Next: `bridgerec runs list --warehouse {summary.warehouse}`; Prefect artifacts "
        f"(data quality, train metrics); workspace `{summary.workspace}`."
    ]
    if summary.gate is not None and summary.gate.decision == "refused":
        tail.append(
            f"To publish the refused run anyway: `bridgerec publish --config FILE --run-id "
            f"{summary.gate.new_run_id}` (FILE: the config the night ran with, so the same workspace, "
            "warehouse and publish settings)."
        )
    return "\n".join(lines), "\n".join(tail)
