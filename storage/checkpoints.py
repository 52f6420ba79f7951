"""Finished work of a stage that is still being built, kept outside its staging folder.

A stage is swapped in only when complete (workspace.building), so a crash after hours of model calls
would otherwise lose all of them. Each finished batch is written here as a small Parquet shard; the
next run reads the shards as a cache, and a successful build deletes them.

Layout: WORKSPACE/.checkpoints/<stage>/<kind>/<time>-<uuid>.parquet
"""

from __future__ import annotations

import contextlib
import shutil
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bridgerec.runtime.logs import get_logger
from bridgerec.storage.files import write_parquet_atomic
from bridgerec.storage.workspace import Workspace


class Checkpoints:
    def __init__(self, workspace: Workspace, stage: str) -> None:
        self.root = workspace.root / ".checkpoints" / stage

    def _dir(self, kind: str) -> Path:
        return self.root / kind

    def write(self, kind: str, table: pa.Table) -> None:
        if table.num_rows:
            write_parquet_atomic(table, self._dir(kind) / f"{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet")

    def read(
        self, kind: str, schema: pa.Schema | None = None, columns: list[str] | None = None
    ) -> pa.Table | None:
        """All shards of `kind`, or only their `columns` (unreadable or mismatched shards are skipped with
        a warning)."""
        folder = self._dir(kind)
        if not folder.is_dir():
            return None
        tables = []
        for path in sorted(folder.glob("*.parquet")):
            try:
                table = pq.read_table(path, columns=columns)
                tables.append(table.select(schema.names).cast(schema) if schema is not None else table)
            except (pa.ArrowException, OSError, KeyError, ValueError) as exc:
                get_logger().warning("checkpoint shard %s unusable (%s): ignored", path, exc)
        return pa.concat_tables(tables) if tables else None

    def path(self, name: str) -> Path:
        """A file of the run's own (e.g. the clusters every profile shard must share)."""
        return self.root / "run" / name

    def kinds(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else []

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        with contextlib.suppress(OSError):  # remove .checkpoints/ too when no other stage uses it
            self.root.parent.rmdir()
