"""The layout of one training run, WORKSPACE/runs/<run_id>/, and its atomic writes.

model.safetensors  best weights (frozen LLM tables included, so the run rebuilds on its own)
refit.safetensors  train.refit: the same model retrained through the validation targets (test, publish)
config.json        everything needed to rebuild the model (settings, id spaces, table shapes, inputs)
items.parquet      the item id of every global id this run was trained on (warm start remaps by it)
metrics.parquet    per-epoch training history and the final evaluation (schemas.TRAIN_METRICS)
curve.png          validation NDCG@10 and training loss per epoch
summary.json       the run's result; written last, so its presence means the run is complete
checkpoint.pt      weights + optimizer + loop state after the latest epoch (resume after a crash)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from bridgerec.storage import schemas
from bridgerec.storage.files import write_json_atomic, write_parquet_atomic
from bridgerec.storage.workspace import Workspace

RUNS = "runs"


class RunDir:
    """WORKSPACE/runs/<run_id>/. A run's folder is never replaced: a forced retrain on the same settings
    and inputs is a run of its own, `<run_id>-r2`, `-r3`, ... (`retrain_id`), beside the first."""

    def __init__(self, workspace: Workspace, run_id: str) -> None:
        self.run_id = run_id
        self.path = workspace.root / RUNS / run_id

    @staticmethod
    def retrain_id(base: str, n: int) -> str:
        """The id of the n-th training (n >= 2) of the settings and inputs whose first run is `base`."""
        return f"{base}-r{n}"

    @classmethod
    def trainings(cls, workspace: Workspace, base: str) -> list[RunDir]:
        """The folders of `base` and of its forced retrains (`retrain_id`) that exist, oldest first."""
        root = workspace.root / RUNS
        found = {1: cls(workspace, base)} if (root / base).is_dir() else {}
        if root.is_dir():
            prefix = f"{base}-r"
            for path in root.iterdir():
                n = path.name[len(prefix) :]
                if path.name.startswith(prefix) and n.isdigit() and int(n) >= 2 and path.is_dir():
                    found[int(n)] = cls(workspace, path.name)
        return [found[n] for n in sorted(found)]

    @property
    def model(self) -> Path:
        """The selected weights (best on validation): what the quality gate and warm starts read."""
        return self.path / "model.safetensors"

    @property
    def refit(self) -> Path:
        """train.refit's weights (retrained through the validation targets), when the run has them."""
        return self.path / "refit.safetensors"

    @property
    def served(self) -> Path:
        """The weights publish serves and the test figures measured: the refit's, else the selected."""
        return self.refit if self.refit.exists() else self.model

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def items(self) -> Path:
        return self.path / "items.parquet"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.parquet"

    @property
    def curve(self) -> Path:
        return self.path / "curve.png"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"

    def is_complete(self) -> bool:
        return self.summary.exists() and self.model.exists()

    def read_config(self) -> dict[str, Any]:
        if not self.config.exists():
            raise FileNotFoundError(f"{self.config} does not exist: not a training run folder")
        config: dict[str, Any] = json.loads(self.config.read_text())
        return config

    def read_summary(self) -> dict[str, Any]:
        summary: dict[str, Any] = json.loads(self.summary.read_text())
        return summary

    def write_config(self, config: dict[str, Any]) -> None:
        write_json_atomic(config, self.config)

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json_atomic(summary, self.summary)

    def write_items(self, item_ids: list[str]) -> None:
        """The run's id map: item_ids[g - 1] is the source id of global id g (ingest renumbers every run)."""
        table = pa.table(
            {"global_id": pa.array(range(1, len(item_ids) + 1), pa.int32()), "item_id": item_ids},
            schema=schemas.TRAIN_RUN_ITEMS,
        )
        write_parquet_atomic(table, self.items, schemas.TRAIN_RUN_ITEMS)

    def read_items(self) -> list[str]:
        """The item ids in global-id order (FileNotFoundError for runs trained before this file existed)."""
        import pyarrow.parquet as pq

        table = pq.read_table(self.items).sort_by("global_id")
        item_ids: list[str] = table["item_id"].to_pylist()
        return item_ids

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        table = pa.Table.from_pylist(rows, schema=schemas.TRAIN_METRICS)
        write_parquet_atomic(table, self.metrics, schemas.TRAIN_METRICS)
