"""The warehouse analysts query: a small DuckDB file of tables and views over the night's Parquet parts.

By job:
- `schema`: the numbered migrations of the file's tables (`WarehouseError`, `migrate`);
- `connection`: opening the file read-only (`open_read_only`, `connect` for analysts and readers);
- `parts`: the Parquet parts under a data root (local folder or s3://), their layout and writing;
- `views`: the views over the parts, rewritten at every change and re-pointed when the file moved;
- `swap`: every change made on a copy of the file and swapped in atomically (`rewrite`, `relink`);
- `attempts`: one publish at a time, journaled, so a dead attempt's parts are cleaned;
- `publish`: registering a night (`register_night`), retention and vacuum, `publish` from tables;
- `legacy`: moving a file of the single-file layout into parts;
- `nights`: the runs' statuses and the nightly flow's rows;
- `reads`: runs, the latest run, a user's lists in any retained run.

docs/publish.md, "The warehouse", describes the layout and the guarantees readers get.
"""

from bridgerec.storage.warehouse.attempts import Attempt, clean_dead_attempts, publish_attempt
from bridgerec.storage.warehouse.connection import (
    NOTHING_PUBLISHED,
    connect,
    connect_reader,
    damaged,
    held_read_write,
    is_damage,
    is_lock_conflict,
    open_read_only,
    reading,
    verify_readable,
)
from bridgerec.storage.warehouse.nights import (
    NightRecord,
    mark_crashed,
    record_night,
    record_run_status,
    running_nights,
)
from bridgerec.storage.warehouse.parts import PART_SCHEMAS, PartInfo, PartTarget
from bridgerec.storage.warehouse.publish import (
    DEFAULT_GRACE_HOURS,
    Night,
    PublishBatch,
    PublishResult,
    Retention,
    RunRecord,
    default_root,
    profile_rows,
    publish,
    register_night,
    vacuum,
    write_rows,
)
from bridgerec.storage.warehouse.reads import latest_run, list_runs, published_run, user_recommendations
from bridgerec.storage.warehouse.schema import (
    MIGRATIONS,
    PARTS_VERSION,
    RUN_STATUSES,
    SCHEMA_VERSION,
    Migration,
    WarehouseDamaged,
    WarehouseError,
    migrate,
    schema_version,
)
from bridgerec.storage.warehouse.swap import (
    DEFAULT_STORAGE_COMPATIBILITY,
    RewriteTimings,
    relink,
    rewrite,
    storage_header_version,
    writer_lock,
)

__all__ = [
    "DEFAULT_GRACE_HOURS",
    "DEFAULT_STORAGE_COMPATIBILITY",
    "MIGRATIONS",
    "NOTHING_PUBLISHED",
    "PARTS_VERSION",
    "PART_SCHEMAS",
    "RUN_STATUSES",
    "SCHEMA_VERSION",
    "Attempt",
    "Migration",
    "Night",
    "NightRecord",
    "PartInfo",
    "PartTarget",
    "PublishBatch",
    "PublishResult",
    "Retention",
    "RewriteTimings",
    "RunRecord",
    "WarehouseDamaged",
    "WarehouseError",
    "clean_dead_attempts",
    "connect",
    "connect_reader",
    "damaged",
    "default_root",
    "held_read_write",
    "is_damage",
    "is_lock_conflict",
    "latest_run",
    "list_runs",
    "mark_crashed",
    "migrate",
    "open_read_only",
    "profile_rows",
    "publish",
    "publish_attempt",
    "published_run",
    "reading",
    "record_night",
    "record_run_status",
    "register_night",
    "relink",
    "rewrite",
    "running_nights",
    "schema_version",
    "storage_header_version",
    "user_recommendations",
    "vacuum",
    "verify_readable",
    "write_rows",
    "writer_lock",
]
