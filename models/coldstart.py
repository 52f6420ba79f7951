"""Cold-start evaluations over sequences (numpy and torch only): which items play "new", the sequences
without them, and the inputs of a user who never shopped in the target's domain.

New items (`choose_new_items`, `without_items`): a fraction of each domain's interacted items is held
out, the latest by first appearance where timestamps exist, drawn at random (seeded) otherwise. Every
interaction with them leaves the sequences the model trains and validates on; only a test target may be
one of them (the last item of a sequence is kept whatever it is), so the model meets a held-out item for
the first time as a test target and must rank it against the whole domain from what it knows without
interactions (the LLM tables; an ID-only model has nothing but an untrained row).

Untouched domain (`untouched_inputs`): for a user whose history before the test target spans at least
two domains, the input keeps only the items of the *other* domains: what the model recommends in a
domain the user never shopped in. Every item of the target's domain is hidden, so nothing is excluded
from its full ranking either.

Chance level (`chance_ndcg`): the NDCG@k of a random ranking, for the tables that show the figures.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from bridgerec.models.data import Catalog, EvalSplit, Sequences, _ranges


@dataclass
class HeldOut:
    """The sequences without the held-out items, and what was removed."""

    held: np.ndarray  # [N + 1] bool: True for the global ids held out as new items
    sequences: Sequences  # the kept users' sequences, held-out items removed except as the last item
    users: np.ndarray  # [U'] user_idx (rows of the original sequences) of the kept users
    removed_interactions: int  # interactions with held-out items that left the kept users' histories
    dropped_users: int  # users left with fewer than 3 interactions (train, valid, test): not evaluated


def choose_new_items(
    catalog: Catalog,
    sequences: Sequences,
    fraction: float,
    seed: int,
    first_seen: np.ndarray | None = None,
) -> np.ndarray:
    """[N + 1] bool: `fraction` of each domain's interacted items (at least one), held out as new.

    first_seen: [N + 1] first interaction time of each global id (any unit, NaN when unknown). When every
    interacted item has one, the latest `fraction` by first appearance are held out (ties broken at random
    with `seed`); otherwise they are drawn uniformly at random with `seed`. Items nobody interacted with
    are never chosen (they have no test target to measure).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction of new items must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    counts = np.bincount(sequences.flat, minlength=catalog.n_items + 1)
    held = np.zeros(catalog.n_items + 1, bool)
    domain = catalog.item_domain
    for d in range(len(catalog.domains)):
        pool = np.flatnonzero((domain == d) & (counts > 0))
        if not len(pool):
            continue
        n = max(1, round(fraction * len(pool)))
        tiebreak = rng.random(len(pool))
        if first_seen is not None and not np.isnan(first_seen[pool]).any():
            order = np.lexsort((tiebreak, -first_seen[pool]))  # latest first appearance first
        else:
            order = np.argsort(tiebreak)
        held[pool[order[:n]]] = True
    return held


def without_items(
    sequences: Sequences, held: np.ndarray, min_length: int = 3, keep_validation: bool = False
) -> HeldOut:
    """Remove every interaction with a `held` item from each sequence, except the sequence's last item
    (the test target) and, with `keep_validation`, the one before it (the validation target: new items
    are then validation targets where they fall, as items first bought there are); keep the users left
    with at least `min_length` interactions."""
    lengths = sequences.lengths
    users = np.repeat(np.arange(len(lengths)), lengths)
    last = np.zeros(len(sequences.flat), bool)
    last[sequences.offsets[1:][lengths > 0] - 1] = True
    if keep_validation:
        last[sequences.offsets[1:][lengths > 1] - 2] = True
    keep = ~held[sequences.flat] | last
    new_lengths = np.bincount(users[keep], minlength=len(lengths))
    kept_users = np.flatnonzero(new_lengths >= min_length)
    row_ok = np.zeros(len(lengths), bool)
    row_ok[kept_users] = True
    keep_rows = keep & row_ok[users]
    flat = sequences.flat[keep_rows]
    offsets = np.concatenate([[0], np.cumsum(new_lengths[kept_users])]).astype(np.int64)
    removed = int((~keep & row_ok[users]).sum())
    return HeldOut(
        held=held,
        sequences=Sequences([sequences.user_ids[u] for u in kept_users], flat, offsets),
        users=kept_users,
        removed_interactions=removed,
        dropped_users=len(lengths) - len(kept_users),
    )


def untouched_inputs(
    catalog: Catalog, sequences: Sequences, max_len: int, target_cut: int = 1
) -> tuple[np.ndarray, Tensor]:
    """(users, inputs): the users whose history before their target spans two domains or more, and their
    inputs [U', max_len] (left-padded global ids) with every item of the target's domain removed.

    target_cut: 1 for the test split (the target is the last item), 2 for validation.
    """
    lengths = sequences.lengths
    U = len(lengths)
    users = np.repeat(np.arange(U), lengths)
    pos = np.arange(len(sequences.flat)) - sequences.offsets[users]
    dom = catalog.item_domain[sequences.flat]
    target_dom = dom[sequences.offsets[1:] - target_cut]  # [U]
    prior = pos < lengths[users] - target_cut
    spans = np.zeros((U, len(catalog.domains)), bool)
    spans[users[prior], dom[prior]] = True
    chosen = np.flatnonzero(spans.sum(1) >= 2)
    is_chosen = np.zeros(U, bool)
    is_chosen[chosen] = True
    keep = prior & is_chosen[users] & (dom != target_dom[users])
    # Left-pad the last max_len kept items of each chosen user.
    counts = np.bincount(users[keep], minlength=U)[chosen]
    take = np.minimum(counts, max_len)
    row_of = np.full(U, -1)
    row_of[chosen] = np.arange(len(chosen))
    k_users, k_items = users[keep], sequences.flat[keep]
    # rank from the end within each user: 0 = the most recent kept item
    from_end = np.repeat(counts, counts) - 1 - _ranges(counts)
    sel = from_end < np.repeat(take, counts)
    inputs = np.zeros((len(chosen), max_len), np.int64)
    inputs[row_of[k_users[sel]], max_len - 1 - from_end[sel]] = k_items[sel]
    return chosen, torch.from_numpy(inputs)


def untouched_split(test: EvalSplit, users: np.ndarray, inputs: Tensor) -> EvalSplit:
    """The test split for `users` only, with `inputs` (from `untouched_inputs`) instead of their history.

    Targets and sampled candidates are the test split's; the full ranking excludes nothing (the user has
    no earlier item in the target's domain in this scenario)."""
    idx = torch.from_numpy(users)
    assert test.candidates is not None
    return EvalSplit(
        "test_untouched",
        inputs,
        test.target[idx],
        test.target_domain[idx],
        candidates=test.candidates[idx],
    )


def subset_split(split: EvalSplit, mask: np.ndarray, name: str) -> EvalSplit:
    """The users of `split` where `mask` holds, as a split named `name` (for metric rows: inputs,
    targets, domains and candidates; exclusions and user groups are not carried)."""
    idx = torch.from_numpy(np.flatnonzero(mask))
    return EvalSplit(
        name,
        split.inputs[idx],
        split.target[idx],
        split.target_domain[idx],
        candidates=None if split.candidates is None else split.candidates[idx],
    )


def chance_ndcg(n_candidates: np.ndarray, k: int = 10) -> float:
    """Mean NDCG@k of a uniformly random rank among `n_candidates` items (the target included), per user.

    For M candidates: (1 / M) * sum_{r < min(k, M)} 1 / log2(r + 2)."""
    m = np.asarray(n_candidates, np.float64)
    if not len(m):
        return float("nan")
    gains = np.cumsum(1.0 / np.log2(np.arange(k) + 2.0))  # [k]: sum of the first j + 1 gains
    top = np.minimum(m, k).astype(np.int64)
    return float(np.mean(gains[top - 1] / m))
