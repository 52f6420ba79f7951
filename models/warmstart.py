"""Warm start: initialise a freshly built model from an earlier run's weights, item rows matched by item_id.

Ingest numbers items afresh on every run (row_number over the sorted item ids of each domain), so one new
item shifts the rows of every item after it. Every item-indexed tensor (`Recommender.item_tables()`) is
therefore remapped through the items' string ids: a row of an item both runs know takes the old row, a
row of an item new in this run keeps the fresh initialisation the model was built with, except in a
model with LLM tables (llm4cdsr-hybrid), where a new item's ID row starts at zero: such rows are added to
the item's LLM embedding, so the new item enters as its LLM-derived representation. The frozen LLM
tables (`Recommender.frozen_tables()`) always stay as built, i.e. from the current enrich output; the
old ones only serve to measure how far the enrich tables moved. Every other tensor is copied when its
name and shape match. Anything else is an incompatibility (`WarmStartError`): the caller starts cold.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from bridgerec.models.base import GLOBAL_IDS, Recommender
from bridgerec.models.data import Catalog


class WarmStartError(ValueError):
    """The earlier weights cannot initialise this model (the message says why)."""


@dataclass
class ItemSpace:
    """A run's id spaces: item_ids[g - 1] is the source id of global id g; local id = g - offsets[d]."""

    item_ids: list[str]
    domains: list[str]
    offsets: list[int]
    sizes: list[int]

    @classmethod
    def of(cls, catalog: Catalog) -> ItemSpace:
        return cls(
            list(catalog.item_ids),
            list(catalog.domains),
            [int(n) for n in catalog.offsets],
            [int(n) for n in catalog.sizes],
        )

    def rows(self, space: int) -> dict[str, int]:
        """item_id -> row of a table over `space` (GLOBAL_IDS or a domain index); row 0 is padding."""
        if space == GLOBAL_IDS:
            return {item: g for g, item in enumerate(self.item_ids, start=1)}
        start = self.offsets[space]
        return {item: lid for lid, item in enumerate(self.item_ids[start : start + self.sizes[space]], 1)}


@dataclass
class RowMap:
    """new[new_rows] = old[old_rows] for the items both runs know."""

    new_rows: np.ndarray
    old_rows: np.ndarray
    new_items: int  # rows of this run's items the earlier run did not have (they stay fresh)
    dropped_items: int  # the earlier run's items that are gone


def row_map(previous: ItemSpace, current: ItemSpace, space: int) -> RowMap:
    """Match the rows of one id space by item_id. A local space is matched by domain *name*."""
    new = current.rows(space)
    if space == GLOBAL_IDS:
        old = previous.rows(space)
    else:
        name = current.domains[space]
        old = previous.rows(previous.domains.index(name)) if name in previous.domains else {}
    pairs = np.array([(row, old[item]) for item, row in new.items() if item in old], np.int64).reshape(-1, 2)
    return RowMap(pairs[:, 0], pairs[:, 1], len(new) - len(pairs), len(old) - len(pairs))


@dataclass
class WarmStart:
    """What `warm_state` did, tensor by tensor (for the log and the run's record)."""

    state: dict[str, Tensor]  # the full state dict to load
    copied: list[str] = field(default_factory=list)
    remapped: dict[str, dict[str, int]] = field(default_factory=dict)  # key -> kept/new/dropped rows
    fresh: list[str] = field(default_factory=list)  # not in the earlier weights: as initialised
    frozen: list[str] = field(default_factory=list)  # from the current enrich output
    ignored: list[str] = field(default_factory=list)  # earlier tensors this model has no use for
    table_cosine: dict[str, float] = field(default_factory=dict)  # frozen key -> mean cosine, shared items
    items: dict[str, int] = field(default_factory=dict)  # kept/new/dropped items (all domains)

    def describe(self) -> str:
        parts = [
            f"items {self.items.get('kept', 0)} kept, {self.items.get('new', 0)} new, "
            f"{self.items.get('dropped', 0)} dropped",
            f"{len(self.copied)} tensors copied",
        ]
        parts += [
            f"{k} remapped ({v['kept']} kept, {v['new']} new, {v['dropped']} dropped)"
            for k, v in self.remapped.items()
        ]
        if self.fresh:
            parts.append(f"fresh: {', '.join(self.fresh)}")
        if self.frozen:
            parts.append(f"from enrich: {', '.join(self.frozen)}")
        if self.ignored:
            parts.append(f"unused earlier tensors: {', '.join(self.ignored)}")
        return "; ".join(parts)


def warm_state(
    model: Recommender, previous: dict[str, Tensor], previous_items: ItemSpace, current_items: ItemSpace
) -> WarmStart:
    """The state dict that initialises `model` (freshly built on `current_items`) from `previous` (an
    earlier run's weights on `previous_items`). The model itself is not touched: load `.state` into it.

    Raises WarmStartError when the domains differ or a tensor both have differs in shape (beyond the item
    rows of an item table)."""
    if previous_items.domains != current_items.domains:
        raise WarmStartError(f"domains changed: {previous_items.domains} -> {current_items.domains}")
    fresh = model.state_dict()
    tables, frozen = model.item_tables(), model.frozen_tables()
    maps: dict[int, RowMap] = {}

    def rows(space: int, device: torch.device) -> tuple[Tensor, Tensor, RowMap]:
        if space not in maps:
            maps[space] = row_map(previous_items, current_items, space)
        rm = maps[space]
        return torch.from_numpy(rm.new_rows).to(device), torch.from_numpy(rm.old_rows).to(device), rm

    g = rows(GLOBAL_IDS, torch.device("cpu"))[2]
    out = WarmStart(state={}, items={"kept": len(g.new_rows), "new": g.new_items, "dropped": g.dropped_items})
    for key, value in fresh.items():
        old = previous.get(key)
        if key in frozen:
            # Always the current enrich output; the old rows only measure how far the tables moved.
            out.frozen.append(key)
            out.state[key] = value
            if old is not None and old.shape[1:] == value.shape[1:]:
                new_rows, old_rows, _ = rows(tables[key], value.device)
                out.table_cosine[key] = _mean_cosine(value[new_rows], old.to(value)[old_rows])
            continue
        if old is None:
            out.fresh.append(key)
            out.state[key] = value
            continue
        if key in tables:
            if old.shape[1:] != value.shape[1:]:
                raise WarmStartError(
                    f"{key}: rows of width {tuple(old.shape[1:])}, now {tuple(value.shape[1:])}"
                )
            new_rows, old_rows, rm = rows(tables[key], value.device)
            new = value.clone()  # rows of new items (and the padding row) keep their fresh values...
            if frozen:
                # ...except in a model with LLM tables, whose trainable ID rows are added to the LLM
                # embedding: a new item's row starts at zero, so it enters as its LLM-derived
                # representation alone, not that plus random noise.
                new.zero_()
            new[new_rows] = old.to(value)[old_rows]
            out.state[key] = new
            out.remapped[key] = {"kept": len(rm.new_rows), "new": rm.new_items, "dropped": rm.dropped_items}
            continue
        if old.shape != value.shape:
            raise WarmStartError(f"{key}: shape {tuple(old.shape)}, now {tuple(value.shape)}")
        out.state[key] = old.to(value).clone()
        out.copied.append(key)
    out.ignored = sorted(set(previous) - set(fresh))
    return out


def _mean_cosine(a: Tensor, b: Tensor) -> float:
    """Mean cosine of paired rows, over the rows that are non-zero in both (1.0 when none)."""
    keep = (a.norm(dim=1) > 0) & (b.norm(dim=1) > 0)
    if not bool(keep.any()):
        return 1.0
    return float(torch.nn.functional.cosine_similarity(a[keep], b[keep], dim=1).mean())
