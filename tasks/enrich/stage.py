"""The enrich stage end to end: item texts -> embeddings -> PCA tables, then hierarchical user profiles,
into WORKSPACE/enrich/. A rerun with unchanged inputs, config and models is skipped without starting an
engine; otherwise only new texts and changed histories go to the models."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from bridgerec.storage import schemas
from bridgerec.storage.checkpoints import Checkpoints
from bridgerec.storage.workspace import Workspace, hash_file, hash_json
from bridgerec.tasks.enrich import items as item_phase
from bridgerec.tasks.enrich import models
from bridgerec.tasks.enrich import profiles as profile_phase
from bridgerec.tasks.enrich.batching import Failed
from bridgerec.tasks.enrich.engine import (
    EnginePool,
    EngineSpec,
    engine_scope,
    engines_for_run,
    process_engines,
)
from bridgerec.tasks.enrich.plan import (
    EnrichPlan,
    EnrichSummary,
    ItemShardWork,
    ProfilePlan,
    ProfileShardWork,
    Shard,
    shards,
)
from bridgerec.tasks.enrich.settings import EnrichSettings, ProfileSettings

from bridgerec.runtime.logs import get_logger

STAGE = "enrich"
INGEST_FILES = ("domains", "items", "users", "sequences")
CLUSTERS_FILE = "clusters.npz"  # fixed by plan_profiles for every profile shard of the run


def config_hash(enrich: EnrichSettings, profiles: ProfileSettings) -> str:
    # Model folders enter through their content fingerprints (input hashes), not their paths; shard
    # sizes only change how the work is split.
    return hash_json(
        {
            "enrich": enrich.model_dump(
                mode="json", exclude={"model", "items_per_shard", "task_runner", "workers"}
            ),
            "profiles": profiles.model_dump(
                mode="json", exclude={"model", "gguf_source", "auto_prepare", "users_per_shard"}
            ),
        }
    )


def _previous(workspace: Workspace, name: str) -> pa.Table | None:
    """A table of the current enrich output, or None (first run, or unreadable: then nothing is reused)."""
    if workspace.read_manifest(STAGE) is None:
        return None
    path = workspace.stage_dir(STAGE) / f"{name}.parquet"
    if not path.exists():
        return None
    try:
        return workspace.read_table(STAGE, name)
    except (pa.ArrowException, OSError) as exc:
        get_logger().warning("enrich: previous %s unreadable (%s): recomputing", name, exc)
        return None


def plan_enrich(
    enrich: EnrichSettings,
    profiles: ProfileSettings,
    workspace: Workspace,
    threads: int = 1,
    force: bool = False,
) -> EnrichPlan:
    """Input hashes and the item shards; `skipped` holds the summary when inputs, config and models are
    unchanged (then no engine starts)."""
    log = get_logger()
    started = time.perf_counter()
    if workspace.read_manifest("ingest") is None:
        raise FileNotFoundError(
            f"{workspace.stage_dir('ingest')} has no finished ingest: run `bridgerec ingest`"
        )
    embed_dir, embed_id = models.embedding_model(enrich)
    llm_dir, llm_id = models.profile_model(profiles) if profiles.mode == "llm" else (None, None)
    prompts = profile_phase.load_prompts(profiles.prompt_version) if profiles.mode == "llm" else None
    hashes = {
        f"ingest/{name}": hash_file(workspace.stage_dir("ingest") / f"{name}.parquet")
        for name in INGEST_FILES
    }
    hashes["model/embed"] = embed_id
    if llm_id is not None and prompts is not None:
        hashes["model/llm"] = llm_id
        hashes["prompts"] = prompts.digest
    chash = config_hash(enrich, profiles)
    n_items = workspace.read_table("ingest", "items").num_rows
    plan = EnrichPlan(
        workspace=str(workspace.root),
        threads=threads,
        config_hash=chash,
        input_hashes=hashes,
        embed_dir=str(embed_dir),
        embed_id=embed_id,
        llm_dir=str(llm_dir) if llm_dir is not None else None,
        llm_id=llm_id,
        items=n_items,
        item_shards=shards(n_items, enrich.items_per_shard),
    )
    existing = workspace.read_manifest(STAGE)
    if (
        not force
        and existing is not None
        and existing.schema_version == schemas.ENRICH_SCHEMA_VERSION
        and existing.config_hash == chash
        and existing.input_hashes == hashes
    ):
        log.info("enrich: inputs, config and models unchanged, skipping (%s)", workspace.stage_dir(STAGE))
        stats = existing.stats
        plan.item_shards = []
        plan.skipped = EnrichSummary(
            **{
                **stats,
                "items_embedded": 0,
                "items_cached": stats.get("items", 0) - stats.get("item_errors", 0),
                "texts_embedded": 0,
                "profiles_generated": 0,
                "profiles_cached": stats.get("profiles", 0),
                "profile_estimate": None,
                "tokens_generated": 0,
                "generation_tokens_per_s": None,
                "embedding_texts_per_s": None,
                "engines_started": [],
            },
            skipped=True,
            seconds=time.perf_counter() - started,
            workspace=str(workspace.root),
        )
    return plan


def _item_cache(workspace: Workspace, embed_id: str, checkpoints: Checkpoints) -> item_phase.VectorCache:
    """Vectors of the previous output and of every finished batch of this (or a crashed) run."""
    cache = item_phase.VectorCache(embed_id)
    cache.add_table(_previous(workspace, "item_embeddings"))
    cache.add_table(checkpoints.read(item_phase.CHECKPOINT_KIND))
    return cache


def _failures(rows: list[dict]) -> dict[str, Failed]:
    return {
        r["text_hash"]: Failed(unit=(r["text_hash"], ""), reason=r["reason"], attempts=r["attempts"])
        for r in rows
    }


def embed_item_shard(plan: EnrichPlan, enrich: EnrichSettings, shard: Shard) -> ItemShardWork:
    """Embed the new texts of one shard of items; each finished batch is checkpointed."""
    workspace = Workspace(plan.workspace)
    checkpoints = Checkpoints(workspace, STAGE)
    items = workspace.read_table("ingest", "items").slice(shard.start, shard.stop - shard.start)
    cache = _item_cache(workspace, plan.embed_id, checkpoints)
    pool = process_engines()
    n_started = len(pool.starts)
    spec = EngineSpec.of("pooling", Path(plan.embed_dir), enrich.engine, plan.threads)
    result = item_phase.embed_items(
        items,
        enrich,
        plan.embed_id,
        cache,
        lambda: pool.embedder(spec, plan.embed_id, truncate=enrich.truncate),
        checkpoints,
    )
    started = pool.starts[n_started:]
    return ItemShardWork(
        shard=shard,
        items_embedded=result.items_embedded,
        texts_embedded=result.texts_embedded,
        seconds=result.seconds_embedding,
        failures=[
            {"text_hash": h, "reason": f.reason, "attempts": f.attempts} for h, f in result.failures.items()
        ],
        engines_started=started,
    )


def _all_items(
    plan: EnrichPlan, enrich: EnrichSettings, item_work: list[ItemShardWork]
) -> tuple[pa.Table, item_phase.ItemResult]:
    """Every item's vector from the cache the shards filled (a text missing there, say after its
    checkpoint was lost, is embedded here; texts that failed in a shard are reported, not retried)."""
    workspace = Workspace(plan.workspace)
    checkpoints = Checkpoints(workspace, STAGE)
    items = workspace.read_table("ingest", "items")
    failed = _failures([f for w in item_work for f in w.failures])
    spec = EngineSpec.of("pooling", Path(plan.embed_dir), enrich.engine, plan.threads)
    with engines_for_run() as pool:
        result = item_phase.embed_items(
            items,
            enrich,
            plan.embed_id,
            _item_cache(workspace, plan.embed_id, checkpoints),
            lambda: pool.embedder(spec, plan.embed_id, truncate=enrich.truncate),
            checkpoints,
            failed,
        )
    if items.num_rows and not result.ok.any():
        raise RuntimeError(f"no item could be embedded; first error: {result.errors[0]['reason']}")
    return items, result


def _model_factories(
    pool: EnginePool, plan: EnrichPlan, enrich: EnrichSettings, profiles: ProfileSettings
) -> dict[str, Callable[[], Any]]:
    """generator= and embedder= for the profile phase: engines start only when first asked for."""
    generate = EngineSpec.of("generate", Path(str(plan.llm_dir)), profiles.engine, plan.threads)
    embed = EngineSpec.of("pooling", Path(plan.embed_dir), enrich.engine, plan.threads)
    return {
        "generator": lambda: pool.generator(generate, str(plan.llm_id)),
        "embedder": lambda: pool.embedder(embed, plan.embed_id, truncate=enrich.truncate),
    }


def _profile_inputs(
    plan: EnrichPlan,
    enrich: EnrichSettings,
    profiles: ProfileSettings,
    items: pa.Table,
    item_result: item_phase.ItemResult | None,
    dim: int,
    clusters: profile_phase.Clusters | None,
) -> profile_phase.ProfileInputs:
    workspace = Workspace(plan.workspace)
    existing = workspace.read_manifest(STAGE)
    assert plan.llm_id is not None
    return profile_phase.profile_inputs(
        workspace=workspace,
        items=items,
        item_result=item_result,
        enrich=enrich,
        settings=profiles,
        prompts=profile_phase.load_prompts(profiles.prompt_version),
        llm_id=plan.llm_id,
        embed_id=plan.embed_id,
        dim=dim,
        previous=[_previous(workspace, "profiles"), _previous(workspace, "profile_cache")],
        previous_stats=existing.stats if existing is not None else {},
        checkpoints=Checkpoints(workspace, STAGE),
        clusters=clusters,
    )


def plan_profiles(
    plan: EnrichPlan, enrich: EnrichSettings, profiles: ProfileSettings, item_work: list[ItemShardWork]
) -> ProfilePlan:
    """After the item shards: fit (or reuse) the clusters once for all profile shards, print the cost
    estimate of the users to generate, and split the selected users into shards."""
    workspace = Workspace(plan.workspace)
    items, item_result = _all_items(plan, enrich, item_work)
    inputs = _profile_inputs(plan, enrich, profiles, items, item_result, item_result.dim, None)
    profile_phase.save_clusters(inputs.clusters, Checkpoints(workspace, STAGE).path(CLUSTERS_FILE))
    cached, todo = inputs.split(inputs.jobs)
    existing = workspace.read_manifest(STAGE)
    speed = (
        existing.stats.get("generation_tokens_per_s") if existing else None
    ) or profiles.estimate_tokens_per_s
    estimate = profile_phase.estimate_cost(todo, profiles, speed)
    profile_phase.log_estimate(inputs, len(cached), todo, estimate)
    return ProfilePlan(
        shards=shards(len(inputs.jobs), profiles.users_per_shard),
        embedding_dim=item_result.dim,
        users_selected=len(inputs.jobs),
        to_generate=len(todo),
        estimate=estimate,
    )


def profile_shard(
    plan: EnrichPlan,
    enrich: EnrichSettings,
    profiles: ProfileSettings,
    profile_plan: ProfilePlan,
    shard: Shard,
) -> ProfileShardWork:
    """Generate the profiles of one shard of the selected users whose history changed; each finished
    batch is checkpointed."""
    workspace = Workspace(plan.workspace)
    checkpoints = Checkpoints(workspace, STAGE)
    clusters = profile_phase.load_clusters(checkpoints.path(CLUSTERS_FILE))
    items = workspace.read_table("ingest", "items")
    inputs = _profile_inputs(plan, enrich, profiles, items, None, profile_plan.embedding_dim, clusters)
    _, todo = inputs.split(inputs.jobs[shard.start : shard.stop])
    assert plan.llm_dir is not None and plan.llm_id is not None
    pool = process_engines()
    n_started = len(pool.starts)
    gen = profile_phase.generate_profiles(
        todo,
        inputs=inputs,
        settings=profiles,
        prompts=profile_phase.load_prompts(profiles.prompt_version),
        llm_id=plan.llm_id,
        embed_id=plan.embed_id,
        **_model_factories(pool, plan, enrich, profiles),
        checkpoints=checkpoints,
        label=f"enrich: user profiles, shard {shard.index}",
    )
    started = pool.starts[n_started:]
    return ProfileShardWork(
        shard=shard,
        generated=len(gen.rows),
        tokens=gen.tokens,
        seconds=gen.seconds,
        errors=gen.errors,
        engines_started=started,
    )


def finish_enrich(
    plan: EnrichPlan,
    enrich: EnrichSettings,
    profiles: ProfileSettings,
    item_work: list[ItemShardWork],
    profile_plan: ProfilePlan | None,
    profile_work: list[ProfileShardWork],
    started: float | None = None,
) -> EnrichSummary:
    """Assemble the shards' work into WORKSPACE/enrich (PCA tables, profiles, errors, manifest), swapped
    in atomically; the checkpoints are removed only then."""
    log = get_logger()
    workspace = Workspace(plan.workspace)
    checkpoints = Checkpoints(workspace, STAGE)
    existing = workspace.read_manifest(STAGE)
    summary = EnrichSummary(
        items=plan.items, embed_model_id=plan.embed_id, llm_model_id=plan.llm_id, profile_mode=profiles.mode
    )
    with engines_for_run() as pool:
        n_started = len(pool.starts)
        items, result = _all_items(plan, enrich, item_work)
        # Counted where the work was done: the shards (this pass only reads their checkpoints).
        result.items_embedded += sum(w.items_embedded for w in item_work)
        result.items_cached = int(result.ok.sum()) - result.items_embedded
        result.texts_embedded += sum(w.texts_embedded for w in item_work)
        result.seconds_embedding += sum(w.seconds for w in item_work)
        tables = item_phase.reduce_items(items, result, enrich)
        errors = list(result.errors)
        profile_result = None
        if profiles.mode == "llm":
            assert plan.llm_dir is not None and plan.llm_id is not None
            clusters_file = checkpoints.path(CLUSTERS_FILE)
            failed_users = {e["key"]: e for w in profile_work for e in w.errors}
            profile_result = profile_phase.build_profiles(
                workspace=workspace,
                items=items,
                item_result=result,
                enrich=enrich,
                settings=profiles,
                prompts=profile_phase.load_prompts(profiles.prompt_version),
                llm_id=plan.llm_id,
                embed_id=plan.embed_id,
                **_model_factories(pool, plan, enrich, profiles),
                previous=[_previous(workspace, "profiles"), _previous(workspace, "profile_cache")],
                previous_stats=existing.stats if existing is not None else {},
                checkpoints=checkpoints,
                clusters=profile_phase.load_clusters(clusters_file) if clusters_file.exists() else None,
                failed_before=failed_users,
                estimate=profile_plan.estimate if profile_plan is not None else None,
            )
            shard_generated = sum(w.generated for w in profile_work)
            shard_tokens = sum(w.tokens for w in profile_work)
            shard_seconds = sum(w.seconds for w in profile_work)
            profile_result.generated += shard_generated
            profile_result.cached -= shard_generated
            profile_result.tokens_generated += shard_tokens
            if shard_tokens and shard_seconds:
                profile_result.tokens_per_s = round(shard_tokens / shard_seconds, 1)
                profile_result.stats["generation_tokens_per_s"] = profile_result.tokens_per_s
            errors += profile_result.errors
        starts = [s for w in [*item_work, *profile_work] for s in w.engines_started] + pool.starts[n_started:]
        summary.engines_started = [dict(t) for t in dict.fromkeys(tuple(sorted(s.items())) for s in starts)]
        summary.shards = [
            {
                "kind": "items",
                **w.shard.model_dump(),
                "new": w.items_embedded,
                "seconds": round(w.seconds, 2),
                "worker": w.worker,
            }
            for w in item_work
        ] + [
            {
                "kind": "users",
                **w.shard.model_dump(),
                "new": w.generated,
                "seconds": round(w.seconds, 2),
                "worker": w.worker,
            }
            for w in profile_work
        ]
        carried = None
        if profile_result is None:  # profiles off: keep the generated ones for when they are back on
            names = ("profile_cache", "profiles")
            kept = [t for t in (_previous(workspace, n) for n in names) if t is not None and t.num_rows]
            if kept and existing is not None:
                carried = (
                    pa.concat_tables(kept),
                    {k: existing.stats.get(k) for k in ("profile_gen_key", "generation_tokens_per_s")},
                )
        _write(
            workspace,
            summary,
            result,
            tables,
            profile_result,
            carried,
            errors,
            enrich,
            profiles,
            plan.config_hash,
            plan.input_hashes,
        )
    checkpoints.clear()
    summary.workspace = str(workspace.root)
    if started is not None:
        summary.seconds = time.perf_counter() - started
    if errors:
        log.warning(
            "enrich: %d items/users failed %s -> %s",
            len(errors),
            summary.errors_by_step,
            workspace.stage_dir(STAGE) / "errors.parquet",
        )
    return summary


def run_enrich(
    enrich: EnrichSettings,
    profiles: ProfileSettings,
    workspace: Workspace,
    threads: int = 1,
    force: bool = False,
) -> EnrichSummary:
    """Build WORKSPACE/enrich from WORKSPACE/ingest in this process, shard after shard (the flow maps the
    same shards onto Prefect task runs); skip when inputs, config and models are unchanged."""
    started = time.perf_counter()
    plan = plan_enrich(enrich, profiles, workspace, threads, force)
    if plan.skipped is not None:
        return plan.skipped
    with engine_scope():  # one engine per model for all shards
        item_work = [embed_item_shard(plan, enrich, s) for s in plan.item_shards]
        profile_plan, profile_work = None, []
        if profiles.mode == "llm":
            profile_plan = plan_profiles(plan, enrich, profiles, item_work)
            profile_work = [
                profile_shard(plan, enrich, profiles, profile_plan, s) for s in profile_plan.shards
            ]
        return finish_enrich(plan, enrich, profiles, item_work, profile_plan, profile_work, started)


def _write(
    workspace: Workspace,
    summary: EnrichSummary,
    result: item_phase.ItemResult,
    tables: item_phase.ItemTablesResult,
    profile_result: profile_phase.ProfileResult | None,
    carried: tuple[pa.Table, dict] | None,
    errors: list[dict],
    enrich: EnrichSettings,
    profiles: ProfileSettings,
    chash: str,
    hashes: dict[str, str],
) -> None:
    dg = tables.global_fit.out_dim
    dl = int(tables.table.schema.field("local_vector").type.list_size)
    summary.items_embedded = result.items_embedded
    summary.items_cached = result.items_cached
    summary.texts_embedded = result.texts_embedded
    summary.embedding_dim, summary.global_dim, summary.local_dim = result.dim, dg, dl
    if result.texts_embedded:
        summary.embedding_texts_per_s = round(result.texts_embedded / max(result.seconds_embedding, 1e-9), 1)
    by_step: dict[str, int] = {}
    for e in errors:
        by_step[e["step"]] = by_step.get(e["step"], 0) + 1
    summary.errors, summary.errors_by_step = len(errors), dict(sorted(by_step.items()))
    profile_stats: dict = {}
    if profile_result is not None:
        summary.profile_users = profile_result.users_selected
        summary.profiles_generated = profile_result.generated
        summary.profiles_cached = profile_result.cached
        summary.profile_estimate = profile_result.estimate
        summary.tokens_generated = profile_result.tokens_generated
        summary.generation_tokens_per_s = profile_result.tokens_per_s
        profile_stats = profile_result.stats
    with workspace.building(STAGE) as stage:
        stage.write_table("item_embeddings", result.embeddings, schemas.item_embeddings_schema(result.dim))
        stage.write_table("item_vectors", tables.table, schemas.item_vectors_schema(dg, dl))
        arrays = tables.global_fit.arrays("global")
        for d, fit in tables.local_fits.items():
            arrays |= fit.arrays(f"local_{d}")
        np.savez(stage.path("pca.npz"), **arrays)
        if profile_result is not None:
            stage.write_table("profiles", profile_result.table, schemas.profiles_schema(result.dim))
            stage.write_table("item_clusters", profile_result.clusters, schemas.ITEM_CLUSTERS)
            np.savez(stage.path("kmeans.npz"), **profile_result.kmeans_arrays)
            stage.write_table(
                "profile_cache", profile_result.cache_table, schemas.profiles_schema(result.dim)
            )
        else:  # profiles off: an empty table keeps the contract (no user has a profile)
            empty = schemas.profiles_schema(result.dim).empty_table()
            stage.write_table("profiles", empty, schemas.profiles_schema(result.dim))
            if carried is not None and carried[0].schema.field("vector").type.list_size == result.dim:
                table = carried[0]
                _, first = np.unique(
                    np.asarray(table["user_id"].to_pylist(), dtype=object), return_index=True
                )
                stage.write_table(
                    "profile_cache", table.take(np.sort(first)), schemas.profiles_schema(result.dim)
                )
                profile_stats = {k: v for k, v in carried[1].items() if v is not None}
        stage.write_table(
            "errors", pa.Table.from_pylist(errors, schemas.ENRICH_ERRORS), schemas.ENRICH_ERRORS
        )
        stage.finish(
            schema_version=schemas.ENRICH_SCHEMA_VERSION,
            config_hash=chash,
            input_hashes=hashes,
            stats={
                "items": summary.items,
                "item_errors": len(result.errors),
                "profiles": summary.profiles_generated + summary.profiles_cached,
                "profile_users": summary.profile_users,
                "errors": summary.errors,
                "errors_by_step": summary.errors_by_step,
                "embedding_dim": result.dim,
                "global_dim": dg,
                "local_dim": dl,
                "global_pca": "identity"
                if tables.global_fit.identity
                else f"{tables.global_fit.explained:.4f}",
                "embed_model_id": summary.embed_model_id,
                "llm_model_id": summary.llm_model_id,
                "profile_mode": profiles.mode,
                "template_version": enrich.template_version,
                "prompt_version": profiles.prompt_version,
                **profile_stats,
            },
        )
