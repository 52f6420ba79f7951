"""The files a train run reads, found and checked without torch: the stage's input check
(`check_train_inputs`, the stage table's `check`) runs before the command line imports the models, so a
mistyped workspace fails in a second."""

from __future__ import annotations

from pathlib import Path

from bridgerec.storage.workspace import Workspace, hash_file
from bridgerec.tasks.context import StageRun
from bridgerec.tasks.enrich import EnrichOutputs
from bridgerec.tasks.ingest import IngestOutputs
from bridgerec.tasks.train.settings import TrainSettings


def input_files(workspace: Workspace, llm: bool, profiles: bool) -> dict[str, Path]:
    """The files a run depends on (their content hashes decide whether a rerun is skipped)."""
    ingest, enrich = IngestOutputs(workspace), EnrichOutputs(workspace)
    files = {"ingest/sequences": ingest.file("sequences"), "ingest/items": ingest.file("items")}
    if llm:
        files["enrich/item_vectors"] = enrich.file("item_vectors")
    if profiles and enrich.file("profiles").exists():
        files["enrich/profiles"] = enrich.file("profiles")
    return files


def check_files(files: dict[str, Path]) -> dict[str, Path]:
    """`files` (role -> path) when every one is a file. Raises FileNotFoundError naming each missing one
    and the stage that writes it."""
    missing = [f"{role}: {p}" for role, p in files.items() if not p.is_file()]
    if missing:
        raise FileNotFoundError("train inputs not found (run ingest/enrich first): " + "; ".join(missing))
    return files


def input_hashes(files: dict[str, Path]) -> dict[str, str]:
    """role -> content hash of each of `files`; raises FileNotFoundError as `check_files`."""
    return {role: hash_file(p) for role, p in check_files(files).items()}


def check_train_inputs(run: StageRun[TrainSettings]) -> dict[str, str]:
    """role -> path of each file the run would read (the ingest's sequences and items, the enrich's item
    vectors for a model on the LLM tables, its profiles where used). Raises FileNotFoundError naming each
    missing file and the stage that writes it, before any work (the stage table's `check`)."""
    settings = run.settings
    files = input_files(run.workspace, settings.uses_llm_tables, settings.uses_profiles)
    return {role: str(p) for role, p in check_files(files).items()}
