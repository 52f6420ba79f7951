"""Benchmark: the table format of the warehouse's rows, side by side in one run: plain Parquet parts + a
small DuckDB file of views (what bridgerec does), Delta Lake (`deltalake`) and Apache Iceberg
(`pyiceberg`, SQLite catalog), and whether DuckLake loads. For each: the time to publish nights of
food-kitchen's shape (53,061 users x 2 domains x k = 20 = 2,122,440 rows each, synthetic ids and scores),
the latency of one user's lookup in the newest night as `bridgerec recs` does it (open, read, close)
and in the oldest (time travel), and what an analyst types.

DuckDB reads Delta and Iceberg only through extensions it downloads at first use, which cannot be done
here; they are read through their Python libraries as Arrow datasets registered on a DuckDB connection.
deltalake and pyiceberg are not dependencies of bridgerec; install them apart to run this:
    .venv/bin/python -m pip install --target /tmp/tf --no-deps deltalake==1.6.6 arro3-core==0.9.1 \
        deprecated==1.2.18 wrapt pyiceberg==0.12.0 mmh3==5.3.1 strictyaml==1.7.3 tenacity pyroaring==1.2.0 \
        zstandard==0.25.0
    .venv/bin/python bench/table_formats.py --extra-path /tmp/tf [--nights 3]
Writes bench/results/table-formats.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bridgerec.runtime.machine import machine_info

REPO = Path(__file__).resolve().parents[1]
USERS, K = 53_061, 20


def night(run_id: str, seed: int):
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(USERS), 2 * K)
    domain = np.tile(np.repeat(np.array(["food", "kitchen"]), K), USERS)
    rank = np.tile(np.arange(1, K + 1, dtype=np.int16), USERS * 2)
    items = rng.integers(0, 36_298, USERS * 2 * K)
    return pa.table(
        {
            "run_id": pa.array([run_id] * len(users)),
            "user_id": pa.array([f"u{u:06d}" for u in users]),
            "domain": pa.array(domain),
            "rank": pa.array(rank),
            "item_id": pa.array([f"i{i:06d}" for i in items]),
            "score": pa.array((1.0 - rank / 100.0).astype(np.float32)),
        }
    )


def timed(fn, *args, repeat: int = 1, **kwargs) -> tuple[float, object]:
    """Mean seconds of `repeat` calls of fn(*args, **kwargs), and the last result."""
    t0 = time.perf_counter()
    out = None
    for _ in range(repeat):
        out = fn(*args, **kwargs)
    return (time.perf_counter() - t0) / repeat, out


def parts_format(root: Path, nights: list) -> dict:
    import pyarrow as pa

    from bridgerec.storage import warehouse as wh

    path = root / "warehouse.duckdb"
    items = pa.table(
        {
            "item_id": [f"i{i:06d}" for i in range(36_298)],
            "domain": ["food"] * 36_298,
            "title": ["t"] * 36_298,
            "brand": [None] * 36_298,
            "categories": [None] * 36_298,
            "price": [None] * 36_298,
        }
    )
    writes = []
    for table in nights:
        run_id = table["run_id"][0].as_py()
        batch = wh.PublishBatch(
            wh.RunRecord(run_id, datetime.now(UTC), k=K), table.drop_columns(["run_id"]), items
        )
        writes.append(timed(wh.publish, path, batch, 30)[0])
    first, last = nights[0]["run_id"][0].as_py(), nights[-1]["run_id"][0].as_py()
    latest = timed(lambda: wh.user_recommendations(path, "u012345"), repeat=20)[0]
    oldest = timed(lambda: wh.user_recommendations(path, "u012345", run_id=first), repeat=20)[0]
    assert last
    return {
        "format": "parquet parts + DuckDB views (bridgerec)",
        "publish_s": writes,
        "recs_latest_ms": latest * 1000,
        "recs_oldest_ms": oldest * 1000,
        "analyst": "duckdb -readonly warehouse.duckdb  then  SELECT * FROM latest_recommendations WHERE user_id = ?;"
        " any night: ... FROM recommendations WHERE run_id = ?",
        "duckdb_1x_reads": True,
    }


def delta_format(root: Path, nights: list) -> dict:
    import duckdb
    from deltalake import DeltaTable, write_deltalake

    path = str(root / "delta")
    writes = [
        timed(write_deltalake, path, t, partition_by=["run_id", "domain"], mode="append")[0] for t in nights
    ]

    def lookup(run_id: str) -> int:
        dt = DeltaTable(path)
        con = duckdb.connect()
        con.register("recs", dt.to_pyarrow_dataset())
        n = len(
            con.execute("SELECT * FROM recs WHERE run_id = ? AND user_id = 'u012345'", [run_id]).fetchall()
        )
        con.close()
        return n

    first, last = nights[0]["run_id"][0].as_py(), nights[-1]["run_id"][0].as_py()
    assert lookup(last) == 2 * K
    return {
        "format": "Delta Lake (deltalake)",
        "publish_s": writes,
        "recs_latest_ms": timed(lookup, last, repeat=20)[0] * 1000,
        "recs_oldest_ms": timed(lookup, first, repeat=20)[0] * 1000,
        "analyst": "Python: DeltaTable(path).to_pyarrow_dataset() registered on a DuckDB connection; plain DuckDB"
        " needs the delta extension (downloaded at first use): SELECT * FROM delta_scan('path')",
        "duckdb_1x_reads": False,
    }


def iceberg_format(root: Path, nights: list) -> dict:
    import duckdb
    from pyiceberg.catalog.sql import SqlCatalog
    from pyiceberg.expressions import And, EqualTo

    catalog = SqlCatalog("bench", uri=f"sqlite:///{root}/iceberg.db", warehouse=f"file://{root}/iceberg")
    catalog.create_namespace("bridgerec")
    table = catalog.create_table("bridgerec.recommendations", schema=nights[0].schema)
    with table.update_spec() as spec:  # partitioned by run and domain, as the parts are
        spec.add_identity("run_id")
        spec.add_identity("domain")
    writes = [timed(table.append, t)[0] for t in nights]

    def lookup(run_id: str) -> int:
        t = SqlCatalog("bench", uri=f"sqlite:///{root}/iceberg.db").load_table("bridgerec.recommendations")
        found = t.scan(row_filter=And(EqualTo("run_id", run_id), EqualTo("user_id", "u012345"))).to_arrow()
        con = duckdb.connect()
        con.register("found", found)
        n = len(con.execute("SELECT * FROM found").fetchall())
        con.close()
        return n

    first, last = nights[0]["run_id"][0].as_py(), nights[-1]["run_id"][0].as_py()
    assert lookup(last) == 2 * K
    return {
        "format": "Apache Iceberg (pyiceberg, SQLite catalog)",
        "publish_s": writes,
        "recs_latest_ms": timed(lookup, last, repeat=20)[0] * 1000,
        "recs_oldest_ms": timed(lookup, first, repeat=20)[0] * 1000,
        "analyst": "Python: a pyiceberg catalog, table.scan(row_filter=...).to_arrow(); plain DuckDB needs the"
        " iceberg extension (downloaded at first use) and the catalog: SELECT * FROM iceberg_scan(...)",
        "duckdb_1x_reads": False,
    }


def ducklake_loads() -> str:
    import duckdb

    try:
        duckdb.connect().execute("LOAD ducklake")
        return "loads"
    except duckdb.Error as exc:
        return str(exc).strip().splitlines()[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--extra-path", default=None, help="where deltalake and pyiceberg were installed apart")
    ap.add_argument("--nights", type=int, default=3)
    args = ap.parse_args()
    if args.extra_path:
        sys.path.append(args.extra_path)  # after the project's packages: they win on any overlap
    nights = [night(f"night-{i}", i) for i in range(args.nights)]
    rows = []
    for name, fn in (("parts", parts_format), ("delta", delta_format), ("iceberg", iceberg_format)):
        with tempfile.TemporaryDirectory() as tmp:
            try:
                rows.append(fn(Path(tmp), nights))
            except ImportError as exc:
                rows.append({"format": name, "not_run": f"{exc} (see --extra-path)"})
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "benchmark": "table-formats",
        "machine": machine_info(),
        "rows_per_night": nights[0].num_rows,
        "nights": args.nights,
        "ducklake": ducklake_loads(),
        "rows": rows,
    }
    out = REPO / "bench" / "results" / "table-formats.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'format':45} {'publish s (each night)':>28} {'recs ms':>8} {'oldest ms':>9}")
    for r in rows:
        if "not_run" in r:
            print(f"{r['format']:45} not run: {r['not_run']}")
            continue
        each = ", ".join(f"{s:.2f}" for s in r["publish_s"])
        print(f"{r['format']:45} {each:>28} {r['recs_latest_ms']:>8.0f} {r['recs_oldest_ms']:>9.0f}")
    print(f"DuckLake on DuckDB here: {result['ducklake']} -> {out}")


if __name__ == "__main__":
    main()
