"""The publish stage: the best trained run's vectors -> FAISS top-k per user and domain -> the DuckDB
warehouse (one atomic swap) and per-run indexes.

Its face: `PublishSettings`, `run_publish` -> `PublishSummary`, `PublishError` (a missing or
inconsistent input), `candidate_lists` (the rows a publish would write, written nowhere: for the quality
gate). The warehouse itself is read through `bridgerec.storage.warehouse`.
"""

from bridgerec.tasks.publish.settings import PublishSettings
from bridgerec.tasks.publish.stage import (
    PublishError,
    PublishSummary,
    candidate_lists,
    resolve_trained_run,
    run_publish,
)

__all__ = [
    "PublishError",
    "PublishSettings",
    "PublishSummary",
    "candidate_lists",
    "resolve_trained_run",
    "run_publish",
]
