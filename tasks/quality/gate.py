"""The quality gate: score tonight's new run and the published one on tonight's validation split, with
popularity as the floor, and decide whether the new run may be published.

Metric: NDCG@10 with full ranking (the target against every item of its domain, the user's earlier
items of that domain left out; models/evaluate.py), on the validation split of the current workspace
(each user's second-to-last item). The published run is rebuilt from its own config and best weights,
with its item rows remapped onto tonight's catalogue by item id (models/warmstart.py: items it never saw
keep their fresh initialisation), so both are judged on the same users and targets.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import numpy as np
import torch
from bridgerec.models.data import Catalog, EvalSplit, SequenceData, Sequences
from bridgerec.models.evaluate import evaluate
from bridgerec.models.metrics import ndcg
from bridgerec.models.registry import build_model
from bridgerec.models.warmstart import ItemSpace, WarmStartError, warm_state
from bridgerec.storage.runs import RunDir
from bridgerec.storage.workspace import Workspace
from bridgerec.tasks.quality.settings import GateSettings
from bridgerec.tasks.train.inputs import load_catalog, load_item_tables, load_sequences
from bridgerec.tasks.train.settings import TrainSettings
from bridgerec.tasks.train.warmstart import previous_items
from pydantic import BaseModel

Decision = Literal["passed", "refused", "first", "unchanged", "off"]


class GateResult(BaseModel):
    """The gate's decision for one night (also the `gate*` and `*_valid_ndcg10` columns of `runs`)."""

    decision: Decision
    publish: bool
    message: str
    new_run_id: str
    published_run_id: str | None = None  # the train run behind the published lists, if any
    new_ndcg10: float | None = None
    published_ndcg10: float | None = None
    popularity_ndcg10: float | None = None
    seconds: float = 0.0


class _Popularity(torch.nn.Module):
    """Most popular first: every user scores each item by log(1 + its count in the training prefixes).
    Shaped like a Recommender for models/evaluate.py (one-dimensional user and item vectors)."""

    def __init__(self, catalog: Catalog, sequences: Sequences) -> None:
        super().__init__()
        lengths = sequences.lengths
        # Training prefixes only: each user's last two items are the validation and test targets.
        keep = np.ones(len(sequences.flat), bool)
        ends = sequences.offsets[1:]
        keep[ends - 1] = False
        keep[ends[lengths >= 2] - 2] = False
        counts = np.bincount(sequences.flat[keep], minlength=catalog.n_items + 1).astype(np.float32)
        local, domain = catalog.item_local, catalog.item_domain
        self.tables = []
        for d, size in enumerate(catalog.sizes):
            table = np.zeros((int(size) + 1, 1), np.float32)
            ids = np.nonzero(domain == d)[0]
            table[local[ids], 0] = np.log1p(counts[ids])
            self.tables.append(torch.from_numpy(table))
        self.n_domains = len(catalog.domains)

    def item_vectors(self, domain: int) -> torch.Tensor:
        return self.tables[domain]

    def user_vectors(self, inputs: torch.Tensor, domain: int) -> torch.Tensor:
        return torch.ones((inputs.shape[0], 1))


def popularity_ndcg10(catalog: Catalog, sequences: Sequences, valid: EvalSplit, batch_size: int) -> float:
    """The floor: full-ranking validation NDCG@10 of recommending the most popular items of the domain.

    A small function on purpose: when the train stage gains a `pop` model, score that run instead."""
    ranks = evaluate(_Popularity(catalog, sequences), valid, batch_size, full=True)
    assert ranks.full is not None
    return ndcg(ranks.full, 10)


def score_run(
    run: RunDir, workspace: Workspace, catalog: Catalog, sequences: Sequences, settings: TrainSettings
) -> float:
    """Full-ranking validation NDCG@10 of `run`'s best weights on the workspace's current data.

    Raises WarmStartError when the run cannot be rebuilt on tonight's catalogue (other domains, other
    table shapes) and FileNotFoundError when its files are gone."""
    config = run.read_config()
    model_config = config["settings"]
    tables = load_item_tables(workspace) if model_config.get("tables", {}).get("global_dim") else None
    model = build_model(model_config, catalog, tables)
    from safetensors.torch import load_file

    weights = load_file(str(run.model), device="cpu")
    plan = warm_state(model, weights, previous_items(run, config, {}, catalog), ItemSpace.of(catalog))
    model.load_state_dict(plan.state, strict=True)
    data = SequenceData(catalog, sequences, int(model_config["max_len"]))
    valid = data.eval_split("valid", settings.eval_negatives, settings.seed, settings.short_history)
    ranks = evaluate(model, valid, settings.eval_batch_size, full=True)
    assert ranks.full is not None
    return ndcg(ranks.full, 10)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def decide(
    settings: GateSettings,
    new: float,
    published: float | None,
    popularity: float | None,
    new_run_id: str,
    published_run_id: str | None,
) -> GateResult:
    """The decision from the three scores (pure: what the tests pin down).

    refused: new < published x (1 - max_drop), or (with the floor on) new < popularity.
    first: nothing published yet (only the floor applies). passed: otherwise."""
    fig = {"new_ndcg10": new, "published_ndcg10": published, "popularity_ndcg10": popularity}
    ids = {"new_run_id": new_run_id, "published_run_id": published_run_id}
    if settings.popularity_floor and popularity is not None and new < popularity:
        return GateResult(
            decision="refused",
            publish=False,
            message=f"run {new_run_id} scores validation NDCG@10 {new:.4f}, below the popularity floor "
            f"{popularity:.4f} by {popularity - new:.4f} ({(popularity - new) / popularity:.1%})",
            **fig,
            **ids,
        )
    if published is None:
        return GateResult(
            decision="first",
            publish=True,
            message=f"run {new_run_id}: validation NDCG@10 {new:.4f} (popularity {_fmt(popularity)}); no "
            "published run to compare with",
            **fig,
            **ids,
        )
    bound = published * (1.0 - settings.max_drop)
    drop = published - new
    if new < bound:
        return GateResult(
            decision="refused",
            publish=False,
            message=f"run {new_run_id} scores validation NDCG@10 {new:.4f}, {drop:.4f} "
            f"({drop / published:.1%}) below the published run {published_run_id} ({published:.4f}); "
            f"the gate allows {settings.max_drop:.1%}",
            **fig,
            **ids,
        )
    change = f"{-drop:+.4f}" + (f" ({-drop / published:+.1%})" if published else "")
    return GateResult(
        decision="passed",
        publish=True,
        message=f"run {new_run_id}: validation NDCG@10 {new:.4f}, {change} vs the published run "
        f"{published_run_id} ({published:.4f}); popularity {_fmt(popularity)}",
        **fig,
        **ids,
    )


def run_gate(
    settings: GateSettings,
    train: TrainSettings,
    workspace: Workspace,
    new_run_id: str,
    published_run_id: str | None,
    log: Any = None,
) -> GateResult:
    """Score the new run, the published one (its train run in this workspace) and popularity on the
    workspace's validation split, and decide. `published_run_id` None = nothing published yet."""
    started = time.perf_counter()
    if not settings.enabled:
        return GateResult(
            decision="off", publish=True, message="gate.enabled is false", new_run_id=new_run_id
        )
    if published_run_id == new_run_id:
        return GateResult(
            decision="unchanged",
            publish=True,
            message=f"run {new_run_id} is the published one",
            new_run_id=new_run_id,
            published_run_id=published_run_id,
        )
    catalog, sequences = load_catalog(workspace), load_sequences(workspace)
    new = score_run(RunDir(workspace, new_run_id), workspace, catalog, sequences, train)
    published = None
    if published_run_id is not None:
        run = RunDir(workspace, published_run_id)
        try:
            published = score_run(run, workspace, catalog, sequences, train)
        except (WarmStartError, FileNotFoundError, KeyError) as exc:
            # The published run cannot be judged on tonight's data (other domains or shapes, or its
            # folder is gone): only the floor applies, and the message says so.
            if log is not None:
                log.warning("gate: the published run %s cannot be re-scored: %s", published_run_id, exc)
            published_run_id = None
    data = SequenceData(catalog, sequences, train.resolved().max_len)
    valid = data.eval_split("valid", train.eval_negatives, train.seed, train.short_history)
    popularity = popularity_ndcg10(catalog, sequences, valid, train.eval_batch_size)
    result = decide(settings, new, published, popularity, new_run_id, published_run_id)
    return result.model_copy(update={"seconds": round(time.perf_counter() - started, 2)})
