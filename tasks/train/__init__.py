"""The train stage: train one model on the ingest and enrich outputs, evaluate it, record the run
(WORKSPACE/train/ and WORKSPACE/runs/<run_id>/).

Its face: `TrainSettings` (and `MODEL_PRESETS`), `check_train_inputs` and `run_train` -> `TrainSummary`,
and `TrainOutputs`, the reader later stages use (best run, exported vectors, metrics), and the scores the
nightly quality gate compares (`run_validation_ndcg10`, `popularity_validation_ndcg10` on `Tonight`'s
validation split; `popularity_validation_by_domain` for the night report). Nothing outside this package
imports its other modules.
"""

from bridgerec.models.warmstart import WarmStartError
from bridgerec.tasks.train.outputs import TrainedRun, TrainMissing, TrainOutputs
from bridgerec.tasks.train.rescore import (
    Tonight,
    popularity_validation_by_domain,
    popularity_validation_ndcg10,
    run_validation_ndcg10,
)
from bridgerec.tasks.train.settings import MODEL_PRESETS, TrainSettings
from bridgerec.tasks.train.stage import TrainSummary, check_train_inputs, run_train

__all__ = [
    "MODEL_PRESETS",
    "Tonight",
    "TrainMissing",
    "TrainOutputs",
    "TrainSettings",
    "TrainSummary",
    "TrainedRun",
    "WarmStartError",
    "check_train_inputs",
    "popularity_validation_by_domain",
    "popularity_validation_ndcg10",
    "run_train",
    "run_validation_ndcg10",
]
