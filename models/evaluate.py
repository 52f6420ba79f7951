"""Evaluation: every thread scores the same candidates, because every model scores through one user
vector and one item vector per item (their concatenation over threads).

Sampled protocol: the target against the split's fixed 100 negatives (seeded, from the target's domain,
never items the user interacted with). Full ranking: the target against every item of its domain,
leaving out the user's earlier items of that domain. Users are grouped by target domain (one item table
per domain) and sorted by length (trimmed batches).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from bridgerec.models.base import Recommender
from bridgerec.models.data import EvalSplit, _ranges, users_by_domain
from bridgerec.models.metrics import as_numpy, rank_full, rank_sampled, summarise
from torch import Tensor


@dataclass
class Ranks:
    split: str
    sampled: np.ndarray  # [U] rank of the target among the sampled candidates
    full: np.ndarray | None  # [U] rank in the whole target domain, or None


@torch.no_grad()
def evaluate(
    model: Recommender, split: EvalSplit, batch_size: int, full: bool, device: torch.device | str = "cpu"
) -> Ranks:
    model.eval()
    U = split.inputs.shape[0]
    sampled = np.zeros(U, np.int64)
    full_ranks = np.zeros(U, np.int64) if full else None
    ex_offsets = np.searchsorted(split.exclude_users, np.arange(U + 1))
    lengths = (split.inputs > 0).sum(1)
    for d, users in enumerate(users_by_domain(split.target_domain, model.n_domains)):
        if not len(users):
            continue
        items = model.item_vectors(d)  # [n_d + 1, D]
        users = users[torch.argsort(lengths[users], stable=True)]
        for chunk in torch.split(users, batch_size):
            u = model.user_vectors(split.inputs[chunk].to(device), d)  # [B, D]
            cand = split.candidates[chunk].to(device)  # [B, 1 + n]
            scores = (items[cand] * u.unsqueeze(1)).sum(-1)  # [B, 1 + n]
            sampled[chunk.numpy()] = as_numpy(rank_sampled(scores))
            if full_ranks is not None:
                full_ranks[chunk.numpy()] = as_numpy(
                    _full_rank(u, items, cand[:, 0], chunk, split, ex_offsets)
                )
    return Ranks(split.name, sampled, full_ranks)


def _full_rank(
    u: Tensor, items: Tensor, target: Tensor, chunk: Tensor, split: EvalSplit, ex_offsets: np.ndarray
) -> Tensor:
    scores = u @ items.T  # [B, n_d + 1]
    scores[:, 0] = -torch.inf  # padding row
    b = chunk.numpy()
    counts = ex_offsets[b + 1] - ex_offsets[b]
    idx = np.repeat(ex_offsets[b], counts) + _ranges(counts)
    rows = torch.from_numpy(np.repeat(np.arange(len(b)), counts)).to(scores.device)
    cols = torch.from_numpy(split.exclude_items[idx]).to(scores.device)
    earlier = cols != target[rows]  # a repeat of the target stays in
    scores[rows[earlier], cols[earlier]] = -torch.inf
    return rank_full(scores, target)


def metric_rows(ranks: Ranks, split: EvalSplit, domains: list[str]) -> list[dict]:
    """Long-format rows: protocol x group x metric, for overall, each target domain and user groups."""
    groups: dict[str, np.ndarray] = {"overall": np.ones(len(ranks.sampled), bool)}
    tdom = split.target_domain.numpy()
    for d, name in enumerate(domains):
        groups[f"domain:{name}"] = tdom == d
    for name, mask in split.groups.items():
        groups[name] = mask.numpy()
    rows = []
    for protocol, r in (("sampled", ranks.sampled), ("full", ranks.full)):
        if r is None:
            continue
        for group, mask in groups.items():
            for metric, value in summarise(r[mask]).items():
                rows.append(
                    {
                        "split": ranks.split,
                        "protocol": protocol,
                        "group": group,
                        "metric": metric,
                        "value": value,
                        "users": int(mask.sum()),
                    }
                )
    return rows


def headline(rows: list[dict], domains: list[str]) -> dict:
    """The CLI's `test` object: overall and per domain hr@10/ndcg@10, sampled, plus the same under `full`."""

    def pick(protocol: str, group: str) -> dict[str, float]:
        found = {r["metric"]: r["value"] for r in rows if r["protocol"] == protocol and r["group"] == group}
        return {
            k: found.get(k, float("nan")) for k in ("hr@5", "ndcg@5", "hr@10", "ndcg@10", "hr@20", "ndcg@20")
        }

    out: dict = {"overall": pick("sampled", "overall")}
    for name in domains:
        out[name] = pick("sampled", f"domain:{name}")
    if any(r["protocol"] == "full" for r in rows):
        out["full"] = {"overall": pick("full", "overall")} | {n: pick("full", f"domain:{n}") for n in domains}
    return out
