"""The publish stage: the best trained run's vectors -> FAISS top-k per user and domain, scored in user
shards that each write their own Parquet parts -> the night registered in the DuckDB warehouse (one small
atomic swap) and per-run indexes.

Its face: `PublishSettings`, `run_publish` -> `PublishSummary`, `PublishError` (a missing or
inconsistent input), the shard function and its plan (`score_shard`, `ShardPlan`, `PublishShard`,
`ShardResult`) and the other steps the stage's runner calls (`plan_publish`, `register_publish`), and
`candidate_lists` (the rows a publish would write, written nowhere: for the quality gate). The warehouse
itself is read through `bridgerec.storage.warehouse`.
"""

from bridgerec.tasks.publish.settings import PublishSettings
from bridgerec.tasks.publish.shards import PublishShard, ShardPlan, ShardResult, score_shard
from bridgerec.tasks.publish.stage import (
    PublishError,
    PublishPlan,
    PublishSummary,
    candidate_lists,
    plan_publish,
    register_publish,
    resolve_trained_run,
    run_publish,
)

__all__ = [
    "PublishError",
    "PublishPlan",
    "PublishSettings",
    "PublishShard",
    "PublishSummary",
    "ShardPlan",
    "ShardResult",
    "candidate_lists",
    "plan_publish",
    "register_publish",
    "resolve_trained_run",
    "run_publish",
    "score_shard",
]
