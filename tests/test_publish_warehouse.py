"""The warehouse (a small DuckDB file of tables and views over the night's Parquet parts): migrations,
atomic registration, a failure leaves it untouched and its parts cleaned, retention with a grace period,
run status, serialised writers, parameters bound (never pasted) in SQL, a killed writer, views that
work from any working directory and after the folder moved, time travel by run id."""

from __future__ import annotations

import hashlib
import itertools
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
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
        (6, "parts catalogue"),
        (7, "rows in parquet parts"),
        (8, "history rows"),
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
    assert query(
        path, "SELECT user_id, domain, item_ids, scores FROM latest_serving WHERE user_id = 'u0'"
    ) == [
        ("u0", "a", ["a1", "a2", "a3"], [9.0, 8.0, 7.0]),
        ("u0", "b", ["b1", "b2", "b3"], [9.0, 8.0, 7.0]),
    ]
    (run,) = query(
        path, "SELECT run_id, status, seq, n_recommendations, finished_at IS NOT NULL, n_parts FROM runs"
    )
    assert run == (
        "r1",
        "completed",
        1,
        30,
        True,
        2 * 2 + 1 + 1,
    )  # recs + serving per domain, profiles, items
    # The tables analysts had are views now, over the parts; the file itself holds no rows of them.
    kinds = dict(query(path, "SELECT table_name, table_type FROM information_schema.tables"))
    for name in ("recommendations", "items", "user_profiles", "latest_recommendations", "serving"):
        assert kinds[name] == "VIEW", name
    assert kinds["runs"] == kinds["metrics"] == kinds["parts"] == "BASE TABLE"
    # Beside the file: its two locks and the parts folder, nothing else (no journal, no copy left).
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "w.duckdb",
        "w.duckdb.lock",
        "w.duckdb.publish.lock",
        "w.parts",
    ]
    files = sorted(
        p.relative_to(tmp_path / "w.parts").as_posix() for p in (tmp_path / "w.parts").rglob("*.parquet")
    )
    write_id = query(path, "SELECT write_id FROM runs")[0][0]
    assert files == [
        f"items/run_id=r1/part-{write_id}-00000.parquet",
        f"recommendations/run_id=r1/domain=a/part-{write_id}-00000.parquet",
        f"recommendations/run_id=r1/domain=b/part-{write_id}-00000.parquet",
        f"serving/run_id=r1/domain=a/part-{write_id}-00000.parquet",
        f"serving/run_id=r1/domain=b/part-{write_id}-00000.parquet",
        f"user_profiles/run_id=r1/part-{write_id}-00000.parquet",
    ]
    # A part is self-describing: run and domain are columns too.
    part = pq.read_table(tmp_path / "w.parts" / files[1])
    assert part.column_names == [
        "run_id", "user_id", "domain", "rank", "item_id", "score", "because_item_id", "because_score",
        "because_percentile",
    ]  # fmt: skip
    assert set(part["run_id"].to_pylist()) == {"r1"} and set(part["domain"].to_pylist()) == {"a"}


def test_items_price_amount_is_the_price_as_a_number_where_it_is_one(tmp_path: Path) -> None:
    """`items.price` keeps the catalogue's text; `price_amount` is that text as a DOUBLE where it is one
    amount (currency sign and thousands separators dropped), NULL where reading it would be a guess."""
    prices = {
        "a0": "$1,299.00",
        "a1": "3.5",
        "a2": " US$ 4 ",
        "a3": "$5.99 - $10.99",  # a range
        "a4": "12,99",  # a decimal comma
        "b0": "1,2345",  # not a thousands separator
        "b1": "call for price",
        "b2": None,
        "b3": "\u00a37",
        "b4": "nan",
    }
    batch = make_batch("r1")
    price = pa.array([prices[i] for i in batch.items.column("item_id").to_pylist()], pa.string())
    batch = wh.PublishBatch(
        batch.run,
        batch.recommendations,
        batch.items.set_column(5, "price", price),
        batch.metrics,
        batch.profiles,
    )
    path = tmp_path / "w.duckdb"
    wh.publish(path, batch, retention_runs=3)
    rows = dict(query(path, "SELECT item_id, price_amount FROM items"))
    assert rows == {
        "a0": 1299.0, "a1": 3.5, "a2": 4.0, "a3": None, "a4": None,
        "b0": None, "b1": None, "b2": None, "b3": 7.0, "b4": None,
    }  # fmt: skip
    assert dict(query(path, "SELECT item_id, price FROM items WHERE item_id = 'a0'")) == {"a0": "$1,299.00"}
    assert query(path, "SELECT data_type FROM information_schema.columns WHERE table_name = 'items' "
                 "AND column_name = 'price_amount'") == [("DOUBLE",)]  # fmt: skip


def test_parts_are_sorted_by_user_in_row_groups_a_lookup_can_skip(tmp_path: Path) -> None:
    path = tmp_path / "w.duckdb"
    batch = make_batch("r1", users=500, k=4)
    # Rows arrive in any order: the part is sorted by user, then rank.
    batch.recommendations = batch.recommendations.take(
        pa.array(list(range(batch.recommendations.num_rows))[::-1])
    )
    with wh.publish_attempt(path, "r1", wh.default_root(path)) as attempt:
        parts = wh.write_rows(attempt.target(row_group_users=64), 0, batch.recommendations, None)
        wh.register_night(attempt, wh.Night(batch.run, parts, batch.items), wh.Retention(3))
    (rel,) = [p.path for p in parts if p.kind == "recommendations" and p.domain == "a"]
    meta = pq.ParquetFile(tmp_path / "w.parts" / rel).metadata
    assert meta.num_row_groups == -(-500 // 64)  # 64 users x 4 ranks per row group
    user_col = meta.schema.to_arrow_schema().names.index("user_id")
    bounds = [
        (meta.row_group(g).column(user_col).statistics.min, meta.row_group(g).column(user_col).statistics.max)
        for g in range(meta.num_row_groups)
    ]
    assert all(lo <= hi < nxt for (lo, hi), (nxt, _) in itertools.pairwise(bounds))
    rows = query(path, "SELECT user_id, rank FROM recommendations WHERE domain = 'a'")
    assert rows == sorted(rows)


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


def _single_file_warehouse(path: Path) -> None:
    """A warehouse of the single-file layout (schema 4, rows in tables): r1 purged by retention, r2 and
    r3 retained, as publishes before the parts layout left it."""
    con = duckdb.connect(str(path), config={"storage_compatibility_version": "v1.0.0"})
    assert wh.migrate(con, upto=4) == [1, 2, 3, 4]
    for seq, run in enumerate(("r1", "r2", "r3"), start=1):
        purged = "now()" if run == "r1" else "NULL"
        con.execute(
            f"INSERT INTO runs (run_id, kind, seq, status, started_at, finished_at, k, n_users, n_domains, "
            f"n_recommendations, purged_at) VALUES (?, 'publish', ?, 'completed', now(), now(), 3, 5, 2, "
            f"{0 if run == 'r1' else 30}, {purged})",
            [run, seq],
        )
        if run != "r1":
            batch = make_batch(run)
            con.register("recs", batch.recommendations)
            con.execute("INSERT INTO recommendations SELECT ?, * FROM recs", [run])
            con.execute(
                "INSERT INTO user_profiles (run_id, user_id, profile_text) VALUES (?, 'u0', ?)",
                [run, f"old {run}"],
            )
        con.execute(
            "INSERT INTO metrics VALUES (?, 'm', 'test', 'full', 'all', 'all', 'ndcg@10', 0.1, 5)", [run]
        )
    con.execute("INSERT INTO items VALUES ('a1', 'a', 'old title a1', NULL, NULL, NULL, 'r3')")
    con.execute("INSERT INTO items VALUES ('gone', 'a', 'left the catalogue', NULL, NULL, NULL, 'r2')")
    con.close()


def test_a_single_file_warehouse_is_moved_into_parts_by_the_next_publish(tmp_path: Path) -> None:
    path = tmp_path / "w.duckdb"
    _single_file_warehouse(path)
    # Readers of the old layout keep working before the move; a night's record does not move it.
    assert wh.user_recommendations(path, "u0", run_id="r2")["profile"] == "old r2"
    wh.record_run_status(path, "nightly-x", "running")
    assert query(path, "SELECT max(version) FROM schema_migrations") == [(wh.PARTS_VERSION - 1,)]
    wh.publish(path, make_batch("r4"), retention_runs=3)
    assert query(path, "SELECT max(version) FROM schema_migrations") == [(wh.SCHEMA_VERSION,)]
    # r2 and r3 are served from parts now, beside r4 (retention 3); r1, purged before, is history.
    assert query(path, "SELECT run_id, count(*) FROM recommendations GROUP BY 1 ORDER BY 1") == [
        ("r2", 30),
        ("r3", 30),
        ("r4", 30),
    ]
    assert wh.user_recommendations(path, "u0", run_id="r3")["profile"] == "old r3"
    assert query(path, "SELECT count(DISTINCT run_id) FROM metrics") == [(4,)]
    # The catalogue: tonight's items, plus the ones that left it, kept with the run that last held them.
    assert query(
        path, "SELECT title, updated_run_id FROM items WHERE item_id IN ('a1', 'gone') ORDER BY 1"
    ) == [
        ("left the catalogue", "r2"),
        ("title of a1 (r4)", "r4"),
    ]
    assert query(path, "SELECT count(*) FROM parts WHERE run_id = 'r1'") == [(0,)]


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
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "w.duckdb",
        "w.duckdb.lock",
        "w.duckdb.publish.lock",
        "w.parts",
    ]
    assert query(path, "SELECT run_id FROM runs") == [("r1",)]
    # The failed attempt had written its parts before the swap failed; they are gone with it.
    assert {p.parent.name for p in (tmp_path / "w.parts").rglob("*.parquet")} >= {"run_id=r1"}
    assert not list((tmp_path / "w.parts").glob("*/run_id=r2"))


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
    # Within the grace period (default 24 h) the purged runs' files stay for readers that opened an older
    # copy of the file; no view of the live file names them.
    parts = tmp_path / "w.parts"
    assert {p.name for p in parts.glob("recommendations/*")} == {f"run_id=r{i}" for i in range(1, 5)}
    with pytest.raises(wh.WarehouseError, match="purged by retention"):
        wh.user_recommendations(path, "u0", run_id="r1")


def test_views_read_from_any_working_directory_and_after_the_folder_moved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.test_input_cases import _open_with_duckdb1

    ws = tmp_path / "ws"
    path = ws / "w.duckdb"
    wh.publish(path, make_batch("r1"), retention_runs=3)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # The trap: DuckDB resolves a relative path in a view against the reader's working directory, so a
    # view that works where it was made reads nothing from anywhere else.
    monkeypatch.chdir(ws)
    with duckdb.connect("trap.duckdb") as con:
        con.execute("CREATE VIEW v AS SELECT * FROM read_parquet('w.parts/items/*/*.parquet')")
        assert con.execute("SELECT count(*) FROM v").fetchall() == [(10,)]
    monkeypatch.chdir(elsewhere)
    with pytest.raises(duckdb.IOException, match="No files found"):
        query(ws / "trap.duckdb", "SELECT count(*) FROM v")
    # The warehouse's views name their parts by full path: plain DuckDB reads them from anywhere,
    # DuckDB 1.x clients too.
    assert query(path, "SELECT count(*) FROM latest_recommendations") == [(30,)]
    old = _open_with_duckdb1(path)
    assert old.returncode == 0 and old.stdout.split()[1] == "30", old.stderr
    # The folder moves (or is mounted elsewhere): plain DuckDB fails loudly, naming where the parts were ...
    moved = tmp_path / "mnt" / "ws"
    moved.parent.mkdir()
    shutil.move(ws, moved)
    path = moved / "w.duckdb"
    with pytest.raises(duckdb.IOException, match=str(ws / "w.parts")):
        query(path, "SELECT count(*) FROM latest_recommendations")
    # ... bridgerec's readers, and analysts who open it with `connect`, re-point the views for themselves ...
    with wh.connect(path) as con:
        assert con.execute("SELECT count(*), min(title) FROM latest_recommendations").fetchall() == [
            (30, "title of a1 (r1)")
        ]
        assert con.execute("SELECT count(*) FROM items").fetchall() == [(10,)]
    assert wh.user_recommendations(path, "u0")["profile"] == "likes a (r1)"
    # ... and any write there (`bridgerec warehouse relink`, a publish, a night's record) rewrites them.
    wh.relink(path)
    assert query(path, "SELECT count(*) FROM latest_recommendations") == [(30,)]
    assert _open_with_duckdb1(path).stdout.split()[1] == "30"
    wh.publish(path, make_batch("r2"), retention_runs=3)
    assert query(path, "SELECT run_id, count(*) FROM recommendations GROUP BY 1 ORDER BY 1") == [
        ("r1", 30),
        ("r2", 30),
    ]


HELD_READER = """
import sys, duckdb
con = duckdb.connect(sys.argv[1], read_only=True)
print(con.execute("SELECT count(*) FROM latest_recommendations").fetchall()[0][0], flush=True)
sys.stdin.readline()
try:
    print(con.execute("SELECT count(*) FROM latest_recommendations").fetchall()[0][0], flush=True)
except duckdb.Error as exc:
    print("error", str(exc).splitlines()[0], flush=True)
"""


def test_retention_deletes_files_only_after_no_view_names_them(tmp_path: Path) -> None:
    path = tmp_path / "w.duckdb"
    parts = tmp_path / "w.parts"
    wh.publish(path, make_batch("r1"), retention_runs=1, grace_hours=0)
    # An analyst's connection in another process, opened on the file that names r1's parts.
    held = subprocess.Popen(
        [sys.executable, "-c", HELD_READER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert held.stdout.readline().strip() == "30"
    res = wh.publish(path, make_batch("r2"), retention_runs=1, grace_hours=0)
    assert res.purged_runs == ["r1"] and res.files_deleted == 6 and res.vacuumed_runs == ["r1"]
    # grace 0: r1's files went right after the swap that took them out of the views ...
    assert not list(parts.glob("*/run_id=r1"))
    assert query(path, "SELECT count(*) FROM recommendations WHERE run_id = 'r1'") == [(0,)]
    # ... so the connection opened before that swap fails loudly (it is never shown a partial run);
    # with the default grace period it keeps its run (test_publish_concurrency.py).
    out, _ = held.communicate("\n", timeout=60)
    assert out.startswith("error IO Error: No files found") and "run_id=r1" in out
    # The parts rows of deleted files are removed by the next registration, never before their files.
    wh.publish(path, make_batch("r3"), retention_runs=1, grace_hours=0)
    assert query(path, "SELECT DISTINCT run_id FROM parts ORDER BY 1") == [("r2",), ("r3",)]
    assert query(path, "SELECT count(*) FROM parts WHERE dropped_at IS NULL AND run_id = 'r2'") == [(0,)]
    assert {p.name for p in parts.glob("recommendations/*")} == {"run_id=r3"}


def test_any_retained_run_is_queryable_by_run_id(tmp_path: Path) -> None:
    path = tmp_path / "w.duckdb"
    for i in range(1, 4):
        batch = make_batch(f"r{i}")
        batch.recommendations = batch.recommendations.set_column(
            4, "score", pa.array([float(i)] * batch.recommendations.num_rows, pa.float32())
        )
        wh.publish(path, batch, retention_runs=3)
    assert [
        wh.user_recommendations(path, "u0", run_id=f"r{i}")["recommendations"]["a"][0]["score"]
        for i in (1, 2, 3)
    ] == [
        1.0,
        2.0,
        3.0,
    ]
    assert wh.user_recommendations(path, "u0")["run_id"] == "r3"
    assert query(path, "SELECT run_id, avg(score) FROM recommendations GROUP BY 1 ORDER BY 1") == [
        ("r1", 1.0),
        ("r2", 2.0),
        ("r3", 3.0),
    ]
    with pytest.raises(wh.WarehouseError, match="not in the warehouse"):
        wh.user_recommendations(path, "u0", run_id="r9")


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
sys.path[:0] = sys.argv[4:]
from test_publish_warehouse import make_batch
from bridgerec.storage import warehouse as wh
batch = make_batch(sys.argv[2], users=int(sys.argv[3]), k=20)
if sys.argv[2] == "slow-swap":  # a big metrics table keeps the writer inside the swap for a while
    import pyarrow as pa
    batch.metrics = pa.concat_tables([batch.metrics] * 400_000)
print("ready", flush=True)
wh.publish(sys.argv[1], batch, retention_runs=3)
"""


@pytest.mark.parametrize(
    ("moment", "run", "users", "sign"),
    [
        # mid-way through writing its parts (its journal exists, the file was not touched yet) ...
        ("parts", "r2", 40_000, ".w.duckdb.writes/*.json"),
        # ... or inside the swap, while its copy of the file is being written
        ("swap", "slow-swap", 5, ".w.duckdb.*.tmp"),
    ],
)
def test_writer_killed_mid_publish_leaves_the_warehouse_whole(
    tmp_path: Path, moment: str, run: str, users: int, sign: str
) -> None:
    path = tmp_path / "w.duckdb"
    wh.publish(path, make_batch("r1"), retention_runs=3)
    before = digest(path)
    repo = Path(__file__).resolve().parents[1]
    writer = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(path), run, str(users), str(repo / "tests"), str(repo)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout.readline().strip() == "ready"
    pattern = sign.replace(".w.duckdb.writes", "w.duckdb.writes")
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(pattern)) or (
        moment == "parts" and not list(tmp_path.glob(f"w.parts/*/run_id={run}/**/*"))
    ):
        assert writer.poll() is None, "the writer ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert digest(path) == before  # the live file never saw the killed writer
    assert query(path, "SELECT run_id FROM latest_run") == [("r1",)]
    assert query(path, "SELECT count(*) FROM latest_recommendations") == [(30,)]  # r1, whole
    assert list(tmp_path.glob(f"w.parts/*/run_id={run}"))  # its half-written parts are left behind ...
    assert query(path, "SELECT count(*) FROM recommendations WHERE run_id = ?", [run]) == [(0,)]  # unseen
    wh.publish(path, make_batch("r3"), retention_runs=3)  # ... and the next publish removes them
    assert not list(tmp_path.glob(f"w.parts/*/run_id={run}"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "w.duckdb",
        "w.duckdb.lock",
        "w.duckdb.publish.lock",
        "w.parts",
    ]
    assert query(path, "SELECT run_id FROM runs ORDER BY seq") == [("r1",), ("r3",)]


def test_runs_list_gives_each_runs_validation_figure_and_the_serving_run(tmp_path: Path) -> None:
    """`list_runs` (`bridgerec runs list`): a published run's `valid_ndcg10` is its own validation NDCG@10
    (full ranking, all users) from `metrics` (the column held only nights' gate figures, NULL on every
    published run), and `serving` marks the run `latest_run` serves."""
    import dataclasses

    path = tmp_path / "w.duckdb"
    for run_id, valid in (("r1", 0.041), ("r2", 0.043)):
        batch = make_batch(run_id)
        assert batch.metrics is not None
        extra = pa.Table.from_pylist(
            [
                {
                    "model": "m",
                    "split": "valid",
                    "protocol": p,
                    "domain": d,
                    "user_group": g,
                    "metric": "ndcg@10",
                    "value": v,
                    "users": 5,
                }
                for p, d, g, v in (
                    ("full", "all", "all", valid),
                    ("full", "a", "all", 0.9),
                    ("sampled", "all", "all", 0.3),
                )
            ],
            schema=batch.metrics.schema,
        )
        wh.publish(path, dataclasses.replace(batch, metrics=pa.concat_tables([batch.metrics, extra])), 5)
    listed = {r["run_id"]: r for r in wh.list_runs(path)}
    assert listed["r1"]["valid_ndcg10"] == pytest.approx(0.041) and not listed["r1"]["serving"]
    assert listed["r2"]["valid_ndcg10"] == pytest.approx(0.043) and listed["r2"]["serving"]


def test_every_table_view_and_column_says_what_it_means(tmp_path: Path) -> None:
    """Analysts' tools show DuckDB comments (`duckdb_columns().comment`, DBeaver's tooltips): every table
    and view of a published warehouse, and each of their columns, has one, also after the next publish
    rewrote the views (which drops a view's comments), and a 1.1 client reads them. A published run's
    `valid_ndcg10` is its own validation figure (full ranking), so `latest_run` answers it (a new user's
    trial found it NULL)."""
    from tests.test_input_cases import DUCKDB11, _open_with_duckdb1

    path = tmp_path / "w.duckdb"
    for run_id, figure in (("r1", 0.041), ("r2", 0.043)):
        batch = make_batch(run_id)
        valid = pa.table(
            {
                "model": ["m"], "split": ["valid"], "protocol": ["full"], "domain": ["all"],
                "user_group": ["all"], "metric": ["ndcg@10"], "value": [figure],
                "users": pa.array([3], pa.int64()),
            }
        )  # fmt: skip
        batch.metrics = pa.concat_tables([batch.metrics, valid])
        wh.publish(path, batch, retention_runs=3)
    missing = query(
        path,
        "SELECT table_name, column_name FROM duckdb_columns() WHERE NOT internal AND comment IS NULL",
    )
    assert missing == []
    objects = query(
        path,
        "SELECT table_name, comment FROM duckdb_tables() WHERE NOT internal "
        "UNION ALL SELECT view_name, comment FROM duckdb_views() WHERE NOT internal",
    )
    assert len(objects) >= 17 and all(comment for _, comment in objects), objects
    [(comment,)] = query(
        path,
        "SELECT comment FROM duckdb_columns() WHERE table_name = 'latest_recommendations' "
        "AND column_name = 'because_percentile'",
    )
    assert "chance" in comment
    assert query(path, "SELECT run_id, valid_ndcg10 FROM runs ORDER BY seq") == [("r1", 0.041), ("r2", 0.043)]
    assert query(path, "SELECT valid_ndcg10 FROM latest_run") == [(0.043,)]
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import duckdb\n"
        "con = duckdb.connect(sys.argv[2], read_only=True)\n"
        "print(*con.execute(\"SELECT count(*), count(comment) FROM duckdb_columns() WHERE table_name = 'runs'\").fetchone())\n"
    )
    old = subprocess.run(
        [sys.executable, "-S", "-c", code, str(DUCKDB11), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert old.returncode == 0, old.stderr
    columns, commented = map(int, old.stdout.split())
    assert columns == commented > 30
    assert _open_with_duckdb1(path, DUCKDB11).returncode == 0
