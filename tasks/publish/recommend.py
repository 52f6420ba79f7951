"""Top-k per user and domain from DomainVectors through FAISS, flattened into the `recommendations` rows.

Plain functions: vectors in, an index and an Arrow table out. No file is touched here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bridgerec.storage.index_store import Searcher, TopK, build_index, search_topk
from bridgerec.storage.schemas import RECOMMENDATION_ROWS
from bridgerec.storage.vectors import DomainVectors
from bridgerec.tasks.publish.settings import PublishSettings


@dataclass
class DomainTopK:
    domain: str
    vectors: DomainVectors
    index: faiss.Index  # CPU form, saved with the run
    topk: TopK  # rows line up with vectors.user_ids
    on_gpu: bool
    build_s: float
    search_s: float


def recommend_domain(
    vectors: DomainVectors, settings: PublishSettings, on_batch: Callable[[int], None] | None = None
) -> DomainTopK:
    """Build the domain's index and search the top-k of every user in it."""
    t0 = time.perf_counter()
    index = build_index(vectors.item_vectors, settings.index)
    searcher = Searcher.for_index(index, settings.index)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    topk = search_topk(
        searcher,
        vectors.user_vectors,
        settings.k,
        vectors.seen_indptr if settings.exclude_seen else None,
        vectors.seen_items if settings.exclude_seen else None,
        batch_users=settings.batch_users,
        on_batch=on_batch,
    )
    return DomainTopK(
        vectors.domain, vectors, index, topk, searcher.on_gpu, build_s, time.perf_counter() - t0
    )


def without_items(vectors: DomainVectors, leave_out: set[str]) -> DomainVectors:
    """The same vectors without the item rows in `leave_out`; the seen-item rows are renumbered
    (a left-out item must not be a seen one: it is only used for items nobody interacted with)."""
    drop = np.fromiter((i in leave_out for i in vectors.item_ids), bool, len(vectors.item_ids))
    if not drop.any():
        return vectors
    if drop[vectors.seen_items].any():
        raise ValueError(f"domain {vectors.domain!r}: an item to leave out was seen by a user")
    new_row = np.cumsum(~drop) - 1  # old row -> new row, for the rows kept
    return DomainVectors(
        vectors.domain,
        vectors.user_ids,
        vectors.user_vectors,
        [i for i, d in zip(vectors.item_ids, drop, strict=True) if not d],
        vectors.item_vectors[~drop],
        vectors.seen_indptr,
        new_row[vectors.seen_items],
    )


def recommendation_rows(results: Mapping[str, DomainTopK]) -> pa.Table:
    """One row per (user, domain, rank), sorted by user_id, domain, rank (fast per-user lookups).

    Users with fewer than k eligible items in a domain get fewer rows there; every domain must cover
    the same users.
    """
    domains = sorted(results)
    ref = results[domains[0]].vectors.user_ids
    users = pa.array(ref, pa.string())
    n_users, k = len(ref), results[domains[0]].topk.items.shape[1]
    # items[u, d, r] = index into the concatenation of every domain's item_ids; -1 = no row.
    items = np.full((n_users, len(domains), k), -1, dtype=np.int64)
    scores = np.zeros((n_users, len(domains), k), dtype=np.float32)
    item_ids: list[str] = []
    for d, name in enumerate(domains):
        res = results[name]
        if len(res.vectors.user_ids) != n_users:
            raise ValueError(
                f"domain {name!r} covers {len(res.vectors.user_ids)} users, {domains[0]!r} {n_users}"
            )
        # Align this domain's user rows to the reference order.
        pos = pc.index_in(users, value_set=pa.array(res.vectors.user_ids, pa.string()))
        if pos.null_count:
            raise ValueError(f"domain {name!r} lacks {pos.null_count} users of domain {domains[0]!r}")
        rows = pos.to_numpy()
        got = res.topk.items[rows]  # [U, k]
        items[:, d, :] = np.where(got >= 0, got + len(item_ids), -1)
        scores[:, d, :] = np.nan_to_num(res.topk.scores[rows])
        item_ids.extend(res.vectors.item_ids)
    by_id = np.asarray(pc.array_sort_indices(users))  # users sorted by source id
    items, scores = items[by_id], scores[by_id]
    keep = (items >= 0).ravel()
    user_rows = np.repeat(by_id, len(domains) * k)[keep]
    domain_idx = np.tile(np.repeat(np.arange(len(domains), dtype=np.int32), k), n_users)[keep]
    rank = np.tile(np.arange(1, k + 1, dtype=np.int16), n_users * len(domains))[keep]
    return pa.table(
        {
            "user_id": users.take(pa.array(user_rows)),
            "domain": pa.array(domains, pa.string()).take(pa.array(domain_idx)),
            "rank": pa.array(rank),
            "item_id": pa.array(item_ids, pa.string()).take(pa.array(items.ravel()[keep])),
            "score": pa.array(scores.ravel()[keep]),
        },
        schema=RECOMMENDATION_ROWS,
    )
