"""Benchmark: publish the whole food-kitchen: top-k for every user in both domains with FAISS against
brute-force torch in the same process, DuckDB rows/s, total publish time, warehouse copy cost.

Vectors come from the workspace's trained run when there is one (TrainOutputs.export_vectors), otherwise they are
synthetic (random item vectors; a user's vector = the sum of the items they had + noise) with the
model's shape (--dim, default 256 = two 128-d threads concatenated); the JSON says which.
Usage: .venv/bin/python bench/publish.py [--workspace /tmp/fk] [--threads 2] [--publishes 3]
Writes bench/results/publish.json (publish-synthetic.json for synthetic vectors) and prints a table. Goal: the whole publish under 60 s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from bridgerec.runtime.machine import machine_info
from bridgerec.tasks import StageRun

REPO = Path(__file__).resolve().parents[1]
GOAL_SECONDS = 60.0


def ensure_ingested(workspace: Path, data: Path) -> None:
    from bridgerec.storage.workspace import Workspace
    from bridgerec.tasks.ingest.settings import IngestSettings
    from bridgerec.tasks.ingest.stage import run_ingest

    if Workspace(workspace).read_manifest("ingest") is None:
        settings = IngestSettings(items=data / "items.csv.gz", interactions=data / "interactions.csv.gz")
        run_ingest(StageRun(settings, Workspace(workspace), threads=2))


def synthetic_vectors(workspace: Path, dim: int, seed: int = 0) -> dict:
    import numpy as np

    from bridgerec.storage.vectors import DomainVectors, seen_from_pairs
    from bridgerec.storage.workspace import Workspace

    ws = Workspace(workspace)
    rng = np.random.default_rng(seed)
    user_ids = ws.read_table("ingest", "users", ["user_id"])["user_id"].to_pylist()
    items = ws.read_table("ingest", "items", ["item_id", "domain"])
    inter = ws.read_table("ingest", "interactions", ["user_id", "item_id"])
    out = {}
    for domain in sorted(set(items["domain"].to_pylist())):
        mask = [d == domain for d in items["domain"].to_pylist()]
        item_ids = [i for i, m in zip(items["item_id"].to_pylist(), mask, strict=True) if m]
        indptr, seen = seen_from_pairs(user_ids, item_ids, inter["user_id"], inter["item_id"])
        item_vecs = rng.normal(size=(len(item_ids), dim)).astype(np.float32) / np.sqrt(dim)
        user_vecs = rng.normal(scale=0.3, size=(len(user_ids), dim)).astype(np.float32) / np.sqrt(dim)
        has = np.diff(indptr) > 0  # segment sums of the seen items' vectors, user by user (CSR order)
        user_vecs[has] += np.add.reduceat(item_vecs[seen], indptr[:-1][has], axis=0)
        out[domain] = DomainVectors(domain, user_ids, user_vecs, item_ids, item_vecs, indptr, seen)
    return out


def torch_topk(v, k: int, chunk: int = 4096):
    """Brute force: all scores per chunk of users, seen items at -inf, torch.topk."""
    import numpy as np
    import torch

    items = torch.from_numpy(v.item_vectors)
    out_i = np.empty((len(v.user_ids), k), dtype=np.int64)
    out_s = np.empty((len(v.user_ids), k), dtype=np.float32)
    counts = v.seen_counts()
    for start in range(0, len(v.user_ids), chunk):
        stop = min(start + chunk, len(v.user_ids))
        scores = torch.from_numpy(v.user_vectors[start:stop]) @ items.T  # [b, n]
        lo, hi = v.seen_indptr[start], v.seen_indptr[stop]
        rows = torch.from_numpy(np.repeat(np.arange(stop - start), counts[start:stop]))
        scores[rows, torch.from_numpy(v.seen_items[lo:hi])] = -torch.inf
        top = torch.topk(scores, k, dim=1)
        out_i[start:stop], out_s[start:stop] = top.indices.numpy(), top.values.numpy()
    return out_i, out_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", type=Path, default=Path(tempfile.gettempdir()) / "fk")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "food-kitchen")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--dim", type=int, default=256, help="synthetic vectors only")
    ap.add_argument("--publishes", type=int, default=3, help="publishes in a row onto one warehouse")
    ap.add_argument("--steady", type=int, default=8, help="extra publishes of the same rows (retention full)")
    ap.add_argument("--synthetic", action="store_true", help="synthetic vectors even if a trained run exists")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    from datetime import UTC, datetime

    import duckdb
    import numpy as np
    import torch

    from bridgerec.runtime import progress
    from bridgerec.storage import warehouse as wh
    from bridgerec.storage.index_store import Searcher, build_index, search_topk, set_threads
    from bridgerec.storage.warehouse import user_recommendations
    from bridgerec.storage.workspace import Workspace
    from bridgerec.tasks.publish import PublishSettings, run_publish
    from bridgerec.tasks.train import TrainedRun, TrainOutputs

    progress.set_enabled(False)
    torch.set_num_threads(args.threads)
    set_threads(args.threads)
    ensure_ingested(args.workspace, args.data)
    ws = Workspace(args.workspace)
    trained: TrainedRun | None = None
    if not args.synthetic and ws.read_manifest("train") is not None:
        trained = TrainOutputs(ws).best_run()
    t0 = time.perf_counter()
    vectors = (
        TrainOutputs(ws).export_vectors(trained) if trained else synthetic_vectors(args.workspace, args.dim)
    )
    vectors_s = time.perf_counter() - t0
    settings = PublishSettings(k=args.k, threads=args.threads)

    # 1. FAISS vs brute-force torch, same process, same vectors, same threads.
    compare = {}
    for domain, v in vectors.items():
        t0 = time.perf_counter()
        searcher = Searcher.for_index(build_index(v.item_vectors, settings.index), settings.index)
        got = search_topk(searcher, v.user_vectors, args.k, v.seen_indptr, v.seen_items, settings.batch_users)
        faiss_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        want_i, want_s = torch_topk(v, args.k)
        torch_s = time.perf_counter() - t0
        compare[domain] = {
            "users": len(v.user_ids),
            "items": len(v.item_ids),
            "dim": v.dim,
            "max_seen": int(v.seen_counts().max()),
            "faiss_s": round(faiss_s, 3),
            "torch_s": round(torch_s, 3),
            "ids_equal_fraction": float((got.items == want_i).mean()),
            "max_abs_score_diff": float(np.abs(got.scores - want_s).max()),
        }

    # 2. Whole publishes onto one warehouse (the first creates it; later ones copy it).
    publishes = []
    with tempfile.TemporaryDirectory() as tmp:
        warehouse = Path(tmp) / "warehouse.duckdb"
        for i in range(args.publishes):
            cpu0 = time.process_time()
            s = run_publish(
                StageRun(settings, ws, warehouse=warehouse, threads=args.threads),
                run_id=f"bench-{i}",
                vectors=None if trained else vectors,
                model=None if trained else "synthetic",
            )
            publishes.append(
                {
                    "seconds": round(s.seconds, 3),
                    # CPU seconds of this process (all threads): what the publish costs without
                    # contention from other work on the machine.
                    "cpu_s": round(time.process_time() - cpu0, 3),
                    "rows": s.rows,
                    "rows_per_s": round(s.rows_per_s),
                    "warehouse_mb": round(s.warehouse_bytes / 1e6, 1),
                    **s.timings,
                }
            )
        # Steady state: the same rows published again until retention is full, to see what the
        # file-swap design costs with `retention_runs` runs in the warehouse (copy, write, size).
        steady = []
        if args.steady:
            with duckdb.connect(str(warehouse), read_only=True) as con:
                recs = con.sql(
                    "SELECT user_id, domain, rank, item_id, score FROM recommendations WHERE run_id = ? "
                    "ORDER BY user_id, domain, rank",
                    params=[f"bench-{args.publishes - 1}"],
                ).to_arrow_table()
                items = con.sql(
                    "SELECT item_id, domain, title, brand, categories, price FROM items"
                ).to_arrow_table()
            for i in range(args.steady):
                record = wh.RunRecord(f"steady-{i}", datetime.now(UTC), model="steady", k=args.k)
                res = wh.publish(
                    warehouse, wh.PublishBatch(record, recs, items), settings.retention_runs, args.threads
                )
                steady.append(
                    {
                        "runs_before": min(args.publishes + i, settings.retention_runs),
                        "copy_mb": round(res.timings.bytes_copied / 1e6, 1),
                        "copy_s": round(res.timings.copy_s, 3),
                        "write_s": round(res.timings.write_s, 3),
                        "swap_s": round(res.timings.swap_s, 3),
                        "mb_after": round(warehouse.stat().st_size / 1e6, 1),
                    }
                )
        t0 = time.perf_counter()
        shutil.copyfile(warehouse, Path(tmp) / "copy.duckdb")
        copy_s = time.perf_counter() - t0
        # What an analyst waits for: `bridgerec recs` for one user (open, two lookups, close).
        sample_users = next(iter(vectors.values())).user_ids[
            :: max(1, len(next(iter(vectors.values())).user_ids) // 50)
        ]
        t0 = time.perf_counter()
        for user in sample_users:
            user_recommendations(warehouse, user)
        lookup_ms = (time.perf_counter() - t0) / len(sample_users) * 1000
        size_mb = warehouse.stat().st_size / 1e6
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    first = publishes[0]
    result = {
        "benchmark": "publish",
        "workspace": str(args.workspace),
        "vectors": f"trained run {trained.run_id}" if trained else f"synthetic, dim {args.dim}",
        "vectors_s": round(vectors_s, 3),
        "machine": machine_info(),
        "threads": args.threads,
        "k": args.k,
        "faiss_vs_torch": compare,
        "publishes": publishes,
        "warehouse_copy": {"mb": round(size_mb, 1), "seconds": round(copy_s, 3)},
        "steady_state": steady,
        "recs_lookup_ms": round(lookup_ms, 1),
        "peak_rss_mb": round(peak, 1),
        "goal_seconds": GOAL_SECONDS,
        "goal_met": all(p["seconds"] < GOAL_SECONDS for p in publishes),
    }
    out = REPO / "bench" / "results" / ("publish.json" if trained else "publish-synthetic.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"publish benchmark ({result['vectors']}, {args.threads} threads, k={args.k})")
    print(f"{'domain':10} {'users':>7} {'items':>7} {'faiss s':>8} {'torch s':>8} {'ids equal':>9}")
    for d, c in compare.items():
        print(
            f"{d:10} {c['users']:>7} {c['items']:>7} {c['faiss_s']:>8.2f} {c['torch_s']:>8.2f} "
            f"{c['ids_equal_fraction']:>9.4f}"
        )
    cols = {
        "seconds": "seconds",
        "cpu_s": "cpu s",
        "export_s": "export s",
        "search_s": "search s",
        "warehouse_write_s": "db write s",
        "warehouse_copy_s": "copy s",
        "rows_per_s": "rows/s",
    }
    print(f"{'publish':8} " + " ".join(f"{label:>10}" for label in cols.values()) + "        MB")
    for i, p in enumerate(publishes):
        print(f"{i:<8} " + " ".join(f"{p.get(c, 0):>10.2f}" for c in cols) + f" {p['warehouse_mb']:>9.1f}")
    for st in steady:
        print(
            f"steady publish with {st['runs_before']} runs kept: copy {st['copy_mb']:.0f} MB in "
            f"{st['copy_s']:.2f} s, write {st['write_s']:.2f} s, swap {st['swap_s']:.3f} s -> {st['mb_after']:.0f} MB"
        )
    print(
        f"first publish {first['seconds']:.1f} s (goal < {GOAL_SECONDS:.0f} s: "
        f"{'met' if result['goal_met'] else 'NOT met'}); warehouse copy {size_mb:.0f} MB in {copy_s:.2f} s; "
        f"one user's recs {lookup_ms:.0f} ms; peak RSS {peak:.0f} MB -> {out}"
    )


if __name__ == "__main__":
    main()
