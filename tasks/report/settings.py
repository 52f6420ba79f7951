"""Settings of the night report (section `report`)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ReportSettings(BaseModel):
    """Section `report`: the HTML page each night writes to WORKSPACE/reports/<night_id>.html."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(default=True, description="Write the night's figures and report page.")
    nights: int = Field(default=30, ge=1, description="Nights shown in the report's trends (the newest).")
    examples: int = Field(default=3, ge=0, le=20, description="Example users shown with profile and lists.")
    list_length: int = Field(default=5, ge=1, le=100, description="Items of each example list shown.")
    keep: int = Field(
        default=90,
        ge=1,
        description="Night records (WORKSPACE/nights/*.json) and pages kept; older ones are deleted.",
    )
