"""The enrich stage: item embeddings, PCA tables and LLM user profiles (vLLM, batch, incremental).

Its face: the settings, `run_enrich` (the stage in this process), the shard functions the flow maps onto
task runs, the summary, and the readers of WORKSPACE/enrich that the train and publish stages use. Other
packages import this package only, never its modules.
"""

from bridgerec.tasks.enrich.engine import engine_scope
from bridgerec.tasks.enrich.models import (
    ModelError,
    embedding_model,
    model_id,
    prepare_profile_model,
)
from bridgerec.tasks.enrich.outputs import load_item_tables, load_profile_vectors
from bridgerec.tasks.enrich.plan import (
    EnrichPlan,
    EnrichSummary,
    ItemShardWork,
    ProfilePlan,
    ProfileShardWork,
    Shard,
)
from bridgerec.tasks.enrich.settings import EnrichSettings, ProfileSettings
from bridgerec.tasks.enrich.stage import (
    embed_item_shard,
    finish_enrich,
    plan_enrich,
    plan_profiles,
    profile_shard,
    run_enrich,
)

__all__ = [
    "EnrichPlan",
    "EnrichSettings",
    "EnrichSummary",
    "ItemShardWork",
    "ModelError",
    "ProfilePlan",
    "ProfileSettings",
    "ProfileShardWork",
    "Shard",
    "embed_item_shard",
    "embedding_model",
    "engine_scope",
    "finish_enrich",
    "load_item_tables",
    "load_profile_vectors",
    "model_id",
    "plan_enrich",
    "plan_profiles",
    "prepare_profile_model",
    "profile_shard",
    "run_enrich",
]
