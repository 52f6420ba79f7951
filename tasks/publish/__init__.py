"""The publish stage: the best trained run's vectors -> FAISS top-k per user and domain -> the DuckDB
warehouse (one atomic swap) and per-run indexes.

Its face: `PublishSettings`, `run_publish` -> `PublishSummary`, `PublishError` (a missing or
inconsistent input). The warehouse itself is read through `bridgerec.storage.warehouse`.
"""

from bridgerec.tasks.publish.settings import PublishSettings
from bridgerec.tasks.publish.stage import PublishError, PublishSummary, resolve_trained_run, run_publish

__all__ = ["PublishError", "PublishSettings", "PublishSummary", "resolve_trained_run", "run_publish"]
