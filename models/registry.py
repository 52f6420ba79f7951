"""Build a model from its config (the dict saved as config.json) and the tables it needs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from bridgerec.models.base import Recommender
from bridgerec.models.data import Catalog
from bridgerec.models.llm4cdsr import LLM4CDSR
from bridgerec.models.sasrec import SASRec
from bridgerec.models.sasrec_domain import SASRecDomain

ARCHITECTURES: dict[str, type[Recommender]] = {
    "llm4cdsr": LLM4CDSR,
    "sasrec": SASRec,
    "sasrec_domain": SASRecDomain,
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


def build_model(
    config: dict, catalog: Catalog, tables: ItemTables | None = None, profile_dim: int = 0
) -> Recommender:
    """config: the resolved train settings (`architecture` plus hyper-parameters).

    For LLM4CDSR without `tables` (rebuilding from a checkpoint) zero tables of the recorded shapes
    are made; the checkpoint's buffers then fill them.
    """
    arch = config["architecture"]
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}")
    kwargs = {k: config[k] for k in ("hidden", "layers", "heads", "dropout", "max_len", "causal")}
    if arch != "llm4cdsr":
        return ARCHITECTURES[arch](catalog, **kwargs)
    if tables is None:
        shapes = config["tables"]
        global_table = torch.zeros(catalog.n_items + 1, shapes["global_dim"])
        local = [torch.zeros(int(n) + 1, shapes["local_dim"]) for n in catalog.sizes]
    else:
        tables.check(catalog)
        global_table = torch.from_numpy(np.ascontiguousarray(tables.global_table, np.float32))
        local = [torch.from_numpy(np.ascontiguousarray(t, np.float32)) for t in tables.local_tables]
    return LLM4CDSR(
        catalog,
        global_table,
        local,
        profile_dim=config.get("tables", {}).get("profile_dim", profile_dim),
        id_embeddings=config["id_embeddings"],
        alpha=config["alpha"],
        beta=config["beta"],
        tau=config["tau"],
        **kwargs,
    )
