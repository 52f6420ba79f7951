from .files import check_train_inputs
from .outputs import TrainedRun, TrainMissing, TrainOutputs
from .rescore import (
    Tonight,
    popularity_validation_by_domain,
    popularity_validation_ndcg10,
    run_validation_ndcg10,
)
from .settings import MODEL_PRESETS, TrainSettings
from .stage import TrainSummary, run_train
from .warmstart import WarmStartError

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
