"""The quality gate: score tonight's new run and the published one on tonight's validation split, with
popularity as the floor, and decide whether the new run may be published.

Metric: NDCG@10 with full ranking (the target against every item of its domain, the user's earlier
items of that domain left out; models/evaluate.py), on the validation split of the current workspace
(each user's second-to-last item). The published run is rebuilt from its own config and best weights,
with its item rows remapped onto tonight's catalogue by item id (models/warmstart.py: items it never saw
keep their fresh initialisation), so both are judged on the same users and targets.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from bridgerec.runtime.runner import step
from bridgerec.storage.workspace import Workspace
from bridgerec.tasks.publish import PublishSettings, candidate_lists
from bridgerec.tasks.quality.settings import GateSettings
from bridgerec.tasks.quality.stability import list_stability
from bridgerec.tasks.train import (
    Tonight,
    TrainOutputs,
    TrainSettings,
    WarmStartError,
    popularity_validation_ndcg10,
    run_validation_ndcg10,
)

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
    churn: dict[str, float] | None = None  # per domain: mean share of a user's top-k that would change
    churn_note: str | None = None  # why churn was (not) checked
    seconds: float = 0.0


@dataclass
class PublishedLists:
    """What the churn bound compares against: the warehouse, the published (warehouse) run id, and the
    publish settings the new run's lists would be computed with."""

    warehouse: Path
    run_id: str
    publish: PublishSettings


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

    refused: new is not finite (NaN or inf: a diverged model), new < published x (1 - max_drop), or
    (with the floor on) new < popularity. first: nothing published yet (only the floor applies).
    passed: otherwise. A published or popularity figure that is not finite is not compared with (as if
    absent), so a broken figure can never make a run look better or worse than it is."""
    note = ""
    if published is not None and not math.isfinite(published):
        note = f"; the published run {published_run_id} scores a non-finite {published} and is not compared"
        published, published_run_id = None, None
    if popularity is not None and not math.isfinite(popularity):
        popularity = None

    def result(decision: Decision, publish: bool, message: str) -> GateResult:
        return GateResult(
            decision=decision,
            publish=publish,
            message=message + note,
            new_run_id=new_run_id,
            published_run_id=published_run_id,
            new_ndcg10=new if math.isfinite(new) else None,
            published_ndcg10=published,
            popularity_ndcg10=popularity,
        )

    if not math.isfinite(new):
        return result(
            "refused",
            False,
            f"run {new_run_id} scores validation NDCG@10 {new} (not finite): the model diverged; retrain "
            "it (e.g. with a lower train.lr)",
        )
    if settings.popularity_floor and popularity is not None and new < popularity:
        return result(
            "refused",
            False,
            f"run {new_run_id} scores validation NDCG@10 {new:.4f}, below the popularity floor "
            f"{popularity:.4f} by {popularity - new:.4f} ({(popularity - new) / popularity:.1%})",
        )
    if published is None:
        return result(
            "first",
            True,
            f"run {new_run_id}: validation NDCG@10 {new:.4f} (popularity {_fmt(popularity)}); no "
            "published run to compare with",
        )
    bound = published * (1.0 - settings.max_drop)
    drop = published - new
    if new < bound:
        return result(
            "refused",
            False,
            f"run {new_run_id} scores validation NDCG@10 {new:.4f}, {drop:.4f} "
            f"({drop / published:.1%}) below the published run {published_run_id} ({published:.4f}); "
            f"the gate allows {settings.max_drop:.1%}",
        )
    change = change_text(new, published)
    return result(
        "passed",
        True,
        f"run {new_run_id}: validation NDCG@10 {new:.4f}, {change} against the published run "
        f"{published_run_id} ({published:.4f}); popularity {_fmt(popularity)}",
    )


def change_text(new: float, old: float | None) -> str:
    """`new` against `old` as the summaries show it: "+0.0012 (+2.9%)", or "the same to 4 digits" where
    the difference rounds to zero (not "-0.0000 (-0.0%)")."""
    if old is None:
        return "n/a"
    if round(new - old, 4) == 0:
        return "the same to 4 digits"
    return f"{new - old:+.4f}" + (f" ({(new - old) / old:+.1%})" if old else "")


@step("quality-gate")
def run_gate(
    settings: GateSettings,
    train: TrainSettings,
    workspace: Workspace,
    new_run_id: str,
    published_run_id: str | None,
    log: Any = None,
    lists: PublishedLists | None = None,
) -> GateResult:
    """Score the new run, the published one (its train run in this workspace) and popularity on the
    workspace's validation split, and decide. `published_run_id` None = nothing published yet. With
    `gate.max_churn` set, `lists` (the published lists) bounds the churn on unchanged inputs."""
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
    tonight = Tonight.load(workspace, train)
    new = run_validation_ndcg10(workspace, new_run_id, tonight)
    published = None
    if published_run_id is not None:
        try:
            published = run_validation_ndcg10(workspace, published_run_id, tonight)
        except (WarmStartError, FileNotFoundError, KeyError) as exc:
            # The published run cannot be judged on tonight's data (other domains or shapes, or its
            # folder is gone): only the floor applies, and the message says so.
            if log is not None:
                log.warning("gate: the published run %s cannot be re-scored: %s", published_run_id, exc)
            published_run_id = None
    popularity = popularity_validation_ndcg10(tonight)
    result = decide(settings, new, published, popularity, new_run_id, published_run_id)
    if result.publish and settings.max_churn is not None:
        result = _check_churn(settings.max_churn, result, workspace, lists, log)
    return result.model_copy(update={"seconds": round(time.perf_counter() - started, 2)})


def inputs_unchanged(workspace: Workspace, new_run_id: str, published_run_id: str) -> bool:
    """Whether both runs trained on the same content of every input file they both read (config.json
    `inputs`: e.g. pop reads no enrich file, so only the ingest files are compared with an LLM run)."""
    outputs = TrainOutputs(workspace)
    a, b = outputs.input_hashes(new_run_id), outputs.input_hashes(published_run_id)
    common = set(a) & set(b)
    return bool(common) and all(a[role] == b[role] for role in common)


def _check_churn(
    bound: float, result: GateResult, workspace: Workspace, lists: PublishedLists | None, log: Any
) -> GateResult:
    """Refuse a run that passed on scores when, on unchanged inputs, its lists would churn more than
    `bound` (mean share of a user's top-k changed) in some domain."""
    if lists is None or result.published_run_id is None:
        return result.model_copy(update={"churn_note": "nothing published to compare lists with"})
    try:
        unchanged = inputs_unchanged(workspace, result.new_run_id, result.published_run_id)
    except (FileNotFoundError, KeyError, ValueError):
        unchanged = False
    if not unchanged:
        return result.model_copy(
            update={"churn_note": "inputs changed since the published run: churn not bounded"}
        )
    rows = list_stability(
        lists.warehouse, None, lists.run_id, candidate_lists(lists.publish, workspace, result.new_run_id)
    )
    churn = {r["domain"]: r["mean_changed"] for r in rows if r["mean_changed"] is not None}
    over = {d: c for d, c in churn.items() if c > bound}
    if log is not None:
        log.info(
            "gate: on unchanged inputs, lists would change by %s",
            ", ".join(f"{c:.1%} in {d}" for d, c in churn.items()),
        )
    if not over:
        return result.model_copy(
            update={"churn": churn, "churn_note": f"unchanged inputs: churn within the bound {bound:.0%}"}
        )
    worst = max(over, key=over.__getitem__)
    return result.model_copy(
        update={
            "decision": "refused",
            "publish": False,
            "churn": churn,
            "churn_note": "unchanged inputs: churn over the bound",
            "message": f"run {result.new_run_id} trained on the same inputs as the published run "
            f"{result.published_run_id} but would change {over[worst]:.1%} of each {worst} list on average "
            f"(bound {bound:.0%}; {', '.join(f'{d} {c:.1%}' for d, c in sorted(churn.items()))}); scores: "
            + result.message,
        }
    )
