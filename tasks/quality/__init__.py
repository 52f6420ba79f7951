"""Checks around training and publishing, run by the nightly flow: data checks on tonight's ingest
output against the last good night (`check_data`), the quality gate before publishing (`run_gate`),
and the stability and coverage of what was published (`list_stability`).

Its face: the settings (`DataCheckSettings`, `GateSettings`), those functions and their result types.
Nothing outside this package imports its other modules.
"""

from bridgerec.tasks.quality.datachecks import DataCheckFailed, DataChecks, check_data
from bridgerec.tasks.quality.datachecks import as_table as data_checks_table
from bridgerec.tasks.quality.gate import GateResult, PublishedLists, run_gate
from bridgerec.tasks.quality.settings import DataCheckSettings, GateSettings
from bridgerec.tasks.quality.stability import churn_histogram, list_stability, top_items
from bridgerec.tasks.quality.stability import describe as describe_stability

__all__ = [
    "DataCheckFailed",
    "DataCheckSettings",
    "DataChecks",
    "GateResult",
    "GateSettings",
    "PublishedLists",
    "check_data",
    "churn_histogram",
    "data_checks_table",
    "describe_stability",
    "list_stability",
    "run_gate",
    "top_items",
]
