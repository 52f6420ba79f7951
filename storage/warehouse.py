"""The DuckDB warehouse analysts query: schema, numbered migrations, atomic publish, retention.

Why a file swap: DuckDB lets one process write a database file and, while it does, refuses every other
process, read-only openers included ("Could not set lock on file"; measured in the stack notes). So no
process ever writes the live file. Every change (a publish, a run's status) is made on a fresh copy
under a temporary name, checkpointed, closed and fsynced, then renamed over the warehouse path with
`os.replace`, which is atomic on POSIX file systems:

- an analyst who opens the warehouse read-only at any moment gets either the old file or the new one,
  whole; a connection opened before the swap keeps reading its (old) file until it closes;
- a change that fails midway deletes its copy and leaves the live file byte for byte as it was;
- writers queue on an advisory lock file (`<warehouse>.lock`), so two publishes never race.

The price is a copy of the file per change, which is cheap next to building a run (see docs/publish.md
for measured figures). Linux/macOS only: Windows cannot rename over a file that a reader holds open.

Analysts must open the warehouse read-only (`duckdb.connect(path, read_only=True)`); anything written
to the live file by hand is lost at the next publish. A read-write session of another tool (the DuckDB
CLI, DBeaver and `duckdb --ui` open read-write by default) holds a lock that shuts out every other
connection, and writes a write-ahead log (`<warehouse>.wal`) that DuckDB finds by name: swapped beside
a new file, that log would make the new warehouse unreadable. So a writer first checks that no other
process holds the live file (else it refuses, with the holder's PID, and changes nothing), moves a log
left by a session that died aside (`<warehouse>.wal.stale-<UTC time>`, reported), checks again just
before the swap, and opens the result read-only after it.

The file is written in the storage format of `storage_compatibility` (default `v1.0.0`, which every
DuckDB 1.x and 2.x client reads); a live file in another format is converted in the same swap.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from bridgerec.runtime.errors import InputError
from bridgerec.runtime.logs import get_logger

# The storage format new warehouse files are written in: v1.0.0 is read by every DuckDB 1.x client
# (the DuckDB CLI package, DBeaver's driver, older notebooks) and by 2.x; "latest" only by 2.x.
DEFAULT_STORAGE_COMPATIBILITY = "v1.0.0"
_HOLDER = re.compile(r"Conflicting lock is held in (?P<exe>.*?) \(PID (?P<pid>\d+)\)")

# ---- schema: numbered migrations, applied in order, each recorded in schema_migrations ----------------


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "core tables",
        """
        CREATE TABLE runs (
            run_id            VARCHAR PRIMARY KEY,
            seq               BIGINT,        -- publish order (1, 2, ...); NULL until the run completes
            status            VARCHAR NOT NULL CHECK (status IN ('running', 'completed', 'failed')),
            started_at        TIMESTAMPTZ NOT NULL,
            finished_at       TIMESTAMPTZ,
            model             VARCHAR,
            train_run_id      VARCHAR,       -- the trained model's run folder (WORKSPACE/runs/<id>)
            config_hash       VARCHAR,       -- publish settings
            inputs_hash       VARCHAR,       -- config + ingest/enrich/train outputs: equal = nothing new
            k                 INTEGER,
            n_users           BIGINT,
            n_items           BIGINT,
            n_interactions    BIGINT,
            n_domains         INTEGER,
            n_recommendations BIGINT,
            index_path        VARCHAR,       -- folder of this run's FAISS indexes
            message           VARCHAR,       -- why a run failed
            purged_at         TIMESTAMPTZ    -- recommendations, profiles and indexes dropped by retention
        );
        CREATE TABLE recommendations (
            run_id  VARCHAR NOT NULL,
            user_id VARCHAR NOT NULL,
            domain  VARCHAR NOT NULL,
            rank    SMALLINT NOT NULL,       -- 1..k
            item_id VARCHAR NOT NULL,
            score   FLOAT NOT NULL           -- the model's fused score; non-increasing with rank
        );
        CREATE TABLE metrics (
            run_id     VARCHAR NOT NULL,
            model      VARCHAR NOT NULL,
            split      VARCHAR NOT NULL,     -- valid | test
            protocol   VARCHAR NOT NULL,     -- sampled (100 negatives) | full (whole target domain)
            domain     VARCHAR NOT NULL,     -- the target domain, or 'all'
            user_group VARCHAR NOT NULL,     -- 'all', or overlap | single | short | long
            metric     VARCHAR NOT NULL,     -- hr@k | ndcg@k
            value      DOUBLE NOT NULL,
            users      BIGINT                -- users the figure averages over
        );
        CREATE TABLE items (
            item_id        VARCHAR PRIMARY KEY,
            domain         VARCHAR NOT NULL,
            title          VARCHAR NOT NULL,
            brand          VARCHAR,
            categories     VARCHAR,
            price          VARCHAR,
            updated_run_id VARCHAR NOT NULL  -- the last run whose catalogue held the item
        );
        CREATE TABLE user_profiles (
            run_id       VARCHAR NOT NULL,
            user_id      VARCHAR NOT NULL,
            profile_text VARCHAR NOT NULL
        );
        """,
    ),
    Migration(
        2,
        "latest views",
        """
        CREATE VIEW latest_run AS
            SELECT * FROM runs WHERE status = 'completed' AND purged_at IS NULL ORDER BY seq DESC LIMIT 1;
        CREATE VIEW latest_recommendations AS
            SELECT r.run_id, r.user_id, r.domain, r.rank, r.item_id, r.score, i.title
            FROM recommendations r LEFT JOIN items i ON i.item_id = r.item_id
            WHERE r.run_id = (SELECT run_id FROM latest_run);
        CREATE VIEW latest_metrics AS
            SELECT * FROM metrics WHERE run_id = (SELECT run_id FROM latest_run);
        CREATE VIEW latest_user_profiles AS
            SELECT * FROM user_profiles WHERE run_id = (SELECT run_id FROM latest_run);
        """,
    ),
    Migration(
        3,
        "profile interests",
        """
        -- The hierarchical profile's per-interest summaries and the LLM that wrote it.
        ALTER TABLE user_profiles ADD COLUMN cluster_summaries VARCHAR[];
        ALTER TABLE user_profiles ADD COLUMN llm_model VARCHAR;
        CREATE OR REPLACE VIEW latest_user_profiles AS
            SELECT * FROM user_profiles WHERE run_id = (SELECT run_id FROM latest_run);
        """,
    ),
    Migration(
        4,
        "nights in runs",
        """
        -- One row per night of the nightly flow (kind 'night', run_id 'night-<Prefect flow run id>') beside
        -- the published runs (kind 'publish', run_id = the train run id): 'running' when the night starts,
        -- its final state when it ends, also after a Prefect retry (same flow run, same row).
        -- Joins: night.flow_run_id = Prefect's flow run id; night.train_run_id = WORKSPACE/runs/<id>;
        -- night.published_run_id = runs.run_id of the published run serving after the night.
        ALTER TABLE runs ADD COLUMN kind VARCHAR DEFAULT 'publish';
        UPDATE runs SET kind = CASE WHEN seq IS NULL AND starts_with(run_id, 'nightly-') THEN 'night'
                                    ELSE 'publish' END;
        ALTER TABLE runs ADD COLUMN flow_run_id VARCHAR;       -- the Prefect flow run of a night
        ALTER TABLE runs ADD COLUMN published_run_id VARCHAR;  -- night: the run serving after it
        ALTER TABLE runs ADD COLUMN attempts INTEGER;          -- night: starts, retries included
        -- The quality gate of a night (docs/nightly.md, "Quality gate"): passed | refused | override |
        -- first (nothing published yet) | unchanged (same train run as published) | off
        ALTER TABLE runs ADD COLUMN gate VARCHAR;
        ALTER TABLE runs ADD COLUMN gate_message VARCHAR;
        -- Full-ranking validation NDCG@10 on the night's validation split: the new run, the published run
        -- re-scored on the same split, and the popularity floor.
        ALTER TABLE runs ADD COLUMN valid_ndcg10 DOUBLE;
        ALTER TABLE runs ADD COLUMN published_valid_ndcg10 DOUBLE;
        ALTER TABLE runs ADD COLUMN popularity_valid_ndcg10 DOUBLE;
        CREATE OR REPLACE VIEW latest_run AS
            SELECT * FROM runs WHERE status = 'completed' AND purged_at IS NULL AND kind = 'publish'
            ORDER BY seq DESC LIMIT 1;
        CREATE OR REPLACE VIEW latest_recommendations AS
            SELECT r.run_id, r.user_id, r.domain, r.rank, r.item_id, r.score, i.title
            FROM recommendations r LEFT JOIN items i ON i.item_id = r.item_id
            WHERE r.run_id = (SELECT run_id FROM latest_run);
        CREATE OR REPLACE VIEW latest_metrics AS
            SELECT * FROM metrics WHERE run_id = (SELECT run_id FROM latest_run);
        CREATE OR REPLACE VIEW latest_user_profiles AS
            SELECT * FROM user_profiles WHERE run_id = (SELECT run_id FROM latest_run);
        -- The data checks of each night before training (tasks/quality/datachecks.py): per domain and
        -- entity (interactions | users | items) tonight's count against the last checked night's.
        CREATE TABLE data_checks (
            night_id   VARCHAR NOT NULL,     -- runs.run_id of the night
            checked_at TIMESTAMPTZ NOT NULL,
            entity     VARCHAR NOT NULL,
            domain     VARCHAR NOT NULL,
            count      BIGINT NOT NULL,      -- tonight
            previous   BIGINT,               -- the last checked night (NULL on the first night)
            new        BIGINT,               -- keys tonight that were not there
            gone       BIGINT,               -- keys of the last night that are not there tonight
            share_new  DOUBLE,               -- new / count
            share_gone DOUBLE,               -- gone / previous
            change     DOUBLE,               -- count / previous - 1
            passed     BOOLEAN NOT NULL      -- false: this night was stopped by the check
        );
        -- What a night published, per domain (tasks/quality/stability.py): list churn against the
        -- previously published run, catalogue coverage, concentration on the most recommended items.
        CREATE TABLE list_stability (
            night_id          VARCHAR NOT NULL,
            run_id            VARCHAR NOT NULL,  -- the published run
            previous_run_id   VARCHAR,           -- the run published before it (NULL: none)
            domain            VARCHAR NOT NULL,
            users             BIGINT NOT NULL,
            users_compared    BIGINT NOT NULL,   -- users with a list in both runs
            mean_changed      DOUBLE,            -- mean share of a user's top-k not in their previous top-k
            p10_changed       DOUBLE,
            p50_changed       DOUBLE,
            p90_changed       DOUBLE,
            distinct_items    BIGINT NOT NULL,
            catalogue_items   BIGINT,
            coverage          DOUBLE,            -- distinct_items / catalogue_items
            top_item_id       VARCHAR,
            top_item_share    DOUBLE,            -- share of users whose list holds the top item
            top10_slot_share  DOUBLE             -- share of all slots taken by the 10 most recommended items
        );
        CREATE VIEW nights AS
            SELECT run_id, flow_run_id, status, started_at, finished_at, attempts, model, train_run_id,
                   published_run_id, gate, gate_message, valid_ndcg10, published_valid_ndcg10,
                   popularity_valid_ndcg10, message
            FROM runs WHERE kind = 'night';
        """,
    ),
    Migration(
        5,
        "crashed nights",
        """
        -- A night found 'running' by a later night whose process is gone (killed with SIGKILL, a lost
        -- machine) is marked 'crashed' by that later night; a night stopped by SIGTERM or SIGINT records
        -- itself 'failed', naming the signal. `host`, `pid` and `process_started_at` name the process
        -- that ran the night, so a later night can tell whether it is still alive. DuckDB cannot change a
        -- CHECK constraint in place: the table is rebuilt (the views read it by name).
        CREATE TABLE runs_v5 (
            run_id            VARCHAR PRIMARY KEY,
            seq               BIGINT,
            status            VARCHAR NOT NULL CHECK (status IN ('running', 'completed', 'failed', 'crashed')),
            started_at        TIMESTAMPTZ NOT NULL,
            finished_at       TIMESTAMPTZ,
            model             VARCHAR,
            train_run_id      VARCHAR,
            config_hash       VARCHAR,
            inputs_hash       VARCHAR,
            k                 INTEGER,
            n_users           BIGINT,
            n_items           BIGINT,
            n_interactions    BIGINT,
            n_domains         INTEGER,
            n_recommendations BIGINT,
            index_path        VARCHAR,
            message           VARCHAR,
            purged_at         TIMESTAMPTZ,
            kind              VARCHAR DEFAULT 'publish',
            flow_run_id       VARCHAR,
            published_run_id  VARCHAR,
            attempts          INTEGER,
            gate              VARCHAR,
            gate_message      VARCHAR,
            valid_ndcg10      DOUBLE,
            published_valid_ndcg10  DOUBLE,
            popularity_valid_ndcg10 DOUBLE,
            host              VARCHAR,       -- night: the machine whose process ran it
            pid               INTEGER,       -- night: that process
            process_started_at TIMESTAMPTZ   -- night: when that process started (a reused PID differs)
        );
        INSERT INTO runs_v5 BY NAME SELECT * FROM runs;
        DROP TABLE runs;
        ALTER TABLE runs_v5 RENAME TO runs;
        CREATE OR REPLACE VIEW nights AS
            SELECT run_id, flow_run_id, status, started_at, finished_at, attempts, model, train_run_id,
                   published_run_id, gate, gate_message, valid_ndcg10, published_valid_ndcg10,
                   popularity_valid_ndcg10, message, host, pid, process_started_at
            FROM runs WHERE kind = 'night';
        """,
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1].version

RUN_STATUSES = ("running", "completed", "failed", "crashed")


class WarehouseError(InputError):
    """The warehouse cannot be used as asked (missing, held by another process, newer schema); the
    message says why and what to do."""


class WarehouseDamaged(WarehouseError):
    """The warehouse file is damaged (a full disk, a bad sector, a copy cut short): DuckDB finds blocks
    that fail their checksum or metadata it cannot read. Readers and publish refuse it, changing nothing;
    the message says how to replace it."""


# What DuckDB says about a damaged file: checksums that do not match (data or metadata blocks), a file
# shorter than its metadata says, metadata it cannot follow, a header that is not a database's.
_DAMAGE = re.compile(
    r"Corrupt database file|checksum|Could not read enough bytes|MetadataReader|metadata pointer|"
    r"not a valid DuckDB database|database file .* is (?:corrupt|truncated)",
    re.IGNORECASE,
)


def is_damage(exc: BaseException) -> bool:
    """Whether a DuckDB error says the database file itself is damaged."""
    return isinstance(exc, duckdb.Error) and _DAMAGE.search(str(exc)) is not None


def damaged(path: Path | str, exc: BaseException) -> WarehouseDamaged:
    """The error for a damaged warehouse file: what DuckDB found, and the way back. bridgerec keeps no
    earlier copy of the file (each change swaps a new file in and the old one is gone), so the remedy is
    a new warehouse written from the workspace, or the user's own backup."""
    return WarehouseDamaged(
        f"warehouse {path} is damaged ({_first_line(exc)}); it was left as it was. Move it aside "
        f"(`mv {path} {path}.damaged`) and run `bridgerec publish --force` with the config that built it: "
        "that writes a new warehouse with the best trained run of the workspace (earlier runs too with "
        "`--run-id RUN` while WORKSPACE/runs/RUN exists; the nights' history is only in the damaged file). "
        "Or restore the file from a backup: bridgerec keeps no earlier copy (each publish replaces it)"
    )


def schema_version(con: duckdb.DuckDBPyConnection) -> int:
    """The highest migration applied; 0 for an empty database."""
    has = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_migrations'"
    ).fetchall()[0][0]
    if not has:
        return 0
    return int(con.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchall()[0][0])


def migrate(con: duckdb.DuckDBPyConnection, upto: int | None = None) -> list[int]:
    """Apply the pending migrations (each in its own transaction); return the versions applied."""
    con.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        "version INTEGER PRIMARY KEY, name VARCHAR NOT NULL, applied_at TIMESTAMPTZ NOT NULL)"
    )
    current = schema_version(con)
    if current > SCHEMA_VERSION:
        raise WarehouseError(
            f"the warehouse is at schema version {current}, newer than this bridgerec ({SCHEMA_VERSION}): "
            "upgrade bridgerec"
        )
    applied = []
    for m in MIGRATIONS:
        if m.version <= current or (upto is not None and m.version > upto):
            continue
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute(m.sql)
            con.execute(
                "INSERT INTO schema_migrations VALUES (?, ?, ?)", [m.version, m.name, datetime.now(UTC)]
            )
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
        applied.append(m.version)
    return applied


# ---- opening: readers read the live file; writers rewrite a copy and swap it in ----------------------


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def is_lock_conflict(exc: BaseException) -> bool:
    """Whether a DuckDB error says another process holds the file's lock."""
    return isinstance(exc, duckdb.Error) and (
        "Conflicting lock" in str(exc) or "Could not set lock" in str(exc)
    )


def held_read_write(path: Path, exc: BaseException, consequence: str) -> WarehouseError:
    """The error for a warehouse another process holds read-write: who holds it and what to do."""
    m = _HOLDER.search(str(exc))
    holder = f"PID {m['pid']}, {m['exe']}" if m else "another process"
    return WarehouseError(
        f"warehouse {path} is open read-write in another process ({holder}), which shuts out every "
        f"other connection; {consequence}. Close that session, or reopen it read-only "
        f"(`duckdb -readonly {path}`, `duckdb.connect(path, read_only=True)`, a read-only connection in "
        "DBeaver), then retry (docs/publish.md, 'Reading the warehouse')"
    )


def connect_reader(path: Path | str) -> duckdb.DuckDBPyConnection:
    """A read-only connection to the live warehouse (never blocked by a publish).

    Raises WarehouseError when the file is missing, held read-write by another process (naming its
    PID), or not a warehouse this DuckDB can read.
    """
    path = Path(path)
    if not path.is_file():
        raise WarehouseError(f"warehouse {path} does not exist: run `bridgerec publish` first")
    try:
        return duckdb.connect(str(path), read_only=True)
    except duckdb.Error as exc:
        if is_lock_conflict(exc):
            raise held_read_write(path, exc, "it cannot be read until that session ends") from None
        if is_damage(exc):
            raise damaged(path, exc) from None
        raise WarehouseError(f"warehouse {path} cannot be opened: {_first_line(exc)}") from None


@contextlib.contextmanager
def reading(path: Path | str) -> Iterator[duckdb.DuckDBPyConnection]:
    """`connect_reader`, closed after the block; a damaged block met by a query in it raises
    WarehouseDamaged naming the file (a file whose metadata opens can still hold damaged data)."""
    con = connect_reader(path)
    try:
        yield con
    except duckdb.Error as exc:
        if is_damage(exc):
            raise damaged(path, exc) from None
        raise
    finally:
        con.close()


def verify_readable(path: Path | str) -> None:
    """Read every block of the live warehouse once (every column of every table: DuckDB checks each
    block's checksum as it reads it); WarehouseDamaged when one fails. Publish calls it before any work,
    so a damaged file is refused before anything is built or written."""
    path = Path(path)
    if not path.exists():
        return
    _check_no_foreign_writer(path)  # a session holding it read-write: the publish's own message
    with reading(path) as con:
        tables = con.execute(
            "SELECT schema_name, table_name FROM duckdb_tables() WHERE database_name = current_database()"
        ).fetchall()
        for schema, table in tables:
            con.execute(f'SELECT count(hash(t)) FROM "{schema}"."{table}" t').fetchall()


def _check_no_foreign_writer(path: Path) -> None:
    """Refuse to go on while another process holds `path` read-write (a read-only probe fails then)."""
    if not path.exists():
        return
    try:
        duckdb.connect(str(path), read_only=True).close()
    except duckdb.Error as exc:
        if is_lock_conflict(exc):
            raise held_read_write(path, exc, "it was left as it was (nothing published, no swap)") from None
        if is_damage(exc):
            raise damaged(path, exc) from None
        raise WarehouseError(f"warehouse {path} cannot be opened: {_first_line(exc)}") from None


def _wal_path(path: Path) -> Path:
    return path.with_name(path.name + ".wal")


def _set_aside_stale_wal(path: Path) -> Path | None:
    """Move a write-ahead log that no live session owns (a read-write session that died before its
    checkpoint) out of the way, keeping it for whoever wants its changes back; return its new path.
    Only called while no other process holds the file."""
    wal = _wal_path(path)
    if not wal.exists():
        return None
    kept = wal.with_name(f"{wal.name}.stale-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%fZ')}")
    os.replace(wal, kept)
    get_logger().warning(
        "warehouse: %s had a write-ahead log left by a read-write session that did not close cleanly; "
        "moved it to %s (its uncommitted changes are not in the published warehouse)",
        path,
        kept,
    )
    return kept


def storage_header_version(path: Path) -> int | None:
    """The storage version number in a DuckDB file's header (64 = v1.0/1.1 format, 65..68 = the
    v1.2..v1.5 formats); None when the file is not a DuckDB database."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(20)
    except OSError:
        return None
    if len(head) < 20 or head[8:12] != b"DUCK":
        return None
    return int.from_bytes(head[12:20], "little")


@functools.lru_cache(maxsize=8)
def _header_version_for(compatibility: str) -> int:
    """The header version number DuckDB writes for a storage compatibility setting (measured once)."""
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.duckdb"
        con = _connect_writer(probe, compatibility)
        con.execute("CREATE TABLE t AS SELECT 1 AS a")
        con.execute("CHECKPOINT")
        con.close()
        version = storage_header_version(probe)
    if version is None:  # pragma: no cover - DuckDB always writes its header
        raise WarehouseError(f"DuckDB wrote no header for storage compatibility {compatibility!r}")
    return version


def _connect_writer(path: Path, compatibility: str) -> duckdb.DuckDBPyConnection:
    try:
        return duckdb.connect(str(path), config={"storage_compatibility_version": compatibility})
    except duckdb.Error as exc:
        if "storage" in str(exc).lower() and "version" in str(exc).lower():
            raise WarehouseError(
                f"publish.storage_compatibility = {compatibility!r} is not a storage version this DuckDB "
                f"({duckdb.__version__}) writes: {_first_line(exc)}"
            ) from None
        raise


def _lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


@contextlib.contextmanager
def writer_lock(path: Path, timeout_s: float = 900.0) -> Iterator[None]:
    """Exclusive advisory lock that serialises writers of one warehouse (readers never take it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(_lock_path(path), "a+") as fh:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise WarehouseError(
                        f"another process has been writing {path} for over {timeout_s:.0f} s "
                        f"(lock {_lock_path(path)})"
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class RewriteTimings:
    copy_s: float = 0.0
    write_s: float = 0.0
    swap_s: float = 0.0
    bytes_copied: int = 0
    extra: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def rewrite(
    path: Path | str, threads: int = 1, storage_compatibility: str = DEFAULT_STORAGE_COMPATIBILITY
) -> Iterator[tuple[duckdb.DuckDBPyConnection, RewriteTimings]]:
    """A read-write connection on a fresh copy of the warehouse (migrated to the current schema).

    When the block finishes, the copy is checkpointed, closed, fsynced and renamed over `path`; when it
    raises, the copy is deleted and `path` is untouched. The copy is written in the storage format of
    `storage_compatibility` (a DuckDB version such as "v1.0.0", or "latest"); a live file in another
    format is converted (COPY FROM DATABASE) instead of copied.

    Raises WarehouseError, changing nothing, when another process holds the live file read-write (at
    the start or just before the swap). A write-ahead log beside the live file that no session owns is
    moved aside (logged) before the swap, so it can never be replayed against the new file.
    """
    path = Path(path).expanduser().resolve()
    timings = RewriteTimings()
    with writer_lock(path):
        _check_no_foreign_writer(path)
        # Copies left by a writer that was killed mid-way; no other writer is running (we hold the lock).
        for stale in path.parent.glob(f".{path.name}.*.tmp*"):
            stale.unlink(missing_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        con: duckdb.DuckDBPyConnection | None = None
        try:
            t0 = time.perf_counter()
            wanted = _header_version_for(storage_compatibility)
            convert = path.exists() and storage_header_version(path) != wanted
            if path.exists() and not convert:
                shutil.copyfile(path, tmp)
                timings.bytes_copied = tmp.stat().st_size
            con = _connect_writer(tmp, storage_compatibility)
            if convert:
                _convert_into(con, path)
                timings.bytes_copied = path.stat().st_size
            timings.copy_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            con.execute(f"SET threads = {max(1, int(threads))}")
            migrate(con)
            yield con, timings
            con.execute("CHECKPOINT")
            con.close()
            con = None
            timings.write_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            _fsync(tmp)
            _check_no_foreign_writer(path)  # a session opened meanwhile
            _set_aside_stale_wal(path)
            os.replace(tmp, path)
            _fsync(path.parent)
            timings.swap_s = time.perf_counter() - t0
        except duckdb.Error as exc:  # the copy of a damaged live file fails where its blocks do
            if is_damage(exc):
                raise damaged(path, exc) from None
            raise
        finally:
            if con is not None:
                con.close()
            for leftover in (tmp, tmp.with_name(tmp.name + ".wal")):
                leftover.unlink(missing_ok=True)
        _verify_readable(path)


def _convert_into(con: duckdb.DuckDBPyConnection, live: Path) -> None:
    """Copy every table, view and constraint of `live` into the (empty) database of `con`."""
    target = con.execute("SELECT current_database()").fetchall()[0][0]
    con.execute(f"ATTACH '{str(live).replace(chr(39), chr(39) * 2)}' AS bridgerec_live (READ_ONLY)")
    try:
        con.execute(f'COPY FROM DATABASE bridgerec_live TO "{target}"')
    finally:
        con.execute("DETACH bridgerec_live")
    get_logger().info(
        "warehouse: converted %s into storage format %s",
        live,
        con.execute(
            "SELECT tags['storage_version'] FROM duckdb_databases() WHERE database_name = current_database()"
        ).fetchall()[0][0],
    )


def _verify_readable(path: Path) -> None:
    """After a swap: the new file must open read-only and show its schema version. A log written by a
    session that opened the old file in the last instant is moved aside and the check repeated."""
    for attempt in range(2):
        try:
            con = duckdb.connect(str(path), read_only=True)
            try:
                schema_version(con)
            finally:
                con.close()
            return
        except duckdb.Error as exc:
            if is_lock_conflict(exc):
                raise held_read_write(
                    path, exc, "the new warehouse was swapped in, but that session opened it right after"
                ) from None
            if attempt == 0 and _set_aside_stale_wal(path) is not None:
                continue
            raise WarehouseError(
                f"warehouse {path} was swapped in but cannot be read back: {_first_line(exc)}"
            ) from None


# ---- publishing a run -----------------------------------------------------------------------------------


@dataclass
class RunRecord:
    """The `runs` row of a publish (status becomes 'completed' in the same swap as its data)."""

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


@dataclass
class PublishBatch:
    """Everything one run adds to the warehouse; Arrow tables with the columns of the target tables."""

    run: RunRecord
    recommendations: pa.Table  # user_id, domain, rank, item_id, score (run_id is added)
    items: pa.Table  # item_id, domain, title, brand, categories, price
    metrics: pa.Table | None = None  # model, split, protocol, domain, user_group, metric, value, users
    profiles: pa.Table | None = None  # user_id, profile_text [, cluster_summaries, llm_model_id]


@dataclass
class PublishResult:
    run_id: str
    seq: int
    rows: int
    purged_runs: list[str]
    timings: RewriteTimings


_RUN_COLUMNS = (
    "model",
    "train_run_id",
    "config_hash",
    "inputs_hash",
    "k",
    "n_users",
    "n_items",
    "n_interactions",
    "n_domains",
    "index_path",
)


def publish(
    path: Path | str,
    batch: PublishBatch,
    retention_runs: int,
    threads: int = 1,
    storage_compatibility: str = DEFAULT_STORAGE_COMPATIBILITY,
) -> PublishResult:
    """Add one run to the warehouse atomically and apply retention; return the runs whose data was purged.

    A run published again under the same id replaces its earlier rows.
    """
    if retention_runs < 1:
        raise ValueError("retention_runs must be at least 1")
    run = batch.run
    with rewrite(path, threads, storage_compatibility) as (con, timings):
        t0 = time.perf_counter()
        con.register("recs_in", batch.recommendations)
        con.register("items_in", batch.items)
        con.execute("BEGIN TRANSACTION")
        for table in ("recommendations", "metrics", "user_profiles"):
            con.execute(f"DELETE FROM {table} WHERE run_id = ?", [run.run_id])
        con.execute(
            "INSERT INTO recommendations SELECT ?, user_id, domain, rank, item_id, score FROM recs_in",
            [run.run_id],
        )
        rows = con.execute("SELECT count(*) FROM recommendations WHERE run_id = ?", [run.run_id]).fetchall()[
            0
        ][0]
        timings.extra["insert_recommendations_s"] = time.perf_counter() - t0
        con.execute(
            "INSERT INTO items SELECT item_id, domain, title, brand, categories, price, ? FROM items_in "
            "ON CONFLICT (item_id) DO UPDATE SET domain = excluded.domain, title = excluded.title, "
            "brand = excluded.brand, categories = excluded.categories, price = excluded.price, "
            "updated_run_id = excluded.updated_run_id",
            [run.run_id],
        )
        if batch.metrics is not None and batch.metrics.num_rows:
            con.register("metrics_in", batch.metrics)
            con.execute(
                "INSERT INTO metrics SELECT ?, model, split, protocol, domain, user_group, metric, value, users "
                "FROM metrics_in",
                [run.run_id],
            )
        if batch.profiles is not None and batch.profiles.num_rows:
            con.register("profiles_in", _with_optional_columns(batch.profiles))
            con.execute(
                "INSERT INTO user_profiles (run_id, user_id, profile_text, cluster_summaries, llm_model) "
                "SELECT ?, user_id, profile_text, cluster_summaries, llm_model_id FROM profiles_in "
                "WHERE profile_text IS NOT NULL",
                [run.run_id],
            )
        seq = con.execute("SELECT coalesce(max(seq), 0) + 1 FROM runs").fetchall()[0][0]
        values = [getattr(run, c) for c in _RUN_COLUMNS]
        con.execute(
            f"INSERT INTO runs (run_id, seq, status, started_at, finished_at, n_recommendations, "
            f"{', '.join(_RUN_COLUMNS)}) VALUES (?, ?, 'completed', ?, ?, ?, "
            f"{', '.join('?' for _ in _RUN_COLUMNS)}) "
            "ON CONFLICT (run_id) DO UPDATE SET seq = excluded.seq, status = excluded.status, "
            "started_at = excluded.started_at, finished_at = excluded.finished_at, "
            "n_recommendations = excluded.n_recommendations, message = NULL, purged_at = NULL, "
            + ", ".join(f"{c} = excluded.{c}" for c in _RUN_COLUMNS),
            [run.run_id, seq, run.started_at, datetime.now(UTC), rows, *values],
        )
        purged = _apply_retention(con, retention_runs)
        con.execute("COMMIT")
        for name in ("recs_in", "items_in", "metrics_in", "profiles_in"):
            with contextlib.suppress(Exception):
                con.unregister(name)
    return PublishResult(run.run_id, int(seq), int(rows), purged, timings)


def _with_optional_columns(profiles: pa.Table) -> pa.Table:
    """Profiles from an enrich stage that does not write the optional columns get them as nulls."""
    optional = {"cluster_summaries": pa.list_(pa.string()), "llm_model_id": pa.string()}
    for name, type_ in optional.items():
        if name not in profiles.column_names:
            profiles = profiles.append_column(name, pa.nulls(profiles.num_rows, type_))
    return profiles


def _apply_retention(con: duckdb.DuckDBPyConnection, keep: int) -> list[str]:
    """Drop the recommendations and profiles of completed runs older than the newest `keep`.

    The `runs` rows and the metrics stay: they are small and are the history analysts chart.
    """
    old = [
        r[0]
        for r in con.execute(
            "SELECT run_id FROM runs WHERE status = 'completed' AND purged_at IS NULL AND kind = 'publish' "
            "ORDER BY seq DESC OFFSET ?",
            [keep],
        ).fetchall()
    ]
    if old:
        con.execute("DELETE FROM recommendations WHERE list_contains(?, run_id)", [old])
        con.execute("DELETE FROM user_profiles WHERE list_contains(?, run_id)", [old])
        con.execute("UPDATE runs SET purged_at = ? WHERE list_contains(?, run_id)", [datetime.now(UTC), old])
    return old


def record_run_status(
    path: Path | str,
    run_id: str,
    status: str,
    *,
    started_at: datetime | None = None,
    message: str | None = None,
    model: str | None = None,
    threads: int = 1,
    storage_compatibility: str = DEFAULT_STORAGE_COMPATIBILITY,
) -> None:
    """Record a run as 'running' (at its start) or 'failed' (with a message), with the same atomic swap.

    'completed' is set only by `publish`, in the same swap as the run's rows, so a completed run always
    has its data. A completed run cannot be marked running or failed afterwards.
    """
    if status not in ("running", "failed"):
        raise ValueError(f"status must be 'running' or 'failed' (publish sets 'completed'), got {status!r}")
    now = datetime.now(UTC)
    with rewrite(path, threads, storage_compatibility) as (con, _):
        row = con.execute("SELECT status FROM runs WHERE run_id = ?", [run_id]).fetchall()
        if row and row[0][0] == "completed":
            raise WarehouseError(f"run {run_id!r} is already completed; its status cannot become {status!r}")
        con.execute(
            "INSERT INTO runs (run_id, status, started_at, finished_at, model, message) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (run_id) DO UPDATE SET status = excluded.status, "
            "finished_at = excluded.finished_at, message = excluded.message, "
            "model = coalesce(excluded.model, model)",
            [run_id, status, started_at or now, now if status == "failed" else None, model, message],
        )


# ---- nights of the nightly flow (kind 'night') ----------------------------------------------------------


@dataclass
class NightRecord:
    """A night's row in `runs`. Times are UTC: `started_at` when the night first started (a retry keeps
    it), `finished_at` when its last attempt ended; the same meaning as for published runs."""

    run_id: str  # 'night-<Prefect flow run id>'
    flow_run_id: str | None
    status: str  # running | completed | failed
    started_at: datetime
    finished_at: datetime | None = None
    model: str | None = None
    train_run_id: str | None = None
    published_run_id: str | None = None
    gate: str | None = None
    gate_message: str | None = None
    valid_ndcg10: float | None = None
    published_valid_ndcg10: float | None = None
    popularity_valid_ndcg10: float | None = None
    message: str | None = None
    # The night's data checks (tasks/quality/datachecks.py rows), written in the same swap.
    data_checks: list[dict[str, Any]] | None = None
    data_checks_passed: bool = True
    # tasks/quality/stability.py rows of the run the night published (with run_id, previous_run_id).
    list_stability: list[dict[str, Any]] | None = None
    # The process that runs the night (a later night marks it 'crashed' when it is gone).
    host: str | None = None
    pid: int | None = None
    process_started_at: datetime | None = None


_STABILITY_COLUMNS = (
    "run_id",
    "previous_run_id",
    "domain",
    "users",
    "users_compared",
    "mean_changed",
    "p10_changed",
    "p50_changed",
    "p90_changed",
    "distinct_items",
    "catalogue_items",
    "coverage",
    "top_item_id",
    "top_item_share",
    "top10_slot_share",
)
_DATA_CHECK_COLUMNS = (
    "entity",
    "domain",
    "count",
    "previous",
    "new",
    "gone",
    "share_new",
    "share_gone",
    "change",
)

_NIGHT_COLUMNS = (
    "flow_run_id",
    "status",
    "finished_at",
    "model",
    "train_run_id",
    "published_run_id",
    "gate",
    "gate_message",
    "valid_ndcg10",
    "published_valid_ndcg10",
    "popularity_valid_ndcg10",
    "message",
    "host",
    "pid",
    "process_started_at",
)


def record_night(
    path: Path | str,
    night: NightRecord,
    threads: int = 1,
    storage_compatibility: str = DEFAULT_STORAGE_COMPATIBILITY,
) -> None:
    """Write a night's row with the warehouse's atomic swap.

    'running' (at the start of every attempt) counts an attempt and clears the previous attempt's end;
    a final state ('completed' or 'failed') fills in what the night did. `started_at` is the first
    attempt's. Raises ValueError for another status or a run id that is a published run's.
    ('crashed' is set by `mark_crashed`, by a later night.)
    """
    if night.status not in RUN_STATUSES:
        raise ValueError(f"status must be one of {RUN_STATUSES}, got {night.status!r}")
    with rewrite(path, threads, storage_compatibility) as (con, _):
        row = con.execute("SELECT kind FROM runs WHERE run_id = ?", [night.run_id]).fetchall()
        if row and row[0][0] != "night":
            raise WarehouseError(f"run {night.run_id!r} is a published run, not a night")
        values = [getattr(night, c) for c in _NIGHT_COLUMNS]
        if night.status == "running":
            values[_NIGHT_COLUMNS.index("finished_at")] = None
        if night.status == "running":  # a new attempt: nothing of the previous attempt's outcome holds
            updates = (
                ", ".join(f"{c} = excluded.{c}" for c in _NIGHT_COLUMNS) + ", attempts = runs.attempts + 1"
            )
        else:
            updates = ", ".join(
                f"{c} = excluded.{c}"
                if c in ("status", "finished_at")
                else f"{c} = coalesce(excluded.{c}, runs.{c})"
                for c in _NIGHT_COLUMNS
            )
        con.execute(
            f"INSERT INTO runs (run_id, kind, started_at, attempts, {', '.join(_NIGHT_COLUMNS)}) "
            f"VALUES (?, 'night', ?, 1, {', '.join('?' for _ in _NIGHT_COLUMNS)}) "
            f"ON CONFLICT (run_id) DO UPDATE SET {updates}",
            [night.run_id, night.started_at, *values],
        )
        if night.data_checks:
            con.execute("DELETE FROM data_checks WHERE night_id = ?", [night.run_id])
            now = datetime.now(UTC)
            con.executemany(
                f"INSERT INTO data_checks (night_id, checked_at, {', '.join(_DATA_CHECK_COLUMNS)}, passed) "
                f"VALUES (?, ?, {', '.join('?' for _ in _DATA_CHECK_COLUMNS)}, ?)",
                [
                    [night.run_id, now, *[r.get(c) for c in _DATA_CHECK_COLUMNS], night.data_checks_passed]
                    for r in night.data_checks
                ],
            )
        if night.list_stability:
            con.execute("DELETE FROM list_stability WHERE night_id = ?", [night.run_id])
            con.executemany(
                f"INSERT INTO list_stability (night_id, {', '.join(_STABILITY_COLUMNS)}) "
                f"VALUES (?, {', '.join('?' for _ in _STABILITY_COLUMNS)})",
                [[night.run_id, *[r.get(c) for c in _STABILITY_COLUMNS]] for r in night.list_stability],
            )


def running_nights(path: Path | str) -> list[dict[str, Any]]:
    """The nights recorded 'running' (run_id, flow_run_id, started_at, host, pid, process_started_at);
    [] when the warehouse is missing or older than the nights (migration 4)."""
    path = Path(path)
    if not path.is_file():
        return []
    with reading(path) as con:
        if schema_version(con) < 4:
            return []
        process = (
            "host, pid, process_started_at"
            if schema_version(con) >= 5
            else "NULL AS host, NULL AS pid, NULL AS process_started_at"
        )
        return _rows(
            con,
            f"SELECT run_id, flow_run_id, started_at, {process} FROM runs "
            "WHERE kind = 'night' AND status = 'running' ORDER BY started_at",
        )


def mark_crashed(
    path: Path | str,
    messages: dict[str, str],
    threads: int = 1,
    storage_compatibility: str = DEFAULT_STORAGE_COMPATIBILITY,
) -> list[str]:
    """Mark nights 'crashed' (run_id -> message saying who found it and why), in one atomic swap; only
    rows still 'running' change (a night that ended meanwhile keeps its own end). Returns those marked."""
    if not messages:
        return []
    now = datetime.now(UTC)
    marked: list[str] = []
    with rewrite(path, threads, storage_compatibility) as (con, _):
        for run_id, message in messages.items():
            changed = con.execute(
                "UPDATE runs SET status = 'crashed', finished_at = ?, message = ? "
                "WHERE run_id = ? AND kind = 'night' AND status = 'running' RETURNING run_id",
                [now, message[:2000], run_id],
            ).fetchall()
            marked += [r[0] for r in changed]
    return marked


def published_run(path: Path | str) -> dict[str, Any] | None:
    """The run analysts see now (`latest_run`), or None when the warehouse is missing or empty."""
    path = Path(path)
    if not path.is_file():
        return None
    with reading(path) as con:
        try:
            return latest_run(con)
        except duckdb.CatalogException:
            return None


# ---- reading ---------------------------------------------------------------------------------------------


def _rows(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
    cur = con.execute(sql, params or [])
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def list_runs(path: Path | str, limit: int | None = None) -> list[dict[str, Any]]:
    """The runs table, newest first (completed runs by publish order, then the others by start)."""
    with reading(path) as con:
        kind = (
            "kind, flow_run_id, published_run_id, gate, gate_message, valid_ndcg10, "
            if _has_nights(con)
            else ""
        )
        sql = (
            f"SELECT run_id, {kind}status, seq, started_at, finished_at, model, train_run_id, k, n_users, "
            "n_items, n_interactions, n_domains, n_recommendations, purged_at IS NULL AND status = 'completed' "
            "AND seq IS NOT NULL AS retained, index_path, message FROM runs "
            "ORDER BY coalesce(finished_at, started_at) DESC, seq DESC NULLS LAST"
        )
        if limit is not None:
            sql += " LIMIT ?"
        return _rows(con, sql, [limit] if limit is not None else [])


def _has_nights(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether the file is at migration 4 or later (readers never migrate: a publish does)."""
    return schema_version(con) >= 4


def latest_run(con: duckdb.DuckDBPyConnection) -> dict[str, Any] | None:
    rows = _rows(con, "SELECT * FROM latest_run")
    return rows[0] if rows else None


def user_recommendations(
    path: Path | str, user_id: str, domain: str | None = None, run_id: str | None = None
) -> dict[str, Any]:
    """A user's top-k per domain (with item titles) and profile, from the latest run or `run_id`."""
    with reading(path) as con:
        if run_id is None:
            run = latest_run(con)
            if run is None:
                raise WarehouseError(f"warehouse {path} holds no completed run")
        else:
            found = _rows(con, "SELECT * FROM runs WHERE run_id = ?", [run_id])
            if not found:
                raise WarehouseError(f"run {run_id!r} is not in the warehouse (see `bridgerec runs list`)")
            run = found[0]
            if run["status"] != "completed" or run["purged_at"] is not None:
                raise WarehouseError(
                    f"run {run_id!r} has no recommendations (status {run['status']}, purged)"
                )
        rid = run["run_id"]
        known = con.execute(
            "SELECT count(*) FROM recommendations WHERE run_id = ? AND user_id = ?", [rid, user_id]
        ).fetchall()[0][0]
        if not known:
            raise WarehouseError(f"user {user_id!r} has no recommendations in run {rid!r}")
        recs = _rows(
            con,
            "SELECT r.domain, r.rank, r.item_id, r.score, i.title FROM recommendations r "
            "LEFT JOIN items i ON i.item_id = r.item_id "
            "WHERE r.run_id = ? AND r.user_id = ? AND (? IS NULL OR r.domain = ?) ORDER BY r.domain, r.rank",
            [rid, user_id, domain, domain],
        )
        if domain is not None and not recs:
            domains = [
                r[0]
                for r in con.execute(
                    "SELECT DISTINCT domain FROM recommendations WHERE run_id = ? ORDER BY 1", [rid]
                ).fetchall()
            ]
            raise WarehouseError(f"no domain {domain!r} in run {rid!r}; domains: {', '.join(domains)}")
        profile = con.execute(
            "SELECT profile_text, cluster_summaries FROM user_profiles WHERE run_id = ? AND user_id = ?",
            [rid, user_id],
        ).fetchall()
        by_domain: dict[str, list[dict[str, Any]]] = {}
        for r in recs:
            by_domain.setdefault(r.pop("domain"), []).append(r)
        return {
            "run_id": rid,
            "model": run["model"],
            "user_id": user_id,
            "profile": profile[0][0] if profile else None,
            "interests": (profile[0][1] or []) if profile else [],
            "recommendations": by_domain,
        }
