"""Ranking metrics. A rank is 0-based: the number of competing items scored at least as high as the
positive (ties count against the positive, so a model that scores everything equal gets no credit).
A NaN score counts against the positive too (a NaN positive ranks last), so a rank is never negative
and no metric of a broken model is better than chance; `evaluate` also counts the users whose scores
were not finite, which the trainer treats as divergence."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

CUTOFFS = (5, 10, 20)


def _at_least(scores: Tensor, positive: Tensor) -> Tensor:
    """[B, n] whether each score competes with the positive [B, 1]: >= it, or either is NaN."""
    return (scores >= positive) | scores.isnan() | positive.isnan()


def rank_sampled(scores: Tensor) -> Tensor:
    """scores: [B, 1 + n], column 0 the positive, absent candidates -inf -> [B] its rank among the
    negatives."""
    return (_at_least(scores[:, 1:], scores[:, :1]) & (scores[:, 1:] > -torch.inf)).sum(1)


def rank_full(scores: Tensor, target: Tensor) -> Tensor:
    """scores: [B, n] over every item (excluded ones set to -inf), target: [B] column -> [B] rank."""
    t = scores.gather(1, target[:, None])  # [B, 1]
    return _at_least(scores, t).sum(1) - 1  # minus the target itself


def hit_rate(ranks: np.ndarray, k: int) -> float:
    return float((ranks < k).mean()) if len(ranks) else float("nan")


def ndcg_per_user(ranks: np.ndarray, k: int) -> np.ndarray:
    """[U] each user's NDCG@k with one relevant item: 1 / log2(rank + 2) if it is in the top k, else 0
    (ranks 0-based); for paired comparisons of two models on the same users."""
    return np.where(ranks < k, 1.0 / np.log2(ranks.astype(np.float64) + 2.0), 0.0)


def ndcg(ranks: np.ndarray, k: int) -> float:
    """NDCG@k with one relevant item, the mean of `ndcg_per_user`."""
    if not len(ranks):
        return float("nan")
    return float(ndcg_per_user(ranks, k).mean())


def ndcg_standard_error(ranks: np.ndarray, k: int) -> float:
    """The standard error of `ndcg` over these users: the sample standard deviation of their NDCG@k
    (`ndcg_per_user`) over sqrt(U), the spread of the mean over users drawn alike; NaN with fewer than 2."""
    if len(ranks) < 2:
        return float("nan")
    return float(ndcg_per_user(ranks, k).std(ddof=1) / np.sqrt(len(ranks)))


def summarise(ranks: np.ndarray, cutoffs: tuple[int, ...] = CUTOFFS) -> dict[str, float]:
    """{'hr@5': ..., 'ndcg@5': ..., ...} for one set of users."""
    out: dict[str, float] = {}
    for k in cutoffs:
        out[f"hr@{k}"] = hit_rate(ranks, k)
        out[f"ndcg@{k}"] = ndcg(ranks, k)
    return out


def as_numpy(ranks: Tensor) -> np.ndarray:
    return ranks.detach().to("cpu", torch.int64).numpy()
