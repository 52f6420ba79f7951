"""Benchmark: the nightly flow on the whole food-kitchen dataset, three times:
first run, rerun with nothing changed, rerun with 1% new interactions. Wall time per stage.

Goals (issue #5): the unchanged rerun under 5% of the first run, the 1% rerun under 25%.
Usage: .venv/bin/python bench/nightly.py [--data ../shared/data/food-kitchen] [--max-users 200] [--epochs 5]
Writes bench/results/nightly.json and prints a table.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

from harness import add_data_argument, food_kitchen

from bridgerec.runtime.machine import machine_info

REPO = Path(__file__).resolve().parents[1]


def add_new_interactions(src: Path, dst: Path, share: float, seed: int = 0) -> int:
    """Copy the interactions file, appending one new interaction for `share` of the users: the next
    position in their sequence, an item of their last domain they never had."""
    import duckdb

    con = duckdb.connect()
    con.execute(f"CREATE TABLE i AS SELECT * FROM read_csv('{src}', all_varchar=true)")
    users = con.execute(
        "SELECT user_id, max(CAST(position AS INT)), arg_max(domain, CAST(position AS INT)), list(item_id) FROM i GROUP BY 1 ORDER BY 1"
    ).fetchall()
    items = {
        d: [
            r[0]
            for r in con.execute("SELECT DISTINCT item_id FROM i WHERE domain = ? ORDER BY 1", [d]).fetchall()
        ]
        for d in ("food", "kitchen")
    }
    rng = random.Random(seed)
    chosen = rng.sample(users, max(1, int(len(users) * share)))
    lines = []
    for user, last_pos, domain, had in chosen:
        seen = set(had)
        item = next(it for it in rng.sample(items[domain], 50) if it not in seen)
        lines.append(f"{user},{item},{domain},{last_pos + 1}")
    with gzip.open(src, "rt") as fh, gzip.open(dst, "wt") as out:
        out.write(fh.read().rstrip("\n") + "\n" + "\n".join(lines) + "\n")
    return len(lines)


def what_ran(stages: dict) -> dict:
    """The figures that say what each stage did (skipped? new work? warm or cold? quality)."""
    ingest, enrich, train, publish = (stages.get(k) or {} for k in ("ingest", "enrich", "train", "publish"))
    test = train.get("test") or {}
    overall = test.get("overall", test)
    return {
        "ingest_skipped": ingest.get("skipped"),
        "enrich_skipped": enrich.get("skipped"),
        "items_embedded": enrich.get("items_embedded"),
        "profiles_generated": enrich.get("profiles_generated"),
        "engines_started": len(enrich.get("engines_started") or []),
        "train_skipped": train.get("skipped"),
        "train_init": train.get("init"),
        "train_epochs": train.get("epochs"),
        "train_best_epoch": train.get("best_epoch"),
        "test_ndcg10": overall.get("ndcg@10") if isinstance(overall, dict) else None,
        "publish_skipped": publish.get("skipped"),
        "published_rows": publish.get("rows"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(ap)
    ap.add_argument("--max-users", type=int, default=32, help="profiles.max_users (LLM profile cap)")
    ap.add_argument("--epochs", type=int, default=5, help="train.epochs of a cold run")
    ap.add_argument(
        "--warm-start-epochs", type=int, default=None, help="train.warm_start_epochs (default: the config's)"
    )
    ap.add_argument("--keep", type=Path, default=None, help="keep the workspace here")
    args = ap.parse_args()

    from bridgerec.flows.nightly import nightly_flow

    data = food_kitchen(args.data)
    tmp = Path(tempfile.mkdtemp(prefix="bench-nightly-"))
    raw = tmp / "raw"
    raw.mkdir()
    shutil.copy(data / "items.csv.gz", raw / "items.csv.gz")
    shutil.copy(data / "interactions.csv.gz", raw / "interactions.csv.gz")
    ws = args.keep or tmp / "ws"
    overrides = {
        "workspace": str(ws),
        "warehouse": str(ws / "warehouse.duckdb"),
        "ingest": {
            "source": "generic",
            "items": str(raw / "items.csv.gz"),
            "interactions": str(raw / "interactions.csv.gz"),
        },
        "profiles": {"max_users": args.max_users},
        "train": {"epochs": args.epochs}
        | ({"warm_start_epochs": args.warm_start_epochs} if args.warm_start_epochs else {}),
    }
    runs = {}
    for label in ("first", "unchanged", "one_percent_new"):
        if label == "one_percent_new":
            n = add_new_interactions(data / "interactions.csv.gz", raw / "interactions.csv.gz", 0.01)
            print(f"appended {n} new interactions (1% of users)")
        t0 = time.perf_counter()
        result = nightly_flow(None, overrides).model_dump(mode="json")
        total = time.perf_counter() - t0
        runs[label] = {
            "total_seconds": round(total, 2),
            "stage_seconds": result["seconds"],
            "what_ran": what_ran(result["stages"]),
        }
        print(f"{label}: {total:.1f} s {result['seconds']} {runs[label]['what_ran']}")

    first = runs["first"]["total_seconds"]
    ratios = {k: round(v["total_seconds"] / first, 4) for k, v in runs.items()}
    goals = {"unchanged": 0.05, "one_percent_new": 0.25}
    out = {
        "benchmark": "nightly",
        "dataset": str(args.data),
        "profiles_max_users": args.max_users,
        "epochs": args.epochs,
        "warm_start_epochs": args.warm_start_epochs,
        "machine": machine_info(),
        "runs": runs,
        "ratio_to_first": ratios,
        "goals": goals,
        "meets_goals": {k: ratios[k] < g for k, g in goals.items()},
    }
    path = REPO / "bench" / "results" / "nightly.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    stages = list(runs["first"]["stage_seconds"])
    print(f"\n{'run':<18}" + "".join(f"{s:>10}" for s in stages) + f"{'total':>10}{'ratio':>8}")
    for label, r in runs.items():
        print(
            f"{label:<18}"
            + "".join(f"{r['stage_seconds'][s]:>10.1f}" for s in stages)
            + f"{r['total_seconds']:>10.1f}{ratios[label]:>8.3f}"
        )
    print(
        f"goals: unchanged < 5% ({out['meets_goals']['unchanged']}), 1% new < 25% ({out['meets_goals']['one_percent_new']}); wrote {path.relative_to(REPO)}"
    )
    if args.keep is None:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
