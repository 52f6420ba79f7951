"""Reading the warehouse: the runs, the run analysts see now, one user's lists in any retained run.

Every reader opens the file read-only through `connection.connect` (views right wherever the file is now,
remote parts readable). A user's lookup reads only the parts of the run asked for, whose row groups are
sorted by user, so it touches one row group per domain whatever the number of retained nights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb

from bridgerec.storage.warehouse.connection import reading
from bridgerec.storage.warehouse.schema import PARTS_VERSION, WarehouseError, schema_version
from bridgerec.storage.warehouse.views import scan_parts, served_files, typed_empty


def rows(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
    cur = con.execute(sql, params or [])
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def latest_run(con: duckdb.DuckDBPyConnection) -> dict[str, Any] | None:
    found = rows(con, "SELECT * FROM latest_run")
    return found[0] if found else None


def published_run(path: Path | str) -> dict[str, Any] | None:
    """The run analysts see now (`latest_run`), or None when the warehouse is missing or empty."""
    path = Path(path)
    if not path.is_file():
        return None
    with reading(path) as con:
        try:
            return latest_run(con)
        except duckdb.CatalogException:
            return None


def list_runs(path: Path | str, limit: int | None = None) -> list[dict[str, Any]]:
    """The runs table, newest first (completed runs by publish order, then the others by start).

    `valid_ndcg10`: for a night, the gate's figure for the night's run (an unchanged night, which the gate
    does not score: the published run's own, flows/night.py); for a published run, its own validation
    NDCG@10 (full ranking) from `metrics`, read apart and only where it can be: a damaged `metrics` table
    leaves those figures empty and the list whole (`runs list` is how one looks at a damaged warehouse).
    `serving`: the run `latest_run` serves."""
    with reading(path) as con:
        version = schema_version(con)
        kind = (
            "kind, flow_run_id, published_run_id, gate, gate_message, valid_ndcg10, " if version >= 4 else ""
        )
        index = "index_kind, index_recall, data_bytes, " if version >= 6 else ""
        sql = (
            f"SELECT run_id, {kind}status, seq, started_at, finished_at, model, train_run_id, k, n_users, "
            f"n_items, n_interactions, n_domains, n_recommendations, {index}purged_at IS NULL AND "
            "status = 'completed' AND seq IS NOT NULL AS retained, "
            "coalesce(run_id = (SELECT run_id FROM latest_run), false) AS serving, index_path, message "
            "FROM runs ORDER BY coalesce(finished_at, started_at) DESC, seq DESC NULLS LAST"
        )
        if limit is not None:
            sql += " LIMIT ?"
        found = rows(con, sql, [limit] if limit is not None else [])
        try:
            own = dict(
                con.execute(
                    "SELECT run_id, any_value(value) FROM metrics WHERE split = 'valid' AND protocol = 'full' "
                    "AND domain = 'all' AND user_group = 'all' AND metric = 'ndcg@10' GROUP BY run_id"
                ).fetchall()
            )
        except duckdb.Error:  # a damaged metrics table (its blocks fail their checksums): no figures
            own = {}
    for r in found:
        if r.get("valid_ndcg10") is None:
            r["valid_ndcg10"] = own.get(r["run_id"])
    return found


def _served_run(con: duckdb.DuckDBPyConnection, path: Path | str, run_id: str | None) -> dict[str, Any]:
    """The `runs` row of `run_id` (default: the latest), which must still have its rows; a night's id
    stands for the run that night left serving (its `published_run_id`)."""
    if run_id is None:
        run = latest_run(con)
        if run is None:
            raise WarehouseError(f"warehouse {path} holds no completed run")
        return run
    found = rows(con, "SELECT * FROM runs WHERE run_id = ?", [run_id])
    if not found:
        raise WarehouseError(f"run {run_id!r} is not in the warehouse (see `bridgerec runs list`)")
    run = found[0]
    if run.get("kind") == "night":  # a night's id (listed beside the runs): the run it left serving
        if run.get("published_run_id") in (None, run_id):
            raise WarehouseError(
                f"{run_id!r} is a night, and it left no published run (status {run['status']}): give a "
                "run id (`bridgerec runs list`, kind publish)"
            )
        return _served_run(con, path, str(run["published_run_id"]))
    if run["status"] != "completed" or run["purged_at"] is not None:
        state = "purged by retention" if run["purged_at"] is not None else f"status {run['status']}"
        raise WarehouseError(f"run {run_id!r} has no recommendations ({state}; see `bridgerec runs list`)")
    return run


def run_source(con: duckdb.DuckDBPyConnection, folder: Path, run_id: str, kind: str) -> str:
    """A FROM clause holding only `run_id`'s rows of `kind` (recommendations | user_profiles | serving |
    interactions): its parts, or (a file not moved to parts yet) its table (none held interactions)."""
    if schema_version(con) < PARTS_VERSION:
        if kind == "interactions":
            return f"({typed_empty(kind)})"
        quoted = run_id.replace("'", "''")
        return f"({typed_empty(kind)} UNION ALL BY NAME SELECT * FROM {kind} WHERE run_id = '{quoted}')"
    return f"({scan_parts(kind, served_files(con, folder).get((kind, run_id), []))})"


def user_recommendations(
    path: Path | str, user_id: str, domain: str | None = None, run_id: str | None = None, history: int = 10
) -> dict[str, Any]:
    """A user's top-k per domain (with item titles), profile and `history` most recent interactions
    (newest first, as the run read them, in every domain; None for a run published without them:
    `publish.history` off), from the latest run or any retained `run_id` (time travel). Raises
    WarehouseError naming what is missing."""
    folder = Path(path).expanduser().resolve().parent
    with reading(path) as con:
        run = _served_run(con, path, run_id)
        rid = run["run_id"]
        recs = rows(
            con,
            "SELECT domain, rank, item_id, score, because_item_id, because_score, because_percentile "
            f"FROM {run_source(con, folder, rid, 'recommendations')} WHERE user_id = ? ORDER BY domain, rank",
            [user_id],
        )
        if not recs:
            some = rows(
                con,
                f"SELECT DISTINCT user_id FROM {run_source(con, folder, rid, 'recommendations')} "
                "ORDER BY user_id LIMIT 3",
            )
            example = ", ".join(str(r["user_id"]) for r in some)
            raise WarehouseError(
                f"user {user_id!r} has no recommendations in run {rid!r}"
                + (f" (its users' ids are like {example})" if example else "")
            )
        published = run.get("n_history") is not None  # the run's histories were published with it
        had = (
            rows(
                con,
                "SELECT position, domain, item_id, timestamp "
                f"FROM {run_source(con, folder, rid, 'interactions')} WHERE user_id = ? "
                "ORDER BY position DESC LIMIT ?",
                [user_id, history],
            )
            if published and history > 0
            else []
        )
        # Titles of just these items (a join would scan the whole catalogue part: 4x slower measured).
        wanted = {r["item_id"] for r in recs} | {r["because_item_id"] for r in recs if r["because_item_id"]}
        wanted |= {r["item_id"] for r in had}
        titles = dict(
            con.execute(
                "SELECT item_id, title FROM items WHERE item_id IN (SELECT unnest(?::VARCHAR[]))",
                [sorted(wanted)],
            ).fetchall()
        )
        for r in had:
            r["title"] = titles.get(r["item_id"])
            r["timestamp"] = r["timestamp"].isoformat() if r["timestamp"] is not None else None
        for r in recs:
            r["title"] = titles.get(r["item_id"])
            r["because_title"] = titles.get(r["because_item_id"]) if r["because_item_id"] else None
        domains = sorted({r["domain"] for r in recs})
        if domain is not None:
            recs = [r for r in recs if r["domain"] == domain]
            if not recs:
                raise WarehouseError(f"no domain {domain!r} in run {rid!r}; domains: {', '.join(domains)}")
        profile = con.execute(
            f"SELECT profile_text, cluster_summaries FROM {run_source(con, folder, rid, 'user_profiles')} "
            "WHERE user_id = ?",
            [user_id],
        ).fetchall()
        by_domain: dict[str, list[dict[str, Any]]] = {}
        for r in recs:
            by_domain.setdefault(r.pop("domain"), []).append(r)
        return {
            "run_id": rid,
            "model": run["model"],
            "user_id": user_id,
            "profile": profile[0][0] if profile else None,
            "interests": (profile[0][1] or []) if profile else [],
            "history": had if published else None,
            "recommendations": by_domain,
        }
