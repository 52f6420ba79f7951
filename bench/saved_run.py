"""A saved train run reopened for a benchmark: its model, settings and the inputs it was trained on.

Shared by the benchmarks that score a finished run again (`new_item_exposure.py`,
`prior_fit_validation.py`); they run as `python bench/NAME.py`, so this folder is on `sys.path`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from bridgerec.models.base import Recommender
from bridgerec.models.data import Catalog, EvalSplit
from bridgerec.storage.workspace import Workspace
from bridgerec.tasks import StageRun
from bridgerec.tasks.train import TrainSettings
from bridgerec.tasks.train.export import load_run
from bridgerec.tasks.train.inputs import TrainInputs, load_inputs


def run_arguments(description: str | None) -> argparse.ArgumentParser:
    """The arguments every such benchmark takes: --workspace, --run and --threads."""
    ap = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workspace", type=Path, required=True)
    ap.add_argument("--run", type=Path, required=True, help="a run folder (WS/runs/RUN_ID)")
    ap.add_argument("--threads", type=int, default=1)
    return ap


@dataclass
class SavedRun:
    model: Recommender
    config: dict[str, Any]  # the run's config.json
    catalog: Catalog
    settings: TrainSettings  # the settings it was trained with
    inputs: TrainInputs  # its splits again (the same held-out items: seeded by the run's seed)

    def split(self, name: str) -> EvalSplit:
        """The run's `valid` or `test` split as its training built it (its negatives, seed and short-history
        cut-off)."""
        s = self.settings
        return self.inputs.data.eval_split(name, s.eval_negatives, s.seed, s.short_history)


def open_run(
    workspace: Path, run: Path, threads: int, weights: Literal["served", "selected"] = "served"
) -> SavedRun:
    """The run rebuilt with its `weights` (`load_run`): `served` (the refit's where the run has one, what
    its test figures measured) or `selected` (the best on validation, what its validation figures did)."""
    torch.set_num_threads(threads)
    ws = Workspace(workspace)
    model, config, catalog = load_run(run, ws, weights=weights)
    saved = config["settings"]
    settings = TrainSettings(**{k: v for k, v in saved.items() if k in TrainSettings.model_fields})
    return SavedRun(model, config, catalog, settings, load_inputs(StageRun(settings, ws)))


def write_merged(out: Path, record: dict[str, Any], key: str) -> None:
    """Write `record` as JSON to `out`, keeping the rows (`record["rows"]`) an earlier call wrote there at
    other values of `key` (ranks of a saved run do not depend on the machine), sorted by `key`."""
    if out.exists():
        ours = {r[key] for r in record["rows"]}
        earlier = [r for r in json.loads(out.read_text())["rows"] if r[key] not in ours]
        record["rows"] = sorted(earlier + record["rows"], key=lambda r: r[key])
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
