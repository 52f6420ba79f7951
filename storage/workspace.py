"""The workspace on disk: stage folders, atomic Parquet writes and manifests.

Every stage writes into its own folder under the workspace. A stage is built in a hidden staging
folder and swapped into place only when complete, with its manifest written last, so a crash never
leaves a half-written stage and a folder with a manifest is always whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from bridgerec.runtime.errors import InputError
from bridgerec.storage.files import swap_dir, write_json_atomic, write_parquet_atomic

MANIFEST_NAME = "manifest.json"
_HASH_CHUNK = 1 << 22


class Manifest(BaseModel):
    """What a finished stage wrote and what it was built from."""

    stage: str
    schema_version: int
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    config_hash: str
    input_hashes: dict[str, str] = Field(default_factory=dict)
    row_counts: dict[str, int] = Field(default_factory=dict)
    files: list[str] = Field(default_factory=list)
    stats: dict[str, Any] = Field(default_factory=dict)

    def same_inputs(self, other: Manifest) -> bool:
        return (
            self.schema_version == other.schema_version
            and self.config_hash == other.config_hash
            and self.input_hashes == other.input_hashes
        )


def hash_file(path: Path) -> str:
    """Content hash of a file (blake2b, streamed)."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_json(value: Any) -> str:
    """Stable hash of a JSON-serialisable value (keys sorted)."""
    blob = json.dumps(value, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


class StageSettings(BaseModel):
    """A stage's settings section, declaring which of its fields make up its config hash (`config_hash`).

    Every field changes what the stage writes, and so its hash, unless declared otherwise here; a new
    field is hashed by default, which can cost a rebuild but never serves a stale output.
    - `not_hashed`: fields that change how the stage runs, not what it writes (threads, shard sizes, a
      path whose file content is hashed separately as an input).
    - `hashed_since`: the migration table of fields added after outputs existed: field (or "section.field"
      for a field of a nested section) -> the value those outputs implicitly had. A field holding that
      value is left out, so their hashes (and run ids) stay valid; any other value is hashed.
    - `ignored_fields()`: fields this particular configuration does not use (e.g. a switch of another
      model), left out so that changing them does not rebuild.
    """

    not_hashed: ClassVar[frozenset[str]] = frozenset()
    hashed_since: ClassVar[Mapping[str, Any]] = {}

    def ignored_fields(self) -> set[str]:
        return set()

    def hashed_values(self) -> dict[str, Any]:
        """The fields that make up the hash, as JSON values (field name -> value)."""
        data = self.model_dump(mode="json", exclude=set(self.not_hashed) | self.ignored_fields())
        for key, old in self.hashed_since.items():  # "a.b": the field b of the nested section a
            *path, leaf = key.split(".")
            node: Any = data
            for part in path:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict) and leaf in node and node[leaf] == old:
                del node[leaf]
        return data


def config_hash(*sections: StageSettings | None) -> str:
    """The hash a stage's manifest (or run id) records for its settings: the `hashed_values` of its
    sections, in order (None for a section that is off)."""
    dumped = [None if s is None else s.hashed_values() for s in sections]
    return hash_json(dumped[0] if len(dumped) == 1 else dumped)


class WorkspaceBusy(InputError):
    """Another process is writing the workspace (a night, or a stage command): two writers would race
    on the same stage folders and checkpoints."""


LOCK_NAME = ".bridgerec.lock"  # holds the lock (flock: the OS releases it when its process ends)


class Workspace:
    """A folder holding one folder per stage (`ingest/`, `enrich/`, `runs/`, ...)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().resolve()

    @contextlib.contextmanager
    def writing(self, what: str) -> Iterator[None]:
        """Hold the workspace for writing while the block runs, or raise WorkspaceBusy at once, naming the
        process that holds it (pid, host, what it runs, since when; from `LOCK_NAME.json`). Re-entrant in
        one process (a night holds it while its stages take it again); an advisory lock (filelock's
        flock), so a process that dies, even by SIGKILL, leaves no stale lock. The lock file stays (empty,
        as flock files do: removing it would race with the next writer); the holder's note goes with the
        lock. Readers (`recs`, `sql`, the report) do not take it. Cron overlapping two nights on one
        workspace is what it stops."""
        import filelock

        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / LOCK_NAME
        lock = filelock.FileLock(path, thread_local=False, is_singleton=True, blocking=False)
        info = path.with_name(LOCK_NAME + ".json")
        try:
            lock.acquire()
        except filelock.Timeout:
            try:
                holder = json.loads(info.read_text())
                who = (
                    f"pid {holder['pid']} on {holder['host']} ({holder['what']}, since {holder['since']} UTC)"
                )
            except (OSError, ValueError, KeyError):
                who = "another process"
            raise WorkspaceBusy(
                f"workspace {self.root} is being written by {who}; wait for it to end (or stop it) and run "
                "again: two runs on one workspace would race on its stage folders"
            ) from None
        try:
            if lock.lock_counter == 1:  # the outermost holder says who it is
                holder = {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "what": what,
                    "since": f"{datetime.now(UTC):%Y-%m-%d %H:%M:%S}",
                }
                write_json_atomic(holder, info)
            yield
        finally:
            if lock.lock_counter == 1:  # still holding it: nobody else can be writing their own info
                with contextlib.suppress(OSError):
                    info.unlink()
            lock.release()

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def read_manifest(self, stage: str) -> Manifest | None:
        path = self.stage_dir(stage) / MANIFEST_NAME
        if not path.exists():
            return None
        return Manifest.model_validate_json(path.read_text())

    def current(
        self, stage: str, *, schema_version: int, config_hash: str, input_hashes: Mapping[str, str]
    ) -> Manifest | None:
        """The stage's manifest when the stage on disk was built from the same schema, config and
        inputs (a rerun may skip it), else None. The one skip-if-unchanged check of every stage."""
        existing = self.read_manifest(stage)
        wanted = Manifest(
            stage=stage,
            schema_version=schema_version,
            config_hash=config_hash,
            input_hashes=dict(input_hashes),
        )
        return existing if existing is not None and existing.same_inputs(wanted) else None

    def read_table(self, stage: str, name: str, columns: list[str] | None = None) -> pa.Table:
        path = self.stage_dir(stage) / f"{name}.parquet"
        if not path.exists():
            raise FileNotFoundError(
                f"{path} does not exist: run the '{stage}' stage first (bridgerec {stage} --help)"
            )
        return pq.read_table(path, columns=columns)

    @contextlib.contextmanager
    def building(self, stage: str) -> Iterator[StageBuilder]:
        """Build a stage in a staging folder; swap it in only if the block finishes."""
        staging = self.root / ".staging" / f"{stage}-{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)
        builder = StageBuilder(stage, staging)
        try:
            yield builder
            if builder.manifest is None:
                raise RuntimeError(f"stage {stage!r} finished without a manifest")
            self._swap_in(stage, staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            with contextlib.suppress(OSError):
                (self.root / ".staging").rmdir()

    def _swap_in(self, stage: str, staging: Path) -> None:
        swap_dir(
            staging, self.stage_dir(stage), self.root / ".staging" / f"{stage}-old-{uuid.uuid4().hex[:8]}"
        )


class StageBuilder:
    """Collects the files of a stage being built; `finish` writes its manifest last."""

    def __init__(self, stage: str, folder: Path) -> None:
        self.stage = stage
        self.folder = folder
        self.manifest: Manifest | None = None
        self._files: list[str] = []
        self._rows: dict[str, int] = {}

    def write_table(self, name: str, table: pa.Table, schema: pa.Schema | None = None) -> Path:
        path = write_parquet_atomic(table, self.folder / f"{name}.parquet", schema)
        self._files.append(path.name)
        self._rows[name] = table.num_rows
        return path

    def path(self, name: str) -> Path:
        """A path inside the stage for files written by other libraries (indexes, checkpoints)."""
        self._files.append(name)
        return self.folder / name

    def finish(
        self,
        *,
        schema_version: int,
        config_hash: str,
        input_hashes: Mapping[str, str],
        stats: Mapping[str, Any] | None = None,
    ) -> Manifest:
        self.manifest = Manifest(
            stage=self.stage,
            schema_version=schema_version,
            config_hash=config_hash,
            input_hashes=dict(input_hashes),
            row_counts=dict(self._rows),
            files=sorted(set(self._files)),
            stats=dict(stats or {}),
        )
        write_json_atomic(self.manifest.model_dump(mode="json"), self.folder / MANIFEST_NAME)
        return self.manifest
