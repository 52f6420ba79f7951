"""Stability and coverage of what a night published, per domain, read from the warehouse.

- churn: for each user with a list in both runs, the share of their new top-k not in their previous
  top-k (0 = same items, 1 = all new); mean and the 10th / 50th / 90th percentiles over users;
- coverage: distinct items recommended / items of the domain in the warehouse's catalogue;
- concentration: the most recommended item and the share of users whose list holds it, and the share of
  all recommendation slots taken by the 10 most recommended items.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from bridgerec.storage.warehouse import connect_reader


def list_stability(
    warehouse: Path | str, run_id: str | None, previous_run_id: str | None, candidate: pa.Table | None = None
) -> list[dict]:
    """One row per domain of `run_id`'s published lists, or of `candidate` (recommendation rows not
    published yet: user_id, domain, item_id, ...) when given; previous_run_id None or purged: churn
    figures are None."""
    con = connect_reader(warehouse)
    try:
        if candidate is not None:
            con.register("candidate", candidate.select(["user_id", "domain", "item_id"]))
            source = "SELECT user_id, domain, item_id FROM candidate"
        else:
            source = "SELECT user_id, domain, item_id FROM recommendations WHERE run_id = $run"
        cur = con.execute(
            f"""
            WITH cur AS ({source}),
                 prev AS (SELECT user_id, domain, item_id FROM recommendations WHERE run_id = $prev),
                 per_user AS (
                    SELECT c.domain, c.user_id, 1.0 - count(p.item_id) / count(*) AS changed
                    FROM cur c LEFT JOIN prev p USING (user_id, domain, item_id)
                    WHERE (c.user_id, c.domain) IN (SELECT DISTINCT user_id, domain FROM prev)
                    GROUP BY ALL),
                 churn AS (
                    SELECT domain, count(*) AS users_compared, avg(changed) AS mean_changed,
                           quantile_cont(changed, 0.1) AS p10_changed, quantile_cont(changed, 0.5) AS p50_changed,
                           quantile_cont(changed, 0.9) AS p90_changed
                    FROM per_user GROUP BY domain),
                 counts AS (SELECT domain, item_id, count(*) AS n FROM cur GROUP BY ALL),
                 ranked AS (SELECT *, row_number() OVER (PARTITION BY domain ORDER BY n DESC, item_id) AS r
                            FROM counts),
                 dom AS (
                    SELECT domain, count(DISTINCT user_id) AS users, count(*) AS slots FROM cur GROUP BY domain),
                 catalogue AS (SELECT domain, count(*) AS items FROM items GROUP BY domain)
            SELECT d.domain, d.users, (SELECT count(*) FROM counts c WHERE c.domain = d.domain) AS distinct_items,
                   cat.items AS catalogue_items,
                   max(CASE WHEN r = 1 THEN item_id END) AS top_item_id,
                   max(CASE WHEN r = 1 THEN n END) / d.users AS top_item_share,
                   sum(CASE WHEN r <= 10 THEN n ELSE 0 END) / d.slots AS top10_slot_share,
                   ch.users_compared, ch.mean_changed, ch.p10_changed, ch.p50_changed, ch.p90_changed
            FROM dom d JOIN ranked USING (domain) LEFT JOIN catalogue cat USING (domain)
                 LEFT JOIN churn ch USING (domain)
            GROUP BY d.domain, d.users, d.slots, cat.items, ch.users_compared, ch.mean_changed, ch.p10_changed,
                     ch.p50_changed, ch.p90_changed
            ORDER BY d.domain
            """,
            {"prev": previous_run_id or ""} | ({} if candidate is not None else {"run": run_id}),
        )
        names = [c[0] for c in cur.description]
        rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    finally:
        con.close()
    for r in rows:
        r["coverage"] = round(r["distinct_items"] / r["catalogue_items"], 6) if r["catalogue_items"] else None
        for key in (
            "top_item_share",
            "top10_slot_share",
            "mean_changed",
            "p10_changed",
            "p50_changed",
            "p90_changed",
        ):
            if r[key] is not None:
                r[key] = round(float(r[key]), 6)
        r["users_compared"] = int(r["users_compared"] or 0)
    return rows


def describe_stability(rows: list[dict]) -> str:
    """One line for the night's summary."""
    parts = []
    for r in rows:
        churn = (
            f"{r['mean_changed']:.0%} of each list changed (median {r['p50_changed']:.0%}), "
            if r["mean_changed"] is not None
            else ""
        )
        parts.append(
            f"{r['domain']}: {churn}coverage {r['coverage']:.1%}, top item {r['top_item_id']} in "
            f"{r['top_item_share']:.0%} of lists"
        )
    return "lists: " + "; ".join(parts)


def churn_histogram(
    warehouse: Path | str, run_id: str, previous_run_id: str | None, bins: int = 10
) -> dict[str, list[int]]:
    """Per domain: users by the share of their top-k changed since `previous_run_id` (the churn of
    `list_stability`), in `bins` equal bins over [0, 1] (a share of 1 falls in the last bin). Users
    without a list in the previous run are left out; no previous run: {}."""
    if previous_run_id is None:
        return {}
    con = connect_reader(warehouse)
    try:
        rows = con.execute(
            """
            WITH cur AS (SELECT user_id, domain, item_id FROM recommendations WHERE run_id = $run),
                 prev AS (SELECT user_id, domain, item_id FROM recommendations WHERE run_id = $prev),
                 per_user AS (
                    SELECT c.domain, c.user_id, 1.0 - count(p.item_id) / count(*) AS changed
                    FROM cur c LEFT JOIN prev p USING (user_id, domain, item_id)
                    WHERE (c.user_id, c.domain) IN (SELECT DISTINCT user_id, domain FROM prev)
                    GROUP BY ALL)
            SELECT domain, least(floor(changed * $bins)::INTEGER, $bins - 1) AS bin, count(*) AS users
            FROM per_user GROUP BY ALL ORDER BY domain, bin
            """,
            {"run": run_id, "prev": previous_run_id, "bins": bins},
        ).fetchall()
    finally:
        con.close()
    out: dict[str, list[int]] = {}
    for domain, b, users in rows:
        out.setdefault(domain, [0] * bins)[int(b)] = int(users)
    return out


def top_items(warehouse: Path | str, run_id: str, n: int = 10) -> dict[str, list[dict]]:
    """Per domain, the `n` items in the most lists of `run_id`: item_id, title, users (lists holding
    it) and share (of the domain's users with a list)."""
    con = connect_reader(warehouse)
    try:
        cur = con.execute(
            """
            WITH cur AS (SELECT user_id, domain, item_id FROM recommendations WHERE run_id = $run),
                 dom AS (SELECT domain, count(DISTINCT user_id) AS users FROM cur GROUP BY domain),
                 counts AS (SELECT domain, item_id, count(DISTINCT user_id) AS users FROM cur GROUP BY ALL),
                 ranked AS (SELECT *, row_number() OVER (PARTITION BY domain ORDER BY users DESC, item_id) AS r
                            FROM counts)
            SELECT r.domain, r.item_id, i.title, r.users, r.users / d.users AS share
            FROM ranked r JOIN dom d USING (domain) LEFT JOIN items i USING (item_id)
            WHERE r.r <= $n ORDER BY r.domain, r.r
            """,
            {"run": run_id, "n": n},
        )
        rows = cur.fetchall()
    finally:
        con.close()
    out: dict[str, list[dict]] = {}
    for domain, item_id, title, users, share in rows:
        out.setdefault(domain, []).append(
            {"item_id": item_id, "title": title, "users": int(users), "share": round(float(share), 6)}
        )
    return out
