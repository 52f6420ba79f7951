from .datachecks import DataCheckFailed, DataChecks, check_data, keep_data_snapshot
from .gate import GateResult, PublishedLists, change_text, run_gate
from .settings import DataCheckSettings, GateSettings
from .stability import churn_histogram, describe_stability, list_stability, top_items

__all__ = [
    "DataCheckFailed",
    "DataCheckSettings",
    "DataChecks",
    "GateResult",
    "GateSettings",
    "PublishedLists",
    "change_text",
    "check_data",
    "churn_histogram",
    "describe_stability",
    "keep_data_snapshot",
    "list_stability",
    "run_gate",
    "top_items",
]
