"""Training objectives, shared by every neural model.

A model turns a batch into `Targets`, one group per target domain d: the user-side vector at every
training position whose next item (the target) is in d, the target's local id, and one negative local id
per target. The score of item i at a position is `users . item_rows(d, i)`, the same dot product the
evaluation and the export use. The objective then compares the target's score with other items of d:

- `bce`: binary cross-entropy, target -> 1, its one negative (uniform over d, not in the user's history)
  -> 0 (SASRec, Kang & McAuley 2018; the LLM4CDSR paper).
- `sampled_softmax`: softmax cross-entropy over the target and K negatives of d shared by the whole batch
  (`SharedNegatives`), drawn uniformly or by popularity; every logit is corrected by `- log(K q(i))`
  (the logQ correction, Bengio & Senecal 2008; Yi et al., RecSys 2019), so popularity-drawn negatives
  estimate the full softmax; a negative equal to the target (an accidental hit) is masked out.
- `ce`: softmax cross-entropy over every item of d (full softmax, Klenitskiy & Vasilev, RecSys 2023).

Each returns the *sum* over positions; `objective_loss` divides by the number of positions of the batch.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from bridgerec.models.batch import Batch, SharedNegatives, Targets
from bridgerec.models.config import ModelConfig


class ItemSide(Protocol):
    """What an objective needs of a model: its config, domain sizes and differentiable item rows
    (`Recommender` is one)."""

    config: ModelConfig
    sizes: list[int]

    def item_rows(self, domain: int, lids: Tensor) -> Tensor: ...

    def per_thread_rows(self, domain: int, mixed_gids: Tensor, lids: Tensor) -> Tensor: ...


def bce_sum(users: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
    """users, pos, neg: [P, D] -> sum over P of -log sigmoid(u.pos) - log(1 - sigmoid(u.neg))."""
    s_pos, s_neg = (users * pos).sum(-1), (users * neg).sum(-1)
    return F.softplus(-s_pos).sum() + F.softplus(s_neg).sum()


def sampled_softmax_sum(
    users: Tensor, pos: Tensor, negs: Tensor, pos_log_q: Tensor, neg_log_q: Tensor, hits: Tensor
) -> Tensor:
    """users, pos: [P, D]; negs: [K, D]; pos_log_q: [P]; neg_log_q: [K]; hits: [P, K] bool (negative ==
    target) -> sum over P of -log softmax([u.pos - logq_pos, u.negs - logq_negs])[0]."""
    s_pos = (users * pos).sum(-1) - pos_log_q  # [P]
    s_neg = (users @ negs.T - neg_log_q).masked_fill(hits, -torch.inf)  # [P, K]
    logits = torch.cat([s_pos[:, None], s_neg], 1)  # [P, 1 + K]
    return (torch.logsumexp(logits, 1) - s_pos).sum()


def full_softmax_sum(users: Tensor, items: Tensor, targets: Tensor) -> Tensor:
    """users: [P, D]; items: [n, D] every item of the domain (row j = local id j + 1); targets: [P] local
    ids -> sum over P of -log softmax(u . items)[target]."""
    return F.cross_entropy(users @ items.T, targets - 1, reduction="sum")


def objective_loss(model: ItemSide, groups: list[Targets], batch: Batch) -> Tensor:
    """The mean per-position loss of `model.config.objective` over the batch's training positions (or
    their sum over `batch.position_norm`, or the sum of a mean per target domain: see `Batch`)."""
    objective = model.config.objective
    total, count = None, 0
    for g in groups:
        if not len(g.targets):
            continue
        if objective == "bce" and g.mixed_negatives is not None:
            pos = model.item_rows(g.domain, g.targets)
            neg = model.per_thread_rows(g.domain, g.mixed_negatives, g.negatives)
            part = bce_sum(g.users, pos, neg)
        elif objective == "bce":
            rows = model.item_rows(g.domain, torch.cat([g.targets, g.negatives]))
            pos, neg = rows.split(len(g.targets))
            part = bce_sum(g.users, pos, neg)
        elif objective == "sampled_softmax":
            if batch.shared is None:
                raise ValueError("sampled_softmax needs the batch's shared negatives")
            negs, log_q = batch.shared.items[g.domain], batch.shared.log_expected[g.domain]
            rows = model.item_rows(g.domain, torch.cat([g.targets, negs]))
            pos, neg = rows[: len(g.targets)], rows[len(g.targets) :]
            hits = g.targets[:, None] == negs[None, :]
            part = sampled_softmax_sum(g.users, pos, neg, log_q[g.targets], log_q[negs], hits)
        elif objective == "ce":
            items = model.item_rows(
                g.domain, torch.arange(1, model.sizes[g.domain] + 1, device=g.targets.device)
            )
            part = full_softmax_sum(g.users, items, g.targets)
        else:
            raise ValueError(f"unknown objective {objective!r}")
        if batch.domain_means:
            part = part / len(g.targets)
        total = part if total is None else total + part
        count += len(g.targets)
    if total is None:
        return torch.zeros((), device=batch.prefix.device, requires_grad=True)
    if batch.domain_means:
        return total
    return total / (batch.position_norm or count)


def draw_shared_negatives(probs: list[Tensor], k: int, generator: torch.Generator) -> SharedNegatives:
    """K local ids per domain drawn with replacement from `probs` (per domain [n_d + 1], row 0 = 0)."""
    items, logs = [], []
    for p in probs:
        drawn = torch.multinomial(p, k, replacement=True, generator=generator)  # [K] local ids
        items.append(drawn)
        logs.append(torch.log(p * k).clamp(min=-1e4))  # row 0 has p = 0: never drawn, never a target
    return SharedNegatives(items, logs)


def sampling_probs(counts: Tensor, sizes: list[int], offsets: list[int], how: str) -> list[Tensor]:
    """Per domain [n_d + 1] sampling probabilities over local ids (row 0 = 0): uniform, or proportional to
    the training-prefix count + 1 (every item can be drawn)."""
    out = []
    for n, off in zip(sizes, offsets, strict=True):
        w = torch.ones(n + 1, dtype=torch.float64)
        if how == "popularity":
            w = counts[off : off + n + 1].double() + 1.0
        w[0] = 0.0
        out.append((w / w.sum()).float())
    return out
