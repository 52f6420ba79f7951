"""The pipeline's stages as rows of one table (`STAGES`): the nightly flow, the per-stage flows and the
command line all read it. A row names the stage, the settings section it takes from the settings tree,
its run function (`run_<stage>(StageRun) -> summary`), its summary type, the reader of what it wrote,
and how the flows run it. Adding a stage is adding a row (docs/design.md, "Adding a stage").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from bridgerec.config import Settings
from bridgerec.runtime.reports import TableReport
from bridgerec.runtime.runner import Runner, step
from bridgerec.storage.warehouse import published_run
from bridgerec.storage.workspace import Workspace
from bridgerec.tasks import StageRun
from bridgerec.tasks.enrich import (
    EnrichOutputs,
    EnrichSections,
    EnrichSummary,
    run_enrich,
)
from bridgerec.tasks.ingest import IngestOutputs, IngestSummary, check_columns, check_input_files, run_ingest
from bridgerec.tasks.publish import PublishSummary, resolve_trained_run, run_publish
from bridgerec.tasks.train import TrainOutputs, TrainSummary, check_train_inputs, run_train


class Summary(Protocol):
    """What every stage's summary offers besides its fields: the tables it reports to ops."""

    def reports(self) -> list[TableReport]: ...


S = TypeVar("S")
R = TypeVar("R", bound=Summary)


@dataclass(frozen=True)
class Stage(Generic[S, R]):
    """One stage of the pipeline.

    `section` picks the stage's settings from the tree; `run` does the work (`sharded` stages call their
    steps through the run's runner, so they run in the flow body; the others run as one task run);
    `check(run, **options)` fails fast, before any work, when an input is missing, given the options the
    run function takes (publish: `run_id`); `outputs` opens what the stage wrote.
    """

    name: str
    section: Callable[[Settings], S]
    run: Callable[..., R]
    summary: type[R]
    outputs: Callable[[StageRun[Any]], object]
    check: Callable[..., object] | None = None
    sharded: bool = False
    about: str = ""

    def stage_run(
        self, settings: Settings, *, force: bool = False, runner: Runner | None = None
    ) -> StageRun[S]:
        """This stage's run context from the settings tree."""
        extra = {"runner": runner} if runner is not None else {}
        return StageRun(
            self.section(settings),
            Workspace(settings.workspace),
            threads=settings.runtime.resolved_threads(),
            force=force,
            warehouse=settings.warehouse_path,
            **extra,
        )


@step("check-inputs")
def _check_ingest(run: StageRun[Any], **_options: Any) -> dict[str, str]:
    check_columns(run.settings)
    return {role: str(p) for role, p in check_input_files(run.settings).items()}


@step("check-inputs")
def _check_enrich(run: StageRun[Any], **_options: Any) -> None:
    IngestOutputs(run.workspace).manifest()  # raises IngestMissing


@step("check-inputs")
def _check_train(run: StageRun[Any], **_options: Any) -> dict[str, str]:
    return check_train_inputs(run)


@step("check-trained-run")
def _check_train_run(run: StageRun[Any], run_id: str | None = None) -> str:
    """The run publish would score (the best, or `run_id`), on today's catalogue."""
    return resolve_trained_run(run.workspace, run_id).run_id


STAGES: tuple[Stage[Any, Any], ...] = (
    Stage(
        "ingest",
        lambda s: s.ingest,
        run_ingest,
        IngestSummary,
        lambda run: IngestOutputs(run.workspace),
        check=_check_ingest,
        about="raw logs and catalogues -> WORKSPACE/ingest (checks, quarantine, leave-one-out split)",
    ),
    Stage(
        "enrich",
        lambda s: EnrichSections(s.enrich, s.profiles),
        run_enrich,
        EnrichSummary,
        lambda run: EnrichOutputs(run.workspace),
        check=_check_enrich,
        sharded=True,
        about="item embeddings and LLM user profiles (vLLM) -> WORKSPACE/enrich",
    ),
    Stage(
        "train",
        lambda s: s.train,
        run_train,
        TrainSummary,
        lambda run: TrainOutputs(run.workspace),
        check=_check_train,
        about="the recommender, trained and evaluated -> WORKSPACE/runs/<run_id>",
    ),
    Stage(
        "publish",
        lambda s: s.publish,
        run_publish,
        PublishSummary,
        lambda run: published_run(run.warehouse_path),
        check=_check_train_run,
        sharded=True,
        about="top-k per user and domain, scored in user shards -> Parquet parts + the DuckDB warehouse, FAISS indexes",
    ),
)
STAGE: dict[str, Stage[Any, Any]] = {s.name: s for s in STAGES}
