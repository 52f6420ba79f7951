"""Build a model from its typed config (`ModelConfig`) and the tables it needs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bridgerec.models.base import Recommender
from bridgerec.models.config import ModelConfig
from bridgerec.models.data import Catalog
from bridgerec.models.llm4cdsr import LLM4CDSR
from bridgerec.models.pop import Popularity
from bridgerec.models.sasrec import SASRec
from bridgerec.models.sasrec_domain import SASRecDomain

ARCHITECTURES: dict[str, type[Recommender]] = {
    "llm4cdsr": LLM4CDSR,
    "sasrec": SASRec,
    "sasrec_domain": SASRecDomain,
    "pop": Popularity,
}


@dataclass
class ItemTables:
    """Frozen LLM item embeddings: global by global id, local per domain by local id (row 0 = zeros)."""

    global_table: np.ndarray  # [N + 1, Dg]
    local_tables: list[np.ndarray]  # per domain [n_d + 1, Dl]

    def check(self, catalog: Catalog) -> None:
        n = catalog.n_items + 1
        if self.global_table.shape[0] != n:
            raise ValueError(f"global LLM table has {self.global_table.shape[0]} rows, expected {n}")
        for d, (table, size) in enumerate(zip(self.local_tables, catalog.sizes, strict=True)):
            if table.shape[0] != size + 1:
                raise ValueError(
                    f"local LLM table of domain {d} has {table.shape[0]} rows, expected {size + 1}"
                )
        if len({t.shape[1] for t in self.local_tables}) != 1:
            raise ValueError("local LLM tables must share one width")


def build_model(config: ModelConfig, catalog: Catalog, tables: ItemTables | None = None) -> Recommender:
    """The model of `config.architecture`, freshly initialised from the current torch seed.

    For LLM4CDSR without `tables` (rebuilding a finished run) zero tables of the widths in `config` are
    made; the run's weights then fill them."""
    if config.architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {config.architecture!r}")
    if config.architecture != "llm4cdsr":
        return ARCHITECTURES[config.architecture](catalog, config)
    if tables is None:
        global_table = torch.zeros(catalog.n_items + 1, config.global_dim)
        local = [torch.zeros(int(n) + 1, config.local_dim) for n in catalog.sizes]
    else:
        tables.check(catalog)
        if (
            tables.global_table.shape[1] != config.global_dim
            or tables.local_tables[0].shape[1] != config.local_dim
        ):
            raise ValueError(
                f"LLM tables of widths {tables.global_table.shape[1]}/{tables.local_tables[0].shape[1]}, "
                f"the config says {config.global_dim}/{config.local_dim}"
            )
        global_table = torch.from_numpy(np.ascontiguousarray(tables.global_table, np.float32))
        local = [torch.from_numpy(np.ascontiguousarray(t, np.float32)) for t in tables.local_tables]
    return LLM4CDSR(catalog, config, global_table, local)
