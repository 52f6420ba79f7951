"""Why an item is on a user's list: the item of the user's own history closest to it in the model's
text space, how close (`because_item_id`, `because_score` of the recommendations), and how much closer
that is than chance for this user (`because_percentile`).

The text space is the one LLM4CDSR scores items in: its frozen LLM item table `E_all` (the global
embeddings of enrich, saved with the run's weights), rows L2-normalised, so closeness is the cosine
similarity cos(r, h) = <e_r, e_h> / (|e_r| |e_h|), in [-1, 1]. For a recommended item r of user u:

    because(u, r) = argmax_{h in history(u)} cos(r, h),   because_score(u, r) = max_{h in history(u)} cos(r, h)

over the user's whole history in every domain (a kitchen item can be explained by a food item), items
whose embedding failed (zero rows) left out. It explains by content similarity, not by the model's
attention: the closest thing the user had, which is what a reader of the list can check.

A raw cosine is hard to read: item texts share a template (two random food-kitchen items: 0.52 at the
median), and the maximum over a long history is high by chance alone. So each score is also placed
among a reference sample R of the domain's items (REFERENCE_ITEMS of them, drawn once per run and
domain), each scored the same way against the same user's history:

    because_percentile(u, r) = 100 * (|{s in R : c(s) < c(r)}| + |{s in R : c(s) = c(r)}| / 2) / |R|,
    c(x) = max_{h in history(u)} cos(x, h)

(the mid-rank percentile: ties, such as a reference item the user had, whose c is 1, count half; equal
means within TIE of each other, float32's rounding of one cosine computed two ways); about 50 for an item no closer to the user's history than a typical item of the domain, 100 for one
closer than every reference item: the score's percentile rank in an empirical null distribution of the
same statistic (the user's closest history item) for items of the domain drawn at random.

Computed per shard and domain right after the top-k search, vectorised in batches of users: the
recommended vectors [B, k, d] times the padded history vectors [B, H, d] -> [B, k, H] similarities, one
matmul per batch, argmax over H, and the same histories against the reference vectors [M, d] in one
GEMM -> [B, H, M], max over H; users go in order of history length (a batch pads to about its own
length) and batches are cut so that the B x H gathered history vectors stay under BATCH_BYTES (64 MB).
Models without a text space (pop, whose reason is popularity; sasrec) get NULL in the three columns.
"""

from __future__ import annotations

import numpy as np

# The history vectors gathered per batch, B users x H (their longest history) x d float32: at most this
# many bytes (43,690 rows of 384-d MiniLM vectors).
BATCH_BYTES = 64 << 20

# Items of a domain each score is placed among (`because_percentile`): its resolution is 100 / this.
REFERENCE_ITEMS = 64
# Cosines this close count as equal in the percentile (float32 rounding, not closeness).
TIE = 1e-5


def reference_sample(rows: np.ndarray, has_text: np.ndarray, seed: int) -> np.ndarray:
    """REFERENCE_ITEMS of a domain's global `rows` that have text (all of them where there are fewer),
    drawn without replacement with `seed`, sorted: the same sample for every user of the run."""
    usable = np.unique(rows[has_text[rows]])
    if len(usable) <= REFERENCE_ITEMS:
        return usable
    return np.sort(np.random.default_rng(seed).choice(usable, REFERENCE_ITEMS, replace=False))


def closest_in_history(
    rec_rows: np.ndarray,
    history_indptr: np.ndarray,
    history_items: np.ndarray,
    vectors: np.ndarray,
    has_text: np.ndarray,
    reference: np.ndarray | None = None,
    slots: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every recommended item, the user's history item with the highest cosine similarity.

    rec_rows: int64 [U, k], global rows of the recommended items (-1: no item at that rank);
    history_indptr: int64 [U + 1] and history_items: int64 [nnz] (global rows), the users' histories
    in the same user order; vectors: float32 [N, d] unit rows (zero rows where has_text [N] is False).
    reference: int64 [M] global rows of the domain's reference items (`reference_sample`), or None.
    Returns (because_rows int64 [U, k], -1 where there is no explanation: no item, an item without
    text, or no history item with text; because_scores float32 [U, k], NaN there; because_percentiles
    float32 [U, k] in [0, 100], NaN there and everywhere without a reference). `slots`: history rows
    per batch (default: what fits BATCH_BYTES)."""
    n_users, k = rec_rows.shape
    slots = slots or max(1, BATCH_BYTES // (4 * max(vectors.shape[1], 1)))
    # Users in order of history length, so a batch pads its histories to about their own length.
    lengths = np.diff(history_indptr)
    order = np.argsort(lengths, kind="stable")
    starts = history_indptr[:-1][order]
    indptr = np.zeros(n_users + 1, np.int64)
    np.cumsum(lengths[order], out=indptr[1:])
    items = history_items[np.repeat(starts - indptr[:-1], lengths[order]) + np.arange(indptr[-1])]
    recs = rec_rows[order]
    rows = np.full((n_users, k), -1, np.int64)
    scores = np.full((n_users, k), np.nan, np.float32)
    percentiles = np.full((n_users, k), np.nan, np.float32)
    if reference is not None and len(reference) == 0:
        reference = None
    for start, stop in _batches(lengths[order], slots):
        batch = _explain_batch(recs, indptr, items, vectors, has_text, reference, start, stop)
        if batch is not None:
            rows[start:stop], scores[start:stop], percentiles[start:stop] = batch
    out = np.empty_like(rows), np.empty_like(scores), np.empty_like(percentiles)
    out[0][order], out[1][order], out[2][order] = rows, scores, percentiles
    return out


def _batches(lengths: np.ndarray, slots: int) -> list[tuple[int, int]]:
    """Consecutive user ranges [start, stop) whose size x longest history stays within `slots` (a user
    whose history alone is longer gets a batch of their own)."""
    out: list[tuple[int, int]] = []
    start, longest = 0, 0
    for u, n in enumerate(lengths.tolist()):
        if u > start and (u - start + 1) * max(longest, n) > slots:
            out.append((start, u))
            start, longest = u, 0
        longest = max(longest, n)
    if start < len(lengths):
        out.append((start, len(lengths)))
    return out


def _explain_batch(
    rec_rows: np.ndarray,
    indptr: np.ndarray,
    items: np.ndarray,
    vectors: np.ndarray,
    has_text: np.ndarray,
    reference: np.ndarray | None,
    start: int,
    stop: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Users [start, stop): their (rows, scores, percentiles) [B, k], None when none has a history."""
    lengths = np.diff(indptr[start : stop + 1])
    width = int(lengths.max()) if len(lengths) else 0
    if width == 0:
        return None
    # Padded history [B, H] of global rows; padding points at row 0 and is masked out below.
    position = np.arange(width)[None, :]
    present = position < lengths[:, None]  # [B, H]
    gather = np.where(present, indptr[start:stop, None] + position, 0)
    history = np.where(present, items[np.minimum(gather, max(len(items) - 1, 0))], 0)  # [B, H]
    usable = present & has_text[history]  # [B, H]
    recs = rec_rows[start:stop]  # [B, k]
    explainable = (recs >= 0) & has_text[np.maximum(recs, 0)]  # [B, k]
    gathered = vectors[history]  # [B, H, d]
    sims = vectors[np.maximum(recs, 0)] @ gathered.transpose(0, 2, 1)  # [B, k, H]
    sims[~np.broadcast_to(usable[:, None, :], sims.shape)] = -np.inf
    best = sims.argmax(axis=2)  # [B, k]
    best_score = np.take_along_axis(sims, best[:, :, None], axis=2)[:, :, 0]
    ok = explainable & np.isfinite(best_score)
    rows = np.where(ok, np.take_along_axis(history, best, axis=1), -1)
    scores = np.where(ok, best_score, np.nan).astype(np.float32)
    percentiles = np.full(scores.shape, np.nan, np.float32)
    if reference is not None:
        # Each reference item against the same histories, as one GEMM [B * H, d] x [d, M] (not B small
        # ones: the same reference rows serve every user).
        batch, width, dim = gathered.shape
        null = (gathered.reshape(batch * width, dim) @ vectors[reference].T).reshape(batch, width, -1)
        null[~np.broadcast_to(usable[:, :, None], null.shape)] = -np.inf
        closest = null.max(axis=1)  # [B, M]
        gap = closest[:, None, :] - best_score[:, :, None]  # [B, k, M]
        rank = (gap < -TIE).mean(axis=2) + 0.5 * (np.abs(gap) <= TIE).mean(axis=2)  # [B, k]
        percentiles = np.where(ok, 100 * rank, np.nan).astype(np.float32)
    return rows, scores, percentiles
