"""SASRec per domain: one independent SASRec (ID embeddings) over each domain's own subsequence.

The classic single-domain baseline: it never sees the other domain, and a user with no earlier item in
the target's domain gets a zero state (every candidate ties; ties count against the positive).
"""

from __future__ import annotations

from bridgerec.models.backbone import SequenceEncoder, domain_view, embed_many
from bridgerec.models.base import Batch, Recommender, next_item_bce
from bridgerec.models.data import Catalog
from torch import Tensor, nn


class SASRecDomain(Recommender):
    name = "sasrec_domain"

    def __init__(self, catalog: Catalog, hidden: int, layers: int, heads: int, dropout: float,
                 max_len: int, causal: bool, **_: object) -> None:  # fmt: skip
        super().__init__(catalog)
        self.emb = nn.ModuleList(
            nn.Embedding(n + 1, hidden, padding_idx=0, sparse=True) for n in self.sizes
        )  # local ids, sparse gradients
        for e in self.emb:
            nn.init.normal_(e.weight, std=hidden**-0.5)
            e.weight.data[0].zero_()
        self.encoders = nn.ModuleList(
            SequenceEncoder(hidden, layers, heads, dropout, max_len, causal) for _ in self.sizes
        )

    def item_tables(self) -> dict[str, int]:
        return {f"emb.{d}.weight": d for d in range(self.n_domains)}

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        prefix = batch.prefix  # [B, L+1] global ids
        dom, loc = self.domain_of(prefix), self.local(prefix)
        # Negatives are drawn per mixed target; realign them to the domain subsequence's targets.
        neg_loc = self.local(batch.negatives)  # [B, L]
        losses, parts = [], {}
        for d, (emb, enc) in enumerate(zip(self.emb, self.encoders, strict=True)):
            sub, _, _ = domain_view(dom, loc, d)  # [B, Ld+1] this domain's items of the prefix
            sub_neg, _, _ = domain_view(dom[:, 1:], neg_loc, d)  # negatives of this domain's targets
            if sub.shape[1] < 2:
                continue
            inputs, targets = sub[:, :-1], sub[:, 1:]  # [B, Ld] each
            negs = sub_neg[:, -targets.shape[1] :] * (targets > 0)
            x, e_pos, e_neg = embed_many(emb, inputs, targets, negs)  # [B, Ld, H] each
            h = enc(x, inputs)  # [B, Ld, H]
            pos = (h * e_pos).sum(-1)
            neg = (h * e_neg).sum(-1)
            loss_d = next_item_bce(pos, neg, (targets > 0) & (inputs > 0))
            losses.append(loss_d)
            parts[f"rec_{self.domains[d]}"] = float(loss_d.detach())
        total = sum(losses) if losses else prefix.new_zeros((), dtype=self.emb[0].weight.dtype)
        return total, parts

    def user_vectors(self, inputs: Tensor, domain: int) -> Tensor:
        sub, _, _ = domain_view(self.domain_of(inputs), self.local(inputs), domain)  # [B, Ld]
        return self.encoders[domain](self.emb[domain](sub), sub)[:, -1]  # [B, H], zero if no such item

    def item_vectors(self, domain: int) -> Tensor:
        return self.emb[domain].weight  # [n_d + 1, H], row 0 is the zero padding row

    def score(self, inputs: Tensor, domain: int, candidates: Tensor) -> Tensor:
        h = self.user_vectors(inputs, domain)  # [B, H]
        return (self.emb[domain](candidates) * h.unsqueeze(1)).sum(-1)  # [B, C]
