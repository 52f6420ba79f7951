"""Registering a night: its parts become the served run in one small atomic swap; retention and vacuum.

A publish writes its parts first (shards, storage/warehouse/parts.py), under its attempt
(storage/warehouse/attempts.py), then `register_night` makes them visible: in one rewrite of the small
warehouse file (storage/warehouse/swap.py) it records the parts, the run's metrics and its `runs` row
('completed'), marks what retention drops, and rewrites the views. Its cost is the night's items part
plus a copy of a file of a few hundred kB, whatever the number of nights kept.

Retention never deletes a file a view may still read: a dropped part (a run past `retention_runs`, an
older attempt of a republished run, a superseded catalogue) leaves the views at once, and its file is
deleted by the first publish at least `grace_hours` later (`vacuum`), after the swap that unlisted it, so
that a connection opened on an older copy of the file keeps working for that long. Rows of the `parts`
table are removed only after their files are gone, so nothing is ever left that no row names.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bridgerec.storage.warehouse.attempts import Attempt, publish_attempt
from bridgerec.storage.warehouse.connection import NOTHING_PUBLISHED, open_read_only
from bridgerec.storage.warehouse.legacy import MoveContext
from bridgerec.storage.warehouse.parts import (
    PartInfo,
    PartTarget,
    delete_files,
    filesystem,
    record_parts,
    resolve_root,
)
from bridgerec.storage.warehouse.schema import PARTS_VERSION, schema_version
from bridgerec.storage.warehouse.swap import DEFAULT_STORAGE_COMPATIBILITY, RewriteTimings, rewrite

DEFAULT_GRACE_HOURS = 24.0
ITEM_COLUMNS = ["item_id", "domain", "title", "brand", "categories", "price"]


@dataclass
class RunRecord:
    """The `runs` row of a publish (status becomes 'completed' in the same swap as its parts)."""

    run_id: str
    started_at: datetime
    model: str | None = None
    train_run_id: str | None = None
    config_hash: str | None = None
    inputs_hash: str | None = None
    k: int | None = None
    n_users: int | None = None
    n_items: int | None = None
    n_interactions: int | None = None
    n_domains: int | None = None
    index_path: str | None = None
    index_kind: str | None = None  # per domain, e.g. "food: flat; kitchen: ivf(nlist=1024, nprobe=32)"
    index_recall: float | None = None  # lowest per-domain recall@k against exact search; None = exact


_RUN_COLUMNS = tuple(f for f in RunRecord.__dataclass_fields__ if f not in ("run_id", "started_at"))


@dataclass
class Night:
    """What a publish registers: the run's row, its parts (written by the shards), the night's catalogue
    (merged into the run's items part) and the run's metrics."""

    run: RunRecord
    parts: list[PartInfo]
    items: pa.Table  # item_id, domain, title, brand, categories, price
    metrics: pa.Table | None = None  # model, split, protocol, domain, user_group, metric, value, users


@dataclass
class Retention:
    runs: int = 7  # completed runs whose parts stay served
    grace_hours: float = DEFAULT_GRACE_HOURS  # how long a dropped part's file outlives its last view


@dataclass
class PublishResult:
    run_id: str
    seq: int
    rows: int
    purged_runs: list[str]  # runs retention dropped tonight
    timings: RewriteTimings
    bytes_written: int = 0  # the night's parts
    files_deleted: int = 0  # vacuumed files of dropped parts
    vacuumed_runs: list[str] = field(default_factory=list)  # purged runs past the grace period


def register_night(
    attempt: Attempt,
    night: Night,
    retention: Retention,
    threads: int = 1,
    storage_compatibility: str = DEFAULT_STORAGE_COMPATIBILITY,
) -> PublishResult:
    """Serve the night's parts: items part, vacuum of old files, one atomic swap, vacuum after it."""
    t0 = time.perf_counter()
    target = attempt.target()
    parts = [*night.parts, _write_items(attempt.warehouse, target, night.items)]
    cutoff = datetime.now(UTC) - timedelta(hours=retention.grace_hours)
    before = vacuum(attempt.warehouse, cutoff)  # files no view has named for `grace_hours`
    items_s = time.perf_counter() - t0
    with rewrite(attempt.warehouse, threads, storage_compatibility, MoveContext(target)) as (con, timings):
        t1 = time.perf_counter()
        seq, purged = _record(con, attempt.write_id, night, parts, retention.runs, cutoff)
        timings.extra["register_s"] = time.perf_counter() - t1
    after = vacuum(attempt.warehouse, datetime.now(UTC) - timedelta(hours=retention.grace_hours))
    timings.extra["items_part_s"] = items_s
    rows = sum(p.rows for p in night.parts if p.kind == "recommendations")
    return PublishResult(
        night.run.run_id,
        seq,
        rows,
        purged,
        timings,
        bytes_written=sum(p.bytes for p in parts),
        files_deleted=before.files + after.files,
        vacuumed_runs=after.runs,
    )


def _record(
    con: duckdb.DuckDBPyConnection,
    write_id: str,
    night: Night,
    parts: list[PartInfo],
    keep: int,
    vacuumed_before: datetime,
) -> tuple[int, list[str]]:
    """The night's rows in the copy, in one transaction; returns (seq, purged runs)."""
    run = night.run
    now = datetime.now(UTC)
    con.execute("BEGIN TRANSACTION")
    # Parts whose files the vacuum before this swap deleted: their rows go now.
    con.execute("DELETE FROM parts WHERE dropped_at IS NOT NULL AND dropped_at <= ?", [vacuumed_before])
    # An earlier attempt of the same run id, and every older catalogue, leave the views.
    con.execute("UPDATE parts SET dropped_at = ? WHERE run_id = ? AND dropped_at IS NULL", [now, run.run_id])
    con.execute("UPDATE parts SET dropped_at = ? WHERE kind = 'items' AND dropped_at IS NULL", [now])
    record_parts(con, parts, write_id)
    con.execute("DELETE FROM metrics WHERE run_id = ?", [run.run_id])
    if night.metrics is not None and night.metrics.num_rows:
        con.register("metrics_in", night.metrics)
        con.execute(
            "INSERT INTO metrics SELECT ?, model, split, protocol, domain, user_group, metric, value, users "
            "FROM metrics_in",
            [run.run_id],
        )
        con.unregister("metrics_in")
    seq = con.execute("SELECT coalesce(max(seq), 0) + 1 FROM runs").fetchall()[0][0]
    served = [p for p in parts if p.run_id == run.run_id]
    history = [p.rows for p in served if p.kind == "interactions"]
    stats = [
        sum(p.rows for p in served if p.kind == "recommendations"),
        sum(history) if history else None,  # NULL: published without the users' histories
        write_id,
        sum(p.bytes for p in served),
        len(served),
    ]
    con.execute(
        f"INSERT INTO runs (run_id, seq, status, started_at, finished_at, n_recommendations, n_history, "
        f"write_id, data_bytes, n_parts, {', '.join(_RUN_COLUMNS)}) VALUES (?, ?, 'completed', ?, ?, ?, ?, ?, "
        f"?, ?, {', '.join('?' for _ in _RUN_COLUMNS)}) "
        "ON CONFLICT (run_id) DO UPDATE SET seq = excluded.seq, status = excluded.status, "
        "started_at = excluded.started_at, finished_at = excluded.finished_at, "
        "n_recommendations = excluded.n_recommendations, n_history = excluded.n_history, "
        "write_id = excluded.write_id, "
        "data_bytes = excluded.data_bytes, n_parts = excluded.n_parts, message = NULL, purged_at = NULL, "
        + ", ".join(f"{c} = excluded.{c}" for c in _RUN_COLUMNS),
        [run.run_id, seq, run.started_at, now, *stats, *(getattr(run, c) for c in _RUN_COLUMNS)],
    )
    _fill_valid_ndcg10(con)
    purged = _apply_retention(con, keep, now)
    con.execute("COMMIT")
    return int(seq), purged


def _fill_valid_ndcg10(con: duckdb.DuckDBPyConnection) -> None:
    """A published run's `valid_ndcg10`: its own validation NDCG@10 under full ranking, from `metrics`, so
    `SELECT valid_ndcg10 FROM latest_run` answers (a night's row has the gate's figure). Also fills the
    rows of runs published before the column was filled."""
    con.execute(
        "UPDATE runs SET valid_ndcg10 = m.value FROM (SELECT run_id, any_value(value) AS value FROM metrics "
        "WHERE split = 'valid' AND protocol = 'full' AND domain = 'all' AND user_group = 'all' "
        "AND metric = 'ndcg@10' GROUP BY run_id) m "
        "WHERE runs.run_id = m.run_id AND runs.kind = 'publish' AND runs.valid_ndcg10 IS NULL"
    )


def _apply_retention(con: duckdb.DuckDBPyConnection, keep: int, now: datetime) -> list[str]:
    """Completed runs older than the newest `keep` leave the views (their parts are dropped); their
    `runs` rows and metrics stay: they are small and are the history analysts chart."""
    if keep < 1:
        raise ValueError("retention_runs must be at least 1")
    old = [
        r[0]
        for r in con.execute(
            "SELECT run_id FROM runs WHERE status = 'completed' AND purged_at IS NULL AND kind = 'publish' "
            "ORDER BY seq DESC OFFSET ?",
            [keep],
        ).fetchall()
    ]
    if old:
        con.execute("UPDATE runs SET purged_at = ? WHERE list_contains(?, run_id)", [now, old])
        con.execute(
            "UPDATE parts SET dropped_at = ? WHERE list_contains(?, run_id) AND dropped_at IS NULL",
            [now, old],
        )
    return old


# ---- the night's catalogue ---------------------------------------------------------------------------


def _write_items(warehouse: Path, target: PartTarget, items: pa.Table) -> PartInfo:
    """The run's items part: tonight's catalogue, plus the items of the previous catalogue that left it
    (they stay, with the run that last held them); sorted by item_id."""
    tonight = items.select(ITEM_COLUMNS).append_column(
        "updated_run_id", pa.array([target.run_id] * items.num_rows, pa.string())
    )
    previous = previous_items(warehouse)
    if previous is not None and previous.num_rows:
        gone = pc.invert(pc.is_in(previous["item_id"], value_set=tonight["item_id"]))
        tonight = pa.concat_tables(
            [tonight, previous.filter(gone).select(tonight.column_names)], promote_options="permissive"
        )
    tonight = tonight.sort_by("item_id")
    return target.write(tonight, "items", 0)


def previous_items(warehouse: Path) -> pa.Table | None:
    """The catalogue the warehouse serves now (None when there is none yet)."""
    if not warehouse.is_file():
        return None
    con = open_read_only(warehouse, NOTHING_PUBLISHED)
    try:
        version = schema_version(con)
        if version == 0:
            return None
        if version < PARTS_VERSION:  # the single-file layout: a table
            return con.sql(
                "SELECT item_id, domain, title, brand, categories, price, updated_run_id FROM items"
            ).to_arrow_table()
        found = con.execute(
            "SELECT p.root, p.path FROM parts p JOIN runs r USING (run_id) WHERE p.kind = 'items' "
            "AND p.dropped_at IS NULL ORDER BY r.seq DESC NULLS LAST LIMIT 1"
        ).fetchall()
    finally:
        con.close()
    if not found:
        return None
    fs, base = filesystem(resolve_root(found[0][0], warehouse.parent))
    return pq.read_table(f"{base.rstrip('/')}/{found[0][1]}", filesystem=fs)


# ---- vacuum: files of dropped parts, once no view has named them for the grace period -----------------


@dataclass
class Vacuumed:
    files: int = 0
    runs: list[str] = field(default_factory=list)  # purged runs whose parts are all gone


def vacuum(warehouse: Path, cutoff: datetime) -> Vacuumed:
    """Delete the files of parts dropped at or before `cutoff` (in the live file: no view of it names
    them); their rows are removed by the next registration. Returns the files deleted and the purged
    runs past the cutoff (their index folders may go too)."""
    if not warehouse.is_file():
        return Vacuumed()
    con = open_read_only(warehouse, NOTHING_PUBLISHED)
    try:
        if schema_version(con) < PARTS_VERSION:
            return Vacuumed()
        rows = con.execute(
            "SELECT root, path FROM parts WHERE dropped_at IS NOT NULL AND dropped_at <= ? ORDER BY root, path",
            [cutoff],
        ).fetchall()
        runs = [
            r[0]
            for r in con.execute(
                "SELECT run_id FROM runs WHERE purged_at IS NOT NULL AND purged_at <= ? ORDER BY run_id",
                [cutoff],
            ).fetchall()
        ]
    finally:
        con.close()
    by_root: dict[str, list[str]] = {}
    for root, path in rows:
        by_root.setdefault(root, []).append(path)
    deleted = sum(
        delete_files(resolve_root(root, warehouse.parent), paths) for root, paths in by_root.items()
    )
    return Vacuumed(deleted, runs)


# ---- one night from whole tables (tests, tools, the single-process path) -----------------------------


@dataclass
class PublishBatch:
    """Everything one run adds, as whole tables: written as shard 0's parts, then registered."""

    run: RunRecord
    recommendations: pa.Table  # user_id, domain, rank, item_id, score (run_id is added)
    items: pa.Table  # item_id, domain, title, brand, categories, price
    metrics: pa.Table | None = None  # model, split, protocol, domain, user_group, metric, value, users
    profiles: pa.Table | None = None  # user_id, profile_text [, cluster_summaries, llm_model_id]


def default_root(warehouse: Path | str) -> str:
    """The data root when none is configured: `<warehouse name without suffix>.parts` beside the file."""
    return Path(warehouse).with_suffix("").name + ".parts"


def publish(
    path: Path | str,
    batch: PublishBatch,
    retention_runs: int,
    threads: int = 1,
    storage_compatibility: str = DEFAULT_STORAGE_COMPATIBILITY,
    data_root: str | None = None,
    grace_hours: float = DEFAULT_GRACE_HOURS,
) -> PublishResult:
    """Add one run from whole tables: one attempt, its parts as shard 0, registered atomically.

    A run published again under the same id replaces its earlier parts (they leave the views at once).
    """
    if retention_runs < 1:
        raise ValueError("retention_runs must be at least 1")
    path = Path(path).expanduser().resolve()
    with publish_attempt(path, batch.run.run_id, data_root or default_root(path)) as attempt:
        parts = write_rows(attempt.target(), 0, batch.recommendations, batch.profiles)
        night = Night(batch.run, parts, batch.items, batch.metrics)
        return register_night(
            attempt, night, Retention(retention_runs, grace_hours), threads, storage_compatibility
        )


def write_rows(target: PartTarget, shard: int, recs: pa.Table, profiles: pa.Table | None) -> list[PartInfo]:
    """A shard's parts from its rows: per domain, the recommendations (sorted by user, rank) and the
    serving lists; the profiles of its users (rows without a profile text are left out)."""
    con = duckdb.connect()
    try:
        con.execute("SET enable_progress_bar = false")
        con.register("recs", recs)
        parts = []
        for (domain,) in con.execute("SELECT DISTINCT domain FROM recs ORDER BY 1").fetchall():
            rows = con.sql(
                "SELECT ?::VARCHAR AS run_id, * FROM recs WHERE domain = ? ORDER BY user_id, rank",
                params=[target.run_id, domain],
            ).to_arrow_table()
            parts.append(target.write(rows, "recommendations", shard, domain))
            serving = con.sql(
                "SELECT ?::VARCHAR AS run_id, user_id, domain, list(item_id ORDER BY rank) AS item_ids, "
                "list(score ORDER BY rank) AS scores FROM recs WHERE domain = ? GROUP BY ALL ORDER BY user_id",
                params=[target.run_id, domain],
            ).to_arrow_table()
            parts.append(target.write(serving, "serving", shard, domain))
        if profiles is not None and profiles.num_rows:
            parts.append(target.write(profile_rows(target.run_id, profiles), "user_profiles", shard))
        return parts
    finally:
        con.close()


def profile_rows(run_id: str, profiles: pa.Table) -> pa.Table:
    """Enrich's profiles (user_id, profile_text [, cluster_summaries, llm_model_id]) as profile part rows,
    sorted by user; users without a profile text are left out."""
    optional = {"cluster_summaries": pa.list_(pa.string()), "llm_model_id": pa.string()}
    for name, type_ in optional.items():
        if name not in profiles.column_names:
            profiles = profiles.append_column(name, pa.nulls(profiles.num_rows, type_))
    profiles = profiles.filter(pc.is_valid(profiles["profile_text"])).sort_by("user_id")
    return pa.table(
        {
            "run_id": pa.array([run_id] * profiles.num_rows, pa.string()),
            "user_id": profiles["user_id"],
            "profile_text": profiles["profile_text"],
            "cluster_summaries": profiles["cluster_summaries"],
            "llm_model": profiles["llm_model_id"],
        }
    )
