from .models import ModelError, embedding_model, model_id, prepare_profile_model
from .outputs import EnrichOutputs
from .plan import EnrichSummary
from .settings import EnrichSections, EnrichSettings, ProfileSettings, model_cache
from .stage import run_enrich

__all__ = [
    "EnrichOutputs",
    "EnrichSections",
    "EnrichSettings",
    "EnrichSummary",
    "ModelError",
    "ProfileSettings",
    "embedding_model",
    "model_cache",
    "model_id",
    "prepare_profile_model",
    "run_enrich",
]
