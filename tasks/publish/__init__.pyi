from .settings import PublishSettings
from .shards import PublishShard, ShardPlan, ShardResult, score_shard
from .stage import (
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
