"""SASRec with item-ID embeddings on the mixed sequence (the single-thread, no-LLM baseline).

One Transformer over the whole mixed sequence; item embeddings are shared between input and output
(score = <h_t, e_item>); the training objective (models/objectives.py) compares each target with items of
the target's domain.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bridgerec.models.backbone import SequenceEncoder, encode_rows, trim
from bridgerec.models.base import GLOBAL_IDS, Batch, Recommender
from bridgerec.models.config import ModelConfig
from bridgerec.models.data import Catalog
from bridgerec.models.objectives import Targets


class SASRec(Recommender):
    name = "sasrec"

    def __init__(self, catalog: Catalog, config: ModelConfig) -> None:
        super().__init__(catalog, config)
        hidden = config.hidden
        # Sparse gradients: a batch touches a few hundred of the table's rows (see models/optim.py).
        self.emb = nn.Embedding(catalog.n_items + 1, hidden, padding_idx=0, sparse=True)  # global ids
        nn.init.normal_(self.emb.weight, std=hidden**-0.5)
        self.emb.weight.data[0].zero_()
        self.encoder = SequenceEncoder.of(config)

    def item_tables(self) -> dict[str, int]:
        return {"emb.weight": GLOBAL_IDS}

    def train_targets(self, batch: Batch) -> list[Targets]:
        inputs, targets, negatives = batch.inputs, batch.targets, batch.negatives  # [B, L] each
        h = encode_rows(lambda x: self.encoder(self.emb(x), x), inputs, batch.main_rows)  # [B, L, H]
        return mixed_targets(self, h, targets, negatives)

    def item_rows(self, domain: int, lids: Tensor) -> Tensor:
        return self.emb(lids + self.offsets[domain] * (lids > 0))  # [n, H]

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


def mixed_targets(model: Recommender, h: Tensor, targets: Tensor, negatives: Tensor) -> list[Targets]:
    """Group the positions of a mixed sequence by their target's domain.

    h: [B, L, D] the user-side vector at every input position; targets, negatives: [B, L] global ids
    (0 = no target). The position at column t predicts targets[:, t] (the input at column t + 1)."""
    dom = model.domain_of(targets)  # [B, L], -1 where no target
    out = []
    for d in range(model.n_domains):
        rows, cols = torch.nonzero(dom == d, as_tuple=True)  # [P] each
        out.append(
            Targets(
                domain=d,
                users=h[rows, cols],
                targets=model.local(targets[rows, cols]),
                negatives=model.local(negatives[rows, cols]),
                rows=rows,
                cols=cols,
            )
        )
    return out
