"""Benchmark: the whole item stage of enrich under `runtime.runner: local` (one engine with every thread)
against `processes` (`runtime.workers` engines, each with its share of the threads on cores of its own),
through the command line, on the same ingest outputs and model (issue #28: item embedding >= 2x a plain
sentence-transformers loop; bench/embed_engine.py measures the engines alone).

Each run copies the workspace's ingest folder into a fresh workspace (nothing cached: every item text is
embedded), runs `bridgerec enrich --json --profiles none` with the variant's settings, and records the
stage's wall seconds (engine starts and worker processes included) and its items/s. Variants alternate,
`--passes` times; the best of each is kept.

Usage: .venv/bin/python bench/enrich_workers.py --workspace WS [--threads 2] [--workers 2] [--passes 1]
       [--quantization none|w8a8]
WS is a workspace with ingest's outputs (`bridgerec ingest`). Writes bench/results/enrich-workers.json
(with the machine block) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bridgerec.runtime.machine import machine_info

REPO = Path(__file__).resolve().parents[1]
BRIDGEREC = Path(sys.executable).with_name("bridgerec")


def run_once(ingest: Path, sets: list[str], scratch: Path) -> dict:
    """One enrich run on a fresh copy of `ingest`: wall seconds and the summary's counts."""
    ws = Path(tempfile.mkdtemp(dir=scratch))
    shutil.copytree(ingest, ws / "ingest")
    argv = [str(BRIDGEREC), "enrich", "--workspace", str(ws), "--profiles", "none", "--json"]
    for s in sets:
        argv += ["--set", s]
    t = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"error: bridgerec enrich failed (exit {proc.returncode})")
    summary = json.loads(proc.stdout)
    shutil.rmtree(ws)
    return {
        "seconds": round(seconds, 1),
        "items": summary["items"],
        "items_embedded": summary["items_embedded"],
        "engines": [
            {k: e.get(k) for k in ("seconds", "cores", "worker")} for e in summary["engines_started"]
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", type=Path, required=True, help="a workspace with ingest's outputs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--passes", type=int, default=1)
    ap.add_argument("--quantization", default="none", help="enrich.quantization: none | w8a8")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "enrich-workers.json")
    args = ap.parse_args()

    common = [f"runtime.threads={args.threads}", f"enrich.quantization={args.quantization}"]
    variants = {
        "local (1 engine)": [*common, "runtime.runner=local"],
        f"processes ({args.workers} engines)": [
            *common,
            "runtime.runner=processes",
            f"runtime.workers={args.workers}",
        ],
    }
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="enrich-workers-") as scratch:
        for p in range(args.passes):
            names = list(variants) if p % 2 == 0 else list(variants)[::-1]
            for name in names:
                out = run_once(args.workspace / "ingest", variants[name], Path(scratch))
                results.setdefault(name, {"runs": []})["runs"].append(out)
                print(
                    f"pass {p + 1}: {name}: {out['seconds']:.1f} s for {out['items_embedded']:,} items",
                    flush=True,
                )
    print(f"\nthe item stage, {args.quantization}, {args.threads} threads, best of {args.passes}")
    print(f"{'variant':<24} {'seconds':>8} {'items/s':>8}")
    for name, entry in results.items():
        best = min(entry["runs"], key=lambda r: r["seconds"])
        entry |= {
            "seconds": best["seconds"],
            "items_per_s": round(best["items_embedded"] / best["seconds"], 1),
        }
        print(f"{name:<24} {entry['seconds']:>8.1f} {entry['items_per_s']:>8.1f}")
    record = {
        "machine": machine_info(),
        "load_average_end": os.getloadavg(),
        "threads": args.threads,
        "workers": args.workers,
        "quantization": args.quantization,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
