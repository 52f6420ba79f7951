"""The enrich stage: item embeddings, PCA tables and LLM user profiles (vLLM, batch, incremental).

Its face: the settings, `run_enrich` (the stage in this process) and its summary, `EnrichOutputs` (the
reader of WORKSPACE/enrich that the train and publish stages use), the plan and shard functions that the
flow runs as task runs (`plan_enrich`, `run_shards`), and the model helpers of `bridgerec models`. Other
packages import this package only, never its modules.
"""

from bridgerec.tasks.enrich.models import ModelError, embedding_model, model_id, prepare_profile_model
from bridgerec.tasks.enrich.outputs import EnrichOutputs
from bridgerec.tasks.enrich.plan import EnrichPlan, EnrichSummary, Shard
from bridgerec.tasks.enrich.settings import EnrichSections, EnrichSettings, ProfileSettings
from bridgerec.tasks.enrich.stage import (
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
    "model_id",
    "plan_enrich",
    "plan_profiles",
    "prepare_profile_model",
    "profile_shard",
    "run_enrich",
    "run_shards",
]
