"""Shared by the train tests: small training settings, the enrich stage as the train tests run it, and a
next night's raw files (the bundled sample plus new interactions, new users and new items)."""

from __future__ import annotations

import atexit
import csv
import gzip
import os
import shutil
import tempfile
from pathlib import Path

from bridgerec.storage.workspace import Workspace
from bridgerec.tasks import StageRun
from bridgerec.tasks.enrich import EnrichSections

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"


# One embedding cache (enrich.embedding_cache) for the session's runs over the sample: the first run
# embeds the sample's texts with the real model, the later workspaces read them. scripts/test.sh sets
# BRIDGEREC_TEST_EMBEDDING_CACHE so every pytest-xdist worker shares one folder.
def _embedding_cache() -> Path:
    if os.environ.get("BRIDGEREC_TEST_EMBEDDING_CACHE"):
        return Path(os.environ["BRIDGEREC_TEST_EMBEDDING_CACHE"])
    folder = tempfile.mkdtemp(prefix="bridgerec-embeddings-")  # this process's own: removed at its exit
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return Path(folder)


EMBEDDING_CACHE = _embedding_cache()
# Small and quick, but enough to learn on 1,000 users.
FAST = dict(hidden=32, max_len=50, dropout=0.2, lr=5e-3, batch_size=64, eval_batch_size=512, threads=1)
# New items whose ids sort before every sample id ("B00..."), so ingest shifts the ids of every other item.
NEW_ITEMS = [
    {"item_id": "0WARMFOOD1", "domain": "food", "title": "Smoked Paprika Sea Salt Blend, 4-Ounce Jar"},
    {"item_id": "0WARMFOOD2", "domain": "food", "title": "Organic Matcha Green Tea Powder, 100 Grams"},
    {"item_id": "0WARMKIT1", "domain": "kitchen", "title": "Cast Iron Mortar and Pestle, 2-Cup Capacity"},
]


def run_enrich_like_tests(workspace: Workspace) -> None:
    """The real enrich stage with the train tests' settings: vLLM MiniLM item embeddings and PCA tables
    (local tables as wide as the tests' hidden size: the domain threads take them frozen, as in the
    paper), greedy short SmolLM2 profiles for the first 12 users only (cheap, identical on every run)."""
    from bridgerec.tasks.enrich import EnrichSettings, ProfileSettings, run_enrich

    profiles = ProfileSettings(
        max_users=12, temperature=0, analyzer_max_tokens=16, summarizer_max_tokens=32, titles_per_cluster=5
    )
    run_enrich(
        StageRun(
            EnrichSections(
                EnrichSettings(local_dim=FAST["hidden"], embedding_cache=EMBEDDING_CACHE), profiles
            ),
            workspace,
            threads=2,
        )
    )


def _read(path: Path) -> list[dict[str, str]]:
    with gzip.open(path, "rt", newline="") as fh:
        return list(csv.DictReader(fh))


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    """Rows (same keys) -> a CSV file with a header; returns `path`."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def next_night(folder: Path, every: int = 20) -> tuple[Path, Path]:
    """(items.csv, interactions.csv): the sample plus one new interaction for every `every`-th user
    (outside the first 12 users, whose profiles the tests generate: their histories stay as they were),
    alternating between an item of the NEW_ITEMS and an earlier item of the user's last domain they never
    had; plus two new users, each with a history of three sample items and one new item."""
    items = _read(SAMPLE / "items.csv.gz")
    inter = _read(SAMPLE / "interactions.csv.gz")
    by_user: dict[str, list[dict[str, str]]] = {}
    for row in inter:
        by_user.setdefault(row["user_id"], []).append(row)
    domain_items: dict[str, list[str]] = {}
    for row in items:
        domain_items.setdefault(row["domain"], []).append(row["item_id"])
    new_by_domain = {d: [i["item_id"] for i in NEW_ITEMS if i["domain"] == d] for d in domain_items}
    added: list[dict[str, str]] = []
    for n, user in enumerate(sorted(by_user)[12::every]):
        rows = by_user[user]
        last = max(rows, key=lambda r: int(r["position"]))
        seen = {r["item_id"] for r in rows}
        if n % 2 == 0:
            pool = new_by_domain[last["domain"]]
            item = pool[(n // 2) % len(pool)]
        else:
            item = next(i for i in domain_items[last["domain"]][n:] if i not in seen)
        added.append(
            {
                "user_id": user,
                "item_id": item,
                "domain": last["domain"],
                "position": str(int(last["position"]) + 1),
            }
        )
    donors = sorted(by_user)[12:14]
    for k, donor in enumerate(donors):
        history = sorted(by_user[donor], key=lambda r: int(r["position"]))[:3]
        new = NEW_ITEMS[k]
        rows = [r | {"user_id": f"zzwarm{k}", "position": str(p)} for p, r in enumerate(history)]
        rows.append(
            {"user_id": f"zzwarm{k}", "item_id": new["item_id"], "domain": new["domain"], "position": "3"}
        )
        added += rows
    folder.mkdir(parents=True, exist_ok=True)
    return write_csv(folder / "items.csv", items + NEW_ITEMS), write_csv(
        folder / "interactions.csv", inter + added
    )
