"""Training and evaluation data on the fast path: padded tensors built once, vectorised sampling.

Every user's whole mixed sequence is stored once, left-padded to `max_len + 3` global ids, so the
splits are column slices shared by every row (leave-one-out: the last column is the test target, the
one before it the validation target):

    training prefix  = columns [0, W-2)   (inputs = prefix[:-1], targets = prefix[1:]); with
                       `holdout` 1 (the refit, `through_validation`) columns [0, W-1): the validation
                       target is a training target too, the test target never is
    validation       = input: the last max_len columns of [0, W-2), target: column W-2
    test             = input: the last max_len columns of [0, W-1), target: column W-1
    export (serving) = input: the last max_len columns, predicting the item after the test target

Batches are built from users sorted by length and trimmed to their longest row, so an epoch touches
about as many positions as there are interactions (mean length 8) instead of users x 200.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

SPLITS = ("valid", "test", "export")
# Rounds of the vectorised candidate draw before the rows still short get an exact draw (a permutation of
# their unseen items): rows of a domain much larger than the user's history finish in the first round;
# a small domain, or a user who has seen most of it, finishes exactly instead of drawing for ever.
_CANDIDATE_ROUNDS = 16


@dataclass
class Catalog:
    """The item id spaces: global ids 1..N over all domains in order, local ids 1..n_d per domain."""

    domains: list[str]
    sizes: np.ndarray  # [n_domains] items per domain
    offsets: np.ndarray  # [n_domains] global_id = offset + local_id
    item_ids: list[str]  # source id of global id g at index g - 1

    @property
    def n_items(self) -> int:
        return int(self.sizes.sum())

    @property
    def item_domain(self) -> np.ndarray:
        """[N + 1] domain index of each global id (-1 for padding)."""
        return np.concatenate([[-1], np.repeat(np.arange(len(self.domains)), self.sizes)]).astype(np.int64)

    @property
    def item_local(self) -> np.ndarray:
        """[N + 1] local id of each global id (0 for padding)."""
        return np.concatenate([[0], *[np.arange(1, n + 1) for n in self.sizes]]).astype(np.int64)

    def domain_item_ids(self, domain: int) -> list[str]:
        start = int(self.offsets[domain])
        return self.item_ids[start : start + int(self.sizes[domain])]


@dataclass
class Sequences:
    """Every user's whole mixed sequence of global ids (flat, CSR offsets), in user_idx order."""

    user_ids: list[str]
    flat: np.ndarray  # [n_interactions] global ids
    offsets: np.ndarray  # [U + 1]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


@dataclass
class EvalSplit:
    """One evaluation split, users grouped by the domain of their target."""

    name: str
    inputs: Tensor  # [U, max_len] left-padded global ids the model sees
    target: Tensor  # [U] global id of the target (0 for the export split)
    target_domain: Tensor  # [U] domain of the target
    candidates: Tensor | None = None  # [U, 1 + n_neg] local ids, column 0 = the target, 0 = no candidate
    # [U] unseen items of the target's domain per user: fewer than n_neg means the user's sampled
    # candidates are all of them (the row padded with 0); see SequenceData._candidates.
    unseen: np.ndarray | None = None
    # Items to leave out of the full ranking: (user, local id) pairs of the user's earlier items in the
    # target's domain, sorted by user.
    exclude_users: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    exclude_items: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    groups: dict[str, Tensor] = field(default_factory=dict)  # name -> [U] bool


class SequenceData:
    """Padded tensors for one workspace, plus samplers. Build once, reuse every epoch.

    holdout: the last items of each sequence that are never training targets: 2 (validation and test:
    what a model is selected on and measured on) or 1 (test only: the refit after selection,
    `through_validation`). unseen: [N + 1] bool, items that must stay without training interactions
    (the cold-start evaluation's held-out items) where they are a validation target under holdout 1.
    """

    def __init__(
        self,
        catalog: Catalog,
        sequences: Sequences,
        max_len: int,
        holdout: int = 2,
        unseen: np.ndarray | None = None,
    ) -> None:
        if holdout not in (1, 2):
            raise ValueError(f"holdout {holdout}: 2 (validation and test) or 1 (test only)")
        self.catalog, self.sequences, self.max_len, self.holdout = catalog, sequences, max_len, holdout
        self.unseen = None if unseen is None or holdout == 2 else torch.from_numpy(np.asarray(unseen, bool))
        self.width = max_len + 3
        lengths = sequences.lengths
        if lengths.min(initial=3) < 3:
            raise ValueError("every user needs at least 3 interactions (train, valid, test)")
        self.item_domain = torch.from_numpy(catalog.item_domain)
        self.item_local = torch.from_numpy(catalog.item_local)
        self.sizes = torch.from_numpy(catalog.sizes.astype(np.int64))
        self.offsets = torch.from_numpy(catalog.offsets.astype(np.int64))
        # [U, W] the last W items of each sequence, left-padded with 0.
        U, W = len(lengths), self.width
        keep = np.minimum(lengths, W)
        padded = np.zeros((U, W), np.int64)
        rows = np.repeat(np.arange(U), keep)
        cols = W - np.repeat(keep, keep) + _ranges(keep)
        src = np.repeat(sequences.offsets[1:] - keep, keep) + _ranges(keep)
        padded[rows, cols] = sequences.flat[src]
        self.padded = torch.from_numpy(padded)
        # prefix incl. its first input
        self.train_lengths = torch.from_numpy(np.minimum(lengths - holdout, max_len + 1))

    def through_validation(self, unseen: np.ndarray | None = None) -> SequenceData:
        """The same sequences with each user's validation target a training target too (holdout 1): what
        the refit after model selection trains on (`models.trainer.train_schedule`). `unseen` items stay
        out of training where they are a validation target (they are the test's new items)."""
        return SequenceData(self.catalog, self.sequences, self.max_len, holdout=1, unseen=unseen)

    @property
    def n_users(self) -> int:
        return self.padded.shape[0]

    # -- training -------------------------------------------------------------------------------------
    def train_prefix(self, users: Tensor) -> Tensor:
        """[B, L+1] the training prefixes of `users`, trimmed to the longest (inputs + one more target)."""
        end = self.width - self.holdout
        longest = int(self.train_lengths[users].max())
        prefix = self.padded[users, end - longest : end]
        if self.unseen is not None:  # holdout 1: the last column is each user's validation target
            last = prefix[:, -1]
            prefix = torch.cat([prefix[:, :-1], torch.where(self.unseen[last], 0, last)[:, None]], 1)
        return prefix

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
        """User batches of similar length, in random order; every user once per epoch."""
        noise = torch.rand(self.n_users, generator=generator)
        order = torch.argsort(self.train_lengths.double() + noise.double())  # shuffle within a length
        batches = list(torch.split(order, batch_size))
        for i in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[i]

    def hidden_domain_examples(
        self, prefix: Tensor, per_row: float, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """Training examples of a domain the user never shopped in (the untouched-domain case), built from
        a batch's training prefixes. An example of a row: one of its items t that has an item of another
        domain before it, drawn uniformly (t's domain: X); the row's items of the other domains before t,
        then t (every item of X hidden). Only t is a target: its state is what a user with no item of X
        gets. Each row that has such an item gets `per_row` examples, independent draws (a fractional
        part: one more with that probability).

        prefix: [B, L+1] left-padded global ids -> (src [A] the batch row of each example, rows [A, L+1]
        left-padded global ids, t in the last column). A = 0 when no row qualifies or none is drawn.
        """
        if per_row > 1:
            shares = [min(1.0, per_row - i) for i in range(math.ceil(per_row))]
            parts = [self.hidden_domain_examples(prefix, share, generator) for share in shares]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        share = per_row
        dom = self.item_domain[prefix]  # [B, L+1], -1 = padding
        real = dom >= 0
        # seen_other[d, b, c]: items of a domain other than d before column c of row b.
        other = torch.stack([real & (dom != d) for d in range(len(self.catalog.domains))])
        seen_other = other.long().cumsum(2) - other.long()
        eligible = real & (seen_other.gather(0, dom.clamp(min=0).unsqueeze(0)).squeeze(0) > 0)
        drawn = torch.rand(prefix.shape[0], generator=generator) < share
        src = torch.nonzero(drawn & eligible.any(1)).flatten()  # [A]
        if not len(src):
            return src, prefix[:0]
        noise = torch.rand(eligible.shape, generator=generator)
        t = torch.where(eligible, noise, -1.0)[src].argmax(1)  # [A] column of the target
        hidden = dom[src, t]  # [A] its domain
        cols = torch.arange(prefix.shape[1]).expand(len(src), -1)  # [A, L+1]
        keep = (real[src] & (dom[src] != hidden[:, None]) & (cols < t[:, None])) | (cols == t[:, None])
        order = torch.where(keep, cols, -1).sort(1).values  # kept columns last, in order
        rows = torch.where(order >= 0, prefix[src].gather(1, order.clamp(min=0)), 0)
        return src, rows

    def sample_negatives(
        self, targets: Tensor, history: Tensor, generator: torch.Generator, domain_of: Tensor | None = None
    ) -> Tensor:
        """One negative global id per target, uniform over the *target's* domain, avoiding the user's items.

        targets: [B, L] global ids (0 = no target); history: [B, H] global ids the user has seen;
        domain_of: [B, L] global ids whose domain each negative is drawn from instead (e.g. the inputs;
        where one is 0, the target's domain).
        Items in the history are redrawn (twice; a leftover clash is as rare as 1 in n_d^3).
        """
        source = targets if domain_of is None else torch.where(domain_of > 0, domain_of, targets)
        dom = self.item_domain[source].clamp(min=0)  # [B, L]
        size, offset = self.sizes[dom], self.offsets[dom]
        neg = offset + 1 + (torch.rand(targets.shape, generator=generator) * size).long()
        for _ in range(2):
            clash = (neg.unsqueeze(-1) == history.unsqueeze(1)).any(-1)  # [B, L]
            if not clash.any():
                break
            redraw = offset + 1 + (torch.rand(targets.shape, generator=generator) * size).long()
            neg = torch.where(clash, redraw, neg)
        return neg * (targets > 0)

    def item_counts(self, which: str = "train") -> np.ndarray:
        """[N + 1] interactions per global id: `train` counts the training prefixes only (every item before
        each user's validation target, or under holdout 1 before the test target, `unseen` items left
        out: what a model may learn from), `all` every known interaction."""
        seqs = self.sequences
        ids = seqs.flat
        if which == "train":
            pos = np.arange(len(ids)) - np.repeat(seqs.offsets[:-1], seqs.lengths)
            ids = ids[pos < np.repeat(seqs.lengths - self.holdout, seqs.lengths)]
        elif which != "all":
            raise ValueError(f"unknown count {which!r}")
        counts = np.bincount(ids, minlength=self.catalog.n_items + 1).astype(np.int64)
        if which == "train" and self.unseen is not None:
            counts[self.unseen.numpy()] = 0
        return counts

    # -- evaluation -----------------------------------------------------------------------------------
    def eval_split(self, name: str, n_negatives: int, seed: int, short_history: int) -> EvalSplit:
        """The inputs, targets, candidate sets, exclusions and user groups of one split."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}")
        W, L = self.width, self.max_len
        end = {"valid": W - 2, "test": W - 1, "export": W}[name]
        inputs = self.padded[:, end - L : end]
        if name == "export":
            # Serving recommends for every domain; target_domain is filled per domain by the exporter.
            return EvalSplit(name, inputs, torch.zeros(self.n_users, dtype=torch.long), inputs[:, 0] * 0)
        target = self.padded[:, end]
        tdom = self.item_domain[target]
        split = EvalSplit(name, inputs, target, tdom)
        split.candidates, split.unseen = self._candidates(
            target, n_negatives, seed + (0 if name == "valid" else 1)
        )
        split.exclude_users, split.exclude_items = self._earlier_items(name, tdom.numpy())
        n_prior = self.sequences.lengths - (2 if name == "valid" else 1)
        dom_counts = self._prior_domain_counts(name)
        overlap = torch.from_numpy((dom_counts > 0).sum(1) >= 2)
        short = torch.from_numpy(n_prior < short_history)
        split.groups = {"overlap": overlap, "single": ~overlap, "short": short, "long": ~short}
        return split

    def short_candidate_users(self, split: EvalSplit, n_negatives: int) -> dict[str, list[str]]:
        """Per target domain, the users (source ids, in user order) whose sampled candidates are all their
        unseen items of that domain because they have fewer than `n_negatives` (see `_candidates`)."""
        if split.unseen is None:
            return {}
        short = split.unseen < n_negatives
        tdom = split.target_domain.numpy()
        out: dict[str, list[str]] = {}
        for d, name in enumerate(self.catalog.domains):
            users = np.flatnonzero(short & (tdom == d))
            if len(users):
                out[name] = [self.sequences.user_ids[u] for u in users]
        return out

    def _prior_domain_counts(self, name: str) -> np.ndarray:
        """[U, n_domains] how many items of each domain precede the split's target."""
        seqs, dom = self.sequences, self.catalog.item_domain
        cut = 2 if name == "valid" else 1
        pos = np.arange(len(seqs.flat)) - np.repeat(seqs.offsets[:-1], seqs.lengths)
        prior = pos < np.repeat(seqs.lengths - cut, seqs.lengths)
        users = np.repeat(np.arange(len(seqs.lengths)), seqs.lengths)
        counts = np.zeros((len(seqs.lengths), len(self.catalog.domains)), np.int64)
        np.add.at(counts, (users[prior], dom[seqs.flat[prior]]), 1)
        return counts

    def _earlier_items(self, name: str, target_domain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(user, local id) of every item before the target in the target's domain, sorted by user."""
        seqs = self.sequences
        cut = 2 if name == "valid" else 1
        users = np.repeat(np.arange(len(seqs.lengths)), seqs.lengths)
        pos = np.arange(len(seqs.flat)) - seqs.offsets[users]
        g = seqs.flat
        keep = (pos < seqs.lengths[users] - cut) & (self.catalog.item_domain[g] == target_domain[users])
        return users[keep], self.catalog.item_local[g[keep]]

    def _candidates(self, target: Tensor, n_negatives: int, seed: int) -> tuple[Tensor, np.ndarray]:
        """([U, 1 + n] local ids: the target, then n distinct negatives from its domain the user never
        interacted with; [U] how many unseen items each user's target domain holds for them).

        A user with fewer than n unseen items in the target's domain (a domain smaller than n, or a heavy
        user such as a crawler who has seen most of it) gets all of them, the rest of the row padded with
        0, which `evaluate` scores as absent: the sampled protocol then ranks the target against every
        unseen item, as the full ranking does. Drawn once per split from `seed`, so every model and every
        thread sees the same candidates.

        The draw: up to `_CANDIDATE_ROUNDS` rounds of n + 32 uniform ids per row (rows keep their first n
        distinct unseen ids; a domain far larger than the user's history needs one round), then an exact
        draw (a random permutation of the row's unseen items) for the rows still short, so the draw always
        ends: after at most that many rounds plus one permutation per remaining row.
        """
        rng = np.random.default_rng(seed)
        tgt = target.numpy()
        dom = self.catalog.item_domain[tgt]
        sizes = self.catalog.sizes[dom]
        seen = self._seen_keys()
        N1 = self.catalog.n_items + 1
        seen_dom = self.catalog.item_domain[seen % N1]
        seen_in_target = np.bincount((seen // N1)[seen_dom == dom[seen // N1]], minlength=len(tgt))
        unseen = sizes - seen_in_target
        U = len(tgt)
        out = np.zeros((U, n_negatives), np.int64)
        todo = np.flatnonzero(unseen > n_negatives)  # the others take all their unseen items, below
        for _ in range(_CANDIDATE_ROUNDS):
            if not len(todo):
                break
            draws = n_negatives + 32  # enough for almost every row; short rows draw again
            loc = (rng.random((len(todo), draws)) * sizes[todo, None]).astype(np.int64) + 1
            glob = loc + self.catalog.offsets[dom[todo], None]
            keys = todo[:, None] * N1 + glob
            ok = seen[np.minimum(np.searchsorted(seen, keys), len(seen) - 1)] != keys
            # Keep the first occurrence of each id in a row.
            order = np.argsort(loc, axis=1, kind="stable")
            srt = np.take_along_axis(loc, order, 1)
            dup_sorted = np.zeros_like(srt, dtype=bool)
            dup_sorted[:, 1:] = srt[:, 1:] == srt[:, :-1]
            dup = np.zeros_like(dup_sorted)
            np.put_along_axis(dup, order, dup_sorted, 1)
            ok &= ~dup
            # Rows with enough valid draws take their first n; the others are drawn again.
            enough = ok.sum(1) >= n_negatives
            rows = np.where(enough)[0]
            pick = np.argsort(~ok[rows], axis=1, kind="stable")[:, :n_negatives]
            out[todo[rows]] = np.take_along_axis(loc[rows], pick, 1)
            todo = todo[~enough]
        exact = np.union1d(todo, np.flatnonzero(unseen <= n_negatives))
        out[exact] = self._unseen_permutation(exact, dom[exact], n_negatives, seen, rng)
        local_target = self.catalog.item_local[tgt]
        return torch.from_numpy(np.concatenate([local_target[:, None], out], 1)), unseen

    def _unseen_permutation(
        self, users: np.ndarray, dom: np.ndarray, n: int, seen: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        """[len(users), n] local ids: the first n of a random permutation of each user's unseen items of
        domain `dom` (one per user), 0 where the user has fewer than n. Vectorised per domain, in chunks
        of at most ~4M cells."""
        out = np.zeros((len(users), n), np.int64)
        N1 = self.catalog.n_items + 1
        for d in np.unique(dom):
            size, offset = int(self.catalog.sizes[d]), int(self.catalog.offsets[d])
            idx = np.flatnonzero(dom == d)
            step = max(1, (1 << 22) // max(size, 1))
            for start in range(0, len(idx), step):
                part = idx[start : start + step]
                keys = users[part, None] * N1 + offset + np.arange(1, size + 1)[None, :]  # [R, size]
                was_seen = seen[np.minimum(np.searchsorted(seen, keys), len(seen) - 1)] == keys
                noise = np.where(was_seen, np.inf, rng.random(keys.shape))
                take = min(n, size)
                order = np.argsort(noise, axis=1, kind="stable")[:, :take]  # unseen first, in random order
                local = np.where(np.take_along_axis(noise, order, 1) < np.inf, order + 1, 0)
                out[part, :take] = local
        return out

    def _seen_keys(self) -> np.ndarray:
        seqs = self.sequences
        users = np.repeat(np.arange(len(seqs.lengths)), seqs.lengths)
        return np.unique(users * (self.catalog.n_items + 1) + seqs.flat)


def _ranges(counts: np.ndarray) -> np.ndarray:
    """Concatenated aranges: [3, 2] -> [0, 1, 2, 0, 1]."""
    ends = np.cumsum(counts)
    out: np.ndarray = np.arange(ends[-1] if len(ends) else 0) - np.repeat(ends - counts, counts)
    return out


def users_by_domain(target_domain: Tensor, n_domains: int) -> list[Tensor]:
    """The users of each target domain (in user order)."""
    return [torch.nonzero(target_domain == d).flatten() for d in range(n_domains)]
