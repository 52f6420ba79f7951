"""One run of one stage: what every stage's `run_<stage>` receives (`StageRun`).

The stage's own settings section travels with where it works (the workspace, and the warehouse that
publish writes and the nightly checks read), how much of the machine it may use (`threads`), whether to
rebuild an unchanged output (`force`) and where its steps run (`runner`). The flows and the command line
build one from the settings tree (bridgerec/stages.py); a library user or a test builds one directly:

    summary = run_ingest(StageRun(IngestSettings(items=..., interactions=...), Workspace("ws")))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from bridgerec.runtime.logs import BridgerecLogger, get_logger
from bridgerec.runtime.runner import InProcess, Runner
from bridgerec.storage.workspace import Workspace

S = TypeVar("S")


@dataclass(frozen=True)
class StageRun(Generic[S]):
    """A stage's settings section and its run context.

    `threads`: CPU threads for DuckDB, torch and FAISS (a stage section's own `threads`, where it has one
    and it is not 0, wins: `threads_for`). `warehouse`: the DuckDB warehouse file (default
    WORKSPACE/warehouse.duckdb, as the settings tree's `warehouse_path`).
    """

    settings: S
    workspace: Workspace
    threads: int = 1
    force: bool = False
    runner: Runner = field(default_factory=InProcess)
    warehouse: Path | None = None

    def __post_init__(self) -> None:
        warehouse = (
            self.workspace.root / "warehouse.duckdb" if self.warehouse is None else Path(self.warehouse)
        )
        object.__setattr__(self, "warehouse", warehouse)

    @property
    def log(self) -> BridgerecLogger:
        """Prefect's run logger inside a flow or task run, the `bridgerec` logger outside."""
        return get_logger()

    @property
    def warehouse_path(self) -> Path:
        assert self.warehouse is not None  # set by __post_init__
        return self.warehouse

    def threads_for(self, own: int) -> int:
        """The threads a stage uses: its section's own setting when not 0, else the run's."""
        return own or self.threads
