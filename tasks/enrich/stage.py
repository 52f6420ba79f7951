"""The enrich stage end to end: item texts -> embeddings -> PCA tables, then hierarchical user profiles,
into WORKSPACE/enrich/. A rerun with unchanged inputs, config and models is skipped without starting an
engine; otherwise only new texts and changed histories go to the models.

The run order is written once, in `run_enrich` and `run_shards`: `plan_enrich` -> `embed_item_shard` per
item shard -> `plan_profiles` -> `profile_shard` per user shard -> `finish_enrich`, each a step called
through the run's runner: one after another in this process by default, or as Prefect task runs (one per
shard) in the flow. They take small parameters (the plan, a shard, the shards' work) and share only the
workspace.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import TypeVar

import numpy as np
import pyarrow as pa

from bridgerec.runtime.logs import get_logger
from bridgerec.runtime.runner import Runner, step
from bridgerec.storage import schemas
from bridgerec.storage.embedding_cache import EmbeddingCache
from bridgerec.storage.workspace import config_hash, hash_file
from bridgerec.tasks.context import StageRun
from bridgerec.tasks.enrich import items as item_phase
from bridgerec.tasks.enrich import models
from bridgerec.tasks.enrich import profiles as profile_phase
from bridgerec.tasks.enrich.batching import Failed
from bridgerec.tasks.enrich.engine import engine_scope
from bridgerec.tasks.enrich.outputs import STAGE
from bridgerec.tasks.enrich.plan import (
    EnrichContext,
    EnrichPlan,
    EnrichSummary,
    ItemShardWork,
    ProfilePlan,
    ProfileShardWork,
    Shard,
    shards,
)
from bridgerec.tasks.enrich.profiles import load_prompts
from bridgerec.tasks.enrich.settings import EnrichSections, EnrichSettings, ProfileSettings
from bridgerec.tasks.ingest import IngestOutputs

INGEST_FILES = ("domains", "items", "users", "sequences")
CLUSTERS_FILE = "clusters.npz"  # fixed by plan_profiles for every profile shard of the run
PENDING_FILE = "item_texts.parquet"  # the run's texts to embed, fixed by plan_enrich for the item shards
R = TypeVar("R")


def settings_hash(enrich: EnrichSettings, profiles: ProfileSettings) -> str:
    return config_hash(enrich, profiles)


@step("plan-enrich")
def plan_enrich(run: StageRun[EnrichSections]) -> EnrichPlan:
    """Input hashes and the item shards; `skipped` holds the summary when inputs, config and models are
    unchanged (then no engine starts)."""
    (enrich, profiles), workspace, log = run.settings, run.workspace, run.log
    started_at, started = time.time(), time.perf_counter()
    ingest = IngestOutputs(workspace)
    ingest.manifest()  # IngestMissing before any model is touched
    embed_dir, embed_id = models.embedding_model(enrich)
    llm_dir, llm_id = models.profile_model(profiles) if profiles.mode == "llm" else (None, None)
    prompts = load_prompts(profiles.prompt_version) if profiles.mode == "llm" else None
    hashes = {f"ingest/{name}": hash_file(ingest.file(name)) for name in INGEST_FILES}
    hashes["model/embed"] = embed_id
    if llm_id is not None and prompts is not None:
        hashes["model/llm"] = llm_id
        hashes["prompts"] = prompts.digest
    chash = settings_hash(enrich, profiles)
    n_items = ingest.table("items", columns=["item_id"]).num_rows
    plan = EnrichPlan(
        enrich=enrich,
        profiles=profiles,
        workspace=str(workspace.root),
        threads=run.runner.shard_threads(run.threads),
        slots=run.runner.slots,
        config_hash=chash,
        input_hashes=hashes,
        embed_dir=str(embed_dir),
        embed_id=embed_id,
        llm_dir=str(llm_dir) if llm_dir is not None else None,
        llm_id=llm_id,
        items=n_items,
        item_shards=[],
        started_at=started_at,
        force=run.force,
    )
    existing = workspace.current(
        STAGE, schema_version=schemas.ENRICH_SCHEMA_VERSION, config_hash=chash, input_hashes=hashes
    )
    if not run.force and existing is not None:
        log.info("enrich: inputs, config and models unchanged, skipping (%s)", workspace.stage_dir(STAGE))
        stats = existing.stats
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
    plan.item_shards = _plan_item_texts(plan)
    return plan


def _plan_item_texts(plan: EnrichPlan) -> list[Shard]:
    """The run's new item texts (distinct, not cached: `PENDING_FILE`) and the shards that cut them, so
    every shard gets new work and a text shared by items far apart is embedded once. The shards are
    what changed tonight, not the whole catalogue."""
    ctx = EnrichContext.open(plan)
    hashes, pending = item_phase.pending_texts(ctx.items(), ctx.enrich, _known_texts(ctx))
    item_phase.write_pending(ctx.checkpoints.path(PENDING_FILE), pending)
    if pending:
        get_logger().info(
            "enrich: %s of %s item texts to embed", f"{len(pending):,}", f"{len(set(hashes)):,}"
        )
    return shards(len(pending), plan.enrich.items_per_shard, plan.slots)


def _known_texts(ctx: EnrichContext) -> set[str]:
    """The hashes `_item_cache` holds vectors of, read without the vectors (the plan needs only to
    leave them out; on food-kitchen the vectors are 56 MB the finish reads once anyway)."""
    embed_id, keys = ctx.plan.embed_id, item_phase.KEY_COLUMNS
    known = item_phase.texts_of(ctx.outputs.previous("item_embeddings", columns=keys), embed_id)
    known |= item_phase.checkpointed_texts(ctx.checkpoints, embed_id)
    shared = _shared_cache(ctx)
    if shared is not None:
        known |= item_phase.texts_of(shared.read(embed_id, columns=keys), embed_id)
    return known


def _item_cache(ctx: EnrichContext) -> item_phase.VectorCache:
    """Vectors of the previous output and of every finished batch of this (or a crashed) run."""
    cache = item_phase.VectorCache(ctx.plan.embed_id)
    cache.add_table(ctx.outputs.previous("item_embeddings"))
    cache.add_table(ctx.checkpoints.read(item_phase.CHECKPOINT_KIND))
    shared = _shared_cache(ctx)
    if shared is not None:
        cache.add_table(shared.read(ctx.plan.embed_id))
    return cache


def _shared_cache(ctx: EnrichContext) -> EmbeddingCache | None:
    return None if ctx.enrich.embedding_cache is None else EmbeddingCache(ctx.enrich.embedding_cache)


@step("embed-items", run_name="embed-items-{shard.index}", retries=1, retry_delay_s=10)
def embed_item_shard(plan: EnrichPlan, shard: Shard) -> ItemShardWork:
    """Embed rows [start, stop) of the run's new item texts (`PENDING_FILE`); each finished batch is
    checkpointed, so a retried or resumed shard embeds only what is not checkpointed yet. Reads the
    checkpoints' hashes, not their vectors (the finish reads those once)."""
    ctx = EnrichContext.open(plan)
    done_before = item_phase.checkpointed_texts(ctx.checkpoints, plan.embed_id)
    pending = item_phase.read_pending(ctx.checkpoints.path(PENDING_FILE), shard.start, shard.stop)
    todo = {h: t for h, t in pending.items() if h not in done_before}
    done = item_phase.embed_texts(
        todo,
        ctx.enrich,
        plan.embed_id,
        item_phase.VectorCache(plan.embed_id),  # what this shard computes
        ctx.embedder,
        ctx.checkpoints,
        shared=_shared_cache(ctx),
    )
    return ItemShardWork(
        shard=shard,
        texts_embedded=done.embedded,
        seconds=done.seconds,
        failures=[
            {"text_hash": h, "reason": f.reason, "attempts": f.attempts} for h, f in done.failures.items()
        ],
        engines_started=ctx.engines_started(),
    )


def _all_items(ctx: EnrichContext, item_work: list[ItemShardWork]) -> tuple[pa.Table, item_phase.ItemResult]:
    """Every item's vector from the cache the shards filled (a text missing there, say after its
    checkpoint was lost, is embedded here; texts that failed in a shard are reported, not retried)."""
    items = ctx.items()
    failed = {
        f["text_hash"]: Failed(unit=(f["text_hash"], ""), reason=f["reason"], attempts=f["attempts"])
        for w in item_work
        for f in w.failures
    }
    result = item_phase.embed_items(
        items,
        ctx.enrich,
        ctx.plan.embed_id,
        _item_cache(ctx),
        ctx.embedder,
        ctx.checkpoints,
        failed,
        shared=_shared_cache(ctx),
        embedded_before=item_phase.read_pending(ctx.checkpoints.path(PENDING_FILE)).keys(),
    )
    if items.num_rows and not result.ok.any():
        raise RuntimeError(f"no item could be embedded; first error: {result.errors[0]['reason']}")
    return items, result


def _profile_inputs(ctx: EnrichContext, items: pa.Table, dim: int) -> profile_phase.ProfileInputs:
    """The profile inputs over the clusters `plan_profiles` fixed for the run."""
    clusters = profile_phase.load_clusters(ctx.checkpoints.path(CLUSTERS_FILE))
    return profile_phase.profile_inputs(ctx, items, clusters, dim)


@step("plan-profiles")
def plan_profiles(plan: EnrichPlan, item_work: list[ItemShardWork]) -> ProfilePlan:
    """After the item shards: fit (or reuse) the clusters once for all profile shards, log the cost
    estimate of the users to generate, and split the selected users into shards."""
    ctx = EnrichContext.open(plan)
    items, item_result = _all_items(ctx, item_work)
    clusters = profile_phase.cluster_items(ctx, item_result)
    profile_phase.save_clusters(clusters, ctx.checkpoints.path(CLUSTERS_FILE))
    inputs = profile_phase.profile_inputs(ctx, items, clusters, item_result.dim)
    cached, todo = inputs.split(inputs.jobs)
    speed = ctx.previous_stats.get("generation_tokens_per_s") or ctx.profiles.estimate_tokens_per_s
    same_model = ctx.previous_stats.get("profile_gen_key") == inputs.gen_key  # the same model and prompts
    fill = ctx.previous_stats.get("generation_cap_fill") if same_model else None
    estimate = profile_phase.estimate_cost(todo, ctx.profiles, speed, fill)
    profile_phase.log_estimate(inputs, len(cached), todo, estimate)
    return ProfilePlan(
        shards=shards(len(inputs.jobs), ctx.profiles.users_per_shard, plan.slots),
        embedding_dim=item_result.dim,
        estimate=estimate,
    )


@step("profile-users", run_name="profile-users-{shard.index}", retries=1, retry_delay_s=10)
def profile_shard(plan: EnrichPlan, profile_plan: ProfilePlan, shard: Shard) -> ProfileShardWork:
    """Generate the profiles of one shard of the selected users whose history changed; each finished
    batch is checkpointed."""
    ctx = EnrichContext.open(plan)
    inputs = _profile_inputs(ctx, ctx.items(), profile_plan.embedding_dim)
    _, todo = inputs.split(inputs.jobs[shard.start : shard.stop])
    gen = profile_phase.generate_profiles(
        ctx, inputs, todo, label=f"enrich: user profiles, shard {shard.index}"
    )
    return ProfileShardWork(
        shard=shard,
        generated=len(gen.rows),
        tokens=gen.tokens,
        seconds=gen.seconds,
        errors=gen.errors,
        engines_started=ctx.engines_started(),
    )


@step("finish-enrich")
def finish_enrich(
    plan: EnrichPlan,
    item_work: list[ItemShardWork],
    profile_plan: ProfilePlan | None,
    profile_work: list[ProfileShardWork],
) -> EnrichSummary:
    """Assemble the shards' work into WORKSPACE/enrich (PCA tables, profiles, errors, manifest), swapped
    in atomically; the checkpoints are removed only then."""
    ctx = EnrichContext.open(plan)
    items, result = _all_items(ctx, item_work)
    result.seconds_embedding += sum(w.seconds for w in item_work)  # spent in the shards
    tables = item_phase.reduce_items(
        items, result, ctx.enrich, plan.embed_id, ctx.outputs.pca_tables(), force=plan.force
    )
    errors = list(result.errors)
    profile_result = None
    if plan.with_profiles:
        assert profile_plan is not None, "profiles need plan_profiles first"
        profile_result = _finish_profiles(ctx, items, result.dim, profile_plan, profile_work)
        errors += profile_result.errors
    summary = _summary(ctx, result, tables, profile_result, errors, item_work, profile_work)
    _log_engine_starts(summary)
    _write(ctx, summary, result, tables, profile_result, errors)
    ctx.checkpoints.clear()
    summary.seconds = time.time() - plan.started_at
    if errors:
        get_logger().warning(
            "enrich: %s items or users failed (%s); the reasons are in %s",
            f"{len(errors):,}",
            ", ".join(f"{step}: {n:,}" for step, n in summary.errors_by_step.items()),
            ctx.outputs.folder / "errors.parquet",
        )
    return summary


def _log_engine_starts(summary: EnrichSummary) -> None:
    """How many engines the night started, in how many worker processes: at most one per model and
    worker (a worker keeps its engines for all its shards), never one per shard."""
    starts = summary.engines_started
    if not starts:
        return
    workers = {s.get("worker") for s in starts}
    per_worker = Counter((s["runner"], s.get("worker")) for s in starts)
    get_logger().info(
        "enrich: %d engine start(s) in %d worker process(es) for %d shard(s), %.0f s in all; at most %d per "
        "model and worker",
        len(starts),
        len(workers),
        len(summary.shards),
        sum(s["seconds"] for s in starts),
        max(per_worker.values()),
    )


def _finish_profiles(
    ctx: EnrichContext,
    items: pa.Table,
    dim: int,
    profile_plan: ProfilePlan,
    profile_work: list[ProfileShardWork],
) -> profile_phase.ProfileResult:
    """Every selected user's profile from the shards' checkpoints (users the shards missed are generated
    here, those that failed there are reported), with the shards' counts and speed."""
    failed_users = {e["key"]: e for w in profile_work for e in w.errors}
    inputs = _profile_inputs(ctx, items, dim)
    result = profile_phase.build_profiles(ctx, inputs, items, failed_users, profile_plan.estimate)
    shard_generated = sum(w.generated for w in profile_work)
    shard_tokens = sum(w.tokens for w in profile_work)
    shard_seconds = sum(w.seconds for w in profile_work)
    result.generated += shard_generated
    result.cached -= shard_generated
    result.tokens_generated += shard_tokens
    if shard_tokens and shard_seconds:
        result.tokens_per_s = round(shard_tokens / shard_seconds, 1)
        result.stats["generation_tokens_per_s"] = result.tokens_per_s
    if (fill := profile_phase.cap_fill(result.tokens_generated, profile_plan.estimate)) is not None:
        result.stats["generation_cap_fill"] = round(fill, 3)  # the next run's expected time uses it
    elif (
        ctx.previous_stats.get("profile_gen_key") == inputs.gen_key
        and "generation_cap_fill" in ctx.previous_stats
    ):
        result.stats["generation_cap_fill"] = ctx.previous_stats["generation_cap_fill"]  # nothing generated
    return result


def run_shards(plan: EnrichPlan, runner: Runner) -> EnrichSummary:
    """The run order, written once: the item shards, then (profiles on) the profile plan and the profile
    shards, then the finish. Engines started in this process are shared by all its shards and shut down
    at the end (`engine_scope`); `runner` decides where the shard functions run."""
    with engine_scope():
        item_work = runner.map(embed_item_shard, plan.item_shards, plan)
        profile_plan, profile_work = None, []
        if plan.with_profiles:
            profile_plan = runner.call(plan_profiles, plan, item_work)
            profile_work = runner.map(profile_shard, profile_plan.shards, plan, profile_plan)
        return runner.call(finish_enrich, plan, item_work, profile_plan, profile_work)


@step("prepare-models")
def prepare_models(profiles: ProfileSettings) -> None:
    """Convert the packaged GGUF once (a no-op when the folder exists or profiles are off)."""
    if profiles.mode == "llm":
        models.prepare_profile_model(profiles)


def run_enrich(run: StageRun[EnrichSections]) -> EnrichSummary:
    """Build WORKSPACE/enrich from WORKSPACE/ingest: the plan, then the shards through `run.runner` (one
    after another here by default; task runs in the flow); skip when inputs, config and models are
    unchanged (then no engine starts)."""
    run.runner.call(prepare_models, run.settings.profiles)
    plan = run.runner.call(plan_enrich, run)
    if plan.skipped is not None:
        return plan.skipped
    return run_shards(plan, run.runner)


def _shard_row(kind: str, work: ItemShardWork | ProfileShardWork, new: int) -> dict:
    """One row of the summary's `shards` (and the flow's enrich-shards artifact)."""
    return {
        "kind": kind,
        **work.shard.model_dump(),
        "new": new,
        "seconds": round(work.seconds, 2),
        "worker": work.worker,
    }


def _summary(
    ctx: EnrichContext,
    result: item_phase.ItemResult,
    tables: item_phase.ItemTablesResult,
    profile_result: profile_phase.ProfileResult | None,
    errors: list[dict],
    item_work: list[ItemShardWork],
    profile_work: list[ProfileShardWork],
) -> EnrichSummary:
    plan = ctx.plan
    summary = EnrichSummary(
        items=plan.items,
        items_embedded=result.items_embedded,
        items_cached=result.items_cached,
        texts_embedded=result.texts_embedded,
        embedding_dim=result.dim,
        global_dim=tables.fits.global_fit.out_dim,
        local_dim=int(tables.table.schema.field("local_vector").type.list_size),
        embed_model_id=plan.embed_id,
        llm_model_id=plan.llm_id,
        profile_mode=plan.profiles.mode,
        workspace=str(ctx.workspace.root),
    )
    if result.texts_embedded:
        summary.embedding_texts_per_s = round(result.texts_embedded / max(result.seconds_embedding, 1e-9), 1)
    by_step: dict[str, int] = {}
    for e in errors:
        by_step[e["step"]] = by_step.get(e["step"], 0) + 1
    summary.errors, summary.errors_by_step = len(errors), dict(sorted(by_step.items()))
    if profile_result is not None:
        summary.profile_users = profile_result.users_selected
        summary.profiles_generated = profile_result.generated
        summary.profiles_cached = profile_result.cached
        summary.profile_estimate = profile_result.estimate
        summary.tokens_generated = profile_result.tokens_generated
        summary.generation_tokens_per_s = profile_result.tokens_per_s
    works: list[ItemShardWork | ProfileShardWork] = [*item_work, *profile_work]
    starts = [s for w in works for s in w.engines_started] + ctx.engines_started()
    summary.engines_started = [dict(t) for t in dict.fromkeys(tuple(sorted(s.items())) for s in starts)]
    summary.shards = [_shard_row("items", w, w.texts_embedded) for w in item_work] + [
        _shard_row("users", w, w.generated) for w in profile_work
    ]
    return summary


def _carried_profiles(ctx: EnrichContext, dim: int) -> tuple[pa.Table, dict] | None:
    """With profiles off: the previous build's generated profiles of `dim`-d vectors (one row per user) and
    their stats, kept in profile_cache.parquet for when profiles are back on."""
    kept = [
        t
        for t in (ctx.outputs.previous(n) for n in ("profile_cache", "profiles"))
        if t is not None and t.num_rows
    ]
    if not kept:
        return None
    table = pa.concat_tables(kept)
    if table.schema.field("vector").type.list_size != dim:
        return None
    _, first = np.unique(np.asarray(table["user_id"].to_pylist(), dtype=object), return_index=True)
    stats = {
        k: ctx.previous_stats.get(k)
        for k in ("profile_gen_key", "generation_tokens_per_s", "generation_cap_fill")
    }
    return table.take(np.sort(first)), {k: v for k, v in stats.items() if v is not None}


def _write(
    ctx: EnrichContext,
    summary: EnrichSummary,
    result: item_phase.ItemResult,
    tables: item_phase.ItemTablesResult,
    profile_result: profile_phase.ProfileResult | None,
    errors: list[dict],
) -> None:
    """The stage's files and manifest, built in a staging folder and swapped in whole."""
    profiles_schema = schemas.profiles_schema(result.dim)
    profile_stats: dict = profile_result.stats if profile_result is not None else {}
    carried = _carried_profiles(ctx, result.dim) if profile_result is None else None
    with ctx.workspace.building(STAGE) as stage:
        stage.write_table("item_embeddings", result.embeddings, schemas.item_embeddings_schema(result.dim))
        stage.write_table(
            "item_vectors", tables.table, schemas.item_vectors_schema(summary.global_dim, summary.local_dim)
        )
        tables.fits.save(stage.path("pca.npz"), tables.domain_idx)
        if profile_result is not None:
            stage.write_table("profiles", profile_result.table, profiles_schema)
            stage.write_table("item_clusters", profile_result.clusters, schemas.ITEM_CLUSTERS)
            np.savez(stage.path("kmeans.npz"), **profile_result.kmeans_arrays)  # type: ignore[arg-type]
            stage.write_table("profile_cache", profile_result.cache_table, profiles_schema)
        else:  # profiles off: an empty table keeps the contract (no user has a profile)
            stage.write_table("profiles", profiles_schema.empty_table(), profiles_schema)
            if carried is not None:
                stage.write_table("profile_cache", carried[0], profiles_schema)
                profile_stats = carried[1]
        stage.write_table(
            "errors", pa.Table.from_pylist(errors, schemas.ENRICH_ERRORS), schemas.ENRICH_ERRORS
        )
        stage.finish(
            schema_version=schemas.ENRICH_SCHEMA_VERSION,
            config_hash=ctx.plan.config_hash,
            input_hashes=ctx.plan.input_hashes,
            stats={
                "items": summary.items,
                "item_errors": len(result.errors),
                "profiles": summary.profiles_generated + summary.profiles_cached,
                "profile_users": summary.profile_users,
                "errors": summary.errors,
                "errors_by_step": summary.errors_by_step,
                "embedding_dim": result.dim,
                "global_dim": summary.global_dim,
                "local_dim": summary.local_dim,
                "pca_refit": tables.refit,  # why the PCA tables were fit anew; None: the previous kept
                "global_pca": "identity"
                if tables.fits.global_fit.identity
                else f"{tables.fits.global_fit.explained:.4f}",
                "embed_model_id": summary.embed_model_id,
                "llm_model_id": summary.llm_model_id,
                "profile_mode": ctx.profiles.mode,
                "template_version": ctx.enrich.template_version,
                "prompt_version": ctx.profiles.prompt_version,
                **profile_stats,
            },
        )
