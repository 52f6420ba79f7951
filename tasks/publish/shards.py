"""Publish scoring in user shards: plain functions that a runner maps over workers.

The plan (`stage_shards`) writes what every shard loads into the attempt's scratch folder: per domain the
user vectors and seen items in one user order (sorted by user_id), and per shard its user ids,
profiles and histories. `score_shard(plan, shard)` then loads each domain's FAISS index (saved with the run) and its
slice of the vectors once, searches its users' top-k, and writes its own parts: per domain the
recommendations (sorted by user, rank) and the serving lists, and its users' profiles and histories. It returns what
it wrote; nothing is visible until the publish registers the night.

The shard function takes only picklable plain values and reads only files, so a runner
(bridgerec.runtime.runner: `map(fn, shards, *args)` calls `fn(*args, shard)`) can run it anywhere that
sees the scratch folder, the index folder and the data root (a shared folder or S3): `InProcess` runs the
shards one after another here, the flows run each as a task run (`runtime.runner: processes` on worker
processes), and a Ray runner maps the same function over a cluster. A shard is idempotent (it rewrites
the same part names), so a retried shard task replaces what a failed attempt of it wrote.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bridgerec.runtime.progress import advance, progress_bar
from bridgerec.runtime.runner import shard_size, step
from bridgerec.storage.index_store import IndexSettings, IndexStore, Searcher, TopK, search_topk, set_threads
from bridgerec.storage.vectors import DomainVectors, TextSpace
from bridgerec.storage.warehouse import PartInfo, PartTarget, profile_rows
from bridgerec.tasks.publish.explain import closest_in_history, reference_sample


@dataclass(frozen=True)
class PublishShard:
    """Users [start, stop) of the night's users sorted by user_id."""

    index: int
    start: int
    stop: int


@dataclass(frozen=True)
class ShardPlan:
    """Everything a shard needs, as plain values (sent to workers as is)."""

    run_id: str
    target: PartTarget  # where parts go (data root, run, attempt)
    scratch: str  # staged inputs (stage_shards)
    index_root: str  # IndexStore root holding the run's saved indexes
    indexes: tuple[tuple[str, IndexSettings], ...]  # per domain, the resolved index settings
    k: int
    exclude_seen: bool
    batch_users: int
    threads: int
    shards: tuple[PublishShard, ...]
    n_users: int
    explain: bool = False  # the text space is staged (text/): fill the because_* columns


@dataclass
class ShardResult:
    shard: int
    users: int
    parts: list[PartInfo]
    short: dict[str, int]  # per domain: users with fewer than k eligible items
    search_s: dict[str, float]
    write_s: float
    seconds: float
    on_gpu: bool = False
    rows: int = field(default=0)
    explain_s: dict[str, float] = field(default_factory=dict)  # per domain: finding the because items


def _sorted_order(user_ids: list[str]) -> np.ndarray:
    return np.asarray(pc.sort_indices(pa.array(user_ids, pa.string())))


def _permute_csr(indptr: np.ndarray, items: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The CSR rows in `order` (new row r = old row order[r])."""
    counts = np.diff(indptr)[order]
    new_indptr = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(counts, out=new_indptr[1:])
    gather = np.repeat(indptr[:-1][order] - new_indptr[:-1], counts) + np.arange(new_indptr[-1])
    return new_indptr, items[gather]


def stage_shards(
    scratch: Path,
    vectors: Mapping[str, DomainVectors],
    profiles: pa.Table | None,
    run_id: str,
    users_per_shard: int,
    text: TextSpace | None = None,
    slots: int = 1,
    history: pa.Table | None = None,
) -> tuple[tuple[PublishShard, ...], int]:
    """Write the shards' inputs under `scratch`; return the shards (of `users_per_shard` users, fewer where
    that leaves fewer than `slots` shards) and the number of users.

    Per domain: user_vectors.npy (float32 [U, d]), seen_indptr.npy, seen_items.npy, rows in user_id
    order; users/<shard>.parquet (user_id); profiles/<shard>.parquet (profile part rows) when profiles
    are given. With a text space (explanations, tasks/publish/explain.py): text/vectors.npy,
    text/has_text.npy, text/item_ids.parquet (by global row), text/history_indptr.npy and
    text/history_items.npy (user_id order), and per domain text_rows.npy (index row -> global row) and
    reference_rows.npy (the global rows of its reference items, tasks/publish/explain.py).
    With a history (interactions part rows, PART_SCHEMAS["interactions"]): history/<shard>.parquet, its
    users' rows sorted by user then position (rows of users without vectors are not published).
    Every domain must cover the same users (publish checks this against the ingest output).
    """
    first = next(iter(vectors.values()))
    order = _sorted_order(first.user_ids)
    users = pa.array(first.user_ids, pa.string()).take(pa.array(order))
    for domain, v in vectors.items():
        own = order if v.user_ids is first.user_ids else _align(users, v.user_ids)
        folder = scratch / domain
        folder.mkdir(parents=True)
        np.save(folder / "user_vectors.npy", np.ascontiguousarray(v.user_vectors[own]))
        indptr, items = _permute_csr(v.seen_indptr, v.seen_items, own)
        np.save(folder / "seen_indptr.npy", indptr)
        np.save(folder / "seen_items.npy", items)
    n = len(users)
    size = shard_size(n, users_per_shard, slots)
    shards = tuple(PublishShard(i, start, min(start + size, n)) for i, start in enumerate(range(0, n, size)))
    (scratch / "users").mkdir()
    for s in shards:
        pq.write_table(
            pa.table({"user_id": users[s.start : s.stop]}), scratch / "users" / f"{s.index:05d}.parquet"
        )
    if profiles is not None and profiles.num_rows:
        _stage_by_shard(scratch / "profiles", profile_rows(run_id, profiles), users, shards)
    if text is not None:
        _stage_text(scratch, text, vectors, users)
    if history is not None:
        _stage_by_shard(scratch / "history", history, users, shards, within="position")
    return shards, n


def _stage_text(
    scratch: Path, text: TextSpace, vectors: Mapping[str, DomainVectors], users: pa.Array
) -> None:
    folder = scratch / "text"
    folder.mkdir()
    np.save(folder / "vectors.npy", text.vectors)
    np.save(folder / "has_text.npy", text.has_text)
    pq.write_table(pa.table({"item_id": pa.array(text.item_ids, pa.string())}), folder / "item_ids.parquet")
    indptr, items = _permute_csr(text.history_indptr, text.history_items, _align(users, text.user_ids))
    np.save(folder / "history_indptr.npy", indptr)
    np.save(folder / "history_items.npy", items)
    everything = pa.array(text.item_ids, pa.string())
    for domain, v in vectors.items():
        rows = pc.index_in(pa.array(v.item_ids, pa.string()), value_set=everything)
        if rows.null_count:
            raise ValueError(f"{rows.null_count} items of domain {domain!r} are not in the run's text space")
        rows = np.asarray(rows).astype(np.int64)
        np.save(scratch / domain / "text_rows.npy", rows)
        reference = reference_sample(rows, text.has_text, seed=zlib.crc32(domain.encode()))
        np.save(scratch / domain / "reference_rows.npy", reference)


def _align(users: pa.Array, user_ids: list[str]) -> np.ndarray:
    pos = pc.index_in(users, value_set=pa.array(user_ids, pa.string()))
    if pos.null_count:
        raise ValueError(f"{pos.null_count} users lack vectors in a domain")
    return np.asarray(pos)


def _stage_by_shard(
    folder: Path, rows: pa.Table, users: pa.Array, shards: tuple[PublishShard, ...], within: str | None = None
) -> None:
    """Cut per-user part rows (profiles, histories) by shard: a row goes to the shard holding its user's
    place in `users`, as `folder/<shard>.parquet`, rows in user order (then by the column `within`, if
    given). Rows of users not in `users` (no vectors: no longer in the data) are not published."""
    place = pc.index_in(rows["user_id"], value_set=users)
    if place.null_count:
        rows = rows.filter(pc.is_valid(place))
        place = pc.drop_null(place)
    place = np.asarray(place)
    # Ingest writes its interactions in this order already: then no copy (the whole table is in memory).
    step = np.diff(place)
    ordered = (step > 0) | ((step == 0) & (np.diff(rows[within].to_numpy()) > 0)) if within else step >= 0
    if not ordered.all():
        order = np.lexsort((rows[within].to_numpy(), place)) if within else np.argsort(place, kind="stable")
        rows, place = rows.take(pa.array(order)), place[order]
    bounds = np.searchsorted(place, [s.start for s in shards] + [len(users)])
    folder.mkdir()
    for s, lo, hi in zip(shards, bounds[:-1], bounds[1:], strict=True):
        if hi > lo:
            pq.write_table(rows.slice(lo, hi - lo), folder / f"{s.index:05d}.parquet")


@step("score-users", run_name="score-users-{shard.index}", retries=1, retry_delay_s=10)
def score_shard(plan: ShardPlan, shard: PublishShard) -> ShardResult:
    """Top-k of the shard's users in every domain, written as the shard's parts (see the module doc)."""
    started = time.perf_counter()
    set_threads(plan.threads)
    scratch = Path(plan.scratch)
    users = pq.read_table(scratch / "users" / f"{shard.index:05d}.parquet")["user_id"].combine_chunks()
    result = ShardResult(shard.index, len(users), [], {}, {}, 0.0, 0.0)
    total = len(users) * len(plan.indexes)
    with progress_bar(
        f"publish: shard {shard.index + 1}/{len(plan.shards)}", total=total, unit="user-domains"
    ) as bar:
        for domain, settings in plan.indexes:
            _score_domain(plan, shard, scratch, users, domain, settings, result, lambda n: advance(bar, n))
    for folder, kind in (("profiles", "user_profiles"), ("history", "interactions")):
        staged = scratch / folder / f"{shard.index:05d}.parquet"
        if staged.exists():
            t0 = time.perf_counter()
            result.parts.append(plan.target.write(pq.read_table(staged), kind, shard.index))
            result.write_s += time.perf_counter() - t0
    result.seconds = time.perf_counter() - started
    return result


def _score_domain(
    plan: ShardPlan,
    shard: PublishShard,
    scratch: Path,
    users: pa.Array,
    domain: str,
    settings: IndexSettings,
    result: ShardResult,
    on_batch: Callable[[int], None],
) -> None:
    """One domain of a shard: its index and vector slice loaded once, the top-k searched, two parts."""
    t0 = time.perf_counter()
    loaded = IndexStore(plan.index_root).load(plan.run_id, domain)
    searcher = Searcher.for_index(loaded.index, settings)
    vectors = np.load(scratch / domain / "user_vectors.npy", mmap_mode="r")[shard.start : shard.stop]
    indptr, items = None, None
    if plan.exclude_seen:
        full = np.load(scratch / domain / "seen_indptr.npy", mmap_mode="r")
        indptr = np.asarray(full[shard.start : shard.stop + 1])
        items = np.asarray(
            np.load(scratch / domain / "seen_items.npy", mmap_mode="r")[indptr[0] : indptr[-1]]
        )
        indptr = indptr - indptr[0]
    topk = search_topk(searcher, np.asarray(vectors), plan.k, indptr, items, plan.batch_users, on_batch)
    result.search_s[domain] = time.perf_counter() - t0
    result.on_gpu |= searcher.on_gpu
    result.short[domain] = int(((topk.items >= 0).sum(axis=1) < plan.k).sum())
    because = None
    if plan.explain:
        t0 = time.perf_counter()
        because = _because(scratch, shard, domain, topk)
        result.explain_s[domain] = time.perf_counter() - t0
    t0 = time.perf_counter()
    recs, serving = domain_rows(
        plan.run_id, domain, users, topk, pa.array(loaded.item_ids, pa.string()), because
    )
    result.parts.append(plan.target.write(recs, "recommendations", shard.index, domain))
    result.parts.append(plan.target.write(serving, "serving", shard.index, domain))
    result.rows += recs.num_rows
    result.write_s += time.perf_counter() - t0


def _because(scratch: Path, shard: PublishShard, domain: str, topk: TopK) -> Because:
    """The shard's explanations in `domain` (tasks/publish/explain.py) from the staged text space."""
    text = scratch / "text"
    vectors = np.load(text / "vectors.npy", mmap_mode="r")
    has_text = np.load(text / "has_text.npy")
    full = np.load(text / "history_indptr.npy", mmap_mode="r")
    indptr = np.asarray(full[shard.start : shard.stop + 1])
    items = np.asarray(np.load(text / "history_items.npy", mmap_mode="r")[indptr[0] : indptr[-1]])
    text_rows = np.load(scratch / domain / "text_rows.npy")
    reference = np.load(scratch / domain / "reference_rows.npy")
    rec_rows = np.where(topk.items >= 0, text_rows[np.maximum(topk.items, 0)], -1)
    rows, scores, percentiles = closest_in_history(
        rec_rows, indptr - indptr[0], items, np.asarray(vectors), has_text, reference
    )
    item_ids = pq.read_table(text / "item_ids.parquet")["item_id"].combine_chunks()
    return Because(rows, scores, percentiles, item_ids)


@dataclass(frozen=True)
class Because:
    """Explanations of one domain's top-k: global rows [U, k] (-1 none), cosines [U, k] (NaN none) of
    the closest history items and their percentiles [U, k] among the domain's reference items, and the
    item ids by global row."""

    rows: np.ndarray
    scores: np.ndarray
    percentiles: np.ndarray
    item_ids: pa.Array


def domain_rows(
    run_id: str, domain: str, users: pa.Array, topk: TopK, item_ids: pa.Array, because: Because | None = None
) -> tuple[pa.Table, pa.Table]:
    """(recommendation rows, serving rows) of one domain: rows in user order then rank (users given
    sorted); the serving row of a user holds their item ids and scores best first. A user with fewer
    than k eligible items gets fewer rows (and shorter lists). `because`: the explanation columns
    (NULL without)."""
    valid = topk.items >= 0  # [U, k]; search_topk puts the missing ones last
    counts = valid.sum(axis=1)
    k = topk.items.shape[1]
    flat_items = item_ids.take(pa.array(topk.items[valid]))
    flat_scores = pa.array(topk.scores[valid], pa.float32())
    n = int(counts.sum())
    recs = pa.table(
        {
            "run_id": _repeat(run_id, n),
            "user_id": users.take(pa.array(np.repeat(np.arange(len(users)), counts))),
            "domain": _repeat(domain, n),
            "rank": pa.array(np.tile(np.arange(1, k + 1, dtype=np.int16), len(users))[valid.ravel()]),
            "item_id": flat_items,
            "score": flat_scores,
            **_because_columns(because, valid, n),
        }
    )
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    serving = pa.table(
        {
            "run_id": _repeat(run_id, len(users)),
            "user_id": users,
            "domain": _repeat(domain, len(users)),
            "item_ids": pa.ListArray.from_arrays(offsets, flat_items),
            "scores": pa.ListArray.from_arrays(offsets, flat_scores),
        }
    )
    return recs, serving


def _because_columns(because: Because | None, valid: np.ndarray, n: int) -> dict[str, pa.Array]:
    if because is None:
        return {
            "because_item_id": pa.nulls(n, pa.string()),
            "because_score": pa.nulls(n, pa.float32()),
            "because_percentile": pa.nulls(n, pa.float32()),
        }
    rows, scores, percentiles = because.rows[valid], because.scores[valid], because.percentiles[valid]
    missing = rows < 0
    return {
        "because_item_id": because.item_ids.take(pa.array(np.maximum(rows, 0), mask=missing)),
        "because_score": pa.array(scores, pa.float32(), mask=missing),
        "because_percentile": pa.array(percentiles, pa.float32(), mask=missing | np.isnan(percentiles)),
    }


def _repeat(value: str, n: int) -> pa.Array:
    return pa.array([value], pa.string()).take(pa.array(np.zeros(n, dtype=np.int32)))
