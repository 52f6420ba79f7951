"""SASRec per domain: one independent SASRec (ID embeddings) over each domain's own subsequence.

The classic single-domain baseline: it never sees the other domain, and a user with no earlier item in
the target's domain gets a zero state (every candidate ties; ties count against the positive). It trains
on each domain's subsequence: the target of a position is the next item *of that domain*.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from bridgerec.models.backbone import SequenceEncoder, domain_view
from bridgerec.models.base import Recommender
from bridgerec.models.batch import Batch, Targets
from bridgerec.models.config import ModelConfig
from bridgerec.models.data import Catalog


class SASRecDomain(Recommender):
    name = "sasrec_domain"

    def __init__(self, catalog: Catalog, config: ModelConfig) -> None:
        super().__init__(catalog, config)
        hidden = config.hidden
        self.emb = nn.ModuleList(
            nn.Embedding(n + 1, hidden, padding_idx=0, sparse=True) for n in self.sizes
        )  # local ids, sparse gradients
        for e in self.emb:
            assert isinstance(e, nn.Embedding)
            nn.init.normal_(e.weight, std=hidden**-0.5)
            e.weight.data[0].zero_()
        self.encoders = nn.ModuleList(SequenceEncoder.of(config) for _ in self.sizes)

    def item_tables(self) -> dict[str, int]:
        return {f"emb.{d}.weight": d for d in range(self.n_domains)}

    def encode(self, sub: Tensor, domain: int) -> Tensor:
        """The one sequence encoder (training, validation, export): sub [B, Ld] left-padded local ids of
        `domain` (its subsequence, `domain_view`) -> [B, Ld, H] the state after each item."""
        states: Tensor = self.encoders[domain](self.emb[domain](sub), sub)
        return states

    def train_targets(self, batch: Batch) -> list[Targets]:
        prefix = batch.prefix  # [B, L+1] global ids
        dom, loc = self.domain_of(prefix), self.local(prefix)
        # Negatives are drawn per mixed target; realign them to the domain subsequence's targets.
        neg_loc = self.local(batch.negatives)  # [B, L]
        cols = torch.arange(prefix.shape[1], device=prefix.device).expand_as(prefix)
        out = []
        for d in range(self.n_domains):
            sub, _, _ = domain_view(dom, loc, d)  # [B, Ld+1] this domain's items of the prefix
            sub_neg, _, _ = domain_view(dom[:, 1:], neg_loc, d)  # negatives of this domain's targets
            src, _, _ = domain_view(dom, cols + 1, d)  # mixed column + 1 of each sub item (0 = padding)
            if sub.shape[1] < 2:
                out.append(_empty(d, prefix, self.config.hidden))
                continue
            inputs, targets = sub[:, :-1], sub[:, 1:]  # [B, Ld] each
            negs = sub_neg[:, -targets.shape[1] :]
            h = self.encode(inputs, d)  # [B, Ld, H]
            rows, c = torch.nonzero((targets > 0) & (inputs > 0), as_tuple=True)
            out.append(Targets(d, h[rows, c], targets[rows, c], negs[rows, c], rows, src[rows, c] - 1))
        return out

    def item_rows(self, domain: int, lids: Tensor) -> Tensor:
        rows: Tensor = self.emb[domain](lids)
        return rows

    def user_vectors_all(self, inputs: Tensor, domains: Sequence[int] | None = None) -> list[Tensor]:
        """[B, H] per domain: its thread after the user's latest item of it (zero if none)."""
        dom, loc = self.domain_of(inputs), self.local(inputs)
        out = []
        for d in range(self.n_domains) if domains is None else domains:
            sub, _, _ = domain_view(dom, loc, d)  # [B, Ld]
            out.append(self.encode(sub, d)[:, -1])
        return out


def _empty(domain: int, like: Tensor, hidden: int) -> Targets:
    z = like.new_zeros(0)
    return Targets(domain, torch.zeros(0, hidden, device=like.device), z, z, z, z)
