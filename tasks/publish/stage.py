"""The publish stage end to end: the trained run's vectors -> FAISS top-k per user and domain ->
indexes saved per run -> one atomic swap of the DuckDB warehouse (+ retention).

An unchanged rerun (same run id, same inputs and settings, still retained) does no work.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel

from bridgerec.runtime.errors import InputError
from bridgerec.runtime.logs import get_logger
from bridgerec.runtime.progress import advance, progress_bar
from bridgerec.runtime.reports import TableReport
from bridgerec.runtime.runner import step
from bridgerec.storage import warehouse as wh
from bridgerec.storage.index_store import IndexStore, check_run_id, set_threads
from bridgerec.storage.vectors import DomainVectors
from bridgerec.storage.workspace import Workspace, config_hash, hash_json
from bridgerec.tasks.context import StageRun
from bridgerec.tasks.enrich import EnrichOutputs
from bridgerec.tasks.ingest import IngestMissing, IngestOutputs
from bridgerec.tasks.publish.recommend import (
    DomainTopK,
    recommend_domain,
    recommendation_rows,
    without_items,
)
from bridgerec.tasks.publish.settings import PublishSettings
from bridgerec.tasks.train import TrainedRun, TrainMissing, TrainOutputs

STAGE = "publish"
ITEM_COLUMNS = ["item_id", "domain", "title", "brand", "categories", "price"]


class PublishError(InputError):
    """Publishing cannot start: a missing or inconsistent input; the message says which."""


class PublishSummary(BaseModel):
    """What `bridgerec publish --json` prints."""

    run_id: str
    train_run_id: str | None = None
    model: str | None = None
    users: int = 0
    items_per_domain: dict[str, int] = {}
    k: int = 0
    rows: int = 0
    users_short: dict[str, int] = {}  # per domain: users with fewer than k eligible items
    new_items: int = 0  # catalogue items without interactions (ingest)
    new_items_recommended: bool = False  # whether they were eligible for the top-k
    new_items_note: str | None = None  # why they were left out
    skipped: bool = False
    seconds: float = 0.0
    timings: dict[str, float] = {}
    rows_per_s: float = 0.0  # DuckDB insert rate of the recommendations
    warehouse_bytes: int = 0
    purged_runs: list[str] = []
    on_gpu: bool = False
    warehouse: str = ""
    index_dir: str = ""

    def reports(self) -> list[TableReport]:
        """The warehouse's runs after this publish (newest 20): status, rows, retention."""
        rows = [
            {
                "run_id": r["run_id"],
                "status": r["status"],
                "model": r["model"],
                "finished_at": str(r["finished_at"]),
                "rows": r["n_recommendations"],
                "retained": r["retained"],
            }
            for r in wh.list_runs(self.warehouse, limit=20)
        ]
        description = (
            f"Published run {self.run_id} ({self.model}): {self.rows:,} rows for {self.users:,} "
            f"users, k={self.k}, in {self.seconds:.1f} s"
            + (" (skipped: already published)" if self.skipped else "")
            + (f"; purged {', '.join(self.purged_runs)}" if self.purged_runs else "")
        )
        return [TableReport("publish-runs", rows, description)]


def resolve_trained_run(workspace: Workspace) -> TrainedRun:
    """The best run of the train stage on the current inputs. Raises PublishError when there is none."""
    try:
        return TrainOutputs(workspace).best_run()
    except TrainMissing as exc:
        raise PublishError(str(exc)) from None


def index_root(settings: PublishSettings, warehouse: Path) -> Path:
    return Path(settings.index_dir) if settings.index_dir is not None else warehouse.parent / "indexes"


def settings_hash(settings: PublishSettings) -> str:
    return config_hash(settings)


def inputs_hash(
    settings: PublishSettings,
    workspace: Workspace,
    trained: TrainedRun | None,
    vectors: Mapping[str, DomainVectors] | None,
) -> str:
    """Everything the published rows depend on; equal hashes mean a rerun would publish the same."""
    parts: dict[str, Any] = {
        "config": settings_hash(settings),
        "ingest": IngestOutputs(workspace).key(),
        "enrich": EnrichOutputs(workspace).key(),
    }
    if trained is not None:
        parts["train"] = {"run_id": trained.run_id, "summary": TrainOutputs(workspace).fingerprint(trained)}
    if vectors is not None:  # vectors handed in directly: their content is the input
        parts["vectors"] = {
            d: hash_json([v.user_ids, v.item_ids, _array_hash(v.user_vectors), _array_hash(v.item_vectors)])
            for d, v in sorted(vectors.items())
        }
    return hash_json(parts)


def _array_hash(a: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16).hexdigest()


def load_run_metrics(workspace: Workspace, trained: TrainedRun) -> pa.Table | None:
    """The final evaluation of a training run, in the warehouse's metrics columns (None if absent).

    metrics.parquet (schemas.TRAIN_METRICS) also holds the per-epoch history (protocol 'train', or
    'sampled' validation without a user count); the final evaluation of the best weights is split
    valid|test, protocol sampled|full, with the users it averages over. Its `group` is 'overall',
    'domain:<name>' or a user group (overlap, single, short, long).
    """
    table = TrainOutputs(workspace).metrics(trained)
    if table is None:
        return None
    con = duckdb.connect()
    try:
        con.register("m", table)
        return con.sql(
            """
            SELECT ?::VARCHAR AS model, split, protocol,
                   CASE WHEN starts_with("group", 'domain:') THEN substr("group", 8) ELSE 'all' END AS domain,
                   CASE WHEN "group" = 'overall' OR starts_with("group", 'domain:') THEN 'all'
                        ELSE "group" END AS user_group,
                   metric, value::DOUBLE AS value, users::BIGINT AS users
            FROM m
            WHERE (split IN ('valid', 'test') OR starts_with(split, 'test_'))
              AND protocol IN ('sampled', 'full') AND users IS NOT NULL
              AND value IS NOT NULL AND NOT isnan(value)
            ORDER BY split, protocol, domain, user_group, metric
            """,
            params=[trained.model or "unknown"],
        ).to_arrow_table()
    finally:
        con.close()


def load_profiles(workspace: Workspace) -> pa.Table | None:
    """User profiles of the enrich stage (user_id, profile_text and, when written, cluster_summaries and
    llm_model_id), or None when profiles are off."""
    try:
        return EnrichOutputs(workspace).profile_texts()
    except ValueError as exc:
        raise PublishError(str(exc)) from exc


def check_vectors_match_ingest(
    vectors: Mapping[str, DomainVectors], items: pa.Table, users: pa.Table
) -> None:
    """Vectors must cover every ingested user and only items of their domain: stale vectors stop here."""
    for domain, v in vectors.items():
        catalogue = pc.filter(items["item_id"], pc.equal(items["domain"], domain))
        if not len(catalogue):
            raise PublishError(f"domain {domain!r} of the vectors is not in the ingested catalogue")
        ids = pa.array(v.item_ids, pa.string())
        unknown = len(ids) - (pc.sum(pc.is_in(ids, value_set=catalogue)).as_py() or 0)
        if unknown:
            raise PublishError(
                f"{unknown} item ids of domain {domain!r} are not in its ingested catalogue: stale vectors?"
            )
        given = pa.array(v.user_ids, pa.string())
        covered = pc.sum(pc.is_in(users["user_id"], value_set=given)).as_py() or 0
        if covered != users.num_rows or len(given) != users.num_rows:
            raise PublishError(
                f"vectors of domain {domain!r} cover {covered} of the {users.num_rows} ingested users "
                f"(and hold {len(given)}): stale vectors?"
            )


def _already_published(warehouse: Path, run_id: str, ihash: str, index_dir: Path) -> dict[str, Any] | None:
    if not warehouse.exists():
        return None
    with wh.reading(warehouse) as con:
        try:
            cur = con.execute(
                "SELECT run_id, model, train_run_id, n_users, k, n_recommendations FROM runs WHERE run_id = ? "
                "AND status = 'completed' AND purged_at IS NULL AND inputs_hash = ?",
                [run_id, ihash],
            )
            rows = cur.fetchall()
        except duckdb.CatalogException:  # an empty or foreign file: publish will migrate it
            return None
    if not rows or not (index_dir / run_id / "manifest.json").exists():
        return None
    r = rows[0]
    return {"run_id": r[0], "model": r[1], "train_run_id": r[2], "users": r[3], "k": r[4], "rows": r[5]}


@dataclass
class _Lists:
    """The top-k of every user and domain, before anything is written."""

    vectors: Mapping[str, DomainVectors]
    results: dict[str, DomainTopK]
    new_ids: list[str]
    new_note: str | None
    model: str | None
    timings: dict[str, float]


def _top_k(
    settings: PublishSettings,
    workspace: Workspace,
    trained: TrainedRun | None,
    vectors: Mapping[str, DomainVectors] | None,
    model: str | None,
    ingest: IngestOutputs,
    items: pa.Table,
) -> _Lists:
    """Export the run's vectors (unless handed in), leave out the items the run may not rank (items
    without interactions when `publish.new_items` is off or the model cannot score them), and search every
    domain's top-k through FAISS."""
    log = get_logger()
    timings: dict[str, float] = {}
    if vectors is None:
        assert trained is not None
        t0 = time.perf_counter()
        vectors = TrainOutputs(workspace).export_vectors(trained)
        timings["export_s"] = time.perf_counter() - t0
        log.info("publish: exported vectors of run %s in %.1f s", trained.run_id, timings["export_s"])
    if not vectors:
        raise PublishError("no domain vectors to publish")
    model = model or (trained.model if trained else None)
    check_vectors_match_ingest(vectors, items, ingest.table("users", columns=["user_id"]))
    new_ids = ingest.items_without_interactions()
    new_note = None
    text_scored = trained is None or TrainOutputs(workspace).scores_items_from_text(trained)
    if new_ids and not (settings.new_items and text_scored):
        new_note = f"{len(new_ids)} items without interactions left out: " + (
            "publish.new_items is off"
            if not settings.new_items
            else f"model {model} scores items by trained ID rows only and cannot score them"
        )
        log.warning("publish: %s", new_note)
        vectors = {d: without_items(v, set(new_ids)) for d, v in vectors.items()}
    n_users = len(next(iter(vectors.values())).user_ids)
    results: dict[str, DomainTopK] = {}
    with progress_bar("publish: top-k", total=n_users * len(vectors), unit="user-domains") as bar:
        for domain in sorted(vectors):
            results[domain] = recommend_domain(vectors[domain], settings, lambda n: advance(bar, n))
    return _Lists(vectors, results, new_ids, new_note, model, timings)


def candidate_lists(
    settings: PublishSettings, workspace: Workspace, run_id: str, threads: int = 1
) -> pa.Table:
    """The `recommendations` rows (storage.schemas.RECOMMENDATION_ROWS: user_id, domain, rank, item_id,
    score) that `run_publish` would write for train run `run_id`, computed the same way and written
    nowhere: what the quality gate compares with the published lists.

    Raises PublishError when the run or the ingest output is missing or inconsistent."""
    try:
        trained = TrainOutputs(workspace).run(run_id)
    except TrainMissing as exc:
        raise PublishError(str(exc)) from None
    set_threads(settings.threads or threads)
    ingest = IngestOutputs(workspace)
    items = ingest.table("items", columns=ITEM_COLUMNS)
    return recommendation_rows(_top_k(settings, workspace, trained, None, None, ingest, items).results)


@step("publish")
def run_publish(
    run: StageRun[PublishSettings],
    *,
    run_id: str | None = None,
    vectors: Mapping[str, DomainVectors] | None = None,
    model: str | None = None,
) -> PublishSummary:
    """Publish the latest trained run of the workspace (or the `vectors` handed in) into `run.warehouse`.

    `run_id` defaults to the trained run's id; the nightly flow passes its own to tie the row it
    recorded as 'running' to this publish.
    """
    settings, workspace, force, log = run.settings, run.workspace, run.force, run.log
    started = time.perf_counter()
    started_at = datetime.now(UTC)
    warehouse = run.warehouse_path.expanduser().resolve()
    threads = run.threads_for(settings.threads)
    store = IndexStore(index_root(settings, warehouse))
    timings: dict[str, float] = {}

    trained = resolve_trained_run(workspace) if vectors is None else None
    if run_id is None:
        run_id = trained.run_id if trained else f"publish-{started_at:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    check_run_id(run_id)
    wh.verify_readable(warehouse)  # a damaged warehouse is refused before any index or row is built
    ingest = IngestOutputs(workspace)
    try:
        stats = ingest.manifest().stats
    except IngestMissing as exc:
        raise PublishError(str(exc)) from None
    ihash = inputs_hash(settings, workspace, trained, vectors)
    if not force and (done := _already_published(warehouse, run_id, ihash, store.root)):
        log.info("publish: run %s is already published with the same inputs, skipping", run_id)
        return PublishSummary(
            **{k: v for k, v in done.items() if k != "k"},
            k=done["k"] or settings.k,
            skipped=True,
            seconds=time.perf_counter() - started,
            warehouse=str(warehouse),
            index_dir=str(store.run_dir(run_id)),
        )

    set_threads(threads)
    items = ingest.table("items", columns=ITEM_COLUMNS)
    lists = _top_k(settings, workspace, trained, vectors, model, ingest, items)
    vectors, results, model = lists.vectors, lists.results, lists.model
    new_ids, new_note = lists.new_ids, lists.new_note
    timings |= lists.timings
    n_users = len(next(iter(vectors.values())).user_ids)
    timings["index_build_s"] = sum(r.build_s for r in results.values())
    timings["search_s"] = sum(r.search_s for r in results.values())
    t0 = time.perf_counter()
    recs = recommendation_rows(results)
    timings["rows_s"] = time.perf_counter() - t0
    short = {d: int(((r.topk.items >= 0).sum(axis=1) < settings.k).sum()) for d, r in results.items()}
    for d, n in short.items():
        if n:
            log.warning("publish: %d users have fewer than k=%d eligible items in %s", n, settings.k, d)

    profiles = load_profiles(workspace)
    metrics = load_run_metrics(workspace, trained) if trained else None

    t0 = time.perf_counter()
    # The index goes in first, so the warehouse never names a run whose index is missing.
    republish = (store.run_dir(run_id) / "manifest.json").exists()
    run_dir = store.save_run(
        run_id,
        {d: (r.index, r.vectors.item_ids) for d, r in results.items()},
        {"model": model, "train_run_id": trained.run_id if trained else None, "index": settings.index.kind},
    )
    timings["index_save_s"] = time.perf_counter() - t0
    record = wh.RunRecord(
        run_id=run_id,
        started_at=started_at,
        model=model,
        train_run_id=trained.run_id if trained else None,
        config_hash=settings_hash(settings),
        inputs_hash=ihash,
        k=settings.k,
        n_users=n_users,
        n_items=int(stats.get("items", items.num_rows)),
        n_interactions=stats.get("interactions"),
        n_domains=len(vectors),
        index_path=str(run_dir),
    )
    try:
        result = wh.publish(
            warehouse,
            wh.PublishBatch(record, recs, items, metrics, profiles),
            settings.retention_runs,
            threads,
            settings.storage_compatibility,
        )
    except BaseException:
        if not republish:
            store.remove(run_id)  # the warehouse never named this index
        raise
    for old in result.purged_runs:
        store.remove(old)
    store.clean_temporaries()
    timings |= {
        "warehouse_copy_s": result.timings.copy_s,
        "warehouse_write_s": result.timings.write_s,
        "warehouse_swap_s": result.timings.swap_s,
        **result.timings.extra,
    }
    insert_s = result.timings.extra.get("insert_recommendations_s", 0.0)
    summary = PublishSummary(
        run_id=run_id,
        train_run_id=record.train_run_id,
        model=model,
        users=n_users,
        items_per_domain={d: len(v.item_ids) for d, v in sorted(vectors.items())},
        k=settings.k,
        rows=result.rows,
        users_short=short,
        new_items=len(new_ids),
        new_items_recommended=bool(new_ids) and new_note is None,
        new_items_note=new_note,
        seconds=time.perf_counter() - started,
        timings={k: round(v, 4) for k, v in timings.items()},
        rows_per_s=result.rows / insert_s if insert_s else 0.0,
        warehouse_bytes=warehouse.stat().st_size,
        purged_runs=result.purged_runs,
        on_gpu=any(r.on_gpu for r in results.values()),
        warehouse=str(warehouse),
        index_dir=str(run_dir),
    )
    log.info(
        "publish: run %s, %d rows for %d users x %d domains in %.1f s (purged %s)",
        run_id,
        summary.rows,
        n_users,
        len(vectors),
        summary.seconds,
        result.purged_runs or "none",
    )
    return summary
