"""Benchmark: ingest the whole food-kitchen dataset (no Prefect overhead), wall time, rows/s, peak RSS.

Each repeat runs in a fresh subprocess so peak RSS is that of one ingest alone.
Usage: .venv/bin/python bench/ingest.py [--data ../shared/data/food-kitchen] [--repeats 3]
Writes bench/results/ingest.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

from harness import add_data_argument, food_kitchen, run_child

from bridgerec.runtime.machine import machine_info
from bridgerec.tasks import StageRun

REPO = Path(__file__).resolve().parents[1]
GOALS = {"seconds": 30.0, "peak_rss_mb": 2048.0}


def one_run(data: Path, threads: int) -> dict:
    from bridgerec.storage.workspace import Workspace
    from bridgerec.tasks.ingest import IngestSettings, run_ingest

    settings = IngestSettings(items=data / "items.csv.gz", interactions=data / "interactions.csv.gz")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        s = run_ingest(StageRun(settings, Workspace(tmp), threads=threads))
        seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        skipped = run_ingest(StageRun(settings, Workspace(tmp), threads=threads))
        rerun = time.perf_counter() - t1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows = s.accounting["interactions"]["read"] + s.accounting["items"]["read"]
    return {
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows / seconds),
        "peak_rss_mb": round(peak, 1),
        "unchanged_rerun_seconds": round(rerun, 3),
        "rerun_skipped": skipped.skipped,
        "users": s.users,
        "items": s.items,
        "interactions": s.interactions,
        "overlap_users": s.overlap_users,
        "quarantined": s.quarantined,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(ap)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one_run(args.data.resolve(), args.threads)))
        return
    data = food_kitchen(args.data)
    runs = []
    for _ in range(args.repeats):
        out = run_child(
            [sys.executable, __file__, "--child", "--data", str(data), "--threads", str(args.threads)]
        )
        runs.append(json.loads(out.strip().splitlines()[-1]))
    best = min(runs, key=lambda r: r["seconds"])
    result = {
        "benchmark": "ingest",
        "dataset": str(args.data),
        "machine": machine_info(),
        "threads": args.threads,
        "runs": runs,
        "best": best,
        "goals": GOALS,
        "meets_goals": best["seconds"] < GOALS["seconds"]
        and max(r["peak_rss_mb"] for r in runs) < GOALS["peak_rss_mb"],
    }
    out_path = REPO / "bench" / "results" / "ingest.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'run':>4} {'seconds':>8} {'rows/s':>10} {'peak RSS MB':>12} {'rerun s':>8}")
    for i, r in enumerate(runs, 1):
        print(
            f"{i:>4} {r['seconds']:>8.2f} {r['rows_per_s']:>10,} {r['peak_rss_mb']:>12,.0f} {r['unchanged_rerun_seconds']:>8.3f}"
        )
    print(
        f"users {best['users']:,}  items {best['items']:,}  interactions {best['interactions']:,}  "
        f"overlap {best['overlap_users']:,}  quarantined {best['quarantined']}"
    )
    print(
        f"goals: < {GOALS['seconds']:.0f} s, < {GOALS['peak_rss_mb']:.0f} MB peak RSS -> "
        f"{'met' if result['meets_goals'] else 'NOT met'}; wrote {out_path.relative_to(REPO)}"
    )


if __name__ == "__main__":
    main()
