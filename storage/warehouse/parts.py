"""The night's rows as Parquet parts under a data root: a local folder or S3-compatible storage.

Layout under the root (the only code that knows it):

    recommendations/run_id=<run>/domain=<domain>/part-<write_id>-<shard>.parquet
    serving/run_id=<run>/domain=<domain>/part-<write_id>-<shard>.parquet
    user_profiles/run_id=<run>/part-<write_id>-<shard>.parquet
    items/run_id=<run>/part-<write_id>-00000.parquet
    interactions/run_id=<run>/part-<write_id>-<shard>.parquet

Every file carries its `run_id` (and `domain`) as columns too, so a part read on its own (a key-value
loader, Spark, pyarrow) is self-describing. A part is written once, by the shard that computed it, and
never copied or rewritten; it is served only once the warehouse file's `parts` table names it
(storage/warehouse/publish.py), so the files of an attempt that died are never seen. Rows are sorted by
user (then rank) and cut into row groups of `row_group_rows`, so a lookup of one user reads one row group
(Parquet min/max statistics on `user_id` let DuckDB skip the others).

Roots: a relative folder (resolved against the warehouse file's folder, so the workspace can move), an
absolute folder, or `s3://bucket/prefix`. S3 goes through pyarrow's filesystem layer with the usual AWS
settings (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION / AWS_DEFAULT_REGION,
AWS_ENDPOINT_URL for S3-compatible servers, or a profile); DuckDB reads the same files through that
filesystem, registered on the connection (`register_filesystems`), since its own httpfs extension is
downloaded at first use and cannot be here.
"""

from __future__ import annotations

import contextlib
import functools
import re
import urllib.parse
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from bridgerec.storage.schemas import RECOMMENDATION_ROWS
from bridgerec.storage.warehouse.schema import WarehouseError

KINDS = ("recommendations", "serving", "user_profiles", "items", "interactions")
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# The columns of each kind of part (a new column is appended here; views read parts with
# union_by_name, so older parts show it as NULL).
PART_SCHEMAS: dict[str, pa.Schema] = {
    "recommendations": pa.schema(
        [
            pa.field("run_id", pa.string(), nullable=False),
            *RECOMMENDATION_ROWS,
            # The user's history item closest to this one in the model's text space, that cosine, and
            # its percentile among the domain's reference items (tasks/publish/explain.py); NULL for
            # models without one (pop: popularity is its reason), and the percentile in older parts.
            pa.field("because_item_id", pa.string()),
            pa.field("because_score", pa.float32()),
            pa.field("because_percentile", pa.float32()),
        ]
    ),
    "serving": pa.schema(
        [
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("user_id", pa.string(), nullable=False),
            pa.field("domain", pa.string(), nullable=False),
            pa.field("item_ids", pa.list_(pa.string()), nullable=False),  # best first
            pa.field("scores", pa.list_(pa.float32()), nullable=False),  # non-increasing
        ]
    ),
    "user_profiles": pa.schema(
        [
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("user_id", pa.string(), nullable=False),
            pa.field("profile_text", pa.string(), nullable=False),
            pa.field("cluster_summaries", pa.list_(pa.string())),
            pa.field("llm_model", pa.string()),
        ]
    ),
    "items": pa.schema(
        [
            pa.field("item_id", pa.string(), nullable=False),
            pa.field("domain", pa.string(), nullable=False),
            pa.field("title", pa.string(), nullable=False),
            pa.field("brand", pa.string()),
            pa.field("categories", pa.string()),
            pa.field("price", pa.string()),
            pa.field("updated_run_id", pa.string(), nullable=False),  # the last run whose catalogue held it
        ]
    ),
    # Each user's history as the run read it (the ingest stage's interactions), by user then position.
    "interactions": pa.schema(
        [
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("user_id", pa.string(), nullable=False),
            pa.field("position", pa.int32(), nullable=False),  # 0 = the user's first, in the model's order
            pa.field("domain", pa.string(), nullable=False),
            pa.field("item_id", pa.string(), nullable=False),
            pa.field("timestamp", pa.timestamp("us", tz="UTC")),  # NULL for position-ordered sources
            pa.field("rating", pa.float32()),
        ]
    ),
}


def _segment(value: str) -> str:
    """A path segment: safe names as they are, anything else percent-encoded."""
    return value if _SAFE.match(value) else urllib.parse.quote(value, safe="")


def part_path(kind: str, run_id: str, write_id: str, shard: int, domain: str | None = None) -> str:
    """The part's path relative to the data root (always '/'-separated)."""
    if kind not in KINDS:
        raise ValueError(f"unknown part kind {kind!r}")
    folder = f"{kind}/run_id={_segment(run_id)}"
    if domain is not None:
        folder += f"/domain={_segment(domain)}"
    return f"{folder}/part-{write_id}-{shard:05d}.parquet"


def run_folders(run_id: str) -> list[str]:
    """The folders (relative to the root) that hold a run's parts of every kind."""
    return [f"{kind}/run_id={_segment(run_id)}" for kind in KINDS]


def is_remote(root: str) -> bool:
    return "://" in root


def resolve_root(root: str, catalogue_folder: Path) -> str:
    """A root as stored (relative folder, absolute folder or URI) -> an absolute folder or URI."""
    if is_remote(root):
        return root.rstrip("/")
    path = Path(root).expanduser()
    return str(path if path.is_absolute() else (catalogue_folder / path).resolve())


def stored_root(root: str, catalogue_folder: Path) -> str:
    """How a root is recorded: relative to the warehouse file's folder when it lies under it (so that
    the two can move together), as given otherwise."""
    if is_remote(root):
        return root.rstrip("/")
    path = Path(root).expanduser()
    if not path.is_absolute():  # relative roots are relative to the warehouse folder already
        return path.as_posix()
    path = path.resolve()
    try:
        return path.relative_to(catalogue_folder.resolve()).as_posix() or "."
    except ValueError:
        return str(path)


def full_path(resolved_root: str, relpath: str) -> str:
    """The part's location as DuckDB and pyarrow name it: an absolute path or an s3:// URI."""
    return f"{resolved_root.rstrip('/')}/{relpath}"


# What an object store's reader or writer must set: pyarrow's S3 filesystem reads the usual AWS variables.
OBJECT_STORE_HINT = (
    "set AWS_ENDPOINT_URL (an S3-compatible server's address), AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
    "(and AWS_REGION where it matters) where bridgerec runs, on every Ray node too: docs/publish.md, "
    '"Parts on S3"'
)


@functools.lru_cache(maxsize=16)
def filesystem(resolved_root: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, base path inside it) for an absolute folder or a URI such as s3://b/p.
    Raises WarehouseError (one line, with what to set) when the object store cannot be reached: pyarrow
    asks S3 for the bucket's region here unless AWS_ENDPOINT_URL names a server."""
    if is_remote(resolved_root):
        try:
            fs, base = pafs.FileSystem.from_uri(resolved_root)
        except OSError as exc:
            raise WarehouseError(
                f"{resolved_root}: the object store cannot be reached ({str(exc).strip().splitlines()[0]}); "
                f"{OBJECT_STORE_HINT}"
            ) from None
        return fs, str(base)
    return pafs.LocalFileSystem(), resolved_root


def object_store_error(exc: BaseException) -> WarehouseError | None:
    """The error of a query that failed reading a part through the object store's filesystem, as one
    line with what to set; None for any other error. DuckDB reports the filesystem's OSError as its own
    error with the Python traceback in its text; pyarrow's S3 errors carry "AWS Error"."""
    line = next((x.strip() for x in str(exc).splitlines() if "AWS Error" in x), None)
    if line is None:
        return None
    return WarehouseError(
        f"a part on the object store cannot be read ({line.removeprefix('OSError: ')}); {OBJECT_STORE_HINT}"
    )


@dataclass(frozen=True)
class PartInfo:
    """A written part, as the `parts` table records it."""

    run_id: str
    kind: str
    domain: str | None
    shard: int
    root: str  # as stored (relative to the warehouse folder, absolute, or a URI)
    path: str  # relative to the root
    rows: int
    bytes: int


@dataclass(frozen=True)
class PartTarget:
    """Where a publish attempt's parts go: plain values, so a shard on another worker can write its own
    parts (the root must then be a folder that worker shares, or S3)."""

    root: str  # as given: relative to `catalogue_folder`, absolute, or a URI
    catalogue_folder: str
    run_id: str
    write_id: str
    row_group_users: int = 2048

    def for_run(self, run_id: str) -> PartTarget:
        return PartTarget(self.root, self.catalogue_folder, run_id, self.write_id, self.row_group_users)

    @property
    def resolved_root(self) -> str:
        return resolve_root(self.root, Path(self.catalogue_folder))

    def write(self, table: pa.Table, kind: str, shard: int, domain: str | None = None) -> PartInfo:
        """Write one part (zstd Parquet with statistics); `table` must already be sorted as readers want
        it (by user_id, then rank). Row groups hold `row_group_users` users each."""
        fs, base = filesystem(self.resolved_root)
        relpath = part_path(kind, self.run_id, self.write_id, shard, domain)
        target = f"{base.rstrip('/')}/{relpath}"
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        schema = PART_SCHEMAS[kind]
        for f in schema:  # a nullable column the writer does not fill (e.g. no explanations): NULL
            if f.nullable and f.name not in table.column_names:
                table = table.append_column(f, pa.nulls(table.num_rows, f.type))
        extra = [f for f in table.schema if f.name not in schema.names]  # columns a later version added
        table = table.select([*schema.names, *(f.name for f in extra)]).cast(pa.schema([*schema, *extra]))
        per_user = 1
        if "user_id" in table.column_names and table.num_rows:
            per_user = max(1, round(table.num_rows / pc.count_distinct(table["user_id"]).as_py()))
        pq.write_table(
            table,
            target,
            filesystem=fs,
            compression="zstd",
            row_group_size=max(1, self.row_group_users * per_user),
            write_statistics=True,
        )
        size = fs.get_file_info(target).size or 0
        stored = stored_root(self.root, Path(self.catalogue_folder))
        return PartInfo(self.run_id, kind, domain, shard, stored, relpath, table.num_rows, int(size))


def record_parts(con: duckdb.DuckDBPyConnection, parts: list[PartInfo], write_id: str) -> None:
    """Insert the `parts` table's rows of written parts (not served until a view names them)."""
    if not parts:
        return
    now = datetime.now(UTC)
    con.executemany(
        "INSERT INTO parts (run_id, write_id, kind, domain, shard, root, path, rows, bytes, written_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            [p.run_id, write_id, p.kind, p.domain, p.shard, p.root, p.path, p.rows, p.bytes, now]
            for p in parts
        ],
    )


def delete_files(resolved_root: str, relpaths: list[str]) -> int:
    """Delete parts (missing ones are fine: a deletion may be repeated); return how many existed."""
    if not relpaths:
        return 0
    fs, base = filesystem(resolved_root)
    deleted = 0
    for rel in relpaths:
        try:
            fs.delete_file(f"{base.rstrip('/')}/{rel}")
            deleted += 1
        except FileNotFoundError:
            pass
    if not is_remote(resolved_root):  # S3 has no folders to leave behind
        _remove_empty_folders(Path(base), {Path(base, rel).parent for rel in relpaths})
    return deleted


def _remove_empty_folders(base: Path, folders: set[Path]) -> None:
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        while folder != base and base in folder.parents:
            try:
                folder.rmdir()
            except OSError:
                break
            folder = folder.parent


def remove_empty_run_folders(resolved_root: str, run_id: str) -> None:
    """Remove a run's folders that hold no file (local roots; S3 has no folders)."""
    if is_remote(resolved_root):
        return
    for folder in run_folders(run_id):
        top = Path(resolved_root, folder)
        if not top.is_dir():
            continue
        for sub in sorted(
            (p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
        ):
            with contextlib.suppress(OSError):
                sub.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()
        with contextlib.suppress(OSError):
            top.parent.rmdir()


def attempt_files(resolved_root: str, run_id: str, write_id: str) -> list[str]:
    """Every part an attempt wrote for a run (relative paths), found by listing the run's folders."""
    fs, base = filesystem(resolved_root)
    found = []
    prefix = f"part-{write_id}-"
    for folder in run_folders(run_id):
        selector = pafs.FileSelector(f"{base.rstrip('/')}/{folder}", recursive=True, allow_not_found=True)
        for info in fs.get_file_info(selector):
            if info.type == pafs.FileType.File and info.base_name.startswith(prefix):
                found.append(info.path[len(base.rstrip("/")) + 1 :])
    return sorted(found)


# ---- DuckDB reading remote parts -------------------------------------------------------------------------


def register_filesystems(con: duckdb.DuckDBPyConnection, resolved_roots: set[str]) -> None:
    """Let DuckDB read the remote roots' parts through pyarrow's filesystem (no httpfs extension needed):
    an fsspec wrapper of each scheme's pyarrow filesystem, registered on this connection."""
    schemes = {r.split("://", 1)[0] for r in resolved_roots if is_remote(r)}
    for scheme in sorted(schemes):
        root = next(r for r in sorted(resolved_roots) if r.startswith(f"{scheme}://"))
        con.register_filesystem(_fsspec_for(scheme, root))


@functools.lru_cache(maxsize=8)
def _fsspec_for(scheme: str, root: str) -> Any:  # an fsspec AbstractFileSystem
    from fsspec.implementations.arrow import ArrowFSWrapper

    fs, _ = filesystem(root)
    wrapper_type = type(f"{scheme.title()}ArrowFS", (ArrowFSWrapper,), {"protocol": scheme})
    return wrapper_type(fs)
