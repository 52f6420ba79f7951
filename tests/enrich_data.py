"""Tiny real slices of the bundled Food-Kitchen sample for the enrich tests (engine time is the cost)."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

from bridgerec.storage.workspace import Workspace
from bridgerec.tasks import StageRun
from bridgerec.tasks.ingest import IngestSettings, run_ingest

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
LONG_ITEM = "LONGTITLE01"


def _read(name: str) -> list[dict[str, str]]:
    with gzip.open(SAMPLE / name, "rt", newline="") as fh:
        return list(csv.DictReader(fh))


def slice_workspace(root: Path, n_users: int, both_domains: int, long_item: bool = False) -> Workspace:
    """Ingest `n_users` sample users (the first by id; `both_domains` of them active in both domains) and
    the items they touched. With `long_item`, one more user whose history holds an item with a ~4,000-token
    title (too long for either model unless cut)."""
    inter = _read("interactions.csv.gz")
    items = _read("items.csv.gz")
    domains: dict[str, set[str]] = {}
    for r in inter:
        domains.setdefault(r["user_id"], set()).add(r["domain"])
    users = sorted(domains)
    mixed = [u for u in users if len(domains[u]) == 2][:both_domains]
    single = [u for u in users if len(domains[u]) == 1][: n_users - len(mixed)]
    keep = set(mixed) | set(single)
    rows = [r for r in inter if r["user_id"] in keep]
    item_ids = {r["item_id"] for r in rows}
    item_rows = [r for r in items if r["item_id"] in item_ids]
    if long_item:
        victim = single[0]
        extra = [r for r in inter if r["user_id"] == victim]
        for r in extra:  # a copy of that user's history, the first item replaced by the long one
            rows.append(r | {"user_id": "ZZLONGUSER"})
        rows[-len(extra)] = rows[-len(extra)] | {"item_id": LONG_ITEM}
        domain = extra[0]["domain"]
        rows[-len(extra)]["domain"] = domain
        title = " ".join(f"spatula{i} whisk ladle" for i in range(1000))
        item_rows.append({"item_id": LONG_ITEM, "domain": domain, "title": title})
    root.mkdir(parents=True, exist_ok=True)
    for name, data in (("items.csv", item_rows), ("interactions.csv", rows)):
        with open(root / name, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(data[0]))
            writer.writeheader()
            writer.writerows(data)
    ws = Workspace(root / "ws")
    run_ingest(StageRun(IngestSettings(items=root / "items.csv", interactions=root / "interactions.csv"), ws))
    return ws
