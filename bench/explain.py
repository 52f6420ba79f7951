"""Benchmark: what the explanations (because_item_id, because_score, because_percentile;
tasks/publish/explain.py) add to publish scoring. The whole food-kitchen (real users and histories,
through the real ingest) is scored shard by shard as publish does (stage_shards + score_shard: top-k
search, rows, Parquet parts), side by side in three modes, alternating, several rounds: `without` the
text space, `cosine` (the closest history item and its cosine, the reference samples emptied after
staging, so no percentile) and `with` (all three columns, as publish runs); the figures are the added
seconds per million published rows.

Vectors: the search side is synthetic with the model's shape (bench/publish.py's synthetic_vectors, 256-d);
the text space is a random table as wide as the default enrich.global_dim (384: MiniLM, no PCA), since
the cost depends on the widths and the users' real history lengths, not on the values. On a shared,
noisy machine CPU seconds (this process) and the explain step's own time (timed inside the same scoring, `explain_s`) is the steadier
figure; the JSON also has the wall-clock difference of the medians and the median of paired differences.
Usage: .venv/bin/python bench/explain.py [--workspace /tmp/fk] [--rounds 3] [--k 20] [--threads 2]
Writes bench/results/publish-explain.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import add_data_argument
from publish import REPO, ensure_ingested, synthetic_vectors

from bridgerec.runtime import progress
from bridgerec.runtime.machine import machine_info
from bridgerec.tasks.publish.explain import REFERENCE_ITEMS


def text_space(workspace: Path, dim: int, seed: int = 0):
    from bridgerec.storage.vectors import TextSpace, csr_from_pairs
    from bridgerec.storage.workspace import Workspace
    from bridgerec.tasks.train.inputs import load_catalog, load_sequences

    ws = Workspace(workspace)
    catalog, sequences = load_catalog(ws), load_sequences(ws)
    n_users = len(sequences.lengths)
    users = np.repeat(np.arange(n_users), sequences.lengths)
    indptr, items = csr_from_pairs(users, sequences.flat - 1, n_users, len(catalog.item_ids))
    table = np.random.default_rng(seed).normal(size=(len(catalog.item_ids), dim)).astype(np.float32)
    return TextSpace.from_table(list(catalog.item_ids), table, list(sequences.user_ids), indptr, items)


def score_all(vectors, text, index_root: Path, folder: Path, args, percentile: bool = True) -> dict:
    """Stage and score every shard as publish does (without the percentiles: the staged reference
    samples emptied); returns rows and seconds."""
    from bridgerec.storage.index_store import IndexSettings
    from bridgerec.storage.warehouse import PartTarget
    from bridgerec.tasks.publish.shards import ShardPlan, score_shard, stage_shards

    started, cpu = time.perf_counter(), time.process_time()
    scratch = folder / "scratch"
    shards, n_users = stage_shards(scratch, vectors, None, "bench", args.users_per_shard, text)
    if text is not None and not percentile:
        for domain in vectors:
            np.save(scratch / domain / "reference_rows.npy", np.zeros(0, np.int64))
    stage_s = time.perf_counter() - started
    plan = ShardPlan(
        run_id="bench",
        target=PartTarget(str(folder / "parts"), str(folder), "bench", "w1"),
        scratch=str(scratch),
        index_root=str(index_root),
        indexes=tuple((d, IndexSettings(kind="flat")) for d in sorted(vectors)),
        k=args.k,
        exclude_seen=True,
        batch_users=4096,
        threads=args.threads,
        shards=shards,
        n_users=n_users,
        explain=text is not None,
    )
    results = [score_shard(plan, s) for s in shards]
    return {
        "rows": sum(r.rows for r in results),
        "seconds": time.perf_counter() - started,
        "cpu_s": time.process_time() - cpu,  # this process, all threads: steadier on a shared machine
        "stage_s": stage_s,
        "explain_s": sum(sum(r.explain_s.values()) for r in results),
        "search_s": sum(sum(r.search_s.values()) for r in results),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", type=Path, default=Path(tempfile.gettempdir()) / "fk")
    add_data_argument(ap)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--dim", type=int, default=256, help="search vectors' width (the model's)")
    ap.add_argument("--text-dim", type=int, default=384, help="the text space's width (enrich.global_dim)")
    ap.add_argument("--users-per-shard", type=int, default=50_000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from bridgerec.storage.index_store import IndexSettings, IndexStore, build_index, set_threads

    progress.set_enabled(False)
    set_threads(args.threads)
    ensure_ingested(args.workspace, args.data)
    vectors = synthetic_vectors(args.workspace, args.dim)
    text = text_space(args.workspace, args.text_dim)
    lengths = np.diff(text.history_indptr)
    with tempfile.TemporaryDirectory(prefix="bench-explain-") as tmp:
        root = Path(tmp)
        store = IndexStore(root / "indexes")
        store.save_run(
            "bench",
            {
                d: (build_index(v.item_vectors, IndexSettings(kind="flat")), v.item_ids)
                for d, v in vectors.items()
            },
        )
        runs: dict[str, list[dict]] = {"without": [], "cosine": [], "with": []}
        for i in range(args.rounds):  # alternating, so drift on the shared machine hits all alike
            for mode in runs:
                folder = root / f"{mode}-{i}"
                runs[mode].append(
                    score_all(
                        vectors, None if mode == "without" else text, store.root, folder, args, mode == "with"
                    )
                )
                print(f"round {i + 1} {mode}: {runs[mode][-1]['seconds']:.2f} s", flush=True)
    rows = runs["with"][0]["rows"]
    off = statistics.median(r["seconds"] for r in runs["without"])
    on = statistics.median(r["seconds"] for r in runs["with"])
    explain = statistics.median(r["explain_s"] for r in runs["with"])
    explain_cosine = statistics.median(r["explain_s"] for r in runs["cosine"])
    cpu_cosine = statistics.median(r["cpu_s"] for r in runs["cosine"])
    cpu_off = statistics.median(r["cpu_s"] for r in runs["without"])
    cpu_on = statistics.median(r["cpu_s"] for r in runs["with"])
    paired = statistics.median(
        w["seconds"] - o["seconds"] for w, o in zip(runs["with"], runs["without"], strict=True)
    )
    result = {
        "benchmark": "publish scoring without and with explanations (bench/explain.py)",
        "machine": machine_info(),
        "data": str(args.data),
        "users": len(text.user_ids),
        "items": len(text.item_ids),
        "history_length": {
            "mean": float(lengths.mean()),
            "p50": float(np.percentile(lengths, 50)),
            "p99": float(np.percentile(lengths, 99)),
            "max": int(lengths.max()),
        },
        "k": args.k,
        "domains": len(vectors),
        "rows": rows,
        "text_dim": args.text_dim,
        "search_dim": args.dim,
        "threads": args.threads,
        "rounds": runs,
        "median_seconds_without": off,
        "median_seconds_with": on,
        "added_seconds": on - off,
        "added_seconds_per_million_rows": (on - off) / rows * 1e6,
        "paired_added_seconds_per_million_rows": paired / rows * 1e6,  # median of per-round differences
        "median_cpu_seconds_without": cpu_off,
        "median_cpu_seconds_with": cpu_on,
        "added_cpu_seconds_per_million_rows": (cpu_on - cpu_off) / rows * 1e6,
        "explain_seconds_per_million_rows": explain / rows * 1e6,
        "reference_items": REFERENCE_ITEMS,
        "median_cpu_seconds_cosine_only": cpu_cosine,
        "explain_seconds_per_million_rows_cosine_only": explain_cosine / rows * 1e6,
        "percentile_explain_seconds_per_million_rows": (explain - explain_cosine) / rows * 1e6,
        "percentile_cpu_seconds_per_million_rows": (cpu_on - cpu_cosine) / rows * 1e6,
        "ratio_with_to_without": on / off,
    }
    out = REPO / "bench" / "results" / "publish-explain.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    cosine = statistics.median(r["seconds"] for r in runs["cosine"])
    print(f"\n{'':<30}{'without':>10}{'cosine':>10}{'with':>10}")
    print(f"{'scoring seconds (median)':<30}{off:>10.2f}{cosine:>10.2f}{on:>10.2f}")
    print(f"{'scoring CPU seconds (median)':<30}{cpu_off:>10.2f}{cpu_cosine:>10.2f}{cpu_on:>10.2f}")
    print(f"{'explain step seconds (median)':<30}{0:>10.2f}{explain_cosine:>10.2f}{explain:>10.2f}")
    print(
        f"rows {rows:,}, {len(text.user_ids):,} users, history mean {lengths.mean():.1f} (max {lengths.max()})"
    )
    print(
        f"added {on - off:.2f} s = {(on - off) / rows * 1e6:.2f} s per million rows (median of per-round "
        f"differences {paired / rows * 1e6:.2f}; the explain step's own time {explain / rows * 1e6:.2f} s per "
        f"million rows), x{on / off:.2f}; CPU {(cpu_on - cpu_off) / rows * 1e6:.2f} s per million rows"
    )
    print(
        f"the percentile ({REFERENCE_ITEMS} reference items): explain step "
        f"{(explain - explain_cosine) / rows * 1e6:.2f} s, CPU {(cpu_on - cpu_cosine) / rows * 1e6:.2f} s per "
        "million rows"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
