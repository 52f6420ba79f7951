"""What every recommender here shares: the id maps, the loss, and the scoring contract.

Each model encodes a sequence with one method (its `encode`), which training, validation, the export and
publish all go through. The scoring contract (evaluation, export and publish rely on it): for a target
domain d,

    score(user, item) = user_vectors(inputs, d)[user] . item_vectors(d)[local_id(item)]

where `item_vectors(d)` are the rows `item_rows(d, ids)` the training objective scores (the same
function, every local id of d), and `score(inputs, d, candidates)` is that dot product for some items.
At inference a model may append columns to both sides that training does not score (`serving_rows`:
LLM4CDSR's text prior, w * cos(history text, item text), fitted after training).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from bridgerec.models.batch import Batch, Targets
from bridgerec.models.config import ModelConfig
from bridgerec.models.data import Catalog, SequenceData
from bridgerec.models.objectives import objective_loss

GLOBAL_IDS = -1  # item_tables(): the table is indexed by global id (all domains)


class Recommender(nn.Module):
    """Base class: id maps as buffers, and the interface of every model."""

    name = "recommender"
    trainable = True  # False: fitted by counting (pop), no gradient steps
    # The text prior's width (LLM4CDSR's `text_prior`): the last `prior_dims` columns of the user and item
    # vectors (inference only: the training objective scores `item_rows`) are w * the history's text and
    # the item's text, so the score adds w * their cosine; 0 = no prior. `set_text_prior(w)` sets w (`models/evaluate.py: fit_text_prior`).
    prior_dims = 0
    # buffers (register_buffer), by global id: [N + 1] domain and local id of each item; [D] offsets
    item_domain: Tensor
    item_local: Tensor
    offsets: Tensor

    def __init__(self, catalog: Catalog, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.domains = list(catalog.domains)
        self.sizes = [int(n) for n in catalog.sizes]
        self.register_buffer("item_domain", torch.from_numpy(catalog.item_domain), persistent=False)
        self.register_buffer("item_local", torch.from_numpy(catalog.item_local), persistent=False)
        self.register_buffer(
            "offsets", torch.from_numpy(np.asarray(catalog.offsets, np.int64)), persistent=False
        )

    @property
    def n_domains(self) -> int:
        return len(self.domains)

    def item_tables(self) -> dict[str, int]:
        """State-dict keys of the tensors indexed by item (dim 0), and their id space: GLOBAL_IDS for
        global ids, a domain index for that domain's local ids. Warm start remaps these rows by item_id,
        because ingest renumbers items on every run (models/warmstart.py)."""
        return {}

    def frozen_tables(self) -> set[str]:
        """Item tables that come from the enrich stage (never taken from an earlier run's weights)."""
        return set()

    def local(self, gids: Tensor) -> Tensor:
        return self.item_local[gids]

    def domain_of(self, gids: Tensor) -> Tensor:
        return self.item_domain[gids]

    def train_targets(self, batch: Batch) -> list[Targets]:
        """The training positions of `batch`, grouped by target domain, with their user-side vectors (the
        model's `encode` at every position)."""
        raise NotImplementedError

    def item_rows(self, domain: int, lids: Tensor) -> Tensor:
        """[...] local ids of `domain` -> [..., D] their item-side vectors, differentiable (training);
        local id 0 (padding) -> a zero row."""
        raise NotImplementedError

    def per_thread_rows(self, domain: int, mixed_gids: Tensor, lids: Tensor) -> Tensor:
        """bce_negatives per_thread: [n] global ids for the mixed thread, [n] local ids of `domain` for the
        domain thread -> [n, D] the item side of one negative per thread (models with both threads)."""
        raise NotImplementedError(f"{self.name} has no separate threads to give negatives")

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """The training objective (`config.objective`) averaged over the batch's training positions."""
        rec = objective_loss(self, self.train_targets(batch), batch)
        return rec, {"rec": float(rec.detach())}

    def user_vectors_all(self, inputs: Tensor, domains: Sequence[int] | None = None) -> list[Tensor]:
        """inputs: [B, L] left-padded global ids -> one [B, D] per domain of `domains` (default: every
        domain): the user side of the score for that target domain, the state after the last item. One
        `encode` of the sequence serves every domain asked for (the export asks for all of them)."""
        raise NotImplementedError

    def user_vectors(self, inputs: Tensor, domain: int) -> Tensor:
        """inputs: [B, L] global ids -> [B, D] the user side of the score for target domain `domain`."""
        return self.user_vectors_all(inputs, [domain])[0]

    def set_trained_items(self, counts: np.ndarray) -> None:
        """counts: [N + 1] training interactions per global id, given before training. Models whose
        trainable item rows mean nothing without interactions use it (LLM4CDSR's ID hybrid); a no-op
        otherwise."""

    def end_epoch(self) -> None:
        """Called by the training loop after every epoch, before validation: parts fitted in closed form
        rather than by gradient steps (LLM4CDSR's `id_text_fit`); a no-op otherwise."""

    def set_serving(self, on: bool) -> None:
        """Parts that score only once training is over (LLM4CDSR's id_text_knn rows): off while `fit`
        trains and validates each epoch (they see what the epochs fit), on for the final evaluation, the
        export and publish (as a model starts when built); a no-op otherwise."""

    def set_text_prior(self, weight: float, new_items: float | None = None) -> None:
        """Set the text prior's weight w and, given, its scale c on items without training interactions
        (their prior weighs w * c; models with `prior_dims` > 0)."""
        raise NotImplementedError(f"{self.name} has no text prior")

    def prior_new_items(self, domain: int) -> Tensor | None:
        """[n_d + 1] bool by local id of `domain`: the items whose prior weighs w * c (no training
        interactions; the padding row False), or None where no item is treated apart."""
        return None

    def serving_update(self, data: SequenceData) -> None:
        """Called by the export before computing serving vectors from the whole history (pop recounts
        every known interaction; neural models need nothing)."""

    def global_ids(self, domain: int, lids: Tensor) -> Tensor:
        """[...] local ids of `domain` -> [...] global ids (0 stays 0, the padding)."""
        return (lids + self.offsets[domain]) * (lids > 0)

    def item_vectors(self, domain: int) -> Tensor:
        """[n_d + 1, D] the item side for every local id of `domain` (row 0 = padding, zero)."""
        return self.serving_rows(domain, torch.arange(self.sizes[domain] + 1, device=self.offsets.device))

    def serving_rows(self, domain: int, lids: Tensor) -> Tensor:
        """[...] local ids of `domain` -> [..., D'] the item side of the score at inference: `item_rows`
        and what only inference adds (LLM4CDSR's text prior: `prior_dims` more columns)."""
        return self.item_rows(domain, lids)

    def score(self, inputs: Tensor, domain: int, candidates: Tensor) -> Tensor:
        """inputs: [B, L] global ids, candidates: [B, C] local ids of `domain` -> [B, C] scores."""
        users = self.user_vectors(inputs, domain)  # [B, D]
        return (self.serving_rows(domain, candidates) * users.unsqueeze(1)).sum(-1)
