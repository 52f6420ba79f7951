"""Benchmark: publish the whole food-kitchen: top-k for every user in both domains with FAISS against
brute-force torch in the same process, parts written per second, total publish time; and two tables:

--cost-table   publish time and bytes written with 1, 7 and 30 retained nights, at 1x and 4x
               food-kitchen (users resampled under new ids, through the real ingest): a night must cost
               what it writes, not what the warehouse keeps. Writes bench/results/publish-cost.json.
--history-table  publish with `publish.history` on and off in turns (synthetic vectors, the same users):
               seconds, CPU seconds, bytes written and one user's `bridgerec recs` lookup, what each user's
               history in the warehouse costs. Writes bench/results/publish-history.json.
--index-table  FAISS index kinds on synthetic catalogues of 36k, 360k and 3.6M items: build time, search
               time per 1k users, recall@20 against exact search, memory; what `publish.index.kind:
               auto`'s threshold rests on. Writes bench/results/publish-index.json.

Vectors come from the workspace's trained run when there is one (TrainOutputs.export_vectors), otherwise they are
synthetic (random item vectors; a user's vector = the sum of the items they had + noise) with the
model's shape (--dim, default 256 = two 128-d threads concatenated); the JSON says which.
Usage: .venv/bin/python bench/publish.py [--workspace /tmp/fk] [--threads 2] [--publishes 3]
       .venv/bin/python bench/publish.py --cost-table [--scales 1,4] [--retentions 1,7,30]
       .venv/bin/python bench/publish.py --history-table [--publishes 3]
       .venv/bin/python bench/publish.py --index-table [--index-items 36000,360000,3600000]
Writes bench/results/publish.json (publish-synthetic.json for synthetic vectors) and prints a table. Goal: the whole publish under 60 s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from harness import add_data_argument, food_kitchen

from bridgerec.runtime.machine import machine_info
from bridgerec.tasks import StageRun

if TYPE_CHECKING:
    import numpy as np

REPO = Path(__file__).resolve().parents[1]
GOAL_SECONDS = 60.0


def ensure_ingested(workspace: Path, data: Path) -> None:
    from bridgerec.storage.workspace import Workspace
    from bridgerec.tasks.ingest import IngestSettings, run_ingest

    if Workspace(workspace).read_manifest("ingest") is None:
        data = food_kitchen(data)
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


def default_publishes(args: argparse.Namespace) -> None:
    """FAISS against brute-force torch, then whole publishes onto one warehouse (the default mode)."""
    import numpy as np
    import torch

    from bridgerec.storage.index_store import Searcher, build_index, search_topk, set_threads
    from bridgerec.storage.workspace import Workspace
    from bridgerec.tasks.publish import PublishSettings, run_publish
    from bridgerec.tasks.train import TrainedRun, TrainOutputs

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

    # 2. Whole publishes onto one warehouse.
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
                    "data_mb": round(s.data_bytes / 1e6, 1),
                    "warehouse_mb": round(s.warehouse_bytes / 1e6, 2),
                    **s.timings,
                }
            )
        lookup_ms = recs_latency_ms(warehouse, next(iter(vectors.values())).user_ids)
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
        "recs_lookup_ms": round(lookup_ms, 1),
        "peak_rss_mb": round(peak, 1),
        "goal_seconds": GOAL_SECONDS,
        "goal_met": all(p["seconds"] < GOAL_SECONDS for p in publishes),
    }
    out = REPO / "bench" / "results" / ("publish.json" if trained else "publish-synthetic.json")
    write_result(out, result)

    print(f"publish benchmark ({result['vectors']}, {args.threads} threads, k={args.k})")
    print(f"{'domain':10} {'users':>7} {'items':>7} {'faiss s':>8} {'torch s':>8} {'ids equal':>9}")
    for d, c in compare.items():
        print(
            f"{d:10} {c['users']:>7} {c['items']:>7} {c['faiss_s']:>8.2f} {c['torch_s']:>8.2f} "
            f"{c['ids_equal_fraction']:>9.4f}"
        )
    cols = {"seconds": "seconds", "cpu_s": "cpu s", "export_s": "export s", "search_s": "search s"}
    cols |= {"parts_write_s": "parts s", "warehouse_write_s": "db write s", "rows_per_s": "rows/s"}
    print(f"{'publish':8} " + " ".join(f"{label:>10}" for label in cols.values()) + "   parts MB")
    for i, p in enumerate(publishes):
        print(f"{i:<8} " + " ".join(f"{p.get(c, 0):>10.2f}" for c in cols) + f" {p['data_mb']:>10.1f}")
    print(
        f"first publish {first['seconds']:.1f} s (goal < {GOAL_SECONDS:.0f} s: "
        f"{'met' if result['goal_met'] else 'NOT met'}); one user's recs {lookup_ms:.0f} ms; "
        f"peak RSS {peak:.0f} MB -> {out}"
    )


def write_result(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def recs_latency_ms(warehouse: Path, user_ids: list[str], run_id: str | None = None, n: int = 50) -> float:
    """What an analyst waits for: `bridgerec recs` for one user (open, lookups, close), mean of `n`."""
    from bridgerec.storage.warehouse import user_recommendations

    sample = user_ids[:: max(1, len(user_ids) // n)][:n]
    t0 = time.perf_counter()
    for user in sample:
        user_recommendations(warehouse, user, run_id=run_id)
    return (time.perf_counter() - t0) / len(sample) * 1000


# ---- the history's cost: publish.history on against off ---------------------------------------------------


def history_table(args: argparse.Namespace) -> None:
    """`--publishes` rounds; in each, one publish with the history and one without (the order swapped
    every round), each onto its own warehouse, the same synthetic vectors."""
    import statistics

    from bridgerec.storage.workspace import Workspace
    from bridgerec.tasks.publish import PublishSettings, run_publish

    ensure_ingested(args.workspace, args.data)
    ws = Workspace(args.workspace)
    vectors = synthetic_vectors(args.workspace, args.dim)
    rows: dict[str, list[dict]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.publishes):
            for variant in ("on", "off") if i % 2 == 0 else ("off", "on"):
                warehouse = Path(tmp) / variant / "warehouse.duckdb"
                settings = PublishSettings(k=args.k, threads=args.threads, history=variant == "on")
                cpu0 = time.process_time()
                s = run_publish(
                    StageRun(settings, ws, warehouse=warehouse, threads=args.threads),
                    run_id=f"bench-{i}",
                    vectors=vectors,
                    model="synthetic",
                )
                rows[variant].append(
                    {
                        "seconds": round(s.seconds, 3),
                        "cpu_s": round(time.process_time() - cpu0, 3),
                        "data_mb": round(s.data_bytes / 1e6, 2),
                        "stage_s": round(s.timings.get("stage_s", 0.0), 3),
                        "parts_write_s": round(s.timings.get("parts_write_s", 0.0), 3),
                    }
                )
        users = next(iter(vectors.values())).user_ids
        lookup = {v: round(recs_latency_ms(Path(tmp) / v / "warehouse.duckdb", users), 1) for v in rows}
        import duckdb

        with duckdb.connect(str(Path(tmp) / "on" / "warehouse.duckdb"), read_only=True) as con:
            (history_mb,) = con.execute(
                "SELECT sum(bytes) / 1e6 / count(DISTINCT run_id), sum(rows) // count(DISTINCT run_id) FROM parts "
                "WHERE kind = 'interactions' AND dropped_at IS NULL"
            ).fetchall()
    median = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for v, rs in rows.items()}
    result = {
        "benchmark": "publish-history",
        "workspace": str(args.workspace),
        "vectors": f"synthetic, dim {args.dim}",
        "machine": machine_info(),
        "threads": args.threads,
        "k": args.k,
        "rounds": args.publishes,
        "publishes": rows,
        "median": median,
        "history_mb_per_run": round(history_mb[0], 2),
        "history_rows_per_run": int(history_mb[1]),
        "recs_lookup_ms": lookup,
        "ratios_on_over_off": {
            k: round(median["on"][k] / median["off"][k], 3) for k in ("seconds", "cpu_s", "data_mb")
        },
    }
    out = REPO / "bench" / "results" / "publish-history.json"
    write_result(out, result)
    print(
        f"publish with and without the users' histories ({args.publishes} rounds in turns, {args.threads} threads)"
    )
    print(
        f"{'history':8} {'seconds':>8} {'cpu s':>8} {'parts MB':>9} {'stage s':>8} {'parts s':>8} {'recs ms':>8}"
    )
    for v, m in median.items():
        print(
            f"{v:8} {m['seconds']:>8.2f} {m['cpu_s']:>8.2f} {m['data_mb']:>9.2f} {m['stage_s']:>8.2f} "
            f"{m['parts_write_s']:>8.2f} {lookup[v]:>8.1f}"
        )
    print(
        f"on / off: {result['ratios_on_over_off']}; history parts {result['history_mb_per_run']} MB a run -> {out}"
    )


# ---- table 1: publish cost against retention and size --------------------------------------------------


def resampled_workspace(base: Path, data: Path, scale: int, threads: int) -> Path:
    """food-kitchen with every user copied `scale` times under new ids (`<id>~<copy>`), ingested by the
    real ingest stage: the same catalogue, `scale` x the users, interactions and output rows."""
    import gzip

    from bridgerec.storage.workspace import Workspace
    from bridgerec.tasks.ingest import IngestSettings, run_ingest

    root = base.with_name(f"{base.name}-x{scale}") if scale > 1 else base
    if scale == 1:
        ensure_ingested(root, data)
        return root
    if Workspace(root).read_manifest("ingest") is None:
        data = food_kitchen(data)
        raw = root / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        with gzip.open(data / "interactions.csv.gz", "rt") as fh:
            header, *rows = fh.read().splitlines()
        with gzip.open(raw / "interactions.csv.gz", "wt") as out:
            out.write(header + "\n")
            for copy in range(scale):
                suffix = "" if copy == 0 else f"~{copy}"
                out.writelines(f"{u}{suffix},{rest}\n" for u, rest in (r.split(",", 1) for r in rows))
        settings = IngestSettings(items=data / "items.csv.gz", interactions=raw / "interactions.csv.gz")
        run_ingest(StageRun(settings, Workspace(root), threads=threads))
    return root


def clone_nights(warehouse: Path, template: Path, n: int, k: int) -> None:
    """Register `n` nights whose parts are hard links of the template warehouse's night (no scoring, no
    copy): the warehouse then holds `n` retained nights of real size. The linked files keep the
    template's run_id column; only the measured publish's parts are written for real."""
    import os
    from datetime import UTC, datetime

    from bridgerec.storage import warehouse as wh
    from bridgerec.storage.warehouse.parts import PartInfo, part_path
    from bridgerec.storage.warehouse.publish import previous_items

    with wh.connect(template) as con:
        rows = con.execute(
            "SELECT kind, domain, shard, path, rows, bytes FROM parts WHERE dropped_at IS NULL AND kind <> 'items'"
        ).fetchall()
        n_users = con.execute("SELECT n_users FROM latest_run").fetchall()[0][0]
    source = template.parent / wh.default_root(template)
    items = previous_items(template).select(["item_id", "domain", "title", "brand", "categories", "price"])
    for i in range(n):
        run_id = f"night-{i:02d}"
        with wh.publish_attempt(warehouse, run_id, wh.default_root(warehouse)) as attempt:
            parts = []
            for kind, domain, shard, path, n_rows, size in rows:
                rel = part_path(kind, run_id, attempt.write_id, shard, domain)
                target = warehouse.parent / wh.default_root(warehouse) / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(source / path, target)
                parts.append(
                    PartInfo(run_id, kind, domain, shard, wh.default_root(warehouse), rel, n_rows, size)
                )
            record = wh.RunRecord(run_id, datetime.now(UTC), model="clone", k=k, n_users=n_users, n_domains=2)
            wh.register_night(attempt, wh.Night(record, parts, items), wh.Retention(n + 1, 0.0))


def cost_row(args: argparse.Namespace, ws_root: Path, vectors: dict, template: Path, keep: int) -> dict:
    """One measured publish onto a warehouse already holding `keep` retained nights (retention `keep`:
    the publish adds one night and drops the oldest, whose files it deletes: steady state)."""
    from bridgerec.storage.workspace import Workspace
    from bridgerec.tasks.publish import PublishSettings, run_publish

    with tempfile.TemporaryDirectory(dir=ws_root) as tmp:
        warehouse = Path(tmp) / "warehouse.duckdb"
        clone_nights(warehouse, template, keep, args.k)
        before = warehouse.stat().st_size
        settings = PublishSettings(
            k=args.k, threads=args.threads, retention_runs=keep, retention_grace_hours=0
        )
        cpu0 = time.process_time()
        s = run_publish(
            StageRun(settings, Workspace(ws_root), warehouse=warehouse, threads=args.threads),
            run_id="measured",
            vectors=vectors,
            model="synthetic",
        )
        cpu_s = time.process_time() - cpu0
        t = s.timings
        register_s = sum(
            t.get(x, 0.0)
            for x in ("items_part_s", "warehouse_copy_s", "warehouse_write_s", "warehouse_swap_s")
        )
        users = next(iter(vectors.values())).user_ids
        return {
            "retained_nights": keep,
            "rows": s.rows,
            "shards": s.shards,
            "seconds": round(s.seconds, 2),
            "cpu_s": round(cpu_s, 2),
            "search_s": round(t.get("search_s", 0.0), 2),
            "parts_write_s": round(t.get("parts_write_s", 0.0), 2),
            "register_s": round(register_s, 3),
            "parts_mb": round(s.data_bytes / 1e6, 1),
            "warehouse_file_mb_before": round(before / 1e6, 3),
            "warehouse_file_mb": round(s.warehouse_bytes / 1e6, 3),
            "bytes_written_mb": round((s.data_bytes + s.warehouse_bytes) / 1e6, 1),
            "purged": s.purged_runs,
            "recs_latest_ms": round(recs_latency_ms(warehouse, users), 1),
            "recs_oldest_ms": round(
                recs_latency_ms(warehouse, users, run_id=f"night-{1 if keep > 1 else 0:02d}")
                if keep > 1
                else 0.0,
                1,
            ),
            "timings": t,
        }


def cost_table(args: argparse.Namespace) -> None:
    from bridgerec.storage.index_store import set_threads
    from bridgerec.storage.workspace import Workspace
    from bridgerec.tasks.publish import PublishSettings, run_publish

    set_threads(args.threads)
    rows = []
    for scale in args.scales:
        root = resampled_workspace(args.workspace, args.data, scale, args.threads)
        vectors = synthetic_vectors(root, args.dim)
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            template = Path(tmp) / "template.duckdb"
            settings = PublishSettings(k=args.k, threads=args.threads)
            run_publish(
                StageRun(settings, Workspace(root), warehouse=template, threads=args.threads),
                run_id="template",
                vectors=vectors,
                model="synthetic",
            )
            for keep in args.retentions:
                row = {"scale": scale, "users": len(next(iter(vectors.values())).user_ids)}
                rows.append(row | cost_row(args, root, vectors, template, keep))
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "timings"}), flush=True)
    result = {
        "benchmark": "publish-cost",
        "machine": machine_info(),
        "threads": args.threads,
        "k": args.k,
        "dim": args.dim,
        "vectors": f"synthetic, dim {args.dim}",
        "note": "retained nights before the measured publish are hard links of one real night's parts",
        "rows": rows,
    }
    write_result(REPO / "bench" / "results" / "publish-cost.json", result)
    print(
        f"{'scale':>5} {'users':>7} {'kept':>4} {'rows':>9} {'publish s':>9} {'cpu s':>7} {'register s':>10} "
        f"{'parts MB':>8} {'file MB':>7} {'written MB':>10} {'recs ms':>7} {'old ms':>6}"
    )
    for r in rows:
        print(
            f"{r['scale']:>5} {r['users']:>7} {r['retained_nights']:>4} {r['rows']:>9} {r['seconds']:>9.1f} "
            f"{r['cpu_s']:>7.1f} {r['register_s']:>10.3f} {r['parts_mb']:>8.1f} {r['warehouse_file_mb']:>7.2f} "
            f"{r['bytes_written_mb']:>10.1f} {r['recs_latest_ms']:>7.0f} {r['recs_oldest_ms']:>6.0f}"
        )


# ---- table 2: FAISS index kinds by catalogue size ------------------------------------------------------


def clustered_vectors(n: int, dim: int, seed: int, clusters: int = 256) -> np.ndarray:
    """Synthetic item vectors with structure, as trained embeddings have: a mixture of `clusters`
    Gaussian clusters (centres N(0, 1), spread 0.5), float32 [n, dim] / sqrt(dim)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 1_000_000):  # in blocks: the temporaries stay small
        stop = min(n, start + 1_000_000)
        out[start:stop] = centres[rng.integers(0, clusters, stop - start)]
        out[start:stop] += rng.normal(scale=0.5, size=(stop - start, dim)).astype(np.float32)
    out /= np.float32(np.sqrt(dim))
    return out


def index_row(
    items: np.ndarray, users: np.ndarray, kind: str, k: int, exact: np.ndarray | None
) -> tuple[dict, np.ndarray]:
    import faiss
    import numpy as np
    import psutil

    from bridgerec.storage.index_store import IndexSettings, Searcher, build_index

    settings = IndexSettings(kind=kind).resolve(len(items))
    rss0 = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    index = build_index(items, settings)
    build_s = time.perf_counter() - t0
    index_bytes = faiss.serialize_index(index).nbytes
    searcher = Searcher.for_index(index, settings)
    t0 = time.perf_counter()
    _, got = searcher.search(users, k)
    search_s = time.perf_counter() - t0
    recall = 1.0
    if exact is not None:
        recall = float(np.mean([len(set(g) & set(e)) / k for g, e in zip(got, exact, strict=True)]))
    row = {
        "items": len(items),
        "kind": settings.label(),
        "build_s": round(build_s, 2),
        "search_s_per_1k_users": round(search_s / len(users) * 1000, 3),
        f"recall@{k}": round(recall, 4),
        "index_mb": round(index_bytes / 1e6, 1),
        "rss_growth_mb": round((psutil.Process().memory_info().rss - rss0) / 1e6, 1),
    }
    del index, searcher
    return row, got


def index_table(args: argparse.Namespace) -> None:
    import faiss

    from bridgerec.storage.index_store import set_threads

    set_threads(args.threads)
    rows = []
    for n in args.index_items:
        items = clustered_vectors(n, args.index_dim, seed=n)
        # Users: the sum of a few items plus noise, as a user's state sums what they had.
        picks = clustered_vectors(args.index_users, args.index_dim, seed=n + 1)
        users = (picks + items[: args.index_users] * 0.5).astype("float32")
        exact = None
        for kind in args.index_kinds:
            if kind == "hnsw" and n > args.hnsw_max_items:
                rows.append(
                    {
                        "items": n,
                        "kind": "hnsw",
                        "not_run": f"build above --hnsw-max-items {args.hnsw_max_items}",
                    }
                )
                continue
            row, got = index_row(items, users, kind, args.k, exact)
            if kind == "flat":
                exact = got
            rows.append(row)
            print(json.dumps(row), flush=True)
        del items
    result = {
        "benchmark": "publish-index",
        "machine": machine_info(),
        "threads": args.threads,
        "faiss": faiss.__version__,
        "dim": args.index_dim,
        "users": args.index_users,
        "k": args.k,
        "vectors": "synthetic: mixture of 256 Gaussian clusters; users = cluster draws + half an item",
        "rows": rows,
    }
    write_result(REPO / "bench" / "results" / "publish-index.json", result)
    print(
        f"{'items':>9} {'index':<30} {'build s':>8} {'search s/1k':>11} {'recall@' + str(args.k):>9} {'index MB':>8}"
    )
    for r in rows:
        if "not_run" in r:
            print(f"{r['items']:>9} {r['kind']:<30} not run: {r['not_run']}")
            continue
        print(
            f"{r['items']:>9} {r['kind']:<30} {r['build_s']:>8.1f} {r['search_s_per_1k_users']:>11.3f} "
            f"{r[f'recall@{args.k}']:>9.4f} {r['index_mb']:>8.0f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", type=Path, default=Path(tempfile.gettempdir()) / "fk")
    add_data_argument(ap)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--dim", type=int, default=256, help="synthetic vectors only")
    ap.add_argument("--publishes", type=int, default=3, help="publishes in a row onto one warehouse")
    ap.add_argument("--synthetic", action="store_true", help="synthetic vectors even if a trained run exists")
    ap.add_argument("--cost-table", action="store_true", help="publish cost against retention and size")
    ap.add_argument("--scales", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4])
    ap.add_argument("--retentions", type=lambda s: [int(x) for x in s.split(",")], default=[1, 7, 30])
    ap.add_argument("--history-table", action="store_true", help="publish.history on against off")
    ap.add_argument("--index-table", action="store_true", help="FAISS index kinds by catalogue size")
    ap.add_argument(
        "--index-items", type=lambda s: [int(x) for x in s.split(",")], default=[36_000, 360_000, 3_600_000]
    )
    ap.add_argument("--index-kinds", type=lambda s: s.split(","), default=["flat", "ivf", "hnsw"])
    ap.add_argument("--index-dim", type=int, default=128, help="3.6M x 128 float32 = 1.8 GB per copy")
    ap.add_argument("--index-users", type=int, default=1000)
    ap.add_argument("--hnsw-max-items", type=int, default=4_000_000, help="skip HNSW builds above this")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    from bridgerec.runtime import progress

    progress.set_enabled(False)
    if args.cost_table:
        cost_table(args)
    elif args.history_table:
        history_table(args)
    elif args.index_table:
        index_table(args)
    else:
        default_publishes(args)


if __name__ == "__main__":
    main()
