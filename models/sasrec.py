"""SASRec with item-ID embeddings on the mixed sequence (the single-thread, no-LLM baseline).

One Transformer over the whole mixed sequence; item embeddings are shared between input and output
(score = <h_t, e_item>); the training objective (models/objectives.py) compares each target with items of
the target's domain.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from bridgerec.models.backbone import SequenceEncoder, encode_rows, trim
from bridgerec.models.base import GLOBAL_IDS, Recommender
from bridgerec.models.batch import Batch, Targets
from bridgerec.models.config import ModelConfig
from bridgerec.models.data import Catalog


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

    def encode(self, inputs: Tensor, split: int | None = None) -> Tensor:
        """The one sequence encoder (training, validation, export): inputs [B, L] left-padded global ids ->
        [B, L, H] the state after each position. Rows from `split` on run as a batch of their own
        (hidden-domain examples: `encode_rows`)."""
        split = inputs.shape[0] if split is None else split
        return encode_rows(lambda x: self.encoder(self.emb(x), x), inputs, split)

    def train_targets(self, batch: Batch) -> list[Targets]:
        h = self.encode(batch.inputs, batch.main_rows)  # [B, L, H]
        return mixed_targets(self, h, batch.targets, batch.negatives)

    def item_rows(self, domain: int, lids: Tensor) -> Tensor:
        rows: Tensor = self.emb(self.global_ids(domain, lids))  # [..., H]
        return rows

    def user_vectors_all(self, inputs: Tensor, domains: Sequence[int] | None = None) -> list[Tensor]:
        """[B, H] the state after the last item, the same for every target domain."""
        inputs = trim(inputs)
        h = self.encode(inputs)[:, -1]  # [B, H]
        return [h for _ in (range(self.n_domains) if domains is None else domains)]


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
