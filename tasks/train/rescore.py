"""Score finished runs, and the popularity list, on the workspace's *current* validation split: what the
nightly quality gate compares (tasks/quality/gate.py) before it lets a new run replace the published one.

Metric: NDCG@10 under full ranking (the target against every item of its domain, the user's earlier
items of that domain left out; models/evaluate.py) on each user's second-to-last item. A run trained on
an older catalogue is rebuilt from its own config and best weights with its item rows remapped onto
tonight's catalogue by item id (models/warmstart.py; items it never saw get what a warm start gives
them: a zero ID row in llm4cdsr-hybrid, fresh rows otherwise), so every
candidate is judged on the same users and targets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from safetensors.torch import load_file

from bridgerec.models.config import ModelConfig
from bridgerec.models.data import Catalog, EvalSplit, SequenceData, Sequences
from bridgerec.models.evaluate import evaluate
from bridgerec.models.metrics import ndcg
from bridgerec.models.pop import Popularity
from bridgerec.models.registry import build_model
from bridgerec.models.warmstart import ItemSpace, warm_state
from bridgerec.storage.runs import RunDir
from bridgerec.storage.workspace import Workspace
from bridgerec.tasks.train.inputs import load_catalog, load_item_tables, load_sequences
from bridgerec.tasks.train.settings import TrainSettings
from bridgerec.tasks.train.warmstart import previous_items


@dataclass
class Tonight:
    """The current catalogue and sequences, and their validation split per model input length (built
    once each, shared by every score)."""

    catalog: Catalog
    sequences: Sequences
    settings: TrainSettings
    _splits: dict[int, tuple[SequenceData, EvalSplit]] = field(default_factory=dict)

    @classmethod
    def load(cls, workspace: Workspace, settings: TrainSettings) -> Tonight:
        return cls(load_catalog(workspace), load_sequences(workspace), settings)

    def split(self, max_len: int) -> tuple[SequenceData, EvalSplit]:
        if max_len not in self._splits:
            s = self.settings
            data = SequenceData(self.catalog, self.sequences, max_len)
            self._splits[max_len] = data, data.eval_split("valid", s.eval_negatives, s.seed, s.short_history)
        return self._splits[max_len]


def run_validation_ndcg10(workspace: Workspace, run_id: str, tonight: Tonight) -> float:
    """Full-ranking validation NDCG@10 of run `run_id`'s best weights on tonight's data; NaN when any of
    its scores is not finite (a diverged model, which the gate refuses).

    Raises WarmStartError when the run cannot be rebuilt on tonight's catalogue (other domains, other
    table shapes) and FileNotFoundError when its files are gone."""
    run = RunDir(workspace, run_id)
    config = run.read_config()
    spec = ModelConfig.from_run_config(config)
    tables = load_item_tables(workspace) if spec.global_dim else None
    model = build_model(spec, tonight.catalog, tables)
    weights = load_file(str(run.model), device="cpu")
    plan = warm_state(
        model, weights, previous_items(run, config, {}, tonight.catalog), ItemSpace.of(tonight.catalog)
    )
    model.load_state_dict(plan.state, strict=True)
    _, valid = tonight.split(spec.max_len)
    ranks = evaluate(model, valid, tonight.settings.eval_batch_size, full=True)
    assert ranks.full is not None
    return float("nan") if ranks.nonfinite else ndcg(ranks.full, 10)


def popularity_validation_ndcg10(tonight: Tonight) -> float:
    """The floor: full-ranking validation NDCG@10 of the `pop` model (training-prefix counts)."""
    return popularity_validation_by_domain(tonight)["overall"]


def popularity_validation_by_domain(tonight: Tonight) -> dict[str, float]:
    """The floor per target domain and over all users ("overall"): full-ranking validation NDCG@10 of
    the `pop` model (training-prefix counts). A domain without validation targets is left out."""
    model = build_model(ModelConfig(architecture="pop"), tonight.catalog)
    assert isinstance(model, Popularity)
    data, valid = tonight.split(tonight.settings.max_len)
    model.fit_counts(data.item_counts("train"))
    ranks = evaluate(model, valid, tonight.settings.eval_batch_size, full=True)
    assert ranks.full is not None
    target = valid.target_domain.numpy()
    out = {"overall": ndcg(ranks.full, 10)}
    for d, name in enumerate(tonight.catalog.domains):
        if (target == d).any():
            out[name] = ndcg(ranks.full[target == d], 10)
    return out
