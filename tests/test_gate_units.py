"""The night's record in the warehouse and the quality gate's decision, without training anything: real
DuckDB files, the gate's pure decision function, and the popularity floor on the ingested sample."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest

from bridgerec.storage import warehouse as wh
from bridgerec.tasks.quality import GateSettings
from bridgerec.tasks.quality.gate import decide


def _night(status: str, **kw: object) -> wh.NightRecord:
    return wh.NightRecord("night-f1", "f1", status, kw.pop("started_at", datetime.now(UTC)), **kw)  # type: ignore[arg-type]


def test_a_night_is_one_row_from_running_to_its_end_also_after_a_retry(tmp_path: Path) -> None:
    path = tmp_path / "wh.duckdb"
    t0 = datetime(2026, 11, 29, 2, 0, tzinfo=UTC)
    wh.record_night(path, _night("running", started_at=t0))
    with duckdb.connect(str(path), read_only=True) as con:
        assert con.execute("SELECT status, attempts, finished_at FROM nights").fetchall() == [
            ("running", 1, None)
        ]
    wh.record_night(
        path,
        _night("failed", started_at=t0, finished_at=t0 + timedelta(minutes=5), message="stage enrich: boom"),
    )
    # `prefect flow-run retry`: same flow run, same row; the retry's outcome replaces the failure.
    wh.record_night(path, _night("running", started_at=t0 + timedelta(hours=7)))
    wh.record_night(
        path,
        _night(
            "completed",
            started_at=t0 + timedelta(hours=7),
            finished_at=t0 + timedelta(hours=7, minutes=9),
            train_run_id="llm4cdsr-abc",
            published_run_id="llm4cdsr-abc",
            gate="first",
            valid_ndcg10=0.1,
            data_checks=[{"entity": "users", "domain": "food", "count": 10, "previous": None}],
        ),
    )
    with duckdb.connect(str(path), read_only=True) as con:
        rows = con.execute(
            "SELECT run_id, flow_run_id, status, attempts, started_at, message, gate, train_run_id FROM nights"
        ).fetchall()
        latest = con.execute("SELECT count(*) FROM latest_run").fetchall()[0][0]
    assert rows == [("night-f1", "f1", "completed", 2, t0, None, "first", "llm4cdsr-abc")]
    assert latest == 0  # a night is not a published run
    with duckdb.connect(str(path), read_only=True) as con:
        checks = con.execute(
            "SELECT night_id, entity, domain, count, previous, passed FROM data_checks"
        ).fetchall()
    assert checks == [("night-f1", "users", "food", 10, None, True)]
    listed = wh.list_runs(path)
    assert listed[0]["kind"] == "night" and listed[0]["status"] == "completed" and not listed[0]["retained"]
    with pytest.raises(ValueError, match="status"):
        wh.record_night(path, _night("skipped"))


def test_migration_4_keeps_old_failed_nights_as_nights(tmp_path: Path) -> None:
    path = tmp_path / "wh.duckdb"
    con = duckdb.connect(str(path))
    wh.migrate(con, upto=3)
    con.execute(
        "INSERT INTO runs (run_id, status, started_at, message) VALUES ('nightly-x', 'failed', now(), 'stage train: x')"
    )
    con.close()
    with wh.rewrite(path) as (
        con,
        _,
    ):  # a night's record: up to 5; moving rows into parts waits for a publish
        assert wh.schema_version(con) == wh.PARTS_VERSION - 1
    with duckdb.connect(str(path), read_only=True) as con:
        assert con.execute("SELECT run_id, status FROM nights").fetchall() == [("nightly-x", "failed")]


GATE = GateSettings(max_drop=0.05)


def test_gate_decisions() -> None:
    within = decide(GATE, 0.1150, 0.1203, 0.05, "new", "old")
    assert within.decision == "passed" and within.publish and "-0.0053" in within.message
    worse = decide(GATE, 0.1000, 0.1203, 0.05, "new", "old")
    assert (worse.decision, worse.publish) == ("refused", False)
    assert "0.0203 (16.9%) below the published run old (0.1203)" in worse.message
    floor = decide(GATE, 0.04, None, 0.05, "new", None)
    assert floor.decision == "refused" and "below the popularity floor 0.0500 by 0.0100" in floor.message
    first = decide(GATE, 0.06, None, 0.05, "new", None)
    assert (first.decision, first.publish) == ("first", True)
    no_floor = decide(GateSettings(popularity_floor=False), 0.04, None, 0.05, "new", None)
    assert no_floor.publish


def _publish(path: Path, run_id: str, lists: dict[str, list[str]]) -> None:
    import pyarrow as pa

    rows = [
        (u, "kitchen", r + 1, item, 1.0 - r / 10)
        for u, items in lists.items()
        for r, item in enumerate(items)
    ]
    recs = pa.table(
        {
            "user_id": [r[0] for r in rows],
            "domain": [r[1] for r in rows],
            "rank": pa.array([r[2] for r in rows], pa.int16()),
            "item_id": [r[3] for r in rows],
            "score": pa.array([r[4] for r in rows], pa.float32()),
        }
    )
    names = [f"i{n}" for n in range(10)]
    items = pa.table(
        {
            "item_id": names,
            "domain": ["kitchen"] * 10,
            "title": names,
            "brand": [None] * 10,
            "categories": [None] * 10,
            "price": [None] * 10,
        },
        schema=pa.schema(
            [
                ("item_id", pa.string()),
                ("domain", pa.string()),
                ("title", pa.string()),
                ("brand", pa.string()),
                ("categories", pa.string()),
                ("price", pa.string()),
            ]
        ),
    )
    wh.publish(path, wh.PublishBatch(wh.RunRecord(run_id, datetime.now(UTC)), recs, items), retention_runs=3)


def test_list_stability_churn_coverage_and_concentration(tmp_path: Path) -> None:
    from bridgerec.tasks.quality import describe_stability, list_stability

    path = tmp_path / "wh.duckdb"
    _publish(path, "a", {"u1": ["i0", "i1", "i2", "i3"], "u2": ["i0", "i1", "i2", "i3"]})
    _publish(
        path,
        "b",
        {"u1": ["i0", "i1", "i2", "i3"], "u2": ["i0", "i5", "i6", "i7"], "u3": ["i0", "i8", "i1", "i2"]},
    )
    (row,) = list_stability(path, "b", "a")
    assert row["users_compared"] == 2 and row["mean_changed"] == 0.375  # u1 kept all, u2 changed 3 of 4
    assert (row["p50_changed"], row["distinct_items"], row["catalogue_items"]) == (0.375, 8, 10)
    assert row["coverage"] == 0.8 and row["top_item_id"] == "i0" and row["top_item_share"] == 1.0
    assert "38% of each list changed" in describe_stability([row])
    (first,) = list_stability(path, "a", None)
    assert first["mean_changed"] is None and first["users_compared"] == 0


def _night_after_training(run_id: str, valid_full: float):  # -> NightSummary
    """A completed night whose train stage trained `run_id` (validation NDCG@10, full: `valid_full`)."""
    from bridgerec.flows.night import NightSummary
    from bridgerec.tasks.train import TrainSummary

    train = TrainSummary(
        run_id=run_id, model="llm4cdsr-hybrid", epochs=4, best_epoch=4, epoch_seconds=1.0,
        eval_seconds=1.0, train_seconds=8.0, valid={"full": {"overall": {"ndcg@10": valid_full}}}, test={},
        users=10, peak_rss_mb=1.0,
    )  # fmt: skip
    night = NightSummary(night_id="n", workspace="ws", warehouse="w.duckdb", status="completed")
    night.stages.train = train
    return night


def test_the_morning_read_says_when_tonights_run_is_not_the_one_judged() -> None:
    """The train stage picks the best run on tonight's inputs; where an earlier run on the same inputs
    scored higher than tonight's (a rerun with other settings), the summary says which run the gate judged
    and publish published, with both validation figures, instead of naming tonight's run alone."""
    from bridgerec.flows.night import summary_markdown

    night = _night_after_training("tonight", 0.0582)
    night.best_run_id, night.best_valid_ndcg10 = "earlier", 0.0621
    md = summary_markdown(night)
    assert "- it is not the best run on these inputs: `earlier`" in md
    assert "scored 0.0621 on validation against its 0.0582" in md
    assert "| train | did | 0.0 | 10 users |" in md  # each count says what it counts
    # A tie goes to the earlier run, and the line says so (a new user's trial: "not the best ... scored
    # 0.0602 ... against its 0.0602").
    night.best_valid_ndcg10 = 0.05821
    md = summary_markdown(night)
    assert "not the best run" not in md
    assert "- it ties the best run on these inputs, `earlier`" in md and "a tie keeps the earlier run" in md
    night.best_run_id = "tonight"
    assert "not the best run" not in summary_markdown(night) and "ties" not in summary_markdown(night)


def test_an_unchanged_night_reports_the_served_runs_figure_not_tonights() -> None:
    """Gate `unchanged`: the best run on tonight's inputs is the published one. Where tonight's train run
    is another that scored lower (a forced retrain, a rerun with other settings), the night's figure (its
    headline and `nights.valid_ndcg10`) is the served run's, not tonight's (a new user's trial saw 0.0588,
    tonight's weaker run, reported as the published run's 0.0602)."""
    from bridgerec.flows.night import summary_markdown
    from bridgerec.tasks.quality import GateResult

    night = _night_after_training("weaker", 0.0588)
    night.best_run_id, night.best_valid_ndcg10 = "served", 0.0602
    night.gate = GateResult(
        decision="unchanged", publish=True, message="run served is the published one", new_run_id="served",
        published_run_id="served",
    )  # fmt: skip
    assert night.unchanged_ndcg10() == 0.0602
    assert "0.0602: the published run's" in summary_markdown(night)
    assert night.record(datetime.now(UTC)).valid_ndcg10 == 0.0602
    night.best_run_id = "weaker"  # tonight's run is the best and the published one: its own figure
    assert night.unchanged_ndcg10() == 0.0588


def test_a_change_that_rounds_to_nothing_says_so() -> None:
    from bridgerec.tasks.quality import change_text

    assert change_text(0.04123, 0.04) == "+0.0012 (+3.1%)"
    assert change_text(0.0621, 0.06212) == "the same to 4 digits"  # not "-0.0000 (-0.0%)"
    assert change_text(0.05, None) == "n/a"


def test_the_alert_command_explains_itself_and_refuses_what_would_be_lost(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`python -m bridgerec.flows.alerts --help` prints its usage and saves nothing (it took "--help" for
    the webhook URL and created the block and automation on a temporary server); without a Prefect
    server (PREFECT_API_URL) or with a URL that is not https it says so on one line, exit 2."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from bridgerec.flows.alerts import main

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0 and "PREFECT_API_URL" in capsys.readouterr().out
    assert main(["http://hooks.example/x"]) == 2
    assert capsys.readouterr().err.startswith("error: 'http://hooks.example/x' is not an https webhook URL")
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["https://hooks.slack.com/services/T000/B000/XXXX"]) == 2
    assert capsys.readouterr().err.startswith("error: PREFECT_API_URL is not set")


def test_the_report_of_an_unchanged_night_says_the_lists_did_not_change(tmp_path: Path) -> None:
    """A night whose publish skipped itself (the serving run is still the best) wrote no lists: its report
    says the lists are unchanged, not that "the first published run has nothing to compare with" (a new
    user's trial read that on its ninth night)."""
    from bridgerec.storage.workspace import Workspace
    from bridgerec.tasks.report import ReportSettings, collect_night
    from bridgerec.tasks.train import TrainSettings

    summary = {
        "night_id": "night-9",
        "stages": {"train": None, "publish": {"run_id": "served", "skipped": True}},
        "published_run_id": "served",
        "list_stability": None,
    }

    def why_no_churn() -> str:
        args = (Workspace(tmp_path), tmp_path / "w.duckdb", ReportSettings(), TrainSettings())
        record = collect_night(summary, *args, datetime.now(UTC))
        return str(record["figures"]["missing"]["churn_histogram"])

    assert "unchanged tonight" in why_no_churn()
    summary["stages"]["publish"] = None  # a night that stopped before publishing
    assert why_no_churn() == "nothing published tonight"
