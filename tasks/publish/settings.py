"""Settings of the publish stage (section `publish`). Filled in by the publish work."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class PublishSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
