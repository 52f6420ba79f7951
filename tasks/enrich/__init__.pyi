from .models import ModelError, embedding_model, model_id, prepare_profile_model
from .outputs import EnrichOutputs
from .plan import EnrichPlan, EnrichSummary, Shard
from .settings import EnrichSections, EnrichSettings, ProfileSettings, model_cache
from .stage import (
    embed_item_shard,
    finish_enrich,
    plan_enrich,
    plan_profiles,
    profile_shard,
    run_enrich,
    run_shards,
)

__all__ = [
    "EnrichOutputs",
    "EnrichPlan",
    "EnrichSections",
    "EnrichSettings",
    "EnrichSummary",
    "ModelError",
    "ProfileSettings",
    "Shard",
    "embed_item_shard",
    "embedding_model",
    "finish_enrich",
    "model_cache",
    "model_id",
    "plan_enrich",
    "plan_profiles",
    "prepare_profile_model",
    "profile_shard",
    "run_enrich",
    "run_shards",
]
