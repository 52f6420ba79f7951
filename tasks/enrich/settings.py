"""Settings of the enrich stage (sections `enrich` and `profiles`). Filled in by the enrichment work."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class EnrichSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProfileSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
