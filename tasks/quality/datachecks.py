"""Data checks before training: tonight's ingest output against last night's, per domain.

For interactions, users and items of each domain: tonight's count, last night's, how many are new and
how many are gone (shares of tonight's and of last night's). A count that fell by more than
`checks.max_drop` of last night's (a truncated export, a lost domain) stops the night before anything is
trained or published. "Last night" is the last *completed* night's snapshot in `WORKSPACE/quality/`
(64-bit hashes of the keys: user_id; item_id; user_id + item_id + position for interactions): a passing
check keeps tonight's as pending, and the nightly flow makes it the reference when the night completes
(`keep_data_snapshot`), so a night that passed its checks and then failed (or was refused by the gate)
is not what its rerun is compared with: the rerun still shows what is new since the last good night.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
from pydantic import BaseModel

from bridgerec.runtime.errors import InputError
from bridgerec.runtime.runner import step
from bridgerec.storage.workspace import Workspace
from bridgerec.tasks.ingest import IngestOutputs
from bridgerec.tasks.quality.settings import DataCheckSettings

ENTITIES = ("interactions", "users", "items")


class DataCheckFailed(InputError):
    """Tonight's data dropped more than allowed; the message names the domains and figures. An input
    fault (exit code 2, never retried): the same export fails the same way until it is fixed, or the
    drop is allowed (`checks.max_drop`)."""


class DataChecks(BaseModel):
    """The figures (one row per entity and domain) and the verdict."""

    rows: list[dict]
    passed: bool
    message: str


def _snapshot_path(workspace: Workspace) -> Path:
    """The reference: the last completed night's snapshot."""
    return workspace.root / "quality" / "data_snapshot.parquet"


def _pending_path(workspace: Workspace) -> Path:
    """Tonight's snapshot once its check passed, until the night completes."""
    return workspace.root / "quality" / "data_snapshot.pending.parquet"


def keep_data_snapshot(workspace: Workspace) -> bool:
    """Make the pending snapshot (tonight's, its check passed) the reference, once the night completed;
    False when there is none (checks off, or already kept). One atomic rename."""
    pending = _pending_path(workspace)
    if not pending.exists():
        return False
    pending.replace(_snapshot_path(workspace))
    return True


def _current(con: duckdb.DuckDBPyConnection, workspace: Workspace) -> None:
    ingest = IngestOutputs(workspace)
    inter, items = ingest.file("interactions"), ingest.file("items")
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE cur AS
        WITH dom AS (SELECT DISTINCT domain_idx, domain FROM read_parquet('{items}'))
        SELECT 'interactions' AS entity, d.domain, hash(x.user_id, x.item_id, x.seq_pos) AS key
            FROM read_parquet('{inter}') x JOIN dom d USING (domain_idx)
        UNION ALL
        SELECT DISTINCT 'users', d.domain, hash(x.user_id)
            FROM read_parquet('{inter}') x JOIN dom d USING (domain_idx)
        UNION ALL
        SELECT 'items', domain, hash(item_id) FROM read_parquet('{items}')
        """
    )


@step("data-checks")
def check_data(settings: DataCheckSettings, workspace: Workspace) -> DataChecks:
    """Compare tonight's ingest output with the last completed night's; keep tonight's snapshot as
    pending when the check passes (`keep_data_snapshot` makes it the reference once the night completes).
    Never raises for a drop: the caller decides (the nightly flow raises DataCheckFailed when `passed` is
    false)."""
    snap = _snapshot_path(workspace)
    con = duckdb.connect()
    try:
        _current(con, workspace)
        if snap.exists():
            con.execute(f"CREATE TEMP TABLE prev AS SELECT * FROM read_parquet('{snap}')")
        else:
            con.execute("CREATE TEMP TABLE prev AS SELECT * FROM cur LIMIT 0")
        first = not snap.exists()
        cur = con.execute(
            """
            WITH c AS (SELECT entity, domain, count(*) AS n FROM cur GROUP BY ALL),
                 p AS (SELECT entity, domain, count(*) AS n FROM prev GROUP BY ALL),
                 new AS (SELECT entity, domain, count(*) AS n FROM (SELECT * FROM cur EXCEPT SELECT * FROM prev)
                         GROUP BY ALL),
                 gone AS (SELECT entity, domain, count(*) AS n FROM (SELECT * FROM prev EXCEPT SELECT * FROM cur)
                          GROUP BY ALL)
            SELECT entity, domain, coalesce(c.n, 0) AS count, p.n AS previous,
                   coalesce(new.n, 0) AS new, coalesce(gone.n, 0) AS gone
            FROM c FULL JOIN p USING (entity, domain) LEFT JOIN new USING (entity, domain)
                 LEFT JOIN gone USING (entity, domain)
            ORDER BY domain, entity
            """
        ).fetchall()
        rows = []
        for entity, domain, count, previous, new, gone in cur:
            rows.append(
                {
                    "entity": entity,
                    "domain": domain,
                    "count": int(count),
                    "previous": None if first else int(previous or 0),
                    "new": None if first else int(new),
                    "gone": None if first else int(gone),
                    "share_new": None if first or not count else round(new / count, 6),
                    "share_gone": None if first or not previous else round(gone / previous, 6),
                    "change": None if first or not previous else round(count / previous - 1.0, 6),
                }
            )
        drops = [r for r in rows if r["change"] is not None and -r["change"] > settings.max_drop]
        if drops:
            message = (
                "data check: "
                + "; ".join(
                    f"{r['domain']} {r['entity']} {r['previous']:,} -> {r['count']:,} ({r['change']:+.1%})"
                    for r in drops
                )
                + f" (more than the {settings.max_drop:.0%} drop allowed by checks.max_drop); fix the export "
                "and rerun, or, if the drop is real, raise checks.max_drop for this night"
            )
            return DataChecks(rows=rows, passed=False, message=message)
        pending = _pending_path(workspace)
        pending.parent.mkdir(parents=True, exist_ok=True)
        tmp = pending.with_name(pending.name + ".tmp")
        con.execute(f"COPY cur TO '{tmp}' (FORMAT parquet)")
        tmp.replace(pending)
        if first:
            return DataChecks(rows=rows, passed=True, message="data check: first night, no comparison")
        inter = [r for r in rows if r["entity"] == "interactions"]
        return DataChecks(
            rows=rows,
            passed=True,
            message="data check: "
            + ", ".join(
                f"{r['domain']} interactions {r['count']:,} ({r['change']:+.1%}, {r['share_new']:.1%} new)"
                for r in inter
            ),
        )
    finally:
        con.close()
