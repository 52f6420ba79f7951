"""What every recommender here shares: the id maps, the loss, and the scoring contract.

Scoring contract (evaluation, export and publish rely on it): for a target domain d,

    score(user, item) = user_vectors(inputs, d)[user] . item_vectors(d)[local_id(item)]

and `score(inputs, d, candidates)` computes the same numbers thread by thread (the forward pass).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from bridgerec.models.config import ModelConfig
from bridgerec.models.data import Catalog, SequenceData
from bridgerec.models.objectives import SharedNegatives, Targets, objective_loss

GLOBAL_IDS = -1  # item_tables(): the table is indexed by global id (all domains)


def training_targets(prefix: Tensor, hidden_domain_rows: int = 0) -> Tensor:
    """prefix: [B, L+1] -> [B, L] the target of every position (0 = none): the next item, except in the
    last `hidden_domain_rows` rows (hidden-domain examples), where only the last position has one."""
    targets = prefix[:, 1:]
    if hidden_domain_rows:
        main = prefix.shape[0] - hidden_domain_rows
        only_last = torch.zeros_like(targets[main:])
        only_last[:, -1] = targets[main:, -1]
        targets = torch.cat([targets[:main], only_last])
    return targets


@dataclass
class Batch:
    """One training batch (global ids, left-padded, trimmed)."""

    prefix: Tensor  # [B, L+1] training prefix: inputs = prefix[:, :-1], targets = prefix[:, 1:]
    negatives: Tensor  # [B, L] one negative global id per target, from the target's domain (0 = none)
    users: Tensor  # [B] user_idx
    profile: Tensor | None = None  # [B, Dp] profile vectors (zeros where missing)
    has_profile: Tensor | None = None  # [B] bool
    shared: SharedNegatives | None = None  # sampled_softmax: K negatives per domain for the whole batch
    # bce_negatives per_thread: [B, L] the mixed thread's own negative global id per target (0 = none)
    mixed_negatives: Tensor | None = None
    # The last `hidden_domain_rows` rows are hidden-domain examples (SequenceData.hidden_domain_examples):
    # only their last position is a target, and the auxiliary losses (adapter, profile) skip them.
    hidden_domain_rows: int = 0
    # The summed training loss is divided by this (the epoch's mean positions per batch: every position
    # weighs the same, `loss_norm: global`) instead of by this batch's own positions (None: every batch
    # weighs the same).
    position_norm: float | None = None
    # The authors' reduction (`loss_norm: domain`): the sum over target domains of each domain's mean
    # over the batch's positions, instead of one mean over all of them.
    domain_means: bool = False

    @property
    def inputs(self) -> Tensor:
        return self.prefix[:, :-1]

    @property
    def targets(self) -> Tensor:
        """[B, L] the target of every position (0 = none)."""
        return training_targets(self.prefix, self.hidden_domain_rows)

    @property
    def main_rows(self) -> int:
        """Rows that are users' own training prefixes (the first ones)."""
        return self.prefix.shape[0] - self.hidden_domain_rows


class Recommender(nn.Module):
    """Base class: id maps as buffers, and the interface of every model."""

    name = "recommender"
    trainable = True  # False: fitted by counting (pop), no gradient steps

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
        """The training positions of `batch`, grouped by target domain, with their user-side vectors."""
        raise NotImplementedError

    def item_rows(self, domain: int, lids: Tensor) -> Tensor:
        """[n] local ids of `domain` -> [n, D] their item-side vectors, differentiable (training)."""
        raise NotImplementedError

    def per_thread_rows(self, domain: int, mixed_gids: Tensor, lids: Tensor) -> Tensor:
        """bce_negatives per_thread: [n] global ids for the mixed thread, [n] local ids of `domain` for the
        domain thread -> [n, D] the item side of one negative per thread (models with both threads)."""
        raise NotImplementedError(f"{self.name} has no separate threads to give negatives")

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """The training objective (`config.objective`) averaged over the batch's training positions."""
        rec = objective_loss(self, self.train_targets(batch), batch)
        return rec, {"rec": float(rec.detach())}

    def user_vectors(self, inputs: Tensor, domain: int) -> Tensor:
        """inputs: [B, L] global ids -> [B, D] the user side of the score for target domain `domain`."""
        raise NotImplementedError

    def user_vectors_all(self, inputs: Tensor) -> list[Tensor]:
        """inputs: [B, L] -> one [B, D] per domain (the export); models override it to share threads."""
        return [self.user_vectors(inputs, d) for d in range(self.n_domains)]

    def set_trained_items(self, counts: np.ndarray) -> None:
        """counts: [N + 1] training interactions per global id, given before training. Models whose
        trainable item rows mean nothing without interactions use it (LLM4CDSR's ID hybrid); a no-op
        otherwise."""

    def serving_update(self, data: SequenceData) -> None:
        """Called by the export before computing serving vectors from the whole history (pop recounts
        every known interaction; neural models need nothing)."""

    def item_vectors(self, domain: int) -> Tensor:
        """[n_d + 1, D] the item side for every local id of `domain` (row 0 = padding)."""
        raise NotImplementedError

    def score(self, inputs: Tensor, domain: int, candidates: Tensor) -> Tensor:
        """inputs: [B, L] global ids, candidates: [B, C] local ids of `domain` -> [B, C] scores."""
        raise NotImplementedError
