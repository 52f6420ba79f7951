"""What one training step carries: the batch (`Batch`), the batch's shared negatives (`SharedNegatives`),
and its training positions grouped by target domain (`Targets`), the hand-over from a model's encoder to
the objectives (models/objectives.py). Plain data: this module imports no model.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from bridgerec.models.config import Task


def training_targets(
    prefix: Tensor, hidden_domain_rows: int = 0, task: Task = "next", cloze: Tensor | None = None
) -> Tensor:
    """The target of every input position (0 = none), by the training task (`ModelConfig.task`):

    - next: prefix [B, L+1] -> [B, L], the next item at every position, except in the last
      `hidden_domain_rows` rows (hidden-domain examples), where only the last position has one;
    - last: -> [B, L], only the last position of every row has one (the prefix's last item);
    - cloze: -> [B, L+1], the masked items (`cloze` [B, L+1] bool) at their own positions: the inputs are
      the whole prefix, each masked item replaced by the mask token.
    """
    if task == "cloze":
        if cloze is None:
            raise ValueError("the cloze task needs the batch's mask")
        return prefix * cloze
    targets = prefix[:, 1:]
    only = prefix.shape[0] if task == "last" else hidden_domain_rows
    if only:
        main = prefix.shape[0] - only
        only_last = torch.zeros_like(targets[main:])
        only_last[:, -1] = targets[main:, -1]
        targets = torch.cat([targets[:main], only_last])
    return targets


def cloze_mask(
    prefix: Tensor, share: float, generator: torch.Generator, hidden_domain_rows: int = 0
) -> Tensor:
    """prefix: [B, L+1] left-padded global ids -> [B, L+1] bool, the items the cloze task masks and
    predicts: every row's last item, and each other item with probability `share` (the last
    `hidden_domain_rows` rows, hidden-domain examples, only their last item)."""
    real = prefix > 0
    mask = (torch.rand(prefix.shape, generator=generator) < share) & real
    if hidden_domain_rows:
        mask[prefix.shape[0] - hidden_domain_rows :] = False
    mask[:, -1] = real[:, -1]
    return mask


@dataclass
class SharedNegatives:
    """Per domain: K negative local ids shared by the batch, and log(K q(i)) for every local id."""

    items: list[Tensor]  # per domain [K] local ids (drawn with replacement)
    log_expected: list[Tensor]  # per domain [n_d + 1] log of the expected count K q(i) of each item


@dataclass
class Batch:
    """One training batch (global ids, left-padded, trimmed)."""

    prefix: Tensor  # [B, L+1] training prefix: inputs = prefix[:, :-1], targets = prefix[:, 1:] (task next)
    negatives: Tensor  # one negative global id per target (the shape of `targets`), its domain's (0 = none)
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
    task: Task = "next"  # which positions are targets (`training_targets`)
    cloze: Tensor | None = None  # task cloze: [B, L+1] bool, the masked items (`cloze_mask`)

    @property
    def inputs(self) -> Tensor:
        """[B, L] the items the model reads ([B, L+1], the whole prefix, for the cloze task)."""
        return self.prefix if self.task == "cloze" else self.prefix[:, :-1]

    @property
    def targets(self) -> Tensor:
        """The target of every input position, the shape of `inputs` (0 = none)."""
        return training_targets(self.prefix, self.hidden_domain_rows, self.task, self.cloze)

    @property
    def main_rows(self) -> int:
        """Rows that are users' own training prefixes (the first ones)."""
        return self.prefix.shape[0] - self.hidden_domain_rows

    def to(self, device: torch.device | str) -> Batch:
        """This batch with every tensor on `device`."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, Tensor):
                moved[name] = value.to(device)
        if self.shared is not None:
            moved["shared"] = SharedNegatives(
                [t.to(device) for t in self.shared.items], [t.to(device) for t in self.shared.log_expected]
            )
        return Batch(**moved)


@dataclass
class Targets:
    """The training positions of a batch whose target is in one domain."""

    domain: int
    users: Tensor  # [P, D] user-side vectors (the state before the target)
    targets: Tensor  # [P] local ids of the targets
    negatives: Tensor  # [P] local ids, one negative per target (bce)
    rows: Tensor  # [P] batch row of each position
    cols: Tensor  # [P] column, in the batch's mixed inputs, of the position (task next: its last input)
    # bce_negatives per_thread: [P] global ids, the mixed thread's own negatives (`negatives` then feed
    # the domain thread only; `Recommender.per_thread_rows`)
    mixed_negatives: Tensor | None = None
