"""The DuckDB warehouse: migrations, atomic publish, failure leaves it untouched, retention, run status,
serialised writers, parameters bound (never pasted) in SQL."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from bridgerec.storage import warehouse as wh


def make_batch(
    run_id: str, users: int = 5, k: int = 3, domains: tuple[str, ...] = ("a", "b")
) -> wh.PublishBatch:
    item_ids = [f"{d}{i}" for d in domains for i in range(k + 2)]
    rows = [
        {"user_id": f"u{u}", "domain": d, "rank": r, "item_id": f"{d}{r}", "score": float(10 - r)}
        for u in range(users)
        for d in domains
        for r in range(1, k + 1)
    ]
    recs = pa.Table.from_pylist(
        rows,
        schema=pa.schema(
            [
                ("user_id", pa.string()),
                ("domain", pa.string()),
                ("rank", pa.int16()),
                ("item_id", pa.string()),
                ("score", pa.float32()),
            ]
        ),
    )
    items = pa.table(
        {
            "item_id": item_ids,
            "domain": [i[0] for i in item_ids],
            "title": [f"title of {i} ({run_id})" for i in item_ids],
            "brand": [None] * len(item_ids),
            "categories": [None] * len(item_ids),
            "price": [None] * len(item_ids),
        }
    )
    metrics = pa.table(
        {
            "model": ["m", "m"],
            "split": ["test", "test"],
            "protocol": ["sampled", "full"],
            "domain": ["all", "all"],
            "user_group": ["all", "all"],
            "metric": ["ndcg@10", "ndcg@10"],
            "value": [0.3, 0.05],
            "users": pa.array([users, users], pa.int64()),
        }
    )
    profiles = pa.table({"user_id": ["u0", "u1"], "profile_text": [f"likes a ({run_id})", None]})
    run = wh.RunRecord(run_id, datetime.now(UTC), model="m", k=k, n_users=users, n_domains=len(domains))
    return wh.PublishBatch(run, recs, items, metrics, profiles)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def query(path: Path, sql: str, params: list | None = None) -> list[tuple]:
    with duckdb.connect(str(path), read_only=True) as con:
        return con.execute(sql, params or []).fetchall()


def test_fresh_warehouse_is_migrated_and_published(tmp_path: Path) -> None:
    path = tmp_path / "w.duckdb"
    res = wh.publish(path, make_batch("r1"), retention_runs=3)
    assert res.rows == 5 * 2 * 3 and res.seq == 1 and res.purged_runs == []
    assert query(path, "SELECT version, name FROM schema_migrations ORDER BY 1") == [
        (1, "core tables"),
        (2, "latest views"),
        (3, "profile interests"),
        (4, "nights in runs"),
        (5, "crashed nights"),
    ]
    assert query(path, "SELECT count(*), count(DISTINCT user_id) FROM latest_recommendations") == [(30, 5)]
    assert query(
        path, "SELECT title FROM latest_recommendations WHERE user_id='u0' AND domain='a' AND rank=1"
    ) == [("title of a1 (r1)",)]
    assert query(path, "SELECT protocol, value FROM latest_metrics ORDER BY 1") == [
        ("full", 0.05),
        ("sampled", 0.3),
    ]
    assert query(path, "SELECT user_id, profile_text, cluster_summaries FROM latest_user_profiles") == [
        ("u0", "likes a (r1)", None)  # an enrich stage without interests: the column stays empty
    ]
    (run,) = query(path, "SELECT run_id, status, seq, n_recommendations, finished_at IS NOT NULL FROM runs")
    assert run == ("r1", "completed", 1, 30, True)
    # Nothing but the warehouse and its lock file is left beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.duckdb", "w.duckdb.lock"]


def test_old_schema_is_upgraded_in_place_keeping_data(tmp_path: Path) -> None:
    path = tmp_path / "w.duckdb"
    con = duckdb.connect(str(path))
    assert wh.migrate(con, upto=1) == [1]
    con.execute("INSERT INTO runs (run_id, status, started_at) VALUES ('old', 'failed', now())")
    con.close()
    wh.publish(path, make_batch("r1"), retention_runs=3)
    assert query(path, "SELECT max(version) FROM schema_migrations") == [(wh.SCHEMA_VERSION,)]
    assert query(path, "SELECT run_id FROM runs ORDER BY run_id") == [("old",), ("r1",)]
    assert query(path, "SELECT DISTINCT run_id FROM latest_recommendations") == [("r1",)]


def test_warehouse_from_a_newer_bridgerec_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.duckdb"
    wh.publish(path, make_batch("r1"), retention_runs=3)
    con = duckdb.connect(str(path))
    con.execute("INSERT INTO schema_migrations VALUES (99, 'future', now())")
    con.close()
    before = digest(path)
    with pytest.raises(wh.WarehouseError, match="newer than this bridgerec"):
        wh.publish(path, make_batch("r2"), retention_runs=3)
    assert digest(path) == before


def test_failed_publish_leaves_the_warehouse_byte_for_byte(tmp_path: Path) -> None:
    path = tmp_path / "w.duckdb"
    wh.publish(path, make_batch("r1"), retention_runs=3)
    before = digest(path)
    bad = make_batch("r2")
    # A null metric breaks a NOT NULL constraint after the recommendations and items went in: the copy
    # is dropped.
    bad.metrics = bad.metrics.set_column(6, "value", pa.array([0.3, None], pa.float64()))
    with pytest.raises(duckdb.ConstraintException):
        wh.publish(path, bad, retention_runs=3)
    assert digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.duckdb", "w.duckdb.lock"]
    assert query(path, "SELECT run_id FROM runs") == [("r1",)]


def test_retention_keeps_last_n_runs_data_and_all_history(tmp_path: Path) -> None:
    path = tmp_path / "w.duckdb"
    purged = [wh.publish(path, make_batch(f"r{i}"), retention_runs=2).purged_runs for i in range(1, 5)]
    assert purged == [[], [], ["r1"], ["r2"]]
    assert query(path, "SELECT DISTINCT run_id FROM recommendations ORDER BY 1") == [("r3",), ("r4",)]
    assert query(path, "SELECT DISTINCT run_id FROM user_profiles ORDER BY 1") == [("r3",), ("r4",)]
    assert query(path, "SELECT count(DISTINCT run_id) FROM metrics") == [(4,)]  # history stays
    runs = wh.list_runs(path)
    assert [(r["run_id"], r["retained"]) for r in runs] == [
        ("r4", True),
        ("r3", True),
        ("r2", False),
        ("r1", False),
    ]
    assert query(path, "SELECT run_id FROM latest_run") == [("r4",)]
    # The catalogue keeps the latest title of every item.
    assert query(path, "SELECT title FROM items WHERE item_id = 'a1'") == [("title of a1 (r4)",)]


def test_run_status_is_recorded_atomically_and_completed_only_by_publish(tmp_path: Path) -> None:
    path = tmp_path / "w.duckdb"
    wh.record_run_status(path, "nightly-1", "running", model="m")
    assert query(path, "SELECT status, finished_at FROM runs") == [("running", None)]
    assert query(path, "SELECT count(*) FROM latest_run") == [(0,)]  # nothing completed yet
    batch = make_batch("nightly-1")
    wh.publish(path, batch, retention_runs=3)
    assert query(path, "SELECT status, model FROM runs") == [("completed", "m")]
    with pytest.raises(wh.WarehouseError, match="already completed"):
        wh.record_run_status(path, "nightly-1", "failed", message="late")
    with pytest.raises(ValueError, match="publish sets 'completed'"):
        wh.record_run_status(path, "nightly-2", "completed")
    wh.record_run_status(path, "nightly-2", "running")
    wh.record_run_status(path, "nightly-2", "failed", message="train diverged")
    assert query(
        path, "SELECT status, message, finished_at IS NOT NULL FROM runs WHERE run_id = 'nightly-2'"
    ) == [("failed", "train diverged", True)]
    assert query(path, "SELECT run_id FROM latest_run") == [("nightly-1",)]


def test_republishing_a_run_replaces_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "w.duckdb"
    wh.publish(path, make_batch("r1", k=3), retention_runs=3)
    wh.publish(path, make_batch("r1", k=2), retention_runs=3)
    assert query(path, "SELECT count(*), max(rank) FROM recommendations") == [(5 * 2 * 2, 2)]
    assert query(path, "SELECT count(*), max(seq) FROM runs") == [(1, 2)]


def test_concurrent_writers_queue_on_the_lock_and_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "w.duckdb"
    wh.publish(path, make_batch("r0"), retention_runs=3)
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            wh.record_run_status(path, f"run-{i}", "running")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    # Without the lock, writers copying the same base would overwrite each other's rows.
    assert query(path, "SELECT count(*) FROM runs WHERE status = 'running'") == [(6,)]


def test_user_input_is_bound_as_parameters(tmp_path: Path) -> None:
    path = tmp_path / "w.duckdb"
    batch = make_batch("r1")
    evil = "o'brien\"; DROP TABLE runs; --"
    ids = batch.recommendations["user_id"].to_pylist()
    batch.recommendations = batch.recommendations.set_column(
        0, "user_id", pa.array([evil if u == "u1" else u for u in ids], pa.string())
    )
    wh.publish(path, batch, retention_runs=3)
    got = wh.user_recommendations(path, evil, domain="b")
    assert got["user_id"] == evil and list(got["recommendations"]) == ["b"]
    assert [r["rank"] for r in got["recommendations"]["b"]] == [1, 2, 3]
    assert wh.user_recommendations(path, "u0")["profile"] == "likes a (r1)"
    with pytest.raises(wh.WarehouseError, match="no recommendations"):
        wh.user_recommendations(path, "nobody' OR '1'='1")
    with pytest.raises(wh.WarehouseError, match="no domain 'c'"):
        wh.user_recommendations(path, "u0", domain="c")
    with pytest.raises(wh.WarehouseError, match="does not exist"):
        wh.user_recommendations(tmp_path / "missing.duckdb", "u0")
    assert query(path, "SELECT count(*) FROM runs") == [(1,)]


KILLED_WRITER = """
import sys
sys.path[:0] = sys.argv[3:]
from test_publish_warehouse import make_batch
from bridgerec.storage import warehouse as wh
wh.publish(sys.argv[1], make_batch(sys.argv[2], users=60_000, k=20), retention_runs=3)
"""


def test_writer_killed_mid_publish_leaves_the_warehouse_whole(tmp_path: Path) -> None:
    path = tmp_path / "w.duckdb"
    wh.publish(path, make_batch("r1"), retention_runs=3)
    before = digest(path)
    repo = Path(__file__).resolve().parents[1]
    writer = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(path), "r2", str(repo / "tests"), str(repo)]
    )
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".w.duckdb.*.tmp")):  # the writer's copy exists: it is mid-publish
        assert writer.poll() is None, "the writer ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.3)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert digest(path) == before  # the live file never saw the killed writer
    assert query(path, "SELECT run_id FROM latest_run") == [("r1",)]
    assert list(tmp_path.glob(".w.duckdb.*.tmp*"))  # its copy is left behind ...
    wh.publish(path, make_batch("r3"), retention_runs=3)  # ... and the next writer removes it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.duckdb", "w.duckdb.lock"]
    assert query(path, "SELECT run_id FROM runs ORDER BY seq") == [("r1",), ("r3",)]
