"""Benchmark of the enrich stage, in one process, on the whole food-kitchen dataset.

1. Embedding throughput: the pipeline's item phase (texts, hashes, batches, vectors, Arrow) against a bare
   `LLM.embed` over the same texts, same engine (goal: >= 0.9x), and against a plain sentence-transformers
   loop (`SentenceTransformer.encode`, the same model folder, texts and torch threads, in a process of its
   own so the engine's thread binding does not touch it; goal: the pipeline >= 2x); best of `--repeats`
   each, alternating. The pipeline runs twice: with the float model and with its INT8 copy
   (`enrich.quantization: w8a8`), whose vectors are compared with the float ones (cosine, and how many of
   each text's 10 nearest texts they keep).
2. Generation: tokens/s at batch 64 on analyzer prompts built from real histories (greedy, 64 new tokens).
3. The whole item stage on food-kitchen (36,298 items) with a warm engine, and with the engine start
   (goal: under 90 s on 2 cores); then the same with the INT8 copy.
4. A rerun with nothing changed: stage wall time, engines started (goal: under 5 s, none).
5. Profiles: the cost per user of today's profile settings against the earlier ones (the paper's pipeline:
   15 titles a cluster, 80 / 160 new tokens, 50 / 100 words, a summarizer call for every user), on the
   same `--profile-users` users with real K-means clusters, alternating: seconds, prompt and new tokens
   and calls per profile (goal: half), with two users' texts of each for reading.

Usage: .venv/bin/python bench/enrich.py [--data ../shared/data/food-kitchen] [--threads 2]
Writes bench/results/enrich.json and prints a table. Other work on the machine slows every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from harness import add_data_argument, food_kitchen, run_child

from bridgerec.runtime.machine import machine_info
from bridgerec.tasks import StageRun
from bridgerec.tasks.enrich import EnrichSections

if TYPE_CHECKING:
    import numpy as np

REPO = Path(__file__).resolve().parents[1]
GOALS = {"pipeline_vs_bare": 0.9, "item_stage_seconds": 90.0, "rerun_seconds": 5.0}


ST_CHILD = """
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[2]))
from sentence_transformers import SentenceTransformer
texts = json.load(open(sys.argv[3]))
model = SentenceTransformer(sys.argv[1], device="cpu")
model.encode(texts[:64], batch_size=32)  # warm-up
t = time.perf_counter()
model.encode(texts, batch_size=32, normalize_embeddings=True)
print(len(texts) / (time.perf_counter() - t))
"""


def sentence_transformers_rate(folder: Path, texts: list[str], threads: int) -> float:
    """Texts/s of a plain sentence-transformers loop (`encode`, batch 32, length-sorted as it does) over
    `texts` with the model folder and `threads` torch threads, in a process of its own."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(texts, fh)
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    out = run_child([sys.executable, "-c", ST_CHILD, str(folder), str(threads), fh.name], env=env)
    os.unlink(fh.name)
    return float(out.strip().splitlines()[-1])


def top10_kept(a: np.ndarray, b: np.ndarray) -> float:
    """Mean share of each text's 10 nearest texts (cosine, among `a`'s rows) that `b`'s vectors keep."""
    import numpy as np

    def nearest(v: np.ndarray) -> np.ndarray:
        s = v @ v.T
        np.fill_diagonal(s, -np.inf)
        return np.argpartition(-s, 10, axis=1)[:, :10]

    na, nb = nearest(a), nearest(b)
    return float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(na, nb, strict=True)]))


def item_clusters(ws, items, k: int, seed: int):
    """[n_items] K-means cluster (spherical, faiss) of every ingest item row over the enrich stage's raw
    item vectors, as the profile step clusters them; -1 for an item without a vector."""
    import faiss
    import numpy as np

    from bridgerec.tasks.enrich.outputs import to_matrix

    emb = ws.read_table("enrich", "item_embeddings")
    x = np.ascontiguousarray(to_matrix(emb["vector"], emb.schema.field("vector").type.list_size), np.float32)
    km = faiss.Kmeans(x.shape[1], k, niter=20, seed=seed, spherical=True)
    km.train(x)
    index = faiss.IndexFlatIP(x.shape[1])
    assert km.centroids is not None  # set by train()
    index.add(km.centroids)
    nearest = index.search(x, 1)[1][:, 0]
    row_of = {item: i for i, item in enumerate(items["item_id"].to_pylist())}
    out = np.full(items.num_rows, -1, np.int64)
    for item, c in zip(emb["item_id"].to_pylist(), nearest, strict=True):
        out[row_of[item]] = c
    return out


def profile_cost(ws, items, pool, threads: int, n_users: int, repeats: int) -> dict:
    """Seconds, prompt tokens, new tokens and calls per profile of today's settings and the earlier ones,
    on the same users (real clusters), alternating; plus two users' texts of each for reading."""
    from bridgerec.tasks.enrich import EnrichSettings, ProfileSettings, embedding_model
    from bridgerec.tasks.enrich.engine import EngineSpec
    from bridgerec.tasks.enrich.models import profile_model
    from bridgerec.tasks.enrich.profiles import generate_batch, load_prompts, user_jobs

    enrich = EnrichSettings()
    earlier = ProfileSettings(
        titles_per_cluster=15, analyzer_max_tokens=80, summarizer_max_tokens=160, analyzer_max_words=50,
        profile_max_words=100, summarize_single_cluster=True,
    )  # fmt: skip
    variants = {"earlier (the paper's pipeline)": earlier, "today": ProfileSettings()}
    clusters = item_clusters(ws, items, enrich.kmeans_k, enrich.kmeans_seed)
    folder, embed_id = embedding_model(enrich)
    embedder = pool.embedder(EngineSpec.of("pooling", folder, enrich.engine, threads), embed_id)
    llm_dir, llm_id = profile_model(variants["today"])
    gen = pool.generator(EngineSpec.of("generate", llm_dir, variants["today"].engine, threads), llm_id)
    prompts = load_prompts(variants["today"].prompt_version)
    sequences = ws.read_table("ingest", "sequences")
    out: dict = {}
    for r in range(repeats):
        for name, settings in variants.items() if r % 2 == 0 else reversed(variants.items()):
            jobs = user_jobs(sequences, items, clusters, settings)[0][:n_users]
            t = time.perf_counter()
            res = generate_batch(jobs, settings, prompts, gen, embedder, llm_id, embed_id)
            seconds = time.perf_counter() - t
            profiled = {row["user_id"]: row for row in res.rows}
            prompt_tokens, calls = 0, 0
            for job in jobs:
                for _, titles in job.groups:
                    messages = prompts.analyzer.messages(
                        items="\n".join(titles), max_words=settings.analyzer_max_words
                    )
                    prompt_tokens += len(gen.tokenizer.encode(gen.render(messages)))
                    calls += 1
                row = profiled.get(job.user_id)
                if row and (len(row["cluster_summaries"]) > 1 or settings.summarize_single_cluster):
                    summaries = "\n".join(f"- {x}" for x in row["cluster_summaries"])
                    messages = prompts.summarizer.messages(
                        summaries=summaries, max_words=settings.profile_max_words
                    )
                    prompt_tokens += len(gen.tokenizer.encode(gen.render(messages)))
                    calls += 1
            entry = out.setdefault(name, {"seconds": [], "users": len(jobs)})
            entry["seconds"].append(round(seconds, 1))
            entry |= {
                "profiles": len(res.rows),
                "errors": len(res.invalid),
                "new_tokens": res.tokens,
                "prompt_tokens": prompt_tokens,
                "calls": calls,
                "examples": [
                    {k: row[k] for k in ("user_id", "cluster_summaries", "profile_text")}
                    for row in res.rows[:2]
                ],
            }
            print(
                f"profiles, {name}: {seconds:.1f} s for {len(jobs)} users, {res.tokens} new tokens",
                flush=True,
            )
    for entry in out.values():
        n = entry["users"]
        entry |= {
            "seconds_per_profile": round(min(entry["seconds"]) / n, 2),
            "new_tokens_per_profile": round(entry["new_tokens"] / n, 1),
            "prompt_tokens_per_profile": round(entry["prompt_tokens"] / n, 1),
            "calls_per_profile": round(entry["calls"] / n, 2),
        }
    today, before = out["today"], out["earlier (the paper's pipeline)"]
    out["today_vs_earlier"] = {
        k: round(today[k] / before[k], 3)
        for k in (
            "seconds_per_profile",
            "new_tokens_per_profile",
            "prompt_tokens_per_profile",
            "calls_per_profile",
        )
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(ap)
    ap.add_argument("--workspace", type=Path, default=Path("/tmp/bridgerec-bench-enrich"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--texts", type=int, default=3000, help="texts for pipeline vs bare")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--gen-batch", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--profile-users", type=int, default=48, help="users for the profile cost (5.)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: stage,generation,profiles")
    ap.add_argument(
        "--embedding-cache",
        type=Path,
        default=None,
        help="with --skip stage: build the enrich folder the profile part clusters from through this cache",
    )
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "enrich.json")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
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
    from bridgerec.tasks.ingest import IngestSettings, run_ingest

    ws, data = Workspace(args.workspace), food_kitchen(args.data)
    run_ingest(
        StageRun(
            IngestSettings(items=data / "items.csv.gz", interactions=data / "interactions.csv.gz"),
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
        int8_settings = EnrichSettings(quantization="w8a8", quantized_dir=args.workspace / "models")
        int8_folder, int8_id = embedding_model(int8_settings)
        int8 = pool.embedder(EngineSpec.of("pooling", int8_folder, enrich.engine, args.threads), int8_id)
        int8.embed(texts[:256])  # warm-up
        bare: list[float] = []
        pipe: list[float] = []
        pipe8: list[float] = []
        st: list[float] = []
        vectors: dict[str, np.ndarray] = {}
        for _ in range(args.repeats):
            t = time.perf_counter()
            outs = embedder.llm.embed(texts, use_tqdm=False)
            np.asarray([o.outputs.embedding for o in outs], dtype=np.float32)
            bare.append(len(texts) / (time.perf_counter() - t))
            for rates, model, e in ((pipe, embed_id, embedder), (pipe8, int8_id, int8)):
                t = time.perf_counter()
                result = item_phase.embed_items(
                    sub, enrich, model, item_phase.VectorCache(model), lambda e=e: e
                )
                rates.append(len(texts) / (time.perf_counter() - t))
                vectors[model] = result.vectors[result.ok]
            st.append(sentence_transformers_rate(folder, texts, args.threads))
        a, b = vectors[embed_id], vectors[int8_id]
        cosine = (a * b).sum(axis=1)
        out |= {
            "bare_texts_per_s": round(max(bare), 1),
            "pipeline_texts_per_s": round(max(pipe), 1),
            "pipeline_vs_bare": round(max(pipe) / max(bare), 3),
            "sentence_transformers_texts_per_s": round(max(st), 1),
            "pipeline_vs_sentence_transformers": round(max(pipe) / max(st), 3),
            "pipeline_w8a8_texts_per_s": round(max(pipe8), 1),
            "pipeline_w8a8_vs_float": round(max(pipe8) / max(pipe), 3),
            "pipeline_w8a8_vs_sentence_transformers": round(max(pipe8) / max(st), 3),
            "w8a8_cosine_mean": round(float(cosine.mean()), 4),
            "w8a8_cosine_min": round(float(cosine.min()), 4),
            "w8a8_top10_kept": round(top10_kept(a, b), 3),
            "embedding_rounds": {
                "bare": bare,
                "pipeline": pipe,
                "pipeline_w8a8": pipe8,
                "sentence_transformers": st,
            },
        }
        print(
            f"embedding: bare {max(bare):.0f}/s, pipeline {max(pipe):.0f}/s (w8a8 {max(pipe8):.0f}/s), "
            f"sentence-transformers {max(st):.0f}/s",
            flush=True,
        )

        if "stage" not in skip:
            # 3. the whole item stage, warm engines (fresh enrich folder, no cache): the INT8 copy, then the
            # float model, whose folder part 4 reruns
            import shutil

            shutil.rmtree(EnrichOutputs(ws).folder, ignore_errors=True)
            t = time.perf_counter()
            s8 = run_enrich(StageRun(EnrichSections(int8_settings, no_profiles), ws, threads=args.threads))
            out |= {
                "item_stage_w8a8_seconds": round(time.perf_counter() - t, 1),
                "item_stage_w8a8_texts_per_s": s8.embedding_texts_per_s,
            }
            print(f"item stage, w8a8: {out['item_stage_w8a8_seconds']} s", flush=True)
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

        elif EnrichOutputs(ws).manifest() is None:  # the profile part clusters the item vectors
            cached = EnrichSettings(embedding_cache=args.embedding_cache)
            run_enrich(StageRun(EnrichSections(cached, no_profiles), ws, threads=args.threads))
        if "generation" not in skip:
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
        if "profiles" not in skip:
            out["profiles"] = profile_cost(ws, items, pool, args.threads, args.profile_users, args.repeats)
    out["load_avg_end"] = os.getloadavg()[0]

    rows = [
        ("embedding engine start (s)", out["embed_engine_start_s"], ""),
        ("bare LLM.embed (texts/s)", out["bare_texts_per_s"], ""),
        ("pipeline item phase (texts/s)", out["pipeline_texts_per_s"], ""),
        ("pipeline / bare", out["pipeline_vs_bare"], f">= {GOALS['pipeline_vs_bare']}"),
        ("sentence-transformers loop (texts/s)", out["sentence_transformers_texts_per_s"], ""),
        ("pipeline / sentence-transformers", out["pipeline_vs_sentence_transformers"], ">= 2"),
        ("pipeline, w8a8 copy (texts/s)", out["pipeline_w8a8_texts_per_s"], ""),
        ("pipeline w8a8 / float", out["pipeline_w8a8_vs_float"], ""),
        ("pipeline w8a8 / sentence-transformers", out["pipeline_w8a8_vs_sentence_transformers"], ">= 2"),
        (
            "w8a8 vs float vectors: cosine mean / min",
            f"{out['w8a8_cosine_mean']} / {out['w8a8_cosine_min']}",
            "",
        ),
        ("w8a8 vs float: 10 nearest texts kept", out["w8a8_top10_kept"], ""),
    ]
    if "stage" not in skip:
        rows += [
            (f"item stage, {out['items']:,} items, warm engine (s)", out["item_stage_seconds"], ""),
            ("the same, w8a8 copy (s)", out["item_stage_w8a8_seconds"], ""),
            (
                "item stage incl. engine start (s)",
                out["item_stage_with_engine_start_s"],
                f"< {GOALS['item_stage_seconds']}",
            ),
            ("unchanged rerun (s)", out["rerun_seconds"], f"< {GOALS['rerun_seconds']}"),
            ("engines started on rerun", out["rerun_engines_started"], "0"),
        ]
    if "generation" not in skip:
        rows += [
            ("generation engine start (s)", out["gen_engine_start_s"], ""),
            (f"generation, batch {out['gen_batch']} (new tokens/s)", out["gen_tokens_per_s"], ""),
        ]
    for name, p in out.get("profiles", {}).items():
        if name != "today_vs_earlier":
            rows.append(
                (
                    f"profiles {name}: s / new tokens / prompt tokens / calls per profile",
                    f"{p['seconds_per_profile']} / {p['new_tokens_per_profile']} / {p['prompt_tokens_per_profile']} / {p['calls_per_profile']}",
                    "",
                )
            )
    if "profiles" in out:
        ratio = out["profiles"]["today_vs_earlier"]
        rows.append(
            (
                "profiles today / earlier: seconds, new tokens",
                f"{ratio['seconds_per_profile']}, {ratio['new_tokens_per_profile']}",
                "<= 0.5",
            )
        )
    width = max(len(r[0]) for r in rows)
    print(f"\n{'figure':<{width}}  {'value':>10}  goal")
    for name, value, goal in rows:
        print(f"{name:<{width}}  {value!s:>10}  {goal}")
    print(
        f"load average {out['load_avg_start']:.1f} -> {out['load_avg_end']:.1f} (2 cores; other work shares them)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(out | {"args": {k: str(v) for k, v in vars(args).items()}}, indent=2) + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
