"""Benchmark of the enrich stage, in one process, on the whole food-kitchen dataset.

1. Embedding throughput: the pipeline's item phase (texts, hashes, batches, vectors, Arrow) against a bare
   `LLM.embed` over the same texts, same engine; best of `--repeats` each, alternating (goal: >= 0.9x).
2. Generation: tokens/s at batch 64 on analyzer prompts built from real histories (greedy, 64 new tokens).
3. The whole item stage on food-kitchen (36,298 items) with a warm engine, and with the engine start
   (goal: under 90 s on 2 cores).
4. A rerun with nothing changed: stage wall time, engines started (goal: under 5 s, none).

Usage: .venv/bin/python bench/enrich.py [--data ../shared/data/food-kitchen] [--threads 2]
Writes bench/results/enrich.json and prints a table. Other work on the machine slows every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from bridgerec.runtime.machine import machine_info
from bridgerec.tasks import StageRun
from bridgerec.tasks.enrich import EnrichSections

REPO = Path(__file__).resolve().parents[1]
GOALS = {"pipeline_vs_bare": 0.9, "item_stage_seconds": 90.0, "rerun_seconds": 5.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "food-kitchen")
    ap.add_argument("--workspace", type=Path, default=Path("/tmp/bridgerec-bench-enrich"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--texts", type=int, default=3000, help="texts for pipeline vs bare")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--gen-batch", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=64)
    args = ap.parse_args()
    import numpy as np

    from bridgerec.storage.workspace import Workspace
    from bridgerec.tasks.enrich import (
        EnrichOutputs,
        EnrichSettings,
        ProfileSettings,
        embedding_model,
        run_enrich,
    )

    # the parts measured on their own: the item phase, the engines, the profile prompts
    from bridgerec.tasks.enrich import items as item_phase
    from bridgerec.tasks.enrich.engine import EnginePool, EngineSpec, Sampling, shared_engines
    from bridgerec.tasks.enrich.models import profile_model
    from bridgerec.tasks.enrich.profiles import estimate_cost, load_prompts, user_jobs
    from bridgerec.tasks.enrich.texts import item_texts
    from bridgerec.tasks.ingest.settings import IngestSettings
    from bridgerec.tasks.ingest.stage import run_ingest

    ws = Workspace(args.workspace)
    run_ingest(
        StageRun(
            IngestSettings(items=args.data / "items.csv.gz", interactions=args.data / "interactions.csv.gz"),
            ws,
        )
    )
    enrich, no_profiles = EnrichSettings(), ProfileSettings(mode="none")
    items = ws.read_table("ingest", "items")
    out: dict = {"machine": machine_info(), "load_avg_start": os.getloadavg()[0]}

    with shared_engines(EnginePool()) as pool:
        folder, embed_id = embedding_model(enrich)
        t = time.perf_counter()
        embedder = pool.embedder(EngineSpec.of("pooling", folder, enrich.engine, args.threads), embed_id)
        out["embed_engine_start_s"] = round(time.perf_counter() - t, 1)
        out["dtype"] = EngineSpec.of("pooling", folder, enrich.engine, args.threads).dtype

        # 1. pipeline vs bare, same texts, alternating so both see the same machine load
        sub = items.slice(0, args.texts)
        texts = item_texts(sub, enrich)
        embedder.embed(texts[:256])  # warm-up
        bare, pipe = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            outs = embedder.llm.embed(texts, use_tqdm=False)
            np.asarray([o.outputs.embedding for o in outs], dtype=np.float32)
            bare.append(len(texts) / (time.perf_counter() - t))
            t = time.perf_counter()
            item_phase.embed_items(sub, enrich, embed_id, item_phase.VectorCache(embed_id), lambda: embedder)
            pipe.append(len(texts) / (time.perf_counter() - t))
        out |= {
            "bare_texts_per_s": round(max(bare), 1),
            "pipeline_texts_per_s": round(max(pipe), 1),
            "pipeline_vs_bare": round(max(pipe) / max(bare), 3),
        }
        print(f"embedding: bare {max(bare):.0f}/s, pipeline {max(pipe):.0f}/s", flush=True)

        # 3. the whole item stage, warm engine (fresh enrich folder, no cache)
        import shutil

        shutil.rmtree(EnrichOutputs(ws).folder, ignore_errors=True)
        t = time.perf_counter()
        s = run_enrich(StageRun(EnrichSections(enrich, no_profiles), ws, threads=args.threads))
        out |= {
            "items": s.items,
            "item_stage_seconds": round(time.perf_counter() - t, 1),
            "item_stage_texts_per_s": s.embedding_texts_per_s,
            "item_errors": s.errors,
        }
        out["item_stage_with_engine_start_s"] = round(
            out["item_stage_seconds"] + out["embed_engine_start_s"], 1
        )
        print(f"item stage: {out['item_stage_seconds']} s for {s.items} items", flush=True)

        # 4. rerun, nothing changed
        t = time.perf_counter()
        again = run_enrich(StageRun(EnrichSections(enrich, no_profiles), ws, threads=args.threads))
        out |= {
            "rerun_seconds": round(time.perf_counter() - t, 2),
            "rerun_skipped": again.skipped,
            "rerun_engines_started": len(again.engines_started),
            "rerun_items_embedded": again.items_embedded,
        }

        # 2. generation at batch 64 on real analyzer prompts
        profiles = ProfileSettings()
        llm_dir, llm_id = profile_model(profiles)
        t = time.perf_counter()
        gen = pool.generator(EngineSpec.of("generate", llm_dir, profiles.engine, args.threads), llm_id)
        out["gen_engine_start_s"] = round(time.perf_counter() - t, 1)
        clusters = np.zeros(items.num_rows, np.int64)  # one group per user: the last 15 titles
        jobs, n_users = user_jobs(ws.read_table("ingest", "sequences"), items, clusters, profiles)
        prompts = load_prompts(profiles.prompt_version)
        batch = [
            gen.render(prompts.analyzer.messages(items="\n".join(j.groups[0][1]), max_words=50))
            for j in jobs[: args.gen_batch]
        ]
        sampling = [Sampling(0.0, 1.0, args.gen_tokens, 0)] * len(batch)
        gen.generate(batch[:4], sampling[:4])  # warm-up
        t = time.perf_counter()
        res = gen.generate(batch, sampling)
        seconds = time.perf_counter() - t
        tokens = sum(r.n_tokens for r in res)
        prompt_tokens = sum(len(gen.tokenizer.encode(p)) for p in batch)
        out |= {
            "gen_batch": len(batch),
            "gen_new_tokens": tokens,
            "gen_prompt_tokens": prompt_tokens,
            "gen_seconds": round(seconds, 1),
            "gen_tokens_per_s": round(tokens / seconds, 1),
        }
        # what profiling every food-kitchen user would cost at that speed (real clusters need the
        # embeddings above; 2.5 groups a user is what the tests' slice showed)
        est = estimate_cost(jobs, profiles, tokens / seconds)
        out["all_users_profile_estimate_minutes_1_group"] = est["minutes"]
        out["users"] = n_users
        print(f"generation: {tokens / seconds:.0f} new tokens/s at batch {len(batch)}", flush=True)
    out["load_avg_end"] = os.getloadavg()[0]

    rows = [
        ("embedding engine start (s)", out["embed_engine_start_s"], ""),
        ("bare LLM.embed (texts/s)", out["bare_texts_per_s"], ""),
        ("pipeline item phase (texts/s)", out["pipeline_texts_per_s"], ""),
        ("pipeline / bare", out["pipeline_vs_bare"], f">= {GOALS['pipeline_vs_bare']}"),
        (f"item stage, {out['items']:,} items, warm engine (s)", out["item_stage_seconds"], ""),
        (
            "item stage incl. engine start (s)",
            out["item_stage_with_engine_start_s"],
            f"< {GOALS['item_stage_seconds']}",
        ),
        ("unchanged rerun (s)", out["rerun_seconds"], f"< {GOALS['rerun_seconds']}"),
        ("engines started on rerun", out["rerun_engines_started"], "0"),
        ("generation engine start (s)", out["gen_engine_start_s"], ""),
        (f"generation, batch {out['gen_batch']} (new tokens/s)", out["gen_tokens_per_s"], ""),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'figure':<{width}}  {'value':>10}  goal")
    for name, value, goal in rows:
        print(f"{name:<{width}}  {value!s:>10}  {goal}")
    print(
        f"load average {out['load_avg_start']:.1f} -> {out['load_avg_end']:.1f} (2 cores; other work shares them)"
    )
    results = REPO / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "enrich.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
