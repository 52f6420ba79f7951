"""Opening the warehouse file: the read-only open every reader goes through, and its errors.

`open_read_only` is the one place a warehouse file is opened for reading (checks on a file that is not a
warehouse belong here); `connect` adds what a reader needs for the parts (storage/warehouse/views.py):
the views re-pointed when the file was moved, and remote roots readable.
"""

from __future__ import annotations

import contextlib
import fcntl
import re
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb

from bridgerec.runtime.terminal import printable
from bridgerec.storage.warehouse.parts import object_store_error
from bridgerec.storage.warehouse.schema import WarehouseDamaged, WarehouseError

# What a writer refused by another process's read-write session tells the user.
NOTHING_PUBLISHED = "it was left as it was (nothing published, no swap)"
_HOLDER = re.compile(r"Conflicting lock is held in (?P<exe>.*?) \(PID (?P<pid>\d+)\)")


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


def damaged(path: Path | str, exc: BaseException) -> WarehouseError:
    """The error for a damaged warehouse file: what DuckDB found, and the way back. bridgerec keeps no
    earlier copy of the file (each change swaps a new file in and the old one is gone), so the remedy is
    a new warehouse written from the workspace, or the user's own backup. The parts the file named stay
    where they are; a new warehouse writes its own. A file of text was never a warehouse (`--warehouse`
    given the config: a new user's trial, told to move their config aside): `not_a_database` says so."""
    return not_a_database(path) or WarehouseDamaged(
        f"warehouse {path} is damaged ({first_line(exc)}); it was left as it was. Move it aside "
        f"(`mv {path} {path}.damaged`) and run `bridgerec publish --force` with the config that built it: "
        "that writes a new warehouse with the best trained run of the workspace (earlier runs too with "
        "`--run-id RUN` while WORKSPACE/runs/RUN exists; the nights' history is only in the damaged file). "
        "Or restore the file from a backup: bridgerec keeps no earlier copy (each publish replaces it)"
    )


def not_a_database(path: Path | str, probe: int = 4096) -> WarehouseError | None:
    """The error for a path that holds text (a config, a CSV, a log) where a warehouse was expected, or
    None where its first `probe` bytes are not text (a DuckDB file holds NUL bytes in its header, also
    where the header is damaged)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(probe)
        if not head or b"\0" in head:
            return None
        text = head.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    start = printable(text.strip().splitlines()[0][:60]) if text.strip() else ""
    return WarehouseError(
        f"warehouse {path} is not a DuckDB database: it holds text (it starts `{start}`); the warehouse is "
        "the file a publish wrote (WORKSPACE/warehouse.duckdb, or the config's `warehouse`), and a config "
        "file goes to --config"
    )


def first_line(exc: BaseException) -> str:
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
        "DBeaver), then retry (docs/publish.md, 'Things to know as a reader')"
    )


def open_read_only(
    path: Path | str, consequence: str = "it cannot be read until that session ends"
) -> duckdb.DuckDBPyConnection:
    """A plain read-only DuckDB connection to the warehouse file (never blocked by a publish).

    Raises WarehouseError when the file is missing, held read-write by another process (naming its PID;
    `consequence` says what that stopped), or not a database this DuckDB can read.
    """
    path = Path(path)
    if not path.is_file():
        # A relative path (a config's relative workspace) is read from the working directory, which the
        # reader's shell may not share with the pipeline's.
        where = "" if path.is_absolute() else f" in the working directory {Path.cwd()}"
        cause = (
            ""
            if path.is_absolute()
            else " (relative paths are read from where the command runs: run it from the folder the "
            "pipeline ran in, or give --warehouse with an absolute path)"
        )
        raise WarehouseError(f"warehouse {path} does not exist{where}: run `bridgerec publish` first{cause}")
    try:
        return duckdb.connect(str(path), read_only=True)
    except duckdb.Error as exc:
        if is_lock_conflict(exc):
            raise held_read_write(path, exc, consequence) from None
        if is_damage(exc):
            raise damaged(path, exc) from None
        raise WarehouseError(f"warehouse {path} cannot be opened: {first_line(exc)}") from None


def connect(path: Path | str) -> duckdb.DuckDBPyConnection:
    """A read-only connection for analysts and bridgerec's readers: the tables and views of
    docs/publish.md, correct from any working directory, after the warehouse folder was moved or
    mounted elsewhere (the views are re-pointed for this connection), and with parts on S3 readable
    (through pyarrow's filesystem, registered on the connection). Raises WarehouseError as
    `open_read_only` does."""
    from bridgerec.storage.warehouse.views import prepare_reader

    path = Path(path).expanduser()
    con = open_read_only(path)
    try:
        prepare_reader(con, path.resolve().parent)
    except duckdb.Error as exc:
        con.close()
        if is_damage(exc):
            raise damaged(path, exc) from None
        raise WarehouseError(f"warehouse {path} cannot be read: {first_line(exc)}") from None
    except BaseException:
        con.close()
        raise
    return con


# The name every reader used before the parts layout.
connect_reader = connect


@contextlib.contextmanager
def reading(path: Path | str, consequence: str | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
    """`connect` (or, with `consequence`, the plain `open_read_only` a writer uses to look before it
    changes anything), closed after the block; a damaged block met by a query in it raises
    WarehouseDamaged naming the file (a file whose metadata opens can still hold damaged data)."""
    con = connect(path) if consequence is None else open_read_only(path, consequence)
    try:
        yield con
    except duckdb.Error as exc:
        if is_damage(exc):
            raise damaged(path, exc) from None
        if (remote := object_store_error(exc)) is not None:
            raise remote from None
        raise
    finally:
        con.close()


def verify_readable(path: Path | str) -> None:
    """Read every block of the live warehouse file once (every column of every table: DuckDB checks each
    block's checksum as it reads it); WarehouseDamaged when one fails. Publish calls it before any work,
    so a damaged file is refused before anything is built or written. (The rows in parts are not read:
    their files are checked by Parquet as they are read.)"""
    path = Path(path)
    if not path.exists():
        return
    with reading(path, NOTHING_PUBLISHED) as con:
        tables = con.execute(
            "SELECT schema_name, table_name FROM duckdb_tables() WHERE database_name = current_database()"
        ).fetchall()
        for schema, table in tables:
            con.execute(f'SELECT count(hash(t)) FROM "{schema}"."{table}" t').fetchall()


@contextlib.contextmanager
def exclusive_lock(lock: Path, what: str, timeout_s: float, poll_s: float = 0.1) -> Iterator[None]:
    """An exclusive advisory lock on the file `lock` (created with its folder), waited for up to
    `timeout_s` seconds (polled every `poll_s`); WarehouseError "another process has been <what> ..."
    past it. Released when the block ends, or by the kernel when the holder dies."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as fh:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise WarehouseError(
                        f"another process has been {what} for over {timeout_s:.0f} s (lock {lock})"
                    ) from None
                time.sleep(poll_s)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
