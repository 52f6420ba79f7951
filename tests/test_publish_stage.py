"""The publish stage on the ingested sample (1,000 users, two domains) with vectors made for the test:
table invariants, reload of the saved indexes, rerun skip, retention of indexes, a failing publish,
and the analysts' CLI (`recs`, `runs list`)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from publish_data import doc_queries, workspace_vectors
from typer.testing import CliRunner

from bridgerec.cli import app, duckdb_cli, sql_shell_command
from bridgerec.runtime.runner import Runner
from bridgerec.storage import warehouse as wh
from bridgerec.storage.index_store import IndexStore
from bridgerec.storage.vectors import DomainVectors
from bridgerec.storage.warehouse import record_run_status
from bridgerec.storage.workspace import Workspace
from bridgerec.tasks import StageRun
from bridgerec.tasks.publish import PublishError, PublishSettings, run_publish
from tests.conftest import REPO


@pytest.fixture(scope="module")
def profiled_workspace(sample_workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample's ingest output plus an enrich stage holding profiles for some users."""
    root = tmp_path_factory.mktemp("profiled_ws")
    shutil.copytree(sample_workspace / "ingest", root / "ingest")
    ws = Workspace(root)
    users = ws.read_table("ingest", "users", ["user_id"])["user_id"].to_pylist()[:300]
    with ws.building("enrich") as stage:
        stage.write_table(
            "profiles",
            pa.table(
                {
                    "user_id": users,
                    "profile_text": [f"Enjoys things, says user {u}." for u in users],
                    "cluster_summaries": [["Likes [bold] teas.", "Cooks pasta."] for _ in users],
                    "llm_model_id": ["smollm2-test"] * len(users),
                    "history_hash": ["h"] * len(users),  # enrich's other columns are not published
                }
            ),
        )
        stage.finish(schema_version=1, config_hash="test", input_hashes={})
    return root


@pytest.fixture(scope="module")
def published(profiled_workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    warehouse = tmp_path_factory.mktemp("wh") / "warehouse.duckdb"
    vectors = workspace_vectors(profiled_workspace, seed=0)
    summary = run_publish(
        StageRun(PublishSettings(k=20), Workspace(profiled_workspace), warehouse=warehouse),
        run_id="run-a",
        vectors=vectors,
    )
    return warehouse, {"summary": summary, "vectors": vectors}


def sql(warehouse: Path, query: str, params: list | None = None) -> list[tuple]:
    with duckdb.connect(str(warehouse), read_only=True) as con:
        return con.execute(query, params or []).fetchall()


def test_every_user_gets_k_unseen_items_per_domain_ranked_by_score(
    published: tuple[Path, dict], profiled_workspace: Path
) -> None:
    warehouse, ctx = published
    s = ctx["summary"]
    assert (s.run_id, s.users, s.k, s.rows) == ("run-a", 1000, 20, 1000 * 2 * 20)
    assert s.items_per_domain == {"food": 2217, "kitchen": 4230} and not s.skipped
    # k rows per user per domain, also in the domain a user never touched (the cross-domain point).
    assert sql(
        warehouse,
        "SELECT count(*) FROM (SELECT user_id, domain, count(*) c, min(rank) lo, max(rank) hi, "
        "count(DISTINCT rank) r FROM latest_recommendations GROUP BY ALL) WHERE c = 20 AND lo = 1 AND hi = 20 "
        "AND r = 20",
    ) == [(2000,)]
    # Scores never increase with rank.
    assert sql(
        warehouse,
        "SELECT count(*) FROM (SELECT score, lag(score) OVER (PARTITION BY user_id, domain ORDER BY rank) prev "
        "FROM latest_recommendations) WHERE score > prev",
    ) == [(0,)]
    # No recommended item is one the user already had (whole history, all splits).
    interactions = str(profiled_workspace / "ingest" / "interactions.parquet")
    assert sql(
        warehouse,
        "SELECT count(*) FROM latest_recommendations r JOIN read_parquet(?) i USING (user_id, item_id)",
        [interactions],
    ) == [(0,)]
    # Ids are the source's, every item is in its own domain's catalogue, titles are filled in.
    items = str(profiled_workspace / "ingest" / "items.parquet")
    assert sql(
        warehouse,
        "SELECT count(*) FROM latest_recommendations r JOIN read_parquet(?) i "
        "ON i.item_id = r.item_id AND i.domain = r.domain AND i.title = r.title",
        [items],
    ) == [(40_000,)]
    users = str(profiled_workspace / "ingest" / "users.parquet")
    assert sql(
        warehouse,
        "SELECT count(DISTINCT r.user_id) FROM latest_recommendations r JOIN read_parquet(?) u USING (user_id)",
        [users],
    ) == [(1000,)]
    assert sql(warehouse, "SELECT count(*) FROM latest_user_profiles") == [(300,)]
    # Each user's history is published beside the lists: the ingested interactions, row for row, with
    # their domain, so analysts check the exclusion in SQL too.
    history = "SELECT user_id, position, domain, item_id, timestamp, rating FROM latest_interactions"
    ingested = (
        "SELECT i.user_id, i.seq_pos, d.domain, i.item_id, i.timestamp, i.rating FROM read_parquet(?) i "
        "JOIN read_parquet(?) d USING (domain_idx)"
    )
    domains = str(profiled_workspace / "ingest" / "domains.parquet")
    for a, b, params in (
        (history, ingested, [interactions, domains]),
        (ingested, history, [interactions, domains]),
    ):
        assert sql(warehouse, f"SELECT count(*) FROM ({a} EXCEPT ALL {b})", params) == [(0,)]
    assert sql(
        warehouse,
        "SELECT count(*), count(DISTINCT user_id), bool_and(ok) FROM (SELECT user_id, "
        "list(position ORDER BY position) = range(count(*)::INTEGER) AS ok FROM latest_interactions GROUP BY 1) "
        "JOIN (SELECT user_id, count(*) n FROM latest_interactions GROUP BY 1) USING (user_id)",
    ) == [(1000, 1000, True)]
    assert sql(
        warehouse,
        "SELECT count(*) FROM latest_recommendations r JOIN latest_interactions h USING (user_id, item_id)",
    ) == [(0,)]
    (run,) = sql(
        warehouse, "SELECT status, k, n_users, n_items, n_interactions, n_domains, index_path FROM runs"
    )
    assert run[:6] == ("completed", 20, 1000, 6447, 8896, 2)
    assert sql(warehouse, "SELECT count(*) FROM interactions WHERE run_id = 'run-a'") == [(8896,)]
    assert sql(warehouse, "SELECT n_history FROM latest_run") == [(8896,)] and s.history_rows == 8896
    assert Path(run[6]).name == "run-a"


def test_rows_match_brute_force_and_the_saved_index(published: tuple[Path, dict]) -> None:
    warehouse, ctx = published
    vectors: dict[str, DomainVectors] = ctx["vectors"]
    store = IndexStore(warehouse.parent / "indexes")
    for domain, v in vectors.items():
        u = 17
        user = v.user_ids[u]
        got = [
            r[0]
            for r in sql(
                warehouse,
                "SELECT item_id FROM recommendations WHERE run_id = 'run-a' AND user_id = ? AND domain = ? ORDER BY rank",
                [user, domain],
            )
        ]
        scores = v.item_vectors @ v.user_vectors[u]
        scores[v.seen_items[v.seen_indptr[u] : v.seen_indptr[u + 1]]] = -np.inf
        assert got == [v.item_ids[i] for i in np.argsort(-scores, kind="stable")[:20]]
        # A downstream service reloading the index gets the same items once seen ones are dropped.
        seen = {v.item_ids[i] for i in v.seen_items[v.seen_indptr[u] : v.seen_indptr[u + 1]]}
        ids, _ = store.load("run-a", domain).search(v.user_vectors[u : u + 1], 20 + len(seen))
        assert [i for i in ids[0] if i not in seen][:20] == got


def test_exclusion_matters_and_can_be_turned_off(profiled_workspace: Path, tmp_path: Path) -> None:
    warehouse = tmp_path / "w.duckdb"
    vectors = workspace_vectors(profiled_workspace, seed=0)
    off = run_publish(
        StageRun(
            PublishSettings(k=5, exclude_seen=False, history=False),
            Workspace(profiled_workspace),
            warehouse=warehouse,
        ),
        run_id="x",
        vectors=vectors,
    )
    # publish.history off: no history parts, the views are there and empty (typed).
    assert sql(warehouse, "SELECT count(*) FROM parts WHERE kind = 'interactions'") == [(0,)]
    assert sql(warehouse, "SELECT count(*), typeof(any_value(timestamp)) FROM latest_interactions") == [
        (0, "TIMESTAMP WITH TIME ZONE")
    ]
    # ... and the run says so, where a user without history would read the same empty rows.
    assert sql(warehouse, "SELECT n_history FROM latest_run") == [(None,)] and off.history_rows is None
    assert wh.user_recommendations(warehouse, vectors["food"].user_ids[0])["history"] is None
    out = CliRunner().invoke(
        app, ["recs", "--warehouse", str(warehouse), "--user", vectors["food"].user_ids[0]]
    )
    assert out.exit_code == 0 and "none published with this run" in out.stdout, out.output
    interactions = str(profiled_workspace / "ingest" / "interactions.parquet")
    (n,) = sql(
        warehouse,
        "SELECT count(*) FROM recommendations r JOIN read_parquet(?) i USING (user_id, item_id)",
        [interactions],
    )[0]
    # The vectors favour what users had, so without exclusion it comes back: exactly as often as in the
    # brute-force top-5 over all items.
    want = 0
    for v in vectors.values():
        top = np.argsort(-(v.user_vectors @ v.item_vectors.T), axis=1, kind="stable")[:, :5]
        want += sum(
            len(set(top[u]) & set(v.seen_items[v.seen_indptr[u] : v.seen_indptr[u + 1]])) for u in range(1000)
        )
    assert n == want and n > 300


def test_rerun_skips_and_changed_settings_republish(profiled_workspace: Path, tmp_path: Path) -> None:
    warehouse = tmp_path / "w.duckdb"
    ws = Workspace(profiled_workspace)
    vectors = workspace_vectors(profiled_workspace, seed=1)
    run_publish(StageRun(PublishSettings(k=3), ws, warehouse=warehouse), run_id="r", vectors=vectors)
    mtime = warehouse.stat().st_mtime_ns
    again = run_publish(
        StageRun(PublishSettings(k=3, threads=2), ws, warehouse=warehouse), run_id="r", vectors=vectors
    )
    assert again.skipped and again.rows == 1000 * 2 * 3 and warehouse.stat().st_mtime_ns == mtime
    changed = run_publish(
        StageRun(PublishSettings(k=4), ws, warehouse=warehouse), run_id="r", vectors=vectors
    )
    assert not changed.skipped and changed.rows == 1000 * 2 * 4
    assert sql(warehouse, "SELECT count(*), max(rank) FROM recommendations") == [(8000, 4)]
    # Another run serves; then the inputs go back to r's (a night's export rolled back, or `bridgerec
    # publish --run-id r`): r is published again and serves, not skipped as already there.
    other = run_publish(
        StageRun(PublishSettings(k=4), ws, warehouse=warehouse), run_id="s", vectors=workspace_vectors(profiled_workspace, seed=2)
    )  # fmt: skip
    assert not other.skipped and sql(warehouse, "SELECT run_id FROM latest_run") == [("s",)]
    back = run_publish(StageRun(PublishSettings(k=4), ws, warehouse=warehouse), run_id="r", vectors=vectors)
    assert not back.skipped and sql(warehouse, "SELECT run_id FROM latest_run") == [("r",)]
    assert sql(warehouse, "SELECT DISTINCT run_id FROM latest_recommendations") == [("r",)]
    assert run_publish(
        StageRun(PublishSettings(k=4), ws, warehouse=warehouse), run_id="r", vectors=vectors
    ).skipped  # serving and unchanged: nothing to do


def test_retention_drops_old_indexes_and_a_failed_publish_changes_nothing(
    profiled_workspace: Path, tmp_path: Path
) -> None:
    warehouse = tmp_path / "w.duckdb"
    ws = Workspace(profiled_workspace)
    settings = PublishSettings(k=2, retention_runs=2, retention_grace_hours=0)
    vectors = workspace_vectors(profiled_workspace, seed=2)
    for i in range(3):
        s = run_publish(StageRun(settings, ws, warehouse=warehouse), run_id=f"r{i}", vectors=vectors)
    assert s.purged_runs == ["r0"]
    store = IndexStore(tmp_path / "indexes")
    assert store.runs() == ["r1", "r2"]
    # r0's parts left the views in the swap and were deleted after it (no grace period here).
    parts = tmp_path / "w.parts"
    assert not list(parts.glob("*/run_id=r0/**/*.parquet"))
    assert {p.name for p in parts.glob("recommendations/*")} == {"run_id=r1", "run_id=r2"}
    before = warehouse.read_bytes()
    files_before = sorted(parts.rglob("*"))
    # Vectors naming an item the catalogue does not have: refused before the warehouse is touched.
    food = vectors["food"]
    stale = DomainVectors(
        "food",
        food.user_ids,
        food.user_vectors,
        ["NOT-AN-ITEM", *food.item_ids[1:]],
        food.item_vectors,
        food.seen_indptr,
        food.seen_items,
    )
    with pytest.raises(PublishError, match="not in its ingested catalogue"):
        run_publish(
            StageRun(settings, ws, warehouse=warehouse), run_id="r3", vectors={**vectors, "food": stale}
        )
    # Vectors that miss users: refused too.
    fewer = DomainVectors(
        "food",
        food.user_ids[:-1],
        food.user_vectors[:-1],
        food.item_ids,
        food.item_vectors,
        food.seen_indptr[:-1],
        food.seen_items[: food.seen_indptr[-2]],
    )
    with pytest.raises(PublishError, match="cover 999 of the 1000 ingested users"):
        run_publish(
            StageRun(settings, ws, warehouse=warehouse), run_id="r3", vectors={**vectors, "food": fewer}
        )
    assert warehouse.read_bytes() == before and store.runs() == ["r1", "r2"]
    assert sorted(parts.rglob("*")) == files_before  # no part of the refused runs was written


def test_cli_recs_and_runs_list(published: tuple[Path, dict], tmp_path: Path) -> None:
    warehouse, ctx = published
    runner = CliRunner()
    user = ctx["vectors"]["food"].user_ids[0]
    out = runner.invoke(app, ["recs", "--warehouse", str(warehouse), "--user", user, "--json"])
    assert out.exit_code == 0, out.output
    got = json.loads(out.stdout)
    assert got["run_id"] == "run-a" and got["profile"] == f"Enjoys things, says user {user}."
    assert got["interests"] == ["Likes [bold] teas.", "Cooks pasta."]
    assert sorted(got["recommendations"]) == ["food", "kitchen"]
    assert [r["rank"] for r in got["recommendations"]["kitchen"]] == list(range(1, 21))
    assert all(r["title"] for r in got["recommendations"]["food"])
    # The user's most recent history, newest first, as the run read it.
    had = sql(
        warehouse,
        "SELECT position, item_id FROM latest_interactions WHERE user_id = ? ORDER BY position DESC LIMIT 10",
        [user],
    )
    assert [(h["position"], h["item_id"]) for h in got["history"]] == had and had
    assert all(h["title"] and h["domain"] in ("food", "kitchen") for h in got["history"])
    out = runner.invoke(
        app, ["recs", "--warehouse", str(warehouse), "--user", user, "--history", "2", "--json"]
    )
    assert [h["position"] for h in json.loads(out.stdout)["history"]] == [p for p, _ in had[:2]], out.output
    out = runner.invoke(
        app, ["recs", "--warehouse", str(warehouse), "--user", user, "--domain", "food", "--json"]
    )
    assert out.exit_code == 0 and list(json.loads(out.stdout)["recommendations"]) == ["food"], out.output
    out = runner.invoke(app, ["recs", "--warehouse", str(warehouse), "--user", user, "--domain", "food"])
    assert out.exit_code == 0 and "profile" in out.stdout
    lines = out.stdout.splitlines()
    assert "recent history" in out.stdout and sum(x.startswith("  - ") for x in lines) == 2 + len(had)
    assert out.stdout.count("rank") == 1  # one domain's table
    assert "Likes [bold] teas." in out.stdout  # data is printed as is, never read as rich markup
    out = runner.invoke(app, ["recs", "--warehouse", str(warehouse), "--user", "nobody"])
    assert out.exit_code == 2 and "no recommendations" in out.output
    said = out.output.split("ids are like ")[1].split(")")[0].split(", ")  # what the run's user ids look like
    assert said and all(
        runner.invoke(app, ["recs", "--warehouse", str(warehouse), "--user", u]).exit_code == 0 for u in said
    )
    out = runner.invoke(app, ["runs", "list", "--warehouse", str(warehouse), "--json"])
    assert out.exit_code == 0, out.output
    runs = json.loads(out.stdout)["runs"]
    assert [(r["run_id"], r["status"], r["retained"]) for r in runs] == [("run-a", "completed", True)]
    # `-w DIR` as the stage commands take it: the workspace's warehouse.duckdb (after `bridgerec run -w DIR`).
    out = runner.invoke(app, ["runs", "list", "-w", str(warehouse.parent), "--json"])
    assert out.exit_code == 0 and json.loads(out.stdout)["runs"] == runs, out.output
    out = runner.invoke(app, ["runs", "list", "--warehouse", str(warehouse)])
    assert out.exit_code == 0 and "run-a" in out.stdout
    # A failed run's message is shown as written (brackets included), on a copy of the warehouse file
    # (beside it: the copy reads the same parts).
    copy = warehouse.with_name("copy.duckdb")
    shutil.copyfile(warehouse, copy)
    night = "night-35366a3d-17e9-4794-8476-4a82f5b0bb7f"  # as long as the nightly flow's ids
    record_run_status(copy, night, "running")
    record_run_status(copy, night, "failed", message="[Errno 2] no such file")
    out = runner.invoke(app, ["runs", "list", "--warehouse", str(copy)])
    assert out.exit_code == 0 and "[Errno 2]" in out.stdout and "failed" in out.stdout
    # Piped (not a terminal; COLUMNS, 80 under pytest-xdist, is not read then), the table is as wide as
    # its cells: the id whole in its row.
    assert f"│ {night} │" in out.stdout, out.stdout
    # A night's id (listed beside the runs) stands for the run it left serving; one that left none says so.
    from datetime import UTC, datetime

    from bridgerec.storage.warehouse import NightRecord, record_night

    now = datetime.now(UTC)
    record_night(copy, NightRecord("night-b", None, "completed", now, now, published_run_id="run-a"))
    record_night(copy, NightRecord("night-c", None, "failed", now, now))
    by_night = runner.invoke(app, ["recs", "--warehouse", str(copy), "--user", user, "--run-id", "night-b"])
    assert by_night.exit_code == 0 and "run run-a" in by_night.stdout, by_night.output
    none = runner.invoke(app, ["recs", "--warehouse", str(copy), "--user", user, "--run-id", "night-c"])
    assert none.exit_code == 2 and "'night-c' is a night, and it left no published run" in none.stderr


def test_docs_sql_examples_run_on_a_published_warehouse(
    published: tuple[Path, dict], profiled_workspace: Path
) -> None:
    warehouse, ctx = published
    queries = doc_queries()
    assert len(queries) >= 8
    # Each block runs on its own (`bridgerec sql -q` is a session per call): a variable it reads, it sets.
    text = (REPO / "docs" / "publish.md").read_text()
    for block in re.findall(r"```sql\n(.*?)```", text, flags=re.S):
        for name in set(re.findall(r"getvariable\('(\w+)'\)", block)):
            assert f"SET VARIABLE {name} =" in block, block
    user = ctx["vectors"]["food"].user_ids[0]
    with duckdb.connect(str(warehouse), read_only=True) as con:
        con.execute("SET VARIABLE user_id = ?", [user])
        results = [con.execute(q).fetchall() for q in queries]
    user_rows = results[0]
    assert len(user_rows) == 40 and user_rows[0][8] == f"Enjoys things, says user {user}."
    assert user_rows[0][5:8] == (None, None, None)  # vectors handed in: no text space, no explanation
    assert len(results[1]) == 20  # top 10 items in each of the two domains
    assert [r[0] for r in results[2]] == ["food", "kitchen"] and all(0 < r[3] <= 1 for r in results[2])
    assert 0 < results[3][0][0] <= 1000
    had = sql(warehouse, "SELECT count(*) FROM latest_interactions WHERE user_id = ?", [user])[0][0]
    side_by_side = results[4]  # the user's history, newest first, then their top 5 per domain
    assert [r[0] for r in side_by_side] == ["had"] * had + ["recommended"] * 10 and had
    assert [r[1] for r in side_by_side[:had]] == list(range(had - 1, -1, -1))
    assert [(r[2], r[1]) for r in side_by_side[had:]] == [
        (d, n) for d in ("food", "kitchen") for n in range(1, 6)
    ]
    meanings = results[-1]  # the last example: what latest_recommendations' columns mean
    assert [r[0] for r in meanings][:3] == ["run_id", "user_id", "domain"] and all(r[2] for r in meanings)


def test_sql_runs_a_query_read_only(published: tuple[Path, dict]) -> None:
    """`bridgerec sql -q`: one statement on a read-only connection; a write is refused with one line."""
    warehouse, _ = published
    before = warehouse.read_bytes()
    out = CliRunner().invoke(
        app, ["sql", "--warehouse", str(warehouse), "-q", "SELECT domain, count(*) AS n FROM "
              "latest_recommendations GROUP BY domain ORDER BY domain", "--json"]
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    assert result["columns"] == ["domain", "n"] and [r[0] for r in result["rows"]] == ["food", "kitchen"]
    table = CliRunner().invoke(app, ["sql", "--warehouse", str(warehouse), "-q", "SELECT 41 + 1 AS answer"])
    assert table.exit_code == 0 and "answer" in table.stdout and "42" in table.stdout
    # FLOAT (float32) values as DuckDB's shell prints them, not as the doubles they widen to.
    query = "SELECT round(0.123456::FLOAT, 3) AS x, [1.1::FLOAT, NULL] AS l, 0.1::DOUBLE + 0.2 AS d"
    floats = CliRunner().invoke(app, ["sql", "--warehouse", str(warehouse), "-q", query, "--json"])
    assert json.loads(floats.stdout)["rows"] == [[0.123, [1.1, None], 0.30000000000000004]]
    refused = CliRunner().invoke(
        app, ["sql", "--warehouse", str(warehouse), "-q", "CREATE TABLE scratch AS SELECT 1 AS x"]
    )
    assert refused.exit_code == 2 and "read-only" in refused.stderr and refused.stderr.startswith("error: ")
    # A misspelt name: one line that keeps DuckDB's hint of the name meant.
    typo = CliRunner().invoke(app, ["sql", "--warehouse", str(warehouse), "-q", "SELECT titel FROM items"])
    assert typo.exit_code == 2 and typo.stderr.count("\n") == 1
    assert typo.stderr.startswith("error: BinderException: ") and 'Candidate bindings: "title"' in typo.stderr
    table_typo = CliRunner().invoke(app, ["sql", "--warehouse", str(warehouse), "-q", "FROM recomendations"])
    assert table_typo.stderr.strip().endswith('Did you mean "recommendations"?')
    assert warehouse.read_bytes() == before


def test_sql_opens_a_read_only_shell(published: tuple[Path, dict], tmp_path: Path) -> None:
    """`bridgerec sql` opens the DuckDB CLI of the duckdb-cli package (a 1.x CLI) read-only on the
    warehouse: plain SQL typed on stdin, as a terminal would, reads the published tables and a write is
    refused. `--python` gives a Python shell with a read-only connection `con` instead."""
    warehouse, _ = published
    expected = duckdb.connect(str(warehouse), read_only=True).execute(
        "SELECT count(*) FROM latest_recommendations"
    )
    rows = expected.fetchone()[0]
    env = {k: v for k, v in os.environ.items() if k != "PATH"} | {"PATH": str(tmp_path)}  # no duckdb on PATH
    cli = duckdb_cli()
    assert cli is not None and Path(cli).parent.name == "duckdb_cli"  # the package's, found without PATH
    typed = "SELECT count(*) AS n FROM latest_recommendations;\nCREATE TABLE scratch AS SELECT 1;\n"
    argv = [sys.executable, "-m", "bridgerec.cli", "sql", "--warehouse", str(warehouse)]
    done = subprocess.run(argv, input=typed, capture_output=True, text=True, timeout=120, env=env)
    assert f"{rows}" in done.stdout and "│" in done.stdout, done.stdout  # the CLI's table
    assert "read-only mode" in done.stderr and "scratch" not in done.stdout

    typed = (
        "print('rows', con.sql('SELECT count(*) FROM latest_recommendations').fetchall()[0][0])\n"
        "con.execute('CREATE TABLE scratch AS SELECT 1')\n"
    )
    done = subprocess.run(
        [*argv, "--python"], input=typed, capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    assert "read-only DuckDB connection `con`" in done.stderr and "type Python, not SQL" in done.stderr
    assert f"rows {rows}" in done.stdout
    assert "read-only mode" in done.stderr  # the write was refused
    with duckdb.connect(str(warehouse), read_only=True) as con:
        assert con.execute(
            "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'scratch'"
        ).fetchone() == (0,)
    assert sql_shell_command(warehouse, "/opt/duckdb/duckdb") == [
        "/opt/duckdb/duckdb",
        "-readonly",
        str(warehouse),
    ]
    assert sql_shell_command(warehouse, None) is None


class PoolRunner(Runner):
    """Runs the shard function in worker processes, as a Ray runner does across machines: the plan and
    the shards are pickled, and each worker reads only files (staged inputs, the saved index)."""

    def __init__(self, slots: int = 1) -> None:
        self.called: list[str] = []
        self.mapped: list[str] = []
        self.plans: list[object] = []  # what each map handed its shards
        self.slots = slots

    def call(self, fn, *args, **kwargs):
        self.called.append(fn.__name__)
        return fn(*args, **kwargs)

    def map(self, fn, shards, *args):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.mapped.append(fn.__name__)
        self.plans.append(args[0])
        with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
            return list(pool.map(fn, *[[a] * len(shards) for a in args], shards))


def test_publish_cuts_a_shard_for_each_worker_and_splits_the_threads(
    profiled_workspace: Path, tmp_path: Path
) -> None:
    """With 4 workers at once (`runtime.workers` of the processes runner) the 1,000 users are cut into 4
    shards though one shard would hold them all (`users_per_shard`), and each scores with a quarter of the
    run's threads: each shard used all of them before (a settings audit), so the workers fought over
    the cores and, below users_per_shard, all but one idled."""
    ws = Workspace(profiled_workspace)
    runner = PoolRunner(slots=4)
    summary = run_publish(
        StageRun(PublishSettings(k=5), ws, warehouse=tmp_path / "w.duckdb", runner=runner, threads=4),
        run_id="r",
        vectors=workspace_vectors(profiled_workspace, seed=3),
    )
    assert PublishSettings().users_per_shard >= 1000 and summary.shards == 4
    (plan,) = runner.plans
    assert [(s.start, s.stop) for s in plan.shards] == [(0, 250), (250, 500), (500, 750), (750, 1000)]
    assert plan.threads == 1 and summary.rows == 1000 * 2 * 5
    # Profiles and histories are cut where the shards are (they were once cut by users_per_shard, so
    # every profile went to shard 0 here): each shard's parts hold its own users, and every shard has some.
    warehouse = tmp_path / "w.duckdb"
    users_of: dict[tuple[str, int], set[str]] = {}
    for kind, shard, root, path in sql(
        warehouse,
        "SELECT kind, shard, root, path FROM parts WHERE dropped_at IS NULL"
        " AND kind IN ('user_profiles', 'interactions') OR (kind = 'recommendations' AND domain = 'food')",
    ):
        ids = pq.read_table(warehouse.parent / root / path, columns=["user_id"])["user_id"].to_pylist()
        users_of.setdefault((kind, shard), set()).update(ids)
    for kind in ("user_profiles", "interactions"):
        for k, shard in users_of:
            assert k != kind or users_of[(kind, shard)] <= users_of[("recommendations", shard)], (kind, shard)
    # The fixture's 300 profiled users are the first 300 in user order: shards 0 and 1.
    assert [sh for k, sh in sorted(users_of) if k == "user_profiles"] == [0, 1]
    assert [sh for k, sh in sorted(users_of) if k == "interactions"] == [0, 1, 2, 3]


def test_sharded_publish_in_worker_processes_equals_one_shard(
    profiled_workspace: Path, tmp_path: Path
) -> None:
    ws = Workspace(profiled_workspace)
    vectors = workspace_vectors(profiled_workspace, seed=3)
    one = run_publish(
        StageRun(PublishSettings(k=5), ws, warehouse=tmp_path / "one" / "w.duckdb"),
        run_id="r",
        vectors=vectors,
    )
    runner = PoolRunner()
    many = run_publish(
        StageRun(
            PublishSettings(k=5, users_per_shard=300, row_group_users=50),
            ws,
            warehouse=tmp_path / "many" / "w.duckdb",
            runner=runner,
        ),
        run_id="r",
        vectors=vectors,
    )
    assert runner.called == ["plan_publish", "register_publish"] and runner.mapped == ["score_shard"]
    assert (one.shards, many.shards) == (1, 4)
    assert many.rows == one.rows == 1000 * 2 * 5 and many.users_short == one.users_short
    lists = "SELECT user_id, domain, rank, item_id, score FROM recommendations ORDER BY ALL"
    assert sql(tmp_path / "many" / "w.duckdb", lists) == sql(tmp_path / "one" / "w.duckdb", lists)
    serving = "SELECT user_id, domain, item_ids, scores FROM latest_serving ORDER BY ALL"
    assert sql(tmp_path / "many" / "w.duckdb", serving) == sql(tmp_path / "one" / "w.duckdb", serving)
    profiles = "SELECT * FROM latest_user_profiles ORDER BY user_id"
    assert sql(tmp_path / "many" / "w.duckdb", profiles) == sql(tmp_path / "one" / "w.duckdb", profiles)
    # Each shard wrote its own parts: recommendations and serving lists per domain, its users' profiles.
    parts = sql(
        tmp_path / "many" / "w.duckdb",
        "SELECT kind, shard, count(*), sum(rows) FROM parts WHERE dropped_at IS NULL GROUP BY ALL ORDER BY ALL",
    )
    by = {(k, sh): (n, rows) for k, sh, n, rows in parts}
    for shard, users in enumerate([300, 300, 300, 100]):
        assert by[("recommendations", shard)] == (2, users * 2 * 5)
        assert by[("serving", shard)] == (2, users * 2)
    assert sum(by[("user_profiles", sh)][1] for sh in range(4) if ("user_profiles", sh) in by) == 300
    # ... and its users' histories, the same rows as one shard's.
    assert sum(by[("interactions", sh)][1] for sh in range(4)) == 8896
    history = "SELECT user_id, position, domain, item_id, timestamp FROM latest_interactions ORDER BY ALL"
    assert sql(tmp_path / "many" / "w.duckdb", history) == sql(tmp_path / "one" / "w.duckdb", history)
    # A serving row is the user's list, best first: what a key-value store loads.
    (row,) = sql(
        tmp_path / "many" / "w.duckdb",
        "SELECT item_ids, scores FROM latest_serving WHERE user_id = ? AND domain = 'food'",
        [vectors["food"].user_ids[7]],
    )
    ranked = sql(
        tmp_path / "many" / "w.duckdb",
        "SELECT item_id, score FROM latest_recommendations WHERE user_id = ? AND domain = 'food' ORDER BY rank",
        [vectors["food"].user_ids[7]],
    )
    assert list(zip(*row, strict=True)) == [(i, pytest.approx(s)) for i, s in ranked]


def test_index_kind_auto_by_catalogue_size_reports_recall_and_warns_below_the_floor(
    profiled_workspace: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from bridgerec.storage.index_store import IndexSettings

    ws = Workspace(profiled_workspace)
    vectors = workspace_vectors(profiled_workspace, seed=4)
    # food has 2,217 items (exact search), kitchen 4,230 (above the threshold: IVF, sized by its items:
    # sqrt(4230) ~ 64 cells).
    low = IndexSettings(auto_threshold_items=3000, ivf_nprobe=1, recall_sample_users=200, recall_floor=0.999)
    warehouse = tmp_path / "w.duckdb"
    s = run_publish(
        StageRun(PublishSettings(k=10, index=low), ws, warehouse=warehouse), run_id="low", vectors=vectors
    )
    assert s.index_kinds == {"food": "flat", "kitchen": "ivf(nlist=64, nprobe=1)"}
    assert list(s.index_recall) == ["kitchen"] and s.index_recall["kitchen"] < 0.999
    assert s.recall_warning and "kitchen recall@10" in s.recall_warning
    assert "below publish.index.recall_floor" in caplog.text
    (run,) = sql(warehouse, "SELECT index_kind, index_recall FROM runs WHERE run_id = 'low'")
    assert run[0] == "food: flat; kitchen: ivf(nlist=64, nprobe=1)" and run[1] == pytest.approx(
        s.index_recall["kitchen"], abs=1e-4
    )
    # Probing every cell is exact: recall 1, no warning, and the lists equal exact search's.
    every = IndexSettings(
        auto_threshold_items=3000, ivf_nprobe=64, recall_sample_users=200, recall_floor=0.999
    )
    full = run_publish(
        StageRun(PublishSettings(k=10, index=every), ws, warehouse=warehouse), run_id="every", vectors=vectors
    )
    exact = run_publish(
        StageRun(PublishSettings(k=10, index=IndexSettings(kind="flat")), ws, warehouse=warehouse),
        run_id="exact",
        vectors=vectors,
    )
    assert full.index_recall == {"kitchen": 1.0} and full.recall_warning is None
    assert exact.index_kinds == {"food": "flat", "kitchen": "flat"} and exact.index_recall == {}
    lists = "SELECT user_id, domain, rank, item_id FROM recommendations WHERE run_id = ? ORDER BY ALL"
    assert sql(warehouse, lists, ["every"]) == sql(warehouse, lists, ["exact"])


def test_cli_recs_time_travel_and_warehouse_relink(profiled_workspace: Path, tmp_path: Path) -> None:
    ws = Workspace(profiled_workspace)
    warehouse = tmp_path / "ws" / "w.duckdb"
    for i in (1, 2):
        run_publish(
            StageRun(PublishSettings(k=3), ws, warehouse=warehouse),
            run_id=f"r{i}",
            vectors=workspace_vectors(profiled_workspace, seed=10 + i),
        )
    user = sql(warehouse, "SELECT min(user_id) FROM latest_recommendations")[0][0]
    runner = CliRunner()

    def recs(path: Path, *extra: str) -> dict:
        out = runner.invoke(app, ["recs", "--warehouse", str(path), "--user", user, "--json", *extra])
        assert out.exit_code == 0, out.output
        return json.loads(out.stdout)

    latest, older = recs(warehouse), recs(warehouse, "--run-id", "r1")
    assert (latest["run_id"], older["run_id"]) == ("r2", "r1")
    want = sql(
        warehouse,
        "SELECT domain, item_id FROM recommendations WHERE run_id = 'r1' AND user_id = ? ORDER BY domain, rank",
        [user],
    )
    assert [(d, r["item_id"]) for d, rows in older["recommendations"].items() for r in rows] == want
    assert latest["recommendations"] != older["recommendations"]
    out = runner.invoke(app, ["recs", "--warehouse", str(warehouse), "--user", user, "--run-id", "nope"])
    assert out.exit_code == 2 and "not in the warehouse" in out.output
    # The workspace moves: `recs` still works; `warehouse relink` makes plain DuckDB work there too.
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "ws", moved)
    assert recs(moved / "w.duckdb", "--run-id", "r1") == older
    with pytest.raises(duckdb.IOException):
        sql(moved / "w.duckdb", "SELECT count(*) FROM latest_recommendations")
    out = runner.invoke(app, ["warehouse", "relink", "--warehouse", str(moved / "w.duckdb")])
    assert out.exit_code == 0, out.output
    assert sql(moved / "w.duckdb", "SELECT count(*) FROM latest_recommendations") == [(1000 * 2 * 3,)]


def test_rows_are_cut_by_shard_in_user_then_position_order_whatever_their_order(tmp_path: Path) -> None:
    """Ingest writes its interactions in user, position order, so staging them by shard copies nothing;
    rows in any other order (or of users without vectors) are sorted (or dropped) first."""
    from bridgerec.tasks.publish.shards import PublishShard, _stage_by_shard

    users = pa.array(["a", "b", "c", "d"])
    rows = pa.table({"user_id": ["c", "a", "x", "b", "a", "d", "c"], "position": [1, 1, 0, 0, 0, 0, 0]})
    shards = (PublishShard(0, 0, 2), PublishShard(1, 2, 4))
    for n, table in enumerate((rows, rows.sort_by([("user_id", "ascending"), ("position", "ascending")]))):
        _stage_by_shard(tmp_path / str(n), table, users, shards, within="position")
        got = [pq.read_table(tmp_path / str(n) / f"{i:05d}.parquet").to_pylist() for i in (0, 1)]
        assert got == [
            [
                {"user_id": "a", "position": 0},
                {"user_id": "a", "position": 1},
                {"user_id": "b", "position": 0},
            ],
            [
                {"user_id": "c", "position": 0},
                {"user_id": "c", "position": 1},
                {"user_id": "d", "position": 0},
            ],
        ]
