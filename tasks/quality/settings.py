"""Settings of the checks between ingest and publish: data checks (section `checks`), the quality gate
(section `gate`)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class GateSettings(BaseModel):
    """When a night's new run may replace the published one (docs/nightly.md, "Quality gate").

    Both runs are scored on the night's validation split with full ranking (NDCG@10 over the whole target
    domain); the published run is re-scored on tonight's data, not read from its old record.
    """

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(default=True, description="false = publish every night's run unchecked.")
    max_drop: float = Field(
        default=0.05,
        ge=0.0,
        le=1.0,
        description="Refuse when the new run's validation NDCG@10 is below the published run's by more "
        "than this fraction of it (0.05 = 5% lower).",
    )
    popularity_floor: bool = Field(
        default=True, description="Also refuse a run that scores below recommending the most popular items."
    )
    max_churn: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="On unchanged inputs (the new run trained on the same input files as the published "
        "one: a retrain after a settings change or --force), refuse when the mean share of a user's top-k "
        "that would change exceeds this in any domain (0.5 = half of each list). null = off. Costs one "
        "export and top-k search of the new run before publishing.",
    )


class DataCheckSettings(BaseModel):
    """Section `checks`."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(default=True, description="false = no data checks (the figures are not kept).")
    max_drop: float = Field(
        default=0.2,
        ge=0.0,
        le=1.0,
        description="Stop the night when a domain's interactions, users or items fell by more than this "
        "fraction of last night's count.",
    )
