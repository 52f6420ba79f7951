"""Cut the bundled sample (data/sample/) out of the full food-kitchen dataset.

A deterministic slice: users chosen by a hash of their id, stratified so both overlapping and
single-domain users of each domain are present; every item those users touched is kept.
Usage: python scripts/make_sample.py ../shared/data/food-kitchen data/sample --users 1000
"""

from __future__ import annotations

import argparse
from pathlib import Path

import duckdb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--overlap-share", type=float, default=0.3)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    con.execute(
        f"CREATE TABLE inter AS SELECT * FROM read_csv('{args.source / 'interactions.csv.gz'}', all_varchar=true)"
    )
    con.execute(
        f"CREATE TABLE items AS SELECT * FROM read_csv('{args.source / 'items.csv.gz'}', all_varchar=true)"
    )
    n_overlap = int(args.users * args.overlap_share)
    n_single = args.users - n_overlap
    con.execute(
        f"""
        CREATE TABLE chosen AS
        WITH u AS (SELECT user_id, count(DISTINCT domain) AS nd, min(domain) AS d FROM inter GROUP BY user_id),
        ranked AS (SELECT user_id, nd, d, row_number() OVER (PARTITION BY nd, CASE WHEN nd = 1 THEN d END ORDER BY hash(user_id)) AS r FROM u)
        SELECT user_id FROM ranked
        WHERE (nd > 1 AND r <= {n_overlap}) OR (nd = 1 AND d = 'food' AND r <= {n_single // 3})
           OR (nd = 1 AND d = 'kitchen' AND r <= {n_single - n_single // 3})
        """
    )
    con.execute(
        f"""COPY (SELECT i.* FROM inter i JOIN chosen USING (user_id) ORDER BY user_id, CAST(position AS INT))
            TO '{args.out / "interactions.csv.gz"}' (HEADER, COMPRESSION gzip)"""
    )
    con.execute(
        f"""COPY (SELECT * FROM items WHERE item_id IN (SELECT item_id FROM inter JOIN chosen USING (user_id)) ORDER BY domain, item_id)
            TO '{args.out / "items.csv.gz"}' (HEADER, COMPRESSION gzip)"""
    )
    for name in ("interactions", "items"):
        n = con.sql(f"SELECT count(*) FROM read_csv('{args.out / (name + '.csv.gz')}')").fetchall()[0][0]
        print(f"{name}: {n} rows")


if __name__ == "__main__":
    main()
