"""The reader of the train stage's outputs (WORKSPACE/train/ and WORKSPACE/runs/<run_id>/) for later
stages: which run is best on the current inputs, its exported vectors, its metrics.
Only this package and storage/runs.py know the layout. Finding a run and reading its record imports no
torch (the modules that score, export and load the catalogue are imported by the methods that need
them), so the CLI checks a publish's run before the heavy imports (bridgerec/cli.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bridgerec.storage.runs import RunDir
from bridgerec.storage.vectors import DomainVectors, TextSpace
from bridgerec.storage.workspace import Workspace, hash_file

STAGE = "train"


class TrainMissing(FileNotFoundError):
    """No finished (complete) training run to read; the message says what to run."""


@dataclass(frozen=True)
class TrainedRun:
    """A finished run: its id, model preset and folder; for the best run, its validation NDCG@10 as the
    leaderboard chose it (full ranking or sampled: `train.select_by`)."""

    run_id: str
    model: str | None
    path: Path
    valid_ndcg10: float | None = None


class TrainOutputs:
    """Read-only view of the train stage in `workspace`."""

    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace

    def best_run(self) -> TrainedRun:
        """The best run on the current inputs (the stage manifest names it). Raises TrainMissing."""
        folder = self.workspace.stage_dir(STAGE)
        manifest = self.workspace.read_manifest(STAGE)
        if manifest is None:
            raise TrainMissing(f"no trained model in {folder}: run `bridgerec train` first")
        best = manifest.stats.get("best") or {}
        run_id = best.get("run_id")
        if not run_id:
            raise TrainMissing(
                f"{folder}/manifest.json names no best run in its stats: run `bridgerec train`"
            )
        key = "valid_ndcg10" if best.get("select_by") == "sampled" else "valid_full_ndcg10"
        return dataclasses.replace(self.run(str(run_id), best.get("model")), valid_ndcg10=best.get(key))

    def leaderboard(self) -> list[TrainedRun]:
        """The complete trained runs of the workspace in the order they finished (WORKSPACE/train/
        runs.parquet: a skipped train keeps a run's place); [] before the first training."""
        if not (self.workspace.stage_dir(STAGE) / "runs.parquet").exists():
            return []
        rows = self.workspace.read_table(STAGE, "runs", ["run_id", "model"]).to_pylist()
        return [
            TrainedRun(r["run_id"], r["model"], RunDir(self.workspace, r["run_id"]).path)
            for r in rows
            if RunDir(self.workspace, r["run_id"]).is_complete()
        ]

    def run(self, run_id: str, model: str | None = None) -> TrainedRun:
        """A finished run by id. Raises TrainMissing when it is absent or incomplete."""
        run = RunDir(self.workspace, run_id)
        if not run.path.is_dir():
            raise TrainMissing(f"no trained run {run_id!r} in {run.path.parent}")
        if not run.is_complete():
            raise TrainMissing(
                f"the trained run {run_id!r} is incomplete: {run.path} lacks its weights or summary"
            )
        if model is None:
            model = run.read_summary().get("model")
        return TrainedRun(run_id, model, run.path)

    def catalogue_mismatch(self, run: TrainedRun) -> str | None:
        """Why `run` cannot score the workspace's current catalogue, or None when it can
        (`export.catalogue_mismatch`)."""
        from bridgerec.tasks.train.export import catalogue_mismatch
        from bridgerec.tasks.train.inputs import load_catalog

        return catalogue_mismatch(RunDir(self.workspace, run.run_id), load_catalog(self.workspace))

    def export_vectors(self, run: TrainedRun, device: str = "cpu") -> dict[str, DomainVectors]:
        """{domain: DomainVectors}: per target domain, user and item vectors whose inner product is the
        run's score (tasks/train/export.py)."""
        from bridgerec.tasks.train.export import export_vectors

        return export_vectors(run.path, self.workspace, device=device)

    def text_space(self, run: TrainedRun) -> TextSpace | None:
        """The run's text space and users' histories, for explaining its lists (tasks/train/export.py);
        None for a model that scores no text (pop, sasrec, sasrec-domain)."""
        from bridgerec.tasks.train.export import export_text_space

        return export_text_space(run.path, self.workspace)

    def scores_items_from_text(self, run: TrainedRun) -> bool:
        """Whether the run's model scores an item from its LLM embedding (so also an item without
        interactions), rather than from a trained ID row only (sasrec, sasrec-domain, pop)."""
        config = RunDir(self.workspace, run.run_id).read_config()
        typed = config.get("model_config")  # runs that record a typed model config
        if typed is not None:
            return int(typed.get("global_dim", 0)) > 0
        return int(config.get("settings", {}).get("tables", {}).get("global_dim", 0)) > 0

    def input_hashes(self, run_id: str) -> dict[str, str]:
        """{role: content hash} of every input file the run read (config.json `inputs`); raises
        FileNotFoundError for a run without a config."""
        return dict(RunDir(self.workspace, run_id).read_config().get("inputs", {}))

    def metrics(self, run: TrainedRun) -> pa.Table | None:
        """The run's metrics.parquet (storage.schemas.TRAIN_METRICS), or None for a run without one."""
        path = RunDir(self.workspace, run.run_id).metrics
        return pq.read_table(path) if path.exists() else None

    def fingerprint(self, run: TrainedRun) -> str | None:
        """Content hash of the run's summary: changes whenever the run's result changes."""
        summary = RunDir(self.workspace, run.run_id).summary
        return hash_file(summary) if summary.exists() else None
