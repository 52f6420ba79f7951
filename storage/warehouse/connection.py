"""Opening the warehouse file: the read-only open every reader goes through, and its errors.

`open_read_only` is the one place a warehouse file is opened for reading (checks on a file that is not a
warehouse belong here); `connect` adds what a reader needs for the parts (storage/warehouse/views.py):
the views re-pointed when the file was moved, and remote roots readable.
"""

from __future__ import annotations

import re
from pathlib import Path

import duckdb

from bridgerec.storage.warehouse.schema import WarehouseError

# What a writer refused by another process's read-write session tells the user.
NOTHING_PUBLISHED = "it was left as it was (nothing published, no swap)"
_HOLDER = re.compile(r"Conflicting lock is held in (?P<exe>.*?) \(PID (?P<pid>\d+)\)")


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
        "DBeaver), then retry (docs/publish.md, 'Reading the warehouse')"
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
        raise WarehouseError(f"warehouse {path} does not exist: run `bridgerec publish` first")
    try:
        return duckdb.connect(str(path), read_only=True)
    except duckdb.Error as exc:
        if is_lock_conflict(exc):
            raise held_read_write(path, exc, consequence) from None
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
        raise WarehouseError(f"warehouse {path} cannot be read: {first_line(exc)}") from None
    except BaseException:
        con.close()
        raise
    return con


# The name every reader used before the parts layout.
connect_reader = connect
