"""An analyst in a loop: opens the warehouse read-only, checks that what it sees is one whole run, closes.

Run as a separate process by test_publish_concurrency.py:
    python publish_reader.py fresh|held WAREHOUSE STOP_FILE READY_FILE OUT_JSON
It reads until STOP_FILE exists, then writes its counts to OUT_JSON. `fresh` opens a new connection for
every read; `held` keeps one connection for the whole time, which must keep seeing the run it saw
first (its file's snapshot). They must be separate processes: within one process DuckDB shares one
database instance per path, so an open connection pins the snapshot for new ones too.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import duckdb


def check(con: duckdb.DuckDBPyConnection) -> tuple[str | None, list[str]]:
    """The latest run id seen and the list of inconsistencies (empty when all is well)."""
    problems: list[str] = []
    latest = con.execute("SELECT run_id, k, n_domains, n_users, n_recommendations FROM latest_run").fetchall()
    if not latest:
        return None, ["no completed run"]
    run_id, k, n_domains, n_users, n_rows = latest[0]
    rows, runs, first_run, users, bad_rank = con.execute(
        "SELECT count(*), count(DISTINCT run_id), min(run_id), count(DISTINCT user_id), "
        "count(*) FILTER (WHERE rank < 1 OR rank > ?) FROM latest_recommendations",
        [k],
    ).fetchall()[0]
    if runs != 1 or first_run != run_id:
        problems.append(f"latest_recommendations holds runs {runs} ({first_run}), latest_run is {run_id}")
    if not rows == n_rows == n_users * k * n_domains or users != n_users:
        problems.append(
            f"{run_id}: {rows} rows / {users} users, runs says {n_rows} / {n_users} x {k} x {n_domains}"
        )
    if bad_rank:
        problems.append(f"{run_id}: {bad_rank} ranks outside 1..{k}")
    uneven = con.execute(
        "SELECT count(*) FROM (SELECT user_id FROM latest_recommendations GROUP BY user_id HAVING count(*) <> ?)",
        [k * n_domains],
    ).fetchall()[0][0]
    if uneven:
        problems.append(f"{run_id}: {uneven} users without exactly k x domains rows")
    # Every retained run is whole; every purged one is gone.
    for rid, purged, expected, got in con.execute(
        "SELECT r.run_id, r.purged_at IS NOT NULL, r.n_recommendations, count(x.run_id) FROM runs r "
        "LEFT JOIN recommendations x ON x.run_id = r.run_id WHERE r.status = 'completed' GROUP BY ALL"
    ).fetchall():
        if got != (0 if purged else expected):
            problems.append(f"run {rid} (purged={purged}) has {got} rows, expected {expected}")
    metric_runs = con.execute("SELECT DISTINCT run_id FROM latest_metrics").fetchall()
    if metric_runs and metric_runs != [(run_id,)]:
        problems.append(f"latest_metrics holds {metric_runs}, latest_run is {run_id}")
    return run_id, problems


def main(mode: str, warehouse: str, stop: str, ready: str, out: str) -> None:
    reads, errors, inconsistent = 0, [], []
    seen: list[str] = []
    held = duckdb.connect(warehouse, read_only=True) if mode == "held" else None
    Path(ready).touch()
    while True:
        stopping = Path(stop).exists()  # read once more after the stop signal
        try:
            if held is not None:
                run_id, problems = check(held)
            else:
                with duckdb.connect(warehouse, read_only=True) as con:
                    run_id, problems = check(con)
            reads += 1
            if run_id and (not seen or seen[-1] != run_id):
                seen.append(run_id)
            inconsistent.extend(problems)
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        if stopping:
            break
        time.sleep(0.002)
    if held is not None:
        held.close()
    Path(out).write_text(
        json.dumps(
            {
                "reads": reads,
                "errors": errors[:20],
                "n_errors": len(errors),
                "inconsistent": inconsistent[:20],
                "n_inconsistent": len(inconsistent),
                "runs_seen": seen,
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:6])
