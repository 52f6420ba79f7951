"""The train stage's side of the cold-start evaluations (models/coldstart.py holds the splits):
`prepare` holds out the new items before the model sees any data, `ColdStart.evaluate` scores the
held-out items and the untouched domains with the best weights, as metric rows and the summary's
`cold_start` object.

Metric rows (metrics.parquet) use their own split names, so the standard `test` rows stay as they were:
`test_new_items` (test targets that are held-out items), `test_warm_items` (the other test targets of
the same run: the figure to compare with), `test_untouched` (the untouched-domain inputs); each with
the usual protocols (sampled, full) and groups (overall, domain:<name>); `test_new_items` also with
protocol `among_new_items` (full ranking, the held-out items of the domain the only candidates).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from bridgerec.models.base import Recommender
from bridgerec.models.coldstart import (
    HeldOut,
    chance_ndcg,
    choose_new_items,
    subset_split,
    untouched_inputs,
    untouched_split,
    without_items,
)
from bridgerec.models.data import Catalog, EvalSplit, Sequences
from bridgerec.models.evaluate import (
    Ranks,
    evaluate,
    headline,
    metric_rows,
    protocol_rows,
    rank_among,
    user_groups,
)
from bridgerec.models.metrics import summarise
from bridgerec.storage.workspace import Workspace
from bridgerec.tasks.ingest import IngestOutputs
from bridgerec.tasks.train.settings import ColdStartSettings


def first_seen(workspace: Workspace, n_items: int) -> np.ndarray | None:
    """[N + 1] first interaction time of each global id (epoch seconds, NaN for none), or None when the
    interactions carry no timestamps."""
    table = IngestOutputs(workspace).table("interactions", columns=["global_id", "timestamp"])
    if table["timestamp"].null_count == table.num_rows:
        return None
    gids = table["global_id"].to_numpy().astype(np.int64)
    ts = table["timestamp"].cast("int64").to_numpy(zero_copy_only=False).astype(np.float64) / 1e6
    out = np.full(n_items + 1, np.inf)
    np.minimum.at(out, gids, np.nan_to_num(ts, nan=np.inf))
    out[np.isinf(out)] = np.nan
    return out


@dataclass
class ColdStart:
    """What the run holds out and how to evaluate it; a no-op when both switches are off."""

    settings: ColdStartSettings
    source_users: int  # users in the ingest (profile rows are indexed by them)
    held: HeldOut | None = None
    selection: str | None = None  # "first_seen" | "random"
    info: dict[str, Any] = field(default_factory=dict)

    def select_users(self, rows: np.ndarray) -> np.ndarray:
        """Rows indexed by the ingest's user_idx -> the rows of the users this run trains on."""
        return rows if self.held is None else rows[self.held.users]

    def evaluate(
        self,
        model: Recommender,
        catalog: Catalog,
        sequences: Sequences,
        test: EvalSplit,
        test_ranks: Ranks,
        batch_size: int,
        full: bool,
        device: torch.device,
        scores_text: bool,
        max_len: int,
    ) -> tuple[list[dict], dict[str, Any]]:
        """(metric rows, summary) of the switched-on evaluations, from the best weights."""
        rows: list[dict] = []
        summary: dict[str, Any] = {}
        if not (self.settings.new_items or self.settings.untouched_domain):
            return rows, summary
        domains = catalog.domains
        n_excluded = np.bincount(test.exclude_users, minlength=len(test.target))
        warm = np.ones(len(test.target), bool)
        if self.held is not None:
            new = self.held.held[test.target.numpy()]
            warm = ~new
            for name, mask in (("test_new_items", new), ("test_warm_items", warm)):
                sub = subset_split(test, mask, name)
                ranks = Ranks(
                    name, test_ranks.sampled[mask], None if test_ranks.full is None else test_ranks.full[mask]
                )
                split_rows = metric_rows(ranks, sub, catalog)
                rows += split_rows
                key = "new_items" if name == "test_new_items" else "warm_items"
                summary[key] = headline(split_rows, domains) | {
                    "users": int(mask.sum()),
                    "chance_ndcg@10": _chance(sub, catalog, n_excluded[mask], full),
                }
                if ranks.full is not None:
                    summary[key]["auc"] = _auc(ranks.full, sub, catalog, n_excluded[mask])
                if ranks.full is not None and name == "test_new_items":
                    among_rows, summary[key]["among_new_items"] = self._among_new_items(
                        model, catalog, sub, batch_size, device
                    )
                    rows += among_rows
            summary["new_items"] |= {
                "items_held_out": int(self.held.held.sum()),
                "selection": self.selection,
                "removed_interactions": self.held.removed_interactions,
                "dropped_users": self.held.dropped_users,
            }
        if self.settings.untouched_domain:
            chosen, inputs = untouched_inputs(catalog, sequences, max_len)
            keep = warm[chosen]  # with held-out items: warm targets only (one question at a time)
            users, inputs = chosen[keep], inputs[torch.from_numpy(keep)]
            split = untouched_split(test, users, inputs)
            ranks = evaluate(model, split, batch_size, full, device)
            split_rows = metric_rows(ranks, split, catalog)
            rows += split_rows
            summary["untouched_domain"] = headline(split_rows, domains) | {
                "users": len(users),
                "chance_ndcg@10": _chance(split, catalog, np.zeros(len(users), np.int64), full),
            }
            if ranks.full is not None:
                summary["untouched_domain"]["auc"] = _auc(
                    ranks.full, split, catalog, np.zeros(len(users), np.int64)
                )
        if not scores_text:
            summary["note"] = (
                "this model scores items by trained ID rows only: an item without interactions has an "
                "untrained row, so its new-item figures are at (or below) chance by construction"
            )
        return rows, summary

    def _among_new_items(
        self, model: Recommender, catalog: Catalog, sub: EvalSplit, batch_size: int, device: torch.device
    ) -> tuple[list[dict], dict[str, Any]]:
        """The new-item targets ranked among the held-out items of their domain only (`rank_among`: the
        item cold-start protocol, the order of new items apart from their exposure among warm ones):
        metric rows (split test_new_items, protocol among_new_items) and the summary's figures with their
        chance level and the candidates per domain. Held-out items never stay in a history before its
        last item, so there is nothing to leave out."""
        assert self.held is not None
        held = torch.from_numpy(self.held.held)
        ranks = rank_among(model, sub, held, batch_size, device)
        tdom = sub.target_domain.numpy()
        per_domain = [
            int(self.held.held[int(catalog.offsets[d]) + 1 :][: int(n)].sum())
            for d, n in enumerate(catalog.sizes)
        ]
        rows = protocol_rows(sub.name, "among_new_items", ranks, user_groups(sub, catalog))
        candidates = np.asarray(per_domain)[tdom]
        summary = {
            "overall": summarise(ranks, (10,)),
            "chance_ndcg@10": chance_ndcg(candidates),
            "candidates": dict(zip(catalog.domains, per_domain, strict=True)),
        } | {name: summarise(ranks[tdom == d], (10,)) for d, name in enumerate(catalog.domains)}
        return rows, summary


def prepare(
    settings: ColdStartSettings,
    catalog: Catalog,
    sequences: Sequences,
    workspace: Workspace,
    seed: int,
    log: Callable[[str], None] = lambda _: None,
) -> tuple[Sequences, ColdStart]:
    """(the sequences to train and evaluate on, the ColdStart of this run). With `new_items` the held-out
    items' interactions are gone from them (models/coldstart.py)."""
    cold = ColdStart(settings, source_users=len(sequences.lengths))
    if not settings.new_items:
        return sequences, cold
    seen = first_seen(workspace, catalog.n_items)
    usable = seen is not None and not np.isnan(seen[np.unique(sequences.flat)]).any()
    held = choose_new_items(catalog, sequences, settings.new_items_fraction, seed, seen if usable else None)
    cold.held = without_items(sequences, held, keep_validation=settings.new_items_in_validation)
    cold.selection = "first_seen" if usable else "random"
    log(
        f"train: cold start: {int(held.sum())} items held out as new ({cold.selection}); "
        f"{cold.held.removed_interactions} interactions removed, {cold.held.dropped_users} users left "
        "with fewer than 3 interactions are not used"
    )
    return cold.held.sequences, cold


def _auc(
    full_ranks: np.ndarray, split: EvalSplit, catalog: Catalog, n_excluded: np.ndarray
) -> dict[str, float]:
    """Mean full-ranking AUC, overall and per target domain: per user, the share of the other candidates
    (the domain minus the user's excluded items) ranked below the target, 1 - rank / (M - 1). Chance is
    0.5 whatever the domain's size, so it separates "above chance" from "below" on groups far too small
    for NDCG@10 to (46 users, chance NDCG@10 0.0015: no hit at all is the likely outcome of a fair
    ranking). Ties count against the target, as in every rank here."""
    tdom = split.target_domain.numpy()
    others = np.maximum(catalog.sizes[tdom] - n_excluded - 1, 1)
    auc = 1.0 - full_ranks / others

    def mean(mask: np.ndarray) -> float:
        return float(auc[mask].mean()) if mask.any() else float("nan")

    return {"overall": mean(np.ones(len(auc), bool))} | {
        name: mean(tdom == d) for d, name in enumerate(catalog.domains)
    }


def _chance(split: EvalSplit, catalog: Catalog, n_excluded: np.ndarray, full: bool) -> dict[str, Any]:
    """Chance NDCG@10 per protocol, overall and per target domain (a random ranking of the same
    candidates: 1 + negatives sampled, the domain minus the user's excluded items in full)."""
    tdom = split.target_domain.numpy()
    out: dict[str, Any] = {}
    # 1 + the user's negatives (fewer than eval_negatives where the domain holds fewer unseen items)
    sampled = np.zeros(len(tdom)) if split.candidates is None else (split.candidates > 0).sum(1).numpy()
    protocols = {"sampled": sampled}
    if full:
        protocols["full"] = catalog.sizes[tdom] - n_excluded
    for protocol, m in protocols.items():
        out[protocol] = {"overall": chance_ndcg(m)} | {
            name: chance_ndcg(m[tdom == d]) for d, name in enumerate(catalog.domains)
        }
    return out
