"""Publish attempts: one at a time per warehouse, each journaled, so a dead one's parts are cleaned.

A publish holds `<warehouse>.publish.lock` from before its first part is written until its night is
registered (or it failed), and records itself in `<warehouse>.writes/<write_id>.json` (run id, data root)
before writing anything. Parts are named after the attempt's `write_id`. So whoever takes the lock next
knows that every other journal entry is an attempt that died (killed, power loss): its parts were never
registered (the warehouse file never named them; no view ever read them) unless the file's `parts`
table says so, and they are deleted, listing only that run's folders under the root. An attempt that
fails with an exception deletes its own parts at once.

The lock is a local advisory lock beside the warehouse file: shards may run on other machines (writing
to a shared folder or S3), but the attempt, its lock and its journal belong to the process that plans
and registers the night.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb

from bridgerec.runtime.logs import get_logger
from bridgerec.storage.warehouse.connection import NOTHING_PUBLISHED, exclusive_lock, open_read_only
from bridgerec.storage.warehouse.parts import (
    PartTarget,
    attempt_files,
    delete_files,
    remove_empty_run_folders,
    resolve_root,
)
from bridgerec.storage.warehouse.schema import schema_version


@dataclass(frozen=True)
class Attempt:
    """One publish attempt: where its parts go and under which write id."""

    warehouse: Path
    run_id: str
    write_id: str
    root: str  # the data root as given (relative to the warehouse folder, absolute, or a URI)
    scratch: Path | None = None  # a folder for the attempt's staged inputs, removed when it ends

    @property
    def resolved_root(self) -> str:
        return resolve_root(self.root, self.warehouse.parent)

    def target(self, row_group_users: int = 2048) -> PartTarget:
        """Where this attempt's shards write their parts."""
        return PartTarget(self.root, str(self.warehouse.parent), self.run_id, self.write_id, row_group_users)


def _journal_dir(warehouse: Path) -> Path:
    return warehouse.with_name(warehouse.name + ".writes")


def new_write_id() -> str:
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def publish_attempt(
    warehouse: Path | str,
    run_id: str,
    root: str,
    scratch_parent: Path | None = None,
    timeout_s: float = 6 * 3600,
) -> Iterator[Attempt]:
    """Hold the publish lock for one attempt: clean the parts (and scratch folders) of attempts that
    died, journal this one, and on an exception delete the parts it wrote. With `scratch_parent`, the
    attempt gets a scratch folder `<scratch_parent>/.stage-<write_id>` (for inputs its shards load),
    removed when the block ends. The journal entry is removed last (by then the night is registered, or
    its parts are gone)."""
    warehouse = Path(warehouse).expanduser().resolve()
    write_id = new_write_id()
    scratch = Path(scratch_parent).resolve() / f".stage-{write_id}" if scratch_parent is not None else None
    attempt = Attempt(warehouse, run_id, write_id, root, scratch)
    with exclusive_lock(
        warehouse.with_name(warehouse.name + ".publish.lock"), f"publishing {warehouse}", timeout_s
    ):
        clean_dead_attempts(warehouse)
        journal = _journal_dir(warehouse) / f"{attempt.write_id}.json"
        journal.parent.mkdir(exist_ok=True)
        entry = {"run_id": run_id, "write_id": attempt.write_id, "root": root, "pid": os.getpid()}
        entry |= {"host": socket.gethostname(), "started_at": datetime.now(UTC).isoformat()}
        entry["scratch"] = str(scratch) if scratch is not None else None
        journal.write_text(json.dumps(entry))
        if scratch is not None:
            scratch.mkdir(parents=True)
        try:
            yield attempt
        except BaseException:
            _delete_attempt(warehouse, entry)
            raise
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
            journal.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                journal.parent.rmdir()  # only when empty


def clean_dead_attempts(warehouse: Path) -> list[str]:
    """Delete the parts of every journaled attempt (the caller holds the publish lock, so none is alive)
    that the warehouse file does not name; return their write ids."""
    folder = _journal_dir(warehouse)
    if not folder.is_dir():
        return []
    registered = _registered_write_ids(warehouse)
    cleaned = []
    for journal in sorted(folder.glob("*.json")):
        try:
            entry = json.loads(journal.read_text())
        except (OSError, ValueError):
            entry = None
        if entry and entry.get("scratch"):
            shutil.rmtree(entry["scratch"], ignore_errors=True)
        if entry and entry.get("write_id") not in registered:
            n = _delete_attempt(warehouse, entry)
            get_logger().warning(
                "warehouse: removed %d parts of publish attempt %s (run %s), which did not finish",
                n,
                entry["write_id"],
                entry["run_id"],
            )
            cleaned.append(entry["write_id"])
        journal.unlink(missing_ok=True)
    return cleaned


def _delete_attempt(warehouse: Path, entry: dict[str, Any]) -> int:
    if entry.get("scratch"):
        shutil.rmtree(entry["scratch"], ignore_errors=True)
    root = resolve_root(entry["root"], warehouse.parent)
    files = attempt_files(root, entry["run_id"], entry["write_id"])
    deleted = delete_files(root, files)
    remove_empty_run_folders(root, entry["run_id"])  # folders made before the first file was
    return deleted


def _registered_write_ids(warehouse: Path) -> set[str]:
    if not warehouse.is_file():
        return set()
    con = open_read_only(warehouse, NOTHING_PUBLISHED)
    try:
        if schema_version(con) < 6:  # before the parts catalogue
            return set()
        return {r[0] for r in con.execute("SELECT DISTINCT write_id FROM parts").fetchall()}
    except duckdb.CatalogException:
        return set()
    finally:
        con.close()
