"""What a stage reports to ops besides its summary: tables that a flow run shows as Prefect artifacts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TableReport:
    """One table for the flow run's artifacts tab: a stable `key` (artifacts of the same key across runs
    form its history in the UI), the rows and a one-line description."""

    key: str
    rows: list[dict[str, Any]]
    description: str
