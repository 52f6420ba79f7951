from .settings import PublishSettings
from .shards import PublishShard, ShardPlan, ShardResult, score_shard
from .stage import (
    PublishPlan,
    PublishSummary,
    candidate_lists,
    plan_publish,
    register_publish,
    run_publish,
)
from .trained import PublishError, find_trained_run, resolve_trained_run

__all__ = [
    "PublishError",
    "PublishPlan",
    "PublishSettings",
    "PublishShard",
    "PublishSummary",
    "ShardPlan",
    "ShardResult",
    "candidate_lists",
    "find_trained_run",
    "plan_publish",
    "register_publish",
    "resolve_trained_run",
    "run_publish",
    "score_shard",
]
