"""SASRec with item-ID embeddings on the mixed sequence (the single-thread, no-LLM baseline).

One Transformer over the whole mixed sequence; item embeddings are shared between input and output
(score = <h_t, e_item>); each target is scored against one negative from the target's domain.
"""

from __future__ import annotations

from bridgerec.models.backbone import SequenceEncoder, embed_many, trim
from bridgerec.models.base import GLOBAL_IDS, Batch, Recommender, next_item_bce
from bridgerec.models.data import Catalog
from torch import Tensor, nn


class SASRec(Recommender):
    name = "sasrec"

    def __init__(self, catalog: Catalog, hidden: int, layers: int, heads: int, dropout: float,
                 max_len: int, causal: bool, **_: object) -> None:  # fmt: skip
        super().__init__(catalog)
        # Sparse gradients: a batch touches a few hundred of the table's rows (see models/optim.py).
        self.emb = nn.Embedding(catalog.n_items + 1, hidden, padding_idx=0, sparse=True)  # global ids
        nn.init.normal_(self.emb.weight, std=hidden**-0.5)
        self.emb.weight.data[0].zero_()
        self.encoder = SequenceEncoder(hidden, layers, heads, dropout, max_len, causal)

    def item_tables(self) -> dict[str, int]:
        return {"emb.weight": GLOBAL_IDS}

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        inputs, targets, negatives = batch.inputs, batch.targets, batch.negatives  # [B, L] each
        x, e_pos, e_neg = embed_many(self.emb, inputs, targets, negatives)  # [B, L, H] each
        h = self.encoder(x, inputs)  # [B, L, H]
        pos = (h * e_pos).sum(-1)  # [B, L]
        neg = (h * e_neg).sum(-1)  # [B, L]
        rec = next_item_bce(pos, neg, targets > 0)
        return rec, {"rec": float(rec.detach())}

    def user_vectors(self, inputs: Tensor, domain: int) -> Tensor:
        inputs = trim(inputs)
        return self.encoder(self.emb(inputs), inputs)[:, -1]  # [B, H] the state after the last item

    def item_vectors(self, domain: int) -> Tensor:
        start = int(self.offsets[domain])
        return self.emb.weight[start : start + self.sizes[domain] + 1] * self._pad_row(domain)

    def score(self, inputs: Tensor, domain: int, candidates: Tensor) -> Tensor:
        h = self.user_vectors(inputs, domain)  # [B, H]
        e = self.emb(candidates + int(self.offsets[domain]) * (candidates > 0))  # [B, C, H]
        return (e * h.unsqueeze(1)).sum(-1)

    def _pad_row(self, domain: int) -> Tensor:
        """[n_d + 1, 1] zero for row 0: the slice starts one row early (at global id offset)."""
        mask = self.emb.weight.new_ones(self.sizes[domain] + 1, 1)
        mask[0] = 0
        return mask
