"""The publish stage end to end: the trained run's vectors -> FAISS indexes saved per run -> user shards
that score and write their own Parquet parts -> the night registered in one small atomic swap of the
warehouse file (+ retention).

`run_publish` reads as the night's table of contents; the shard function is tasks/publish/shards.py's
`score_shard`, mapped by a runner (in-process by default). An unchanged rerun (same run id, same inputs
and settings, still retained) does no work.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel

from bridgerec.runtime.logs import DETAIL, get_logger
from bridgerec.runtime.progress import advance, progress_bar
from bridgerec.runtime.reports import TableReport
from bridgerec.runtime.runner import step
from bridgerec.storage import warehouse as wh
from bridgerec.storage.index_store import (
    IndexSettings,
    IndexStore,
    Searcher,
    build_index,
    check_run_id,
    recall_at_k,
    set_threads,
)
from bridgerec.storage.vectors import DomainVectors
from bridgerec.storage.workspace import Workspace, config_hash, hash_json
from bridgerec.tasks.context import StageRun
from bridgerec.tasks.enrich import EnrichOutputs
from bridgerec.tasks.ingest import IngestMissing, IngestOutputs
from bridgerec.tasks.publish.recommend import recommend_domain, recommendation_rows, without_items
from bridgerec.tasks.publish.settings import PublishSettings
from bridgerec.tasks.publish.shards import (
    ShardPlan,
    ShardResult,
    score_shard,
    stage_shards,
)
from bridgerec.tasks.publish.trained import PublishError, resolve_trained_run
from bridgerec.tasks.train import TrainedRun, TrainMissing, TrainOutputs

STAGE = "publish"
ITEM_COLUMNS = ["item_id", "domain", "title", "brand", "categories", "price"]


class PublishSummary(BaseModel):
    """What `bridgerec publish --json` prints."""

    run_id: str
    train_run_id: str | None = None
    model: str | None = None
    users: int = 0
    items_per_domain: dict[str, int] = {}
    k: int = 0
    rows: int = 0
    # The users' history rows published (the `interactions` view); None: publish.history off.
    history_rows: int | None = None
    users_short: dict[str, int] = {}  # per domain: users with fewer than k eligible items
    new_items: int = 0  # catalogue items without interactions (ingest)
    new_items_recommended: bool = False  # whether they were eligible for the top-k
    new_items_note: str | None = None  # why they were left out
    index_kinds: dict[str, str] = {}  # per domain: the index searched (publish.index.kind auto decides)
    index_recall: dict[str, float] = {}  # per approximate domain: recall@k against exact search
    recall_warning: str | None = None  # set when a recall fell below publish.index.recall_floor
    shards: int = 0
    parts: int = 0
    data_bytes: int = 0  # the night's Parquet parts
    skipped: bool = False
    seconds: float = 0.0
    timings: dict[str, float] = {}
    rows_per_s: float = 0.0  # rows written as parts per second of writing
    warehouse_bytes: int = 0  # the warehouse file (small: the rows are in parts)
    purged_runs: list[str] = []
    on_gpu: bool = False
    warehouse: str = ""
    data_root: str = ""
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
                "index": r.get("index_kind"),
                "recall": r.get("index_recall"),
            }
            for r in wh.list_runs(self.warehouse, limit=20)
        ]
        description = (
            f"Published run {self.run_id} ({self.model}): {self.rows:,} rows for {self.users:,} "
            f"users, k={self.k}, in {self.seconds:.1f} s"
            + (f", {self.shards} shards, {self.data_bytes / 1e6:.1f} MB of parts" if not self.skipped else "")
            + (" (skipped: already published)" if self.skipped else "")
            + (f"; purged {', '.join(self.purged_runs)}" if self.purged_runs else "")
            + (f"; warning: {self.recall_warning}" if self.recall_warning else "")
        )
        return [TableReport("publish-runs", rows, description)]


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
    """The run's row when it is what the warehouse serves now, published from the same inputs (nothing
    to do); None otherwise. A run published earlier and since displaced by another (inputs rolled back
    to an earlier night's, or `bridgerec publish --run-id` of an earlier run) is published again, so it
    serves: skipping it would leave the newer run serving while the night said otherwise."""
    if not warehouse.exists():
        return None
    with wh.reading(warehouse, wh.NOTHING_PUBLISHED) as con:
        try:
            # Every column (SELECT *): a file of an earlier schema lacks the newer ones (n_history).
            cur = con.execute(
                "SELECT * FROM latest_run WHERE run_id = ? AND inputs_hash = ?", [run_id, ihash]
            )
            names = [d[0] for d in cur.description]
            found = [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        except duckdb.CatalogException:  # an empty or foreign file: publish will migrate it
            return None
    if not found or not (index_dir / run_id / "manifest.json").exists():
        return None
    r = found[0]
    return {
        "run_id": r["run_id"],
        "model": r["model"],
        "train_run_id": r["train_run_id"],
        "users": r["n_users"],
        "k": r["k"],
        "rows": r["n_recommendations"],
        "history_rows": r.get("n_history"),
    }


@dataclass
class _Job:
    """One publish: what it reads, where it writes, under which run id."""

    settings: PublishSettings
    workspace: Workspace
    warehouse: Path
    threads: int
    run_id: str
    trained: TrainedRun | None
    inputs_hash: str
    store: IndexStore
    ingest: IngestOutputs
    stats: dict[str, Any]
    slots: int = 1  # shards that run at once on one machine (`Runner.slots`): at least that many are cut
    shard_threads: int = 1  # CPU threads of one scoring shard (`Runner.shard_threads`)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    started: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def data_root(self) -> str:
        return self.settings.data_dir or wh.default_root(self.warehouse)


@dataclass
class _Ranked:
    """The vectors to rank (items the run may not rank left out) and what was left out."""

    vectors: Mapping[str, DomainVectors]
    model: str | None
    new_ids: list[str]
    new_note: str | None
    items: pa.Table  # the ingested catalogue (ITEM_COLUMNS)


@dataclass
class _Index:
    """One domain's index, saved with the run before any shard reads it."""

    settings: IndexSettings  # resolved: the kind auto chose, IVF sizes
    build_s: float
    recall: float | None  # approximate kinds: recall@k against exact search on a sample of users


@step("publish")
def run_publish(
    run: StageRun[PublishSettings],
    *,
    run_id: str | None = None,
    vectors: Mapping[str, DomainVectors] | None = None,
    model: str | None = None,
) -> PublishSummary:
    """Publish the latest trained run of the workspace (or the `vectors` handed in) into `run.warehouse`.

    `run_id` chooses the trained run (`WORKSPACE/runs/<run_id>`, complete, trained on the current
    catalogue: `bridgerec publish --run-id`, e.g. a run the quality gate refused or an earlier one); by
    default the best run on the current inputs. The published run keeps the trained run's id. With
    `vectors` handed in there is no trained run and `run_id` names the published run (default
    `publish-<time>-<hex>`). Raises PublishError for a run that is not there or not complete.
    The plan, every shard and the registration are steps of `run.runner`
    (task runs in a flow; the shards on worker processes with `runtime.runner: processes`).
    """
    job = _job(run, run_id, vectors)
    if not run.force and (
        done := _already_published(job.warehouse, job.run_id, job.inputs_hash, job.store.root)
    ):
        return _skipped(job, done)
    republish = (job.store.run_dir(job.run_id) / "manifest.json").exists()
    with wh.publish_attempt(job.warehouse, job.run_id, job.data_root, job.store.root) as attempt:
        try:
            plan = run.runner.call(plan_publish, job, attempt, vectors, model)
            results = run.runner.map(score_shard, list(plan.shards.shards), plan.shards)
            result = run.runner.call(register_publish, job, plan, attempt, results)
        except BaseException:
            if not republish:
                job.store.remove(job.run_id)  # the warehouse never named this index
            raise
    _drop_old_indexes(job, result)
    return _summary(job, plan, results, result)


@dataclass(frozen=True)
class _Shape:
    """A domain's sizes: all the registration and the summary need once the vectors are staged."""

    users: int
    items: int


@dataclass
class PublishPlan:
    """What the plan step hands to the shards and the registration (no vectors: they are staged)."""

    model: str | None
    new_ids: list[str]
    new_note: str | None
    items: pa.Table  # the ingested catalogue (ITEM_COLUMNS)
    domains: dict[str, _Shape]
    indexes: dict[str, _Index]
    shards: ShardPlan
    timings: dict[str, float]


@step("plan-publish")
def plan_publish(
    job: _Job, attempt: wh.Attempt, vectors: Mapping[str, DomainVectors] | None, model: str | None
) -> PublishPlan:
    """Vectors (exported unless handed in), the indexes built and saved, the shards' inputs staged."""
    ranked = _ranked_inputs(job, vectors, model)
    indexes = _build_and_save_indexes(job, ranked)  # the index goes in before the warehouse names it
    shards = _plan_shards(job, ranked, indexes, attempt)
    domains = {d: _Shape(len(v.user_ids), len(v.item_ids)) for d, v in sorted(ranked.vectors.items())}
    return PublishPlan(
        ranked.model,
        ranked.new_ids,
        ranked.new_note,
        ranked.items,
        domains,
        indexes,
        shards,
        dict(job.timings),
    )


def _job(
    run: StageRun[PublishSettings], run_id: str | None, vectors: Mapping[str, DomainVectors] | None
) -> _Job:
    """Resolve the trained run, the run id and the inputs' hash; check the ingest output is there."""
    settings, workspace = run.settings, run.workspace
    trained = resolve_trained_run(workspace, run_id) if vectors is None else None
    if trained is not None:
        run_id = trained.run_id
    elif run_id is None:
        run_id = f"publish-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    check_run_id(run_id)
    warehouse = run.warehouse_path.expanduser().resolve()
    wh.verify_readable(warehouse)  # a damaged warehouse is refused before any index or part is built
    ingest = IngestOutputs(workspace)
    try:
        stats = ingest.manifest().stats
    except IngestMissing as exc:
        raise PublishError(str(exc)) from None
    threads = run.threads_for(settings.threads)
    return _Job(
        settings,
        workspace,
        warehouse,
        threads,
        run_id,
        trained,
        inputs_hash(settings, workspace, trained, vectors),
        IndexStore(index_root(settings, warehouse)),
        ingest,
        stats,
        slots=run.runner.slots,
        shard_threads=run.runner.shard_threads(threads),
    )


def _skipped(job: _Job, done: dict[str, Any]) -> PublishSummary:
    get_logger().info("publish: run %s is already published with the same inputs, skipping", job.run_id)
    return PublishSummary(
        **{k: v for k, v in done.items() if k != "k"},
        k=done["k"] or job.settings.k,
        skipped=True,
        seconds=time.perf_counter() - job.started,
        warehouse=str(job.warehouse),
        data_root=job.data_root,
        index_dir=str(job.store.run_dir(job.run_id)),
    )


def _ranked_inputs(job: _Job, vectors: Mapping[str, DomainVectors] | None, model: str | None) -> _Ranked:
    """Export the run's vectors (unless handed in), check them against the ingest output, and leave out
    the items the run may not rank (items without interactions when `publish.new_items` is off or the
    model cannot score them)."""
    log = get_logger()
    set_threads(job.threads)
    if vectors is None:
        assert job.trained is not None
        t0 = time.perf_counter()
        vectors = TrainOutputs(job.workspace).export_vectors(job.trained)
        job.timings["export_s"] = time.perf_counter() - t0
        log.info(
            "publish: exported vectors of run %s in %.1f s",
            job.trained.run_id,
            job.timings["export_s"],
            extra=DETAIL,
        )
    if not vectors:
        raise PublishError("no domain vectors to publish")
    model = model or (job.trained.model if job.trained else None)
    items = job.ingest.table("items", columns=ITEM_COLUMNS)
    check_vectors_match_ingest(vectors, items, job.ingest.table("users", columns=["user_id"]))
    new_ids = job.ingest.items_without_interactions()
    new_note = None
    text_scored = job.trained is None or TrainOutputs(job.workspace).scores_items_from_text(job.trained)
    if new_ids and not (job.settings.new_items and text_scored):
        new_note = f"{len(new_ids)} items without interactions left out: " + (
            "publish.new_items is off"
            if not job.settings.new_items
            else f"model {model} scores items by trained ID rows only and cannot score them"
        )
        log.warning("publish: %s", new_note)
        vectors = {d: without_items(v, set(new_ids)) for d, v in vectors.items()}
    return _Ranked(vectors, model, new_ids, new_note, items)


def _build_and_save_indexes(job: _Job, ranked: _Ranked) -> dict[str, _Index]:
    """Per domain: the index `publish.index` chooses for its size, built and (approximate kinds) checked
    against exact search on a sample of users; then all saved with the run, whole."""
    log = get_logger()
    built, out = {}, {}
    for domain in sorted(ranked.vectors):
        v = ranked.vectors[domain]
        resolved = job.settings.index.resolve(len(v.item_ids))
        t0 = time.perf_counter()
        index = build_index(v.item_vectors, resolved)
        build_s = time.perf_counter() - t0
        recall = None
        if resolved.approximate and resolved.recall_sample_users:
            t0 = time.perf_counter()
            exclude = job.settings.exclude_seen
            recall = recall_at_k(
                Searcher.for_index(index, resolved),
                v.item_vectors,
                v.user_vectors,
                job.settings.k,
                v.seen_indptr if exclude else None,
                v.seen_items if exclude else None,
                sample=resolved.recall_sample_users,
            )
            job.timings["recall_s"] = job.timings.get("recall_s", 0.0) + time.perf_counter() - t0
            log.info(
                "publish: %s index %s: recall@%d %.4f",
                domain,
                resolved.label(),
                job.settings.k,
                recall,
                extra=DETAIL,
            )
        built[domain] = (index, v.item_ids)
        out[domain] = _Index(resolved, build_s, recall)
    t0 = time.perf_counter()
    kinds = {d: i.settings.label() for d, i in out.items()}
    meta = {
        "model": ranked.model,
        "train_run_id": job.trained.run_id if job.trained else None,
        "index": kinds,
    }
    job.store.save_run(job.run_id, built, meta)
    job.timings["index_build_s"] = sum(i.build_s for i in out.values())
    job.timings["index_save_s"] = time.perf_counter() - t0
    return out


def _plan_shards(job: _Job, ranked: _Ranked, indexes: dict[str, _Index], attempt: wh.Attempt) -> ShardPlan:
    """Stage what the shards load (vectors in user order, their users and profiles) in the attempt's
    scratch folder, and cut the users into shards of `publish.users_per_shard`, at least one for each
    worker that runs at once (`runtime.workers` with the processes runner), which share the threads."""
    t0 = time.perf_counter()
    assert attempt.scratch is not None
    profiles = load_profiles(job.workspace)
    text = None
    if job.settings.explain and job.trained is not None:
        text = TrainOutputs(job.workspace).text_space(job.trained)  # None: the model has no text space
    history = history_rows(job.run_id, job.ingest) if job.settings.history else None
    shards, n_users = stage_shards(
        attempt.scratch,
        ranked.vectors,
        profiles,
        job.run_id,
        job.settings.users_per_shard,
        text,
        job.slots,
        history,
    )
    job.timings["stage_s"] = time.perf_counter() - t0
    return ShardPlan(
        run_id=job.run_id,
        target=attempt.target(job.settings.row_group_users),
        scratch=str(attempt.scratch),
        index_root=str(job.store.root),
        indexes=tuple((d, i.settings) for d, i in sorted(indexes.items())),
        k=job.settings.k,
        exclude_seen=job.settings.exclude_seen,
        batch_users=job.settings.batch_users,
        threads=job.shard_threads,
        shards=shards,
        n_users=n_users,
        explain=text is not None,
    )


def history_rows(run_id: str, ingest: IngestOutputs) -> pa.Table:
    """The ingest stage's interactions as the run's history rows (PART_SCHEMAS["interactions"]): one row
    per kept interaction, its domain by name, `position` the 0-based place in the user's mixed sequence."""
    rows = ingest.table(
        "interactions", columns=["user_id", "seq_pos", "domain_idx", "item_id", "timestamp", "rating"]
    )
    domains = ingest.table("domains", columns=["domain", "domain_idx"])
    row_of = pc.index_in(rows["domain_idx"].combine_chunks(), value_set=domains["domain_idx"]).cast(
        pa.int32()
    )
    # run_id and domain as dictionaries (4 bytes a row, not the text): the part writer casts each shard's
    # rows to the part schema's strings.
    return pa.table(
        {
            "run_id": pa.DictionaryArray.from_arrays(
                pa.array(np.zeros(rows.num_rows, np.int32)), pa.array([run_id], pa.string())
            ),
            "user_id": rows["user_id"],
            "position": rows["seq_pos"],
            "domain": pa.DictionaryArray.from_arrays(row_of, domains["domain"].combine_chunks()),
            "item_id": rows["item_id"],
            "timestamp": rows["timestamp"],
            "rating": rows["rating"],
        }
    )


@step("register-night")
def register_publish(
    job: _Job, plan: PublishPlan, attempt: wh.Attempt, results: list[ShardResult]
) -> wh.PublishResult:
    """The night's parts, metrics and runs row into the warehouse file, in one atomic swap."""
    for domain in sorted(plan.domains):
        n = sum(r.short.get(domain, 0) for r in results)
        if n:
            get_logger().warning(
                "publish: %d users have fewer than k=%d eligible items in %s", n, job.settings.k, domain
            )
    recalls = [i.recall for i in plan.indexes.values() if i.recall is not None]
    record = wh.RunRecord(
        run_id=job.run_id,
        started_at=job.started_at,
        model=plan.model,
        train_run_id=job.trained.run_id if job.trained else None,
        config_hash=settings_hash(job.settings),
        inputs_hash=job.inputs_hash,
        k=job.settings.k,
        n_users=sum(r.users for r in results),
        n_items=int(job.stats.get("items", plan.items.num_rows)),
        n_interactions=job.stats.get("interactions"),
        n_domains=len(plan.domains),
        index_path=str(job.store.run_dir(job.run_id)),
        index_kind="; ".join(f"{d}: {i.settings.label()}" for d, i in sorted(plan.indexes.items())),
        index_recall=min(recalls) if recalls else None,
    )
    metrics = load_run_metrics(job.workspace, job.trained) if job.trained else None
    night = wh.Night(record, [p for r in results for p in r.parts], plan.items, metrics)
    retention = wh.Retention(job.settings.retention_runs, job.settings.retention_grace_hours)
    return wh.register_night(attempt, night, retention, job.threads, job.settings.storage_compatibility)


def _drop_old_indexes(job: _Job, result: wh.PublishResult) -> None:
    """Index folders of purged runs go with their parts (after the grace period); crashed saves too."""
    for old in result.vacuumed_runs:
        job.store.remove(old)
    job.store.clean_temporaries()


def _timings(plan: PublishPlan, results: list[ShardResult], result: wh.PublishResult) -> dict[str, float]:
    """Seconds per phase: the plan's (export, indexes, recall, staging), the shards' (summed over
    shards: search, writing parts, whole shards), the registration's (items part, copy, write, swap)."""
    return {
        **plan.timings,
        "search_s": sum(sum(r.search_s.values()) for r in results),
        "explain_s": sum(sum(r.explain_s.values()) for r in results),
        "parts_write_s": sum(r.write_s for r in results),
        "shards_s": sum(r.seconds for r in results),
        "warehouse_copy_s": result.timings.copy_s,
        "warehouse_write_s": result.timings.write_s,
        "warehouse_swap_s": result.timings.swap_s,
        **result.timings.extra,
    }


def _recall_warning(settings: PublishSettings, recall: dict[str, float]) -> str | None:
    low = {d: r for d, r in recall.items() if r < settings.index.recall_floor}
    if not low:
        return None
    warning = ", ".join(f"{d} recall@{settings.k} {r:.3f}" for d, r in low.items())
    warning += (
        f" below publish.index.recall_floor {settings.index.recall_floor}: raise ivf_nprobe / hnsw_ef_search"
    )
    get_logger().warning("publish: %s", warning)
    return warning


def _summary(
    job: _Job, plan: PublishPlan, results: list[ShardResult], result: wh.PublishResult
) -> PublishSummary:
    s = job.settings
    recall = {d: round(i.recall, 4) for d, i in sorted(plan.indexes.items()) if i.recall is not None}
    timings = _timings(plan, results, result)
    write_s = timings["parts_write_s"]
    summary = PublishSummary(
        run_id=job.run_id,
        train_run_id=job.trained.run_id if job.trained else None,
        model=plan.model,
        users=sum(r.users for r in results),
        items_per_domain={d: shape.items for d, shape in plan.domains.items()},
        k=s.k,
        rows=result.rows,
        history_rows=sum(p.rows for r in results for p in r.parts if p.kind == "interactions")
        if s.history
        else None,
        users_short={d: sum(r.short.get(d, 0) for r in results) for d in plan.domains},
        new_items=len(plan.new_ids),
        new_items_recommended=bool(plan.new_ids) and plan.new_note is None,
        new_items_note=plan.new_note,
        index_kinds={d: i.settings.label() for d, i in sorted(plan.indexes.items())},
        index_recall=recall,
        recall_warning=_recall_warning(s, recall),
        shards=len(results),
        parts=sum(len(r.parts) for r in results) + 1,
        data_bytes=result.bytes_written,
        seconds=time.perf_counter() - job.started,
        timings={k: round(v, 4) for k, v in timings.items()},
        rows_per_s=result.rows / write_s if write_s else 0.0,
        warehouse_bytes=job.warehouse.stat().st_size,
        purged_runs=result.purged_runs,
        on_gpu=any(r.on_gpu for r in results),
        warehouse=str(job.warehouse),
        data_root=job.data_root,
        index_dir=str(job.store.run_dir(job.run_id)),
    )
    kinds = ", ".join(
        f"{d} {k}" + (f" recall {recall[d]:.3f}" if d in recall else "")
        for d, k in summary.index_kinds.items()
    )
    get_logger().info(
        "publish: run %s, %s rows for %s users x %d domains, %s, in %d shards, %.1f MB of parts, in %.1f s "
        "(indexes: %s; purged %s)",
        job.run_id,
        f"{summary.rows:,}",
        f"{summary.users:,}",
        len(plan.domains),
        f"{summary.history_rows:,} history rows" if summary.history_rows is not None else "no histories",
        summary.shards,
        summary.data_bytes / 1e6,
        summary.seconds,
        kinds,
        result.purged_runs or "none",
    )
    return summary


def candidate_lists(
    settings: PublishSettings, workspace: Workspace, run_id: str, threads: int = 1
) -> pa.Table:
    """The `recommendations` rows (storage.schemas.RECOMMENDATION_ROWS: user_id, domain, rank, item_id,
    score) that `run_publish` would write for train run `run_id`, computed the same way in this process
    and written nowhere: what the quality gate compares with the published lists.

    Raises PublishError when the run or the ingest output is missing or inconsistent."""
    try:
        trained = TrainOutputs(workspace).run(run_id)
    except TrainMissing as exc:
        raise PublishError(str(exc)) from None
    job = _Job(
        settings,
        workspace,
        Path("."),
        settings.threads or threads,
        run_id,
        trained,
        "",
        IndexStore(Path(".")),
        IngestOutputs(workspace),
        {},
    )
    ranked = _ranked_inputs(job, None, None)
    n_users = len(next(iter(ranked.vectors.values())).user_ids)
    results = {}
    with progress_bar("publish: top-k", total=n_users * len(ranked.vectors), unit="user-domains") as bar:
        for domain in sorted(ranked.vectors):
            results[domain] = recommend_domain(ranked.vectors[domain], settings, lambda n: advance(bar, n))
    return recommendation_rows(results)
