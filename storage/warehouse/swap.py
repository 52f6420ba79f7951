"""Changing the warehouse file: every change is made on a copy that is swapped in whole.

DuckDB lets one process write a database file and, while it does, refuses every other process, read-only
openers included ("Could not set lock on file"; measured in the stack notes). So no process ever writes
the live file. Every change (a night registered, a run's status) is made on a fresh copy under a
temporary name, checkpointed, closed and fsynced, then renamed over the warehouse path with `os.replace`,
which is atomic on POSIX file systems:

- an analyst who opens the warehouse read-only at any moment gets either the old file or the new one,
  whole; a connection opened before the swap keeps reading its (old) file until it closes;
- a change that fails midway deletes its copy and leaves the live file byte for byte as it was;
- writers queue on an advisory lock file (`<warehouse>.lock`), so two changes never race.

The file holds only the small tables and the views (the rows are Parquet parts, storage/warehouse/
parts.py), so the copy costs milliseconds whatever the retention. Linux/macOS only: Windows cannot
rename over a file that a reader holds open.

A read-write session of another tool (the DuckDB CLI, DBeaver and `duckdb --ui` open read-write by
default) holds a lock that shuts out every other connection, and writes a write-ahead log
(`<warehouse>.wal`) that DuckDB finds by name: swapped beside a new file, that log would make the new
warehouse unreadable. So a writer first checks that no other process holds the live file (else it
refuses, with the holder's PID, and changes nothing), moves a log left by a session that died aside
(`<warehouse>.wal.stale-<UTC time>`, reported), checks again just before the swap, and opens the result
read-only after it. The file is written in the storage format of `storage_compatibility` (default
`v1.0.0`, which every DuckDB 1.x and 2.x client reads); a live file in another format is converted in
the same swap.
"""

from __future__ import annotations

import contextlib
import functools
import os
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

from bridgerec.runtime.logs import get_logger
from bridgerec.storage.files import fsync_path
from bridgerec.storage.warehouse.comments import apply_comments
from bridgerec.storage.warehouse.connection import (
    NOTHING_PUBLISHED,
    damaged,
    exclusive_lock,
    first_line,
    held_read_write,
    is_damage,
    is_lock_conflict,
    open_read_only,
)
from bridgerec.storage.warehouse.schema import WarehouseError, migrate, schema_version
from bridgerec.storage.warehouse.views import refresh_views

# The storage format new warehouse files are written in: v1.0.0 is read by every DuckDB 1.x client
# (the DuckDB CLI package, DBeaver's driver, older notebooks) and by 2.x; "latest" only by 2.x.
DEFAULT_STORAGE_COMPATIBILITY = "v1.0.0"


def _check_no_foreign_writer(path: Path) -> None:
    """Refuse to go on while another process holds `path` read-write (a read-only probe fails then)."""
    if path.exists():
        open_read_only(path, NOTHING_PUBLISHED).close()


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
                f"({duckdb.__version__}) writes: {first_line(exc)}"
            ) from None
        raise


def _lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


@contextlib.contextmanager
def writer_lock(path: Path, timeout_s: float = 900.0) -> Iterator[None]:
    """Exclusive advisory lock that serialises writers of one warehouse (readers never take it)."""
    with exclusive_lock(_lock_path(path), f"writing {path}", timeout_s, poll_s=0.05):
        yield


@dataclass
class RewriteTimings:
    copy_s: float = 0.0
    write_s: float = 0.0
    swap_s: float = 0.0
    bytes_copied: int = 0
    extra: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def rewrite(
    path: Path | str,
    threads: int = 1,
    storage_compatibility: str = DEFAULT_STORAGE_COMPATIBILITY,
    move: Any = None,
) -> Iterator[tuple[duckdb.DuckDBPyConnection, RewriteTimings]]:
    """A read-write connection on a fresh copy of the warehouse (migrated to the current schema; the
    migration that moves rows into parts needs `move`, a legacy.MoveContext, and waits for a publish
    otherwise). When the block ends, the views over parts are rewritten for the file's folder.

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
            migrate(con, context=move)
            yield con, timings
            refresh_views(con, path.parent)
            apply_comments(con)  # after the views: CREATE OR REPLACE VIEW drops their comments
            con.execute("CHECKPOINT")
            con.close()
            con = None
            timings.write_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            fsync_path(tmp)
            _check_no_foreign_writer(path)  # a session opened meanwhile
            _set_aside_stale_wal(path)
            os.replace(tmp, path)
            fsync_path(path.parent)
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
                f"warehouse {path} was swapped in but cannot be read back: {first_line(exc)}"
            ) from None


def relink(
    path: Path | str, threads: int = 1, storage_compatibility: str = DEFAULT_STORAGE_COMPATIBILITY
) -> None:
    """Rewrite the views for the folder the file is in now (after the workspace was moved), so that
    plain DuckDB clients read the parts there; one atomic swap, nothing else changes."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WarehouseError(f"warehouse {path} does not exist")
    with rewrite(path, threads, storage_compatibility):
        pass
