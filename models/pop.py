"""The popularity baseline: per domain, items ranked by how often they were interacted with.

No gradient steps: `fit_counts` sets the counts. The train stage counts the *training prefixes* (so the
validation and test targets are never counted, like every model's training data); the export recounts
*every known interaction* (`serving_update`) before publishing. Seen items are left out by the
evaluation and by publish, as for every model.

Vectors (the scoring contract): the user vector is [1], the item vector is [count] (one dimension), so
`user . item` is the count and FAISS's inner product ranks exactly as the counts do. Counts are exact
in float32 up to 2^24.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from bridgerec.models.base import GLOBAL_IDS, Recommender
from bridgerec.models.batch import Batch
from bridgerec.models.config import ModelConfig
from bridgerec.models.data import Catalog, SequenceData


class Popularity(Recommender):
    name = "pop"
    trainable = False
    counts: Tensor  # buffer: [N + 1] training interactions by global id

    def __init__(self, catalog: Catalog, config: ModelConfig) -> None:
        super().__init__(catalog, config)
        self.register_buffer("counts", torch.zeros(catalog.n_items + 1))  # [N + 1] by global id

    def item_tables(self) -> dict[str, int]:
        return {"counts": GLOBAL_IDS}

    def fit_counts(self, counts: np.ndarray | Tensor) -> None:
        """counts: [N + 1] interactions per global id (row 0 ignored)."""
        c = torch.as_tensor(np.asarray(counts), dtype=torch.float32).to(self.counts.device)
        if c.shape != self.counts.shape:
            raise ValueError(f"counts have shape {tuple(c.shape)}, expected {tuple(self.counts.shape)}")
        self.counts.copy_(c)
        self.counts[0] = 0

    def serving_update(self, data: SequenceData) -> None:
        self.fit_counts(data.item_counts("all"))

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        raise TypeError("the popularity baseline is fitted by counting, not by gradient steps")

    def user_vectors_all(self, inputs: Tensor, domains: Sequence[int] | None = None) -> list[Tensor]:
        n = self.n_domains if domains is None else len(domains)
        return [self.counts.new_ones(inputs.shape[0], 1) for _ in range(n)]  # [B, 1] each

    def item_rows(self, domain: int, lids: Tensor) -> Tensor:
        return self.counts[self.global_ids(domain, lids)].unsqueeze(-1)  # [..., 1], row 0 = padding = 0
