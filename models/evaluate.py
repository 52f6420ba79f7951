"""Evaluation: every thread scores the same candidates, because every model scores through one user
vector and one item vector per item (their concatenation over threads).

Sampled protocol: the target against the split's fixed 100 negatives (seeded, from the target's domain,
never items the user interacted with; all of the domain's unseen items for a user who has fewer). Full ranking: the target against every item of its domain,
leaving out the user's earlier items of that domain. Users are grouped by target domain (one item table
per domain) and sorted by length (trimmed batches).

Beyond accuracy (full ranking, each user's top-10 in the target's domain, earlier items left out), per
group of users: `coverage@10` = distinct recommended items / items of the domains they target;
`top1pct_share@10` = share of the recommendations that are among the 1% most popular items of their
domain; `pop_percentile@10` = mean popularity percentile of the recommended items within their domain
(100 = the most popular; ties at their mid-rank); `new_item_share@10` = share of the recommendations that
are items without training interactions (new catalogue items: their exposure, to read against their share
among the group's targets). Popularity = interactions in the training prefixes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from bridgerec.models.base import Recommender
from bridgerec.models.data import Catalog, EvalSplit, _ranges, users_by_domain
from bridgerec.models.metrics import as_numpy, ndcg, ndcg_standard_error, rank_full, rank_sampled, summarise


@dataclass
class Ranks:
    split: str
    sampled: np.ndarray  # [U] rank of the target among the sampled candidates
    full: np.ndarray | None  # [U] rank in the whole target domain, or None
    top: np.ndarray | None = None  # [U, TOP_K] local ids of each user's full-ranking top-k, or None
    nonfinite: int = 0  # users whose scores held NaN or inf (a diverged model; they rank last)


TOP_K = 10
FloorOn = Literal["ndcg", "exposure"]  # what a floor on new items bounds (`PriorFit.floored`)


@torch.no_grad()
def evaluate(
    model: Recommender, split: EvalSplit, batch_size: int, full: bool, device: torch.device | str = "cpu"
) -> Ranks:
    model.eval()
    U = split.inputs.shape[0]
    sampled = np.zeros(U, np.int64)
    full_ranks = np.zeros(U, np.int64) if full else None
    top = np.zeros((U, TOP_K), np.int64) if full else None
    ex_offsets = np.searchsorted(split.exclude_users, np.arange(U + 1))
    lengths = (split.inputs > 0).sum(1)
    assert split.candidates is not None, f"split {split.name} has no sampled candidates"
    nonfinite = 0
    for d, users in enumerate(users_by_domain(split.target_domain, model.n_domains)):
        if not len(users):
            continue
        items = model.item_vectors(d)  # [n_d + 1, D]
        users = users[torch.argsort(lengths[users], stable=True)]
        for chunk in torch.split(users, batch_size):
            u = model.user_vectors(split.inputs[chunk].to(device), d)  # [B, D]
            cand = split.candidates[chunk].to(device)  # [B, 1 + n]
            scores = (items[cand] * u.unsqueeze(1)).sum(-1)  # [B, 1 + n]
            broken = ~(torch.isfinite(scores) | (cand == 0)).all(1)  # [B] (padding columns aside)
            scores = scores.masked_fill(cand == 0, -torch.inf)  # fewer unseen items than n (padding)
            sampled[chunk.numpy()] = as_numpy(rank_sampled(scores))
            if full_ranks is not None and top is not None:
                rank, best, full_broken = rank_over_domain(u, items, cand[:, 0], chunk, split, ex_offsets)
                broken |= full_broken
                full_ranks[chunk.numpy()] = as_numpy(rank)
                top[chunk.numpy(), : best.shape[1]] = as_numpy(best)
            nonfinite += int(broken.sum())
    return Ranks(split.name, sampled, full_ranks, top, nonfinite)


def rank_over_domain(
    u: Tensor,
    items: Tensor,
    target: Tensor,
    chunk: Tensor,
    split: EvalSplit,
    ex_offsets: np.ndarray,
    outside: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Full ranking of one chunk of users over their target domain: returns ([B] the target's 0-based
    rank, [B, TOP_K] the local ids of the top-k, [B] whether a score was not finite).

    u: [B, D] user vectors; items: [n_d + 1, D] the domain's item vectors by local id (row 0 padding);
    target: [B] local ids; chunk: [B] the users' rows of `split`, whose earlier items (`left_out`, by
    `ex_offsets`) are left out, as is every item where `outside` ([n_d + 1] bool by local id) is True
    (`rank_among`). The target itself stays in (it is unseen); ties count against it (`rank_full`)."""
    scores = u @ items.T  # [B, n_d + 1]
    broken = ~torch.isfinite(scores[:, 1:]).all(1)
    rows, cols = left_out(target, chunk, split, ex_offsets)
    scores[:, 0] = -torch.inf  # padding row
    scores[rows, cols] = -torch.inf
    if outside is not None:
        scores[:, outside] = -torch.inf
    rank = rank_full(scores, target)
    # The target itself may be recommended (it is unseen); the items seen before it may not.
    best = torch.topk(scores, min(TOP_K, scores.shape[1] - 1), dim=1).indices
    return rank, best, broken


@torch.no_grad()
def rank_among(
    model: Recommender,
    split: EvalSplit,
    members: Tensor,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """[U] 0-based rank of each user's target among the items of its domain that are `members` ([N + 1]
    bool by global id; every target must be one), the user's earlier items left out as in full ranking,
    ties against the target. The item cold-start protocol of DropoutNet (Volkovs et al., NeurIPS 2017):
    new items ranked against new items only, which reads how well a model orders them apart from how
    much room it gives them among the warm ones (their exposure).

    Raises ValueError when a target is not a member."""
    model.eval()
    assert split.candidates is not None, f"split {split.name} has no candidates (column 0: the target)"
    if not members[split.target].all():
        raise ValueError(f"rank_among: a target of split {split.name} is not among the members")
    U = split.inputs.shape[0]
    out = np.zeros(U, np.int64)
    ex_offsets = np.searchsorted(split.exclude_users, np.arange(U + 1))
    for d, users in enumerate(users_by_domain(split.target_domain, model.n_domains)):
        if not len(users):
            continue
        start = int(model.offsets[d])
        outside = ~members[start : start + model.sizes[d] + 1].to(device)  # [n_d + 1] by local id
        items = model.item_vectors(d)  # [n_d + 1, D]
        for chunk in torch.split(users, batch_size):
            u = model.user_vectors(split.inputs[chunk].to(device), d)  # [B, D]
            target = split.candidates[chunk, 0].to(device)  # [B] local ids
            rank, _, _ = rank_over_domain(u, items, target, chunk, split, ex_offsets, outside)
            out[chunk.numpy()] = as_numpy(rank)
    return out


def left_out(
    target: Tensor, chunk: Tensor, split: EvalSplit, ex_offsets: np.ndarray
) -> tuple[Tensor, Tensor]:
    """(rows, cols): the scores a full ranking leaves out for the users `chunk` ([B] rows of `split`;
    `target` [B] their local target ids): each user's earlier items of the target's domain, except a
    repeat of the target, as rows of the chunk and local ids. `ex_offsets` [U + 1]:
    `np.searchsorted(split.exclude_users, np.arange(U + 1))`, each user's slice of the exclusions."""
    b = chunk.numpy()
    counts = ex_offsets[b + 1] - ex_offsets[b]
    idx = np.repeat(ex_offsets[b], counts) + _ranges(counts)
    rows = torch.from_numpy(np.repeat(np.arange(len(b)), counts)).to(target.device)
    cols = torch.from_numpy(split.exclude_items[idx]).to(target.device)
    earlier = cols != target[rows]  # a repeat of the target stays in
    return rows[earlier], cols[earlier]


@dataclass
class PriorFit:
    """What `fit_text_prior` chose: w, c and validation full-ranking NDCG@10 at every pair tried."""

    weight: float  # w: the prior's weight on every item
    new_items: float  # c: its scale on items without training interactions (w * c)
    ndcg10: dict[tuple[float, float], float]  # (w, c) -> validation full-ranking NDCG@10
    ndcg10_new: dict[tuple[float, float], float]  # (w, c) -> the same over the targets that are new items
    ndcg10_warm: dict[tuple[float, float], float]  # (w, c) -> ... over the other targets
    new_targets: int  # validation targets that are items without training interactions
    fitted_new_items: bool  # False: c was not chosen here (too few such targets, or none to treat apart)
    # s: the weight the new-item targets had in the choice, the catalogue's share of items without
    # training interactions; None: as many as they are among the split's targets (the plain figure)
    share: float | None = None
    # the floor a pair had to reach to be chosen (the untrained model's figure; None: no floor), on
    # `floor_on`: "ndcg" NDCG@10 over the new-item targets, "exposure" `new_share`
    new_items_floor: float | None = None
    floor_on: FloorOn | None = None
    # with a floor: False where no pair of the grid reached it (the choice is then the plain one)
    floor_met: bool | None = None
    # (w, c) -> the new items' share of the split's top-k slots (`fit_text_prior`'s top_k, 10 by default,
    # per user; left-out items fill none)
    new_share: dict[tuple[float, float], float] = field(default_factory=dict)
    # (w, c) -> the standard error of `ndcg10_new` (its spread over the new-item targets, `ndcg_standard_error`)
    ndcg10_new_se: dict[tuple[float, float], float] = field(default_factory=dict)

    def chosen_on(self, key: tuple[float, float]) -> float:
        """The figure the pair (w, c) was chosen on (`_choice_figure`)."""
        return _choice_figure(self.ndcg10, self.ndcg10_new, self.ndcg10_warm, self.share, key)

    def on(self, floor_on: FloorOn) -> dict[tuple[float, float], float]:
        """(w, c) -> the figure a floor on `floor_on` bounds: NDCG@10 over the new-item targets ("ndcg")
        or the new items' share of the top-k slots ("exposure")."""
        return self.ndcg10_new if floor_on == "ndcg" else self.new_share

    def floored(self, floor: float, on: FloorOn) -> PriorFit:
        """The choice among the pairs at or above `floor` on `on` (NDCG@10 over the new-item targets, or
        the new items' top-k share): the best `chosen_on` of them, the smaller of equals; where none
        reaches it the choice stays, `floor_met` False. The model is not touched."""
        measure = self.on(on)
        able = [key for key in sorted(self.ndcg10) if measure[key] >= floor]
        best = max(able, key=self.chosen_on) if able else (self.weight, self.new_items)  # first of equals
        met = bool(able)
        return replace(
            self, weight=best[0], new_items=best[1], new_items_floor=floor, floor_on=on, floor_met=met
        )


def _choice_figure(
    figures: dict[tuple[float, float], float],
    on_new: dict[tuple[float, float], float],
    on_warm: dict[tuple[float, float], float],
    share: float | None,
    key: tuple[float, float],
) -> float:
    """What `fit_text_prior` maximises over (w, c) = key: the plain figure `figures[key]`, or with a
    share s the stratified (1 - s) * on_warm[key] + s * on_new[key]."""
    if share is None:
        return figures[key]
    return (1 - share) * on_warm[key] + share * on_new[key]


def catalogue_new_items(model: Recommender) -> int:
    """The catalogue's items whose text prior weighs w * c (no training interactions)."""
    marked = [model.prior_new_items(d) for d in range(model.n_domains)]
    return sum(0 if m is None else int(m[1:].sum()) for m in marked)


def new_item_targets(model: Recommender, split: EvalSplit) -> int:
    """The split's targets that are items without training interactions (`Recommender.prior_new_items`):
    what decides whether `fit_text_prior` chooses c (`min_new_targets`)."""
    by_domain = users_by_domain(split.target_domain, model.n_domains)
    return int(_new_items(model, split, by_domain)[1].sum())


def catalogue_new_share(model: Recommender) -> float:
    """The share of the catalogue's items that are new (`catalogue_new_items`): what
    `fit_text_prior(catalogue_share=True)` weighs the new-item targets with."""
    return catalogue_new_items(model) / sum(model.sizes)


@torch.no_grad()
def fit_text_prior(
    model: Recommender,
    split: EvalSplit,
    grid: list[float],
    batch_size: int,
    device: torch.device | str = "cpu",
    new_items_grid: list[float] | None = None,
    min_new_targets: int = 100,
    catalogue_share: bool = False,
    new_items_floor: float | None = None,
    floor_on: FloorOn = "ndcg",
    top_k: int = TOP_K,
) -> PriorFit:
    """Choose the text prior's weight w (`model.prior_dims` > 0) on `split`: full-ranking NDCG@10 of
    score + w * cos(history text, item text) for each w of `grid`, over every user of the split; and,
    with `new_items_grid`, its scale c on the items without training interactions (their prior weighs
    w * c) from that grid, jointly with w, when at least `min_new_targets` targets of the split are
    such items (new catalogue items reach validation as targets only; with fewer, c stays the model's).
    Sets the best pair (ties: the smaller w, then the smaller c) and returns the fit, with each pair's
    figure also over the targets that are new items and over the others apart.

    With `catalogue_share` (and at least `min_new_targets` new-item targets) the pair is chosen on the
    stratified figure (1 - s) NDCG@10(other targets) + s NDCG@10(new-item targets), s the share of the
    catalogue's items that have no training interactions: the importance weighting of a shift in the
    target population (Shimodaira 2000), for new catalogue items expected to be bought like the rest
    while validation's new-item targets are only the items first bought at someone's validation
    position (1.6 % of food-kitchen's targets on its new-item split, 7.6 % of its items). Where those
    targets are the new items' real share it is wrong (docs/train.md, "New-item targets weighed at the
    catalogue's share").

    With `new_items_floor` (and c chosen here) only the pairs at least that floor on `floor_on` compete
    (`PriorFit.floored`): "ndcg", their figure over the new-item targets; "exposure", the new items'
    share of the users' top-k slots (`new_share`, every user of the split: no few-target noise). The
    floor is the untrained model's (`train.text_prior_new_items_guard`), so training never leaves new
    items ranked below what the same model knew of them from their text before it (issue #28's goal;
    docs/train.md, "New items never below the untrained model"). Where no pair reaches it the choice is
    the plain one and `floor_met` is False.

    Score-level fusion of a collaborative and a content score with a weight tuned on validation, as
    hybrid recommenders do. One pass of the model per user: the two parts' scores are kept apart and
    combined per (w, c), the columns of new items (a few percent of a domain) apart from the others, so
    the grid of c costs little more than w's (the same ranks as `evaluate` with (w, c) set, up to
    floating-point rounding of near ties; a model with non-finite scores is caught by `evaluate` after
    the fit)."""
    if not model.prior_dims:
        raise ValueError(f"{model.name} has no text prior to fit")
    model.eval()
    U = split.inputs.shape[0]
    by_domain = users_by_domain(split.target_domain, model.n_domains)
    new_of, is_new = _new_items(model, split, by_domain)
    current = float(getattr(model, "text_prior_new_scale", torch.ones(1)).item())
    fit_c = bool(new_items_grid) and int(is_new.sum()) >= min_new_targets
    cs = sorted(set(new_items_grid or [])) if fit_c else [current]
    model.set_text_prior(1.0, 1.0)  # the prior's columns unscaled: the score's parts can be split
    ranks, new_in_top = _prior_pass(model, split, by_domain, new_of, grid, cs, batch_size, device, top_k)
    share = catalogue_new_share(model) if catalogue_share and fit_c else None
    exposure = {key: n / (top_k * max(U, 1)) for key, n in new_in_top.items()}
    fit = _choose(ranks, is_new, fit_c, share, exposure)
    if new_items_floor is not None and fit_c:
        fit = fit.floored(new_items_floor, floor_on)
    model.set_text_prior(fit.weight, fit.new_items)
    return fit


def _prior_pass(
    model: Recommender,
    split: EvalSplit,
    by_domain: list[Tensor],
    new_of: list[Tensor],
    grid: list[float],
    cs: list[float],
    batch_size: int,
    device: torch.device | str,
    top_k: int,
) -> tuple[dict[tuple[float, float], np.ndarray], dict[tuple[float, float], int]]:
    """`fit_text_prior`'s one pass of the model over the split's users (its prior unscaled) ->
    ({(w, c): [U] 0-based full-ranking ranks of the targets}, {(w, c): new items in the users' top-k
    lists, summed}); `new_of` per domain [n_d + 1] bool, the items whose prior weighs w * c."""
    assert split.candidates is not None
    p, U = model.prior_dims, split.inputs.shape[0]
    ranks = {(w, c): np.zeros(U, np.int64) for w in grid for c in cs}
    new_in_top = dict.fromkeys(ranks, 0)
    ex_offsets = np.searchsorted(split.exclude_users, np.arange(U + 1))
    for d, users in enumerate(by_domain):
        if not len(users):
            continue
        items = model.item_vectors(d)  # [n_d + 1, D + p]
        new = new_of[d].to(device)
        for chunk in torch.split(users, batch_size):
            u = model.user_vectors(split.inputs[chunk].to(device), d)  # [B, D + p]
            target = split.candidates[chunk, 0].to(device)[:, None]  # [B, 1] local ids
            learned = u[:, :-p] @ items[:, :-p].T  # [B, n_d + 1]
            text = u[:, -p:] @ items[:, -p:].T  # [B, n_d + 1] the cosines
            rows, cols = left_out(target[:, 0], chunk, split, ex_offsets)
            learned[:, 0] = -torch.inf  # the padding and the user's earlier items never compete
            learned[rows, cols] = -torch.inf
            for key, (rank, in_top) in _prior_ranks(learned, text, target, new, grid, cs, top_k).items():
                ranks[key][chunk.numpy()] = as_numpy(rank)
                new_in_top[key] += int(in_top)
    return ranks, new_in_top


def _choose(
    ranks: dict[tuple[float, float], np.ndarray],
    is_new: np.ndarray,
    fit_c: bool,
    share: float | None,
    new_share: dict[tuple[float, float], float],
) -> PriorFit:
    """`fit_text_prior`'s plain choice from each pair's ranks ([U]; `is_new` [U] the targets that are
    new items): the pair (w, c) with the best `_choice_figure` (the smaller of equals)."""
    figures = {key: ndcg(r, 10) for key, r in ranks.items()}
    on_new = {key: ndcg(r[is_new], 10) for key, r in ranks.items()}  # NaN without such targets
    on_new_se = {key: ndcg_standard_error(r[is_new], 10) for key, r in ranks.items()}
    on_warm = {key: ndcg(r[~is_new], 10) for key, r in ranks.items()}
    best = max(
        sorted(figures), key=partial(_choice_figure, figures, on_new, on_warm, share)
    )  # first of equals
    new_targets = int(is_new.sum())
    return PriorFit(
        *best,
        figures,
        on_new,
        on_warm,
        new_targets,
        fit_c,
        share,
        new_share=new_share,
        ndcg10_new_se=on_new_se,
    )


def _new_items(
    model: Recommender, split: EvalSplit, by_domain: list[Tensor]
) -> tuple[list[Tensor], np.ndarray]:
    """The items whose text prior weighs w * c (no training interactions): per domain [n_d + 1] bool by
    local id (padding False), and [U] bool: the split's user has such an item as target."""
    assert split.candidates is not None
    new_of = []
    for d in range(model.n_domains):
        marked = model.prior_new_items(d)
        new_of.append(torch.zeros(model.sizes[d] + 1, dtype=torch.bool) if marked is None else marked.cpu())
    is_new = np.zeros(split.inputs.shape[0], bool)
    for d, users in enumerate(by_domain):
        is_new[users.numpy()] = new_of[d][split.candidates[users, 0]].numpy()
    return new_of, is_new


def _prior_ranks(
    learned: Tensor,
    text: Tensor,
    target: Tensor,
    new: Tensor,
    grid: list[float],
    cs: list[float],
    top_k: int = TOP_K,
) -> dict[tuple[float, float], tuple[Tensor, Tensor]]:
    """`fit_text_prior`'s ranks for a batch: learned [B, n_d + 1] the learned part's scores (-inf where an
    item may not compete; overwritten), text [B, n_d + 1] the cosines, target [B, 1] local ids, new [n_d + 1] the items
    whose prior weighs w * c -> {(w, c): ([B] 0-based full-ranking rank of the target, [] how many of
    the batch's top-k slots new items take)}.

    Margins over the target's score (exactly 0 in its own column): an item competes where its margin is
    >= 0 (ties against the target, as rank_full; the target counts once, hence - 1). The new items'
    columns are combined per c apart from the others, whose count per w serves every c unless the
    target is a new item itself (its own prior moves with c: those few users are recounted). The top k
    likewise: the other columns' k best per w, merged per c with the new columns' k best."""
    old_cols, new_cols = torch.nonzero(~new)[:, 0], torch.nonzero(new)[:, 0]
    learned -= learned.gather(1, target)  # in place: the caller's matrix is spent
    tt = text.gather(1, target)  # [B, 1] the target's cosine
    t_new = new[target[:, 0]]  # [B] targets that are new items themselves
    rn = torch.nonzero(t_new)[:, 0]
    l_new, x_new = learned[:, new_cols], text[:, new_cols]  # [B, n_new]
    if len(new_cols):  # [B, n_old] the other columns (copies)
        l_old, x_old = learned[:, old_cols], text[:, old_cols]
    else:
        l_old, x_old = learned, text
    x_margin = x_old - tt  # the text margins of the other items over a target that is not new
    combined = torch.empty_like(l_old)  # reused per w: no new [B, n_d + 1] buffers
    competes = torch.empty_like(l_old, dtype=torch.bool)
    k_old, k_new = min(top_k, l_old.shape[1]), min(top_k, len(new_cols))
    out: dict[tuple[float, float], tuple[Tensor, Tensor]] = {}
    for w in grid:
        torch.add(l_old, x_margin, alpha=w, out=combined)
        torch.ge(combined, 0, out=competes)
        old_count = competes.sum(1, dtype=torch.int32)  # [B] right for targets that are not new
        if k_new:  # [B, k_old] the same shift as new_margin's (no new items: none in any top k)
            old_top = combined.topk(k_old, dim=1).values
        for c in cs:
            t_text = tt * torch.where(t_new[:, None], c, 1.0)  # [B, 1] the target's prior: c * tt
            count = old_count.clone()
            if len(rn):
                count[rn] = ((l_old[rn] + w * (x_old[rn] - t_text[rn])) >= 0).sum(1, dtype=torch.int32)
            count += ((l_new + w * (c * x_new - t_text)) >= 0).sum(1, dtype=torch.int32)
            in_top = torch.zeros((), dtype=torch.int64)
            if k_new:
                new_margin = l_new + w * (c * x_new - tt)  # [B, n_new] over a warm target's prior
                both = torch.cat([old_top, new_margin.topk(k_new, dim=1).values], 1)
                best = both.topk(min(top_k, both.shape[1]), dim=1)  # left-out items (-inf) fill no slot
                in_top = ((best.indices >= k_old) & best.values.isfinite()).sum()
            out[(w, c)] = (count - 1, in_top)
    return out


class Popularity(NamedTuple):
    """Per global id [N + 1], from the training prefixes' interaction counts (`popularity_tables`)."""

    popular: np.ndarray  # bool: among the 1% most popular items of its domain (at least one; ties by id)
    percentile: np.ndarray  # popularity percentile within its domain (100 = the most popular; mid-rank)
    new: np.ndarray  # bool: no training interactions (padding False)


def popularity_tables(counts: np.ndarray, catalog: Catalog) -> Popularity:
    """counts: [N + 1] interactions per global id -> the `Popularity` tables of the beyond-accuracy
    figures."""
    popular = np.zeros(len(counts), bool)
    pct = np.zeros(len(counts))
    for d, n in enumerate(catalog.sizes):
        g = int(catalog.offsets[d]) + np.arange(1, int(n) + 1)
        c = counts[g]
        top = max(1, int(np.ceil(0.01 * n)))
        popular[g[np.argsort(-c, kind="stable")[:top]]] = True
        srt = np.sort(c)
        less, upto = np.searchsorted(srt, c, "left"), np.searchsorted(srt, c, "right")
        pct[g] = 100.0 * (less + 0.5 * (upto - less)) / n
    new = np.asarray(counts) == 0
    new[0] = False
    return Popularity(popular, pct, new)


def beyond_accuracy(
    top: np.ndarray, target_domain: np.ndarray, catalog: Catalog, tables: Popularity
) -> dict[str, float]:
    """top: [U, k] local ids recommended to each user in their target domain [U] (0: none) ->
    coverage@k, top1pct_share@k, pop_percentile@k, new_item_share@k (see the module docstring)."""
    k = top.shape[1]
    if not len(top):
        return {}
    g = top + np.asarray(catalog.offsets)[target_domain][:, None]  # [U, k] global ids
    g = g[top > 0]
    catalogue = int(np.asarray(catalog.sizes)[np.unique(target_domain)].sum())
    return {
        f"coverage@{k}": len(np.unique(g)) / catalogue,
        f"top1pct_share@{k}": float(tables.popular[g].mean()),
        f"pop_percentile@{k}": float(tables.percentile[g].mean()),
        f"new_item_share@{k}": float(tables.new[g].mean()),
    }


def user_groups(split: EvalSplit, catalog: Catalog) -> dict[str, np.ndarray]:
    """[U] bool masks by group name: `overall`, `domain:<name>` (the target's domain) and the split's own
    user groups."""
    tdom = split.target_domain.numpy()
    groups: dict[str, np.ndarray] = {"overall": np.ones(len(tdom), bool)}
    groups |= {f"domain:{name}": tdom == d for d, name in enumerate(catalog.domains)}
    return groups | {name: mask.numpy() for name, mask in split.groups.items()}


def protocol_rows(
    split: str,
    protocol: str,
    ranks: np.ndarray,
    groups: dict[str, np.ndarray],
    extra: Callable[[np.ndarray], dict[str, float]] | None = None,
) -> list[dict[str, Any]]:
    """Long-format rows (split, protocol, group, metric, value, users) of `ranks` ([U] 0-based) per group
    (`user_groups`); `extra(mask)` adds figures of its own to a group's (beyond accuracy)."""
    rows: list[dict[str, Any]] = []
    for group, mask in groups.items():
        figures = summarise(ranks[mask]) | (extra(mask) if extra is not None else {})
        rows += [
            {"split": split, "protocol": protocol, "group": group, "metric": metric, "value": value,
             "users": int(mask.sum())}
            for metric, value in figures.items()
        ]  # fmt: skip
    return rows


def metric_rows(
    ranks: Ranks, split: EvalSplit, catalog: Catalog, counts: np.ndarray | None = None
) -> list[dict[str, Any]]:
    """Long-format rows: protocol x group x metric, for overall, each target domain and user groups;
    with `counts` ([N + 1] training-prefix interactions per global id) and full ranks, the beyond-accuracy
    figures too (protocol full)."""
    groups = user_groups(split, catalog)
    rows = protocol_rows(ranks.split, "sampled", ranks.sampled, groups)
    if ranks.full is None:
        return rows
    if ranks.top is None or counts is None:
        return rows + protocol_rows(ranks.split, "full", ranks.full, groups)
    top, tdom, tables = ranks.top, split.target_domain.numpy(), popularity_tables(counts, catalog)
    return rows + protocol_rows(
        ranks.split, "full", ranks.full, groups, lambda g: beyond_accuracy(top[g], tdom[g], catalog, tables)
    )


BEYOND = tuple(f"{m}@{TOP_K}" for m in ("coverage", "top1pct_share", "pop_percentile", "new_item_share"))


def headline(rows: list[dict[str, Any]], domains: list[str]) -> dict[str, Any]:
    """The CLI's `test` object: overall and per domain hr@10/ndcg@10, sampled, plus the same under `full`."""

    def pick(protocol: str, group: str) -> dict[str, float]:
        found = {r["metric"]: r["value"] for r in rows if r["protocol"] == protocol and r["group"] == group}
        out = {
            k: found.get(k, float("nan")) for k in ("hr@5", "ndcg@5", "hr@10", "ndcg@10", "hr@20", "ndcg@20")
        }
        return out | {k: found[k] for k in BEYOND if k in found}

    out: dict[str, Any] = {"overall": pick("sampled", "overall")}
    for name in domains:
        out[name] = pick("sampled", f"domain:{name}")
    if any(r["protocol"] == "full" for r in rows):
        out["full"] = {"overall": pick("full", "overall")} | {n: pick("full", f"domain:{n}") for n in domains}
    return out
