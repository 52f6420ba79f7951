"""Settings of the train stage (section `train`). Filled in by the model work."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class TrainSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
