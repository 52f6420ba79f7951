"""What one training step carries: the batch (`Batch`), the batch's shared negatives (`SharedNegatives`),
and its training positions grouped by target domain (`Targets`), the hand-over from a model's encoder to
the objectives (models/objectives.py). Plain data: this module imports no model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


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
class SharedNegatives:
    """Per domain: K negative local ids shared by the batch, and log(K q(i)) for every local id."""

    items: list[Tensor]  # per domain [K] local ids (drawn with replacement)
    log_expected: list[Tensor]  # per domain [n_d + 1] log of the expected count K q(i) of each item


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


@dataclass
class Targets:
    """The training positions of a batch whose target is in one domain."""

    domain: int
    users: Tensor  # [P, D] user-side vectors (the state before the target)
    targets: Tensor  # [P] local ids of the targets
    negatives: Tensor  # [P] local ids, one negative per target (bce)
    rows: Tensor  # [P] batch row of each position
    cols: Tensor  # [P] column, in the batch's mixed inputs, of the last input the position may see
    # bce_negatives per_thread: [P] global ids, the mixed thread's own negatives (`negatives` then feed
    # the domain thread only; `Recommender.per_thread_rows`)
    mixed_negatives: Tensor | None = None
