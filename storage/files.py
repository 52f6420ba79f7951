"""Atomic file and folder writes: the one place that writes through a temporary sibling and a rename.

`os.replace` is atomic on POSIX file systems, so a reader sees either the old file (or folder) or the new
one, never half of either; a writer killed midway leaves only a hidden temporary (`.NAME.<hex>.tmp`) that
the next writer may remove.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def temp_sibling(path: Path, suffix: str = "tmp") -> Path:
    """A hidden, unique sibling of `path` on the same file system (so a rename is atomic)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.{suffix}")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s new content to; renamed over `path` when the block ends
    without an error, deleted otherwise. For writers that take a path (torch.save, safetensors, faiss)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_parquet_atomic(table: pa.Table, path: Path, schema: pa.Schema | None = None) -> Path:
    """Write `table` to `path` (zstd Parquet) atomically; cast to `schema` (and its column order) if given."""
    if schema is not None:
        table = table.select(schema.names).cast(schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


def write_json_atomic(value: Any, path: Path) -> Path:
    """Write `value` as indented, key-sorted JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")
    return path


def swap_dir(new: Path, target: Path, trash: Path) -> None:
    """Put folder `new` in place of `target` (which may be missing); the old folder goes to `trash`
    (a path on the same file system) and is deleted. Readers see the old folder or the new, whole."""
    if target.exists():
        os.replace(target, trash)
    os.replace(new, target)
    shutil.rmtree(trash, ignore_errors=True)
