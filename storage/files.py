"""Atomic, durable file and folder writes: the one place that writes through a temporary sibling and a
rename. Every file the pipeline publishes or resumes from (stage outputs and manifests, run folders,
checkpoints, indexes, caches) is written through these helpers.

The sequence (`atomic_path`): write the temporary sibling, flush it to disk (fsync), rename it over the
target (`os.replace`, atomic on POSIX file systems), then fsync the folder so the rename itself survives
a power loss. A reader sees the old file (or folder) or the new one, never half of either; a writer
killed midway leaves only a hidden temporary (`.NAME.<hex>.tmp`) that the next writer may remove.
Folders (`swap_dir`, `move_dir_into_place`) get the same treatment: every file inside is flushed before
the folder is renamed into place.
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


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's content (a folder: its entries, e.g. a rename) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder`, then the folders themselves (deepest first)."""
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            fsync_path(Path(root) / name)
        for name in dirs:
            fsync_path(Path(root) / name)
    fsync_path(folder)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s new content to; when the block ends without an error it
    is flushed, renamed over `path` and the folder flushed; deleted otherwise. For writers that take a
    path (torch.save, matplotlib, pyarrow) or a file opened from it (numpy)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_parquet_atomic(table: pa.Table, path: Path, schema: pa.Schema | None = None) -> Path:
    """Write `table` to `path` (zstd Parquet) atomically; cast to `schema` (and its column order) if given."""
    if schema is not None:
        table = table.select(schema.names).cast(schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


def write_text_atomic(text: str, path: Path) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def write_json_atomic(value: Any, path: Path) -> Path:
    """Write `value` as indented, key-sorted JSON atomically."""
    return write_text_atomic(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n", path)


def swap_dir(new: Path, target: Path, trash: Path) -> None:
    """Put folder `new` in place of `target` (which may be missing); the old folder goes to `trash`
    (a path on the same file system) and is deleted. Readers see the old folder or the new, whole."""
    fsync_tree(new)
    if target.exists():
        os.replace(target, trash)
    os.replace(new, target)
    fsync_path(target.parent)
    shutil.rmtree(trash, ignore_errors=True)


def move_dir_into_place(new: Path, target: Path) -> None:
    """Rename the finished folder `new` to `target`, which must not exist yet (raises OSError if another
    writer put it there first), flushed like `swap_dir`."""
    fsync_tree(new)
    os.replace(new, target)
    fsync_path(target.parent)
