"""The rows the nightly flow and the stage flows write beside the published runs: a run's status, and
one row per night (kind 'night') with its data checks and list stability; each write is its own atomic
swap of the warehouse file (storage/warehouse/swap.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bridgerec.storage.warehouse.connection import reading
from bridgerec.storage.warehouse.reads import rows
from bridgerec.storage.warehouse.schema import RUN_STATUSES, WarehouseError, schema_version
from bridgerec.storage.warehouse.swap import DEFAULT_STORAGE_COMPATIBILITY, rewrite


def record_run_status(
    path: Path | str,
    run_id: str,
    status: str,
    *,
    started_at: datetime | None = None,
    message: str | None = None,
    model: str | None = None,
    threads: int = 1,
    storage_compatibility: str = DEFAULT_STORAGE_COMPATIBILITY,
) -> None:
    """Record a run as 'running' (at its start) or 'failed' (with a message), with the same atomic swap.

    'completed' is set only by `publish`, in the same swap as the run's rows, so a completed run always
    has its data. A completed run cannot be marked running or failed afterwards.
    """
    if status not in ("running", "failed"):
        raise ValueError(f"status must be 'running' or 'failed' (publish sets 'completed'), got {status!r}")
    now = datetime.now(UTC)
    with rewrite(path, threads, storage_compatibility) as (con, _):
        row = con.execute("SELECT status FROM runs WHERE run_id = ?", [run_id]).fetchall()
        if row and row[0][0] == "completed":
            raise WarehouseError(f"run {run_id!r} is already completed; its status cannot become {status!r}")
        con.execute(
            "INSERT INTO runs (run_id, status, started_at, finished_at, model, message) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (run_id) DO UPDATE SET status = excluded.status, "
            "finished_at = excluded.finished_at, message = excluded.message, "
            "model = coalesce(excluded.model, model)",
            [run_id, status, started_at or now, now if status == "failed" else None, model, message],
        )


# ---- nights of the nightly flow (kind 'night') ----------------------------------------------------------


@dataclass
class NightRecord:
    """A night's row in `runs`. Times are UTC: `started_at` when the night first started (a retry keeps
    it), `finished_at` when its last attempt ended; the same meaning as for published runs."""

    run_id: str  # 'night-<Prefect flow run id>'
    flow_run_id: str | None
    status: str  # running | completed | failed | crashed
    started_at: datetime
    finished_at: datetime | None = None
    model: str | None = None
    train_run_id: str | None = None
    published_run_id: str | None = None
    gate: str | None = None
    gate_message: str | None = None
    valid_ndcg10: float | None = None
    published_valid_ndcg10: float | None = None
    popularity_valid_ndcg10: float | None = None
    message: str | None = None
    # The night's data checks (tasks/quality/datachecks.py rows), written in the same swap.
    data_checks: list[dict[str, Any]] | None = None
    data_checks_passed: bool = True
    # tasks/quality/stability.py rows of the run the night published (with run_id, previous_run_id).
    list_stability: list[dict[str, Any]] | None = None
    # The process that runs the night (a later night marks it 'crashed' when it is gone).
    host: str | None = None
    pid: int | None = None
    process_started_at: datetime | None = None


_STABILITY_COLUMNS = (
    "run_id",
    "previous_run_id",
    "domain",
    "users",
    "users_compared",
    "mean_changed",
    "p10_changed",
    "p50_changed",
    "p90_changed",
    "distinct_items",
    "catalogue_items",
    "coverage",
    "top_item_id",
    "top_item_share",
    "top10_slot_share",
)
_DATA_CHECK_COLUMNS = (
    "entity",
    "domain",
    "count",
    "previous",
    "new",
    "gone",
    "share_new",
    "share_gone",
    "change",
)

_NIGHT_COLUMNS = (
    "flow_run_id",
    "status",
    "finished_at",
    "model",
    "train_run_id",
    "published_run_id",
    "gate",
    "gate_message",
    "valid_ndcg10",
    "published_valid_ndcg10",
    "popularity_valid_ndcg10",
    "message",
    "host",
    "pid",
    "process_started_at",
)


def record_night(
    path: Path | str,
    night: NightRecord,
    threads: int = 1,
    storage_compatibility: str = DEFAULT_STORAGE_COMPATIBILITY,
) -> None:
    """Write a night's row with the warehouse's atomic swap.

    'running' (at the start of every attempt) counts an attempt and clears the previous attempt's end;
    a final state ('completed' or 'failed') fills in what the night did. `started_at` is the first
    attempt's. Raises ValueError for another status or a run id that is a published run's.
    ('crashed' is set by `mark_crashed`, by a later night.)
    """
    if night.status not in RUN_STATUSES:
        raise ValueError(f"status must be one of {RUN_STATUSES}, got {night.status!r}")
    with rewrite(path, threads, storage_compatibility) as (con, _):
        row = con.execute("SELECT kind FROM runs WHERE run_id = ?", [night.run_id]).fetchall()
        if row and row[0][0] != "night":
            raise WarehouseError(f"run {night.run_id!r} is a published run, not a night")
        values = [getattr(night, c) for c in _NIGHT_COLUMNS]
        if night.status == "running":
            values[_NIGHT_COLUMNS.index("finished_at")] = None
        if night.status == "running":  # a new attempt: nothing of the previous attempt's outcome holds
            updates = (
                ", ".join(f"{c} = excluded.{c}" for c in _NIGHT_COLUMNS) + ", attempts = runs.attempts + 1"
            )
        else:
            updates = ", ".join(
                f"{c} = excluded.{c}"
                if c in ("status", "finished_at")
                else f"{c} = coalesce(excluded.{c}, runs.{c})"
                for c in _NIGHT_COLUMNS
            )
        con.execute(
            f"INSERT INTO runs (run_id, kind, started_at, attempts, {', '.join(_NIGHT_COLUMNS)}) "
            f"VALUES (?, 'night', ?, 1, {', '.join('?' for _ in _NIGHT_COLUMNS)}) "
            f"ON CONFLICT (run_id) DO UPDATE SET {updates}",
            [night.run_id, night.started_at, *values],
        )
        if night.data_checks:
            con.execute("DELETE FROM data_checks WHERE night_id = ?", [night.run_id])
            now = datetime.now(UTC)
            con.executemany(
                f"INSERT INTO data_checks (night_id, checked_at, {', '.join(_DATA_CHECK_COLUMNS)}, passed) "
                f"VALUES (?, ?, {', '.join('?' for _ in _DATA_CHECK_COLUMNS)}, ?)",
                [
                    [night.run_id, now, *[r.get(c) for c in _DATA_CHECK_COLUMNS], night.data_checks_passed]
                    for r in night.data_checks
                ],
            )
        if night.list_stability:
            con.execute("DELETE FROM list_stability WHERE night_id = ?", [night.run_id])
            con.executemany(
                f"INSERT INTO list_stability (night_id, {', '.join(_STABILITY_COLUMNS)}) "
                f"VALUES (?, {', '.join('?' for _ in _STABILITY_COLUMNS)})",
                [[night.run_id, *[r.get(c) for c in _STABILITY_COLUMNS]] for r in night.list_stability],
            )


def running_nights(path: Path | str) -> list[dict[str, Any]]:
    """The nights recorded 'running' (run_id, flow_run_id, started_at, host, pid, process_started_at);
    [] when the warehouse is missing or older than the nights (migration 4)."""
    path = Path(path)
    if not path.is_file():
        return []
    with reading(path) as con:
        if schema_version(con) < 4:
            return []
        process = (
            "host, pid, process_started_at"
            if schema_version(con) >= 5
            else "NULL AS host, NULL AS pid, NULL AS process_started_at"
        )
        return rows(
            con,
            f"SELECT run_id, flow_run_id, started_at, {process} FROM runs "
            "WHERE kind = 'night' AND status = 'running' ORDER BY started_at",
        )


def mark_crashed(
    path: Path | str,
    messages: dict[str, str],
    threads: int = 1,
    storage_compatibility: str = DEFAULT_STORAGE_COMPATIBILITY,
) -> list[str]:
    """Mark nights 'crashed' (run_id -> message saying who found it and why), in one atomic swap; only
    rows still 'running' change (a night that ended meanwhile keeps its own end). Returns those marked."""
    if not messages:
        return []
    now = datetime.now(UTC)
    marked: list[str] = []
    with rewrite(path, threads, storage_compatibility) as (con, _):
        for run_id, message in messages.items():
            changed = con.execute(
                "UPDATE runs SET status = 'crashed', finished_at = ?, message = ? "
                "WHERE run_id = ? AND kind = 'night' AND status = 'running' RETURNING run_id",
                [now, message[:2000], run_id],
            ).fetchall()
            marked += [r[0] for r in changed]
    return marked
