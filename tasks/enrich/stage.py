"""The enrich stage end to end: item texts -> embeddings -> PCA tables, then hierarchical user profiles,
into WORKSPACE/enrich/. A rerun with unchanged inputs, config and models is skipped without starting an
engine; otherwise only new texts and changed histories go to the models."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, Field

from bridgerec.logs import get_logger
from storage import schemas
from storage.checkpoints import Checkpoints
from storage.workspace import Workspace, hash_file, hash_json
from tasks.enrich import items as item_phase
from tasks.enrich import models
from tasks.enrich import profiles as profile_phase
from tasks.enrich.engine import EngineSpec, engines_for_run
from tasks.enrich.settings import EnrichSettings, ProfileSettings

STAGE = "enrich"
INGEST_FILES = ("domains", "items", "users", "sequences")


class EnrichSummary(BaseModel):
    """What `bridgerec enrich --json` prints."""

    items: int = 0
    items_embedded: int = 0
    items_cached: int = 0
    texts_embedded: int = 0
    profile_users: int = 0  # users selected for a profile (all, or the first profiles.max_users)
    profiles_generated: int = 0
    profiles_cached: int = 0
    errors: int = 0
    errors_by_step: dict[str, int] = Field(default_factory=dict)
    embedding_dim: int = 0
    global_dim: int = 0
    local_dim: int = 0
    embed_model_id: str = ""
    llm_model_id: str | None = None
    profile_mode: str = "llm"
    profile_estimate: dict | None = None  # calls, tokens, minutes, printed before generating
    tokens_generated: int = 0
    generation_tokens_per_s: float | None = None
    embedding_texts_per_s: float | None = None
    engines_started: list[dict] = Field(default_factory=list)
    skipped: bool = False
    seconds: float = 0.0
    workspace: str = ""


def config_hash(enrich: EnrichSettings, profiles: ProfileSettings) -> str:
    # Model folders enter through their content fingerprints (input hashes), not their paths.
    return hash_json(
        {
            "enrich": enrich.model_dump(mode="json", exclude={"model"}),
            "profiles": profiles.model_dump(mode="json", exclude={"model", "gguf_source", "auto_prepare"}),
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


def run_enrich(
    enrich: EnrichSettings,
    profiles: ProfileSettings,
    workspace: Workspace,
    threads: int = 1,
    force: bool = False,
) -> EnrichSummary:
    """Build WORKSPACE/enrich from WORKSPACE/ingest; skip when inputs, config and models are unchanged."""
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
        return EnrichSummary(
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

    items = workspace.read_table("ingest", "items")
    checkpoints = Checkpoints(workspace, STAGE)
    cache = item_phase.VectorCache(embed_id)
    cache.add_table(_previous(workspace, "item_embeddings"))
    cache.add_table(checkpoints.read(item_phase.CHECKPOINT_KIND))
    summary = EnrichSummary(
        items=items.num_rows, embed_model_id=embed_id, llm_model_id=llm_id, profile_mode=profiles.mode
    )
    with engines_for_run() as pool:
        n_started = len(pool.starts)
        embed_spec = EngineSpec.of("pooling", embed_dir, enrich.engine, threads)

        def embedder():  # started only if some text is new
            return pool.embedder(embed_spec, embed_id, truncate=enrich.truncate)

        result = item_phase.embed_items(items, enrich, embed_id, cache, embedder, checkpoints)
        if items.num_rows and not result.ok.any():
            raise RuntimeError(f"no item could be embedded; first error: {result.errors[0]['reason']}")
        tables = item_phase.reduce_items(items, result, enrich)
        errors = list(result.errors)
        profile_result = None
        if profiles.mode == "llm":
            assert llm_dir is not None and llm_id is not None and prompts is not None
            profile_result = profile_phase.build_profiles(
                workspace=workspace,
                items=items,
                item_result=result,
                enrich=enrich,
                settings=profiles,
                prompts=prompts,
                llm_id=llm_id,
                embed_id=embed_id,
                generator=lambda: pool.generator(
                    EngineSpec.of("generate", llm_dir, profiles.engine, threads), llm_id
                ),
                embedder=embedder,
                previous=[_previous(workspace, "profiles"), _previous(workspace, "profile_cache")],
                previous_stats=existing.stats if existing is not None else {},
                checkpoints=checkpoints,
            )
            errors += profile_result.errors
        summary.engines_started = pool.starts[n_started:]
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
            chash,
            hashes,
        )
    checkpoints.clear()
    summary.seconds = time.perf_counter() - started
    summary.workspace = str(workspace.root)
    if errors:
        log.warning(
            "enrich: %d items/users failed %s -> %s",
            len(errors),
            summary.errors_by_step,
            workspace.stage_dir(STAGE) / "errors.parquet",
        )
    return summary


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
