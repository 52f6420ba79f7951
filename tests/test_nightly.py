"""The nightly flow in-process on the bundled sample: a full run publishes; an unchanged rerun does no
work; a stage that fails fails the run and leaves the warehouse as it was; the rerun after the fix
resumes from the finished stages."""

from __future__ import annotations

import gzip
import json
import re
import shutil
from dataclasses import dataclass
from html import escape
from pathlib import Path

import duckdb
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.exceptions import ParameterTypeError
from typer.testing import CliRunner

from bridgerec.cli import app
from bridgerec.flows.night import NightSummary, summary_markdown
from bridgerec.flows.nightly import nightly_flow
from bridgerec.storage.runs import RunDir
from bridgerec.storage.workspace import Workspace
from tests.browser import inspect_page
from tests.conftest import REPO, SAMPLE
from tests.train_data import EMBEDDING_CACHE

pytestmark = pytest.mark.slow  # minutes: scheduled first (tests/conftest.py)

CONFIG = str(REPO / "configs" / "sample.yaml")


def _latest_run(warehouse: Path) -> tuple[str, int]:
    with duckdb.connect(str(warehouse), read_only=True) as con:
        run_id = con.execute("SELECT run_id FROM latest_recommendations LIMIT 1").fetchall()[0][0]
        rows = con.execute("SELECT count(*) FROM latest_recommendations").fetchall()[0][0]
    return run_id, rows


def _slice_sample(out: Path, n_users: int) -> int:
    """The first `n_users` users of the bundled sample (both domains present) and the items they had."""
    with gzip.open(SAMPLE / "interactions.csv.gz", "rt") as fh:
        header, *rows = fh.read().splitlines()
    users = sorted({r.split(",")[0] for r in rows})
    chosen = set(users[: n_users // 2] + users[-(n_users - n_users // 2) :])
    kept = [r for r in rows if r.split(",")[0] in chosen]
    items = {r.split(",")[1] for r in kept}
    with gzip.open(out / "interactions.csv.gz", "wt") as fh:
        fh.write("\n".join([header, *kept]) + "\n")
    with gzip.open(SAMPLE / "items.csv.gz", "rt") as fh:
        item_header, *item_rows = fh.read().splitlines()
    with gzip.open(out / "items.csv.gz", "wt") as fh:
        fh.write("\n".join([item_header, *[r for r in item_rows if r.split(",")[0] in items]]) + "\n")
    return len(chosen)


@dataclass
class Nights:
    """Four nights on a slice of the sample: a first run, an unchanged rerun, a night that fails in
    enrich (new data, a broken profile model), and the rerun that resumes it."""

    users: int
    ws: Path
    warehouse: Path
    first: dict
    again: dict
    failed: list[tuple[str]]
    resumed: dict
    runs: tuple[tuple[str, int], tuple[str, int], tuple[str, int]]  # latest run after 1st, failed, 4th


def _overrides(raw: Path, ws: Path, warehouse: Path) -> dict:
    return {
        "workspace": str(ws),
        "warehouse": str(warehouse),
        "ingest": {"items": str(raw / "items.csv.gz"), "interactions": str(raw / "interactions.csv.gz")},
        "enrich": {"embedding_cache": str(EMBEDDING_CACHE)},
        "profiles": {"max_users": 4},
        "train": {"epochs": 1},
        "publish": {"k": 5},
        "runtime": {"stage_retries": 0},
        "gate": {"popularity_floor": False},  # one epoch may sit under popularity: the floor is test_gate's
    }


@pytest.fixture(scope="module")
def nights(prefect_harness: None, tmp_path_factory: pytest.TempPathFactory) -> Nights:
    tmp_path = tmp_path_factory.mktemp("nightly")
    raw = tmp_path / "raw"
    raw.mkdir()
    users = _slice_sample(raw, n_users=150)  # a slice of the sample keeps the four runs short
    ws, warehouse = tmp_path / "ws", tmp_path / "warehouse.duckdb"
    overrides = _overrides(raw, ws, warehouse)
    first = nightly_flow(CONFIG, overrides).model_dump(mode="json")
    after_first = _latest_run(warehouse)
    again = nightly_flow(CONFIG, overrides).model_dump(mode="json")

    # New data arrives, and the profile model is misconfigured: enrich fails after ingest finished.
    with gzip.open(raw / "interactions.csv.gz", "rt") as fh:
        text = fh.read()
    first_user = text.splitlines()[1].split(",")[0]
    last_pos = max(
        int(line.split(",")[3]) for line in text.splitlines()[1:] if line.startswith(first_user + ",")
    )
    kitchen_item = next(line.split(",")[1] for line in text.splitlines()[1:] if ",kitchen," in line)
    with gzip.open(raw / "interactions.csv.gz", "wt") as fh:
        fh.write(text.rstrip("\n") + f"\n{first_user},{kitchen_item},kitchen,{last_pos + 1}\n")
    broken = overrides | {
        "profiles": {"max_users": 4, "model": str(tmp_path / "no-such-model"), "auto_prepare": False}
    }
    with pytest.raises(Exception):  # noqa: B017  (the stage's own error, re-raised by the flow)
        nightly_flow(CONFIG, broken)
    after_failed = _latest_run(warehouse)
    with duckdb.connect(str(warehouse), read_only=True) as con:
        failed = con.execute("SELECT message FROM runs WHERE status = 'failed'").fetchall()
    resumed = nightly_flow(CONFIG, overrides).model_dump(mode="json")
    return Nights(
        users,
        ws,
        warehouse,
        first,
        again,
        failed,
        resumed,
        (after_first, after_failed, _latest_run(warehouse)),
    )


def test_nightly_runs_skips_fails_safely_and_resumes(nights: Nights) -> None:
    stages = nights.first["stages"]
    assert stages["ingest"]["users"] == nights.users
    assert stages["enrich"]["profiles_generated"] == 4
    assert stages["publish"]["rows"] > 0
    run_1, rows_1 = nights.runs[0]
    assert rows_1 == stages["publish"]["rows"]

    again = nights.again["stages"]
    assert again["ingest"]["skipped"] and again["train"]["skipped"] and again["publish"]["skipped"]
    assert again["enrich"]["items_embedded"] == 0 and again["enrich"]["profiles_generated"] == 0
    # The morning read of the unchanged night still gives the headline figure (the gate scored nothing).
    figure = again["train"]["valid"]["full"]["overall"]["ndcg@10"]
    assert nights.again["gate"]["decision"] == "unchanged"
    assert (
        f"- validation NDCG@10 (full ranking) {figure:.4f}: the published run's, its inputs unchanged"
        in summary_markdown(NightSummary(**nights.again))
    )
    # So does its row in the warehouse's `nights` (it was NULL: a trend read from `nights` had a gap).
    with duckdb.connect(str(nights.warehouse), read_only=True) as con:
        row = con.execute(
            "SELECT gate, valid_ndcg10 FROM nights WHERE run_id = ?", [nights.again["night_id"]]
        ).fetchall()
    assert row == [("unchanged", pytest.approx(figure))]

    assert nights.runs[1] == (run_1, rows_1)  # the failed night left the published tables untouched
    assert len(nights.failed) == 1 and nights.failed[0][0].startswith("stage enrich")

    resumed = nights.resumed["stages"]
    assert resumed["ingest"]["skipped"]  # finished before the crash: not redone
    assert not resumed["publish"]["skipped"]
    run_2, _ = nights.runs[2]
    assert run_2 != run_1


def test_a_forced_stage_is_rebuilt_on_unchanged_inputs(nights: Nights, tmp_path: Path) -> None:
    """`force` (`bridgerec run --force train`, or a deployment's parameter) rebuilds a stage whose inputs
    did not change: train trains again, cold, while ingest and enrich skip, and the morning read says
    so. On a copy of the nights' workspace (the fixture's own stays as its other tests read it), into a
    warehouse of its own."""
    ws = tmp_path / "ws"
    shutil.copytree(nights.ws, ws)
    overrides = _overrides(nights.ws.parent / "raw", ws, tmp_path / "warehouse.duckdb")
    with pytest.raises(ParameterTypeError, match=r"force\.0: Input should be 'ingest'"):
        nightly_flow(CONFIG, overrides, ["trian"])  # type: ignore[list-item]
    served = nightly_flow(CONFIG, overrides)  # nothing changed: the copy's run is what this warehouse serves
    assert served.gate is not None and served.published_run_id is not None
    served_run = RunDir(Workspace(ws), served.gate.new_run_id)
    weights = served_run.served.read_bytes()
    night = nightly_flow(CONFIG, overrides, ["train"])
    stages = night.stages
    assert stages.ingest is not None and stages.ingest.skipped
    assert stages.enrich is not None and stages.enrich.items_embedded == stages.enrich.profiles_generated == 0
    assert stages.train is not None and not stages.train.skipped and stages.train.init == "cold"
    assert night.forced == ["train"] and night.status == "completed"
    assert "| train | did (forced) |" in summary_markdown(night)
    # The retrain is a run of its own: the served run's weights are as they were, and the gate judged the
    # best of the two on these inputs against the served one (scored, not waved through as "unchanged").
    assert stages.train.run_id == f"{served_run.run_id}-r2"
    assert served_run.served.read_bytes() == weights
    assert night.gate is not None and night.best_run_id in (served_run.run_id, stages.train.run_id)
    if night.best_run_id == served_run.run_id:  # the retrain scored lower: the served run stays best
        assert night.gate.decision == "unchanged" and night.published_run_id == served.published_run_id
    else:
        assert night.gate.decision in ("passed", "refused") and night.gate.published_ndcg10 is not None
    unforced = nightly_flow(CONFIG, overrides)  # and the next night skips it again
    assert unforced.stages.train is not None and unforced.stages.train.skipped and unforced.forced == []
    assert unforced.stages.train.run_id == night.best_run_id  # the best training of these inputs


PLOTS = {"plot-quality", "plot-coverage", "plot-concentration", "plot-churn", "plot-data", "plot-costs"}


def test_each_night_writes_its_report_and_links_it(nights: Nights) -> None:
    """Every night, failed ones too, keeps a record and writes a report page that the summary (and so the
    nightly-summary artifact) links; the last one shows the four nights' trends and the churn since the
    first published run."""
    records = sorted(nights.ws.glob("nights/*.json"))
    pages = sorted(nights.ws.glob("reports/*.html"))
    assert len(records) == 4 and len(pages) == 4
    last = nights.resumed
    assert last["report"] and Path(last["report"]).exists()
    assert f"night report: [{last['report']}]" in summary_markdown(NightSummary.model_validate(last))
    with get_client(sync_client=True) as client:  # the night's Prefect artifact links the page
        links = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["night-report"]))
        )
    assert any(Path(last["report"]).as_uri() in str(a.data) for a in links)
    html = Path(last["report"]).read_text()
    assert "<script" not in html and not re.search(r'(src|href)="https?:|url\((?!#)', html)  # self-contained
    assert set(re.findall(r'<figure class="plot" id="(plot-\w+)"', html)) == PLOTS
    record = json.loads((nights.ws / "nights" / f"{last['night_id']}.json").read_text())
    figures = record["figures"]
    # The lists table names its top item as the plot beside it does: by title (it gave the id alone).
    top = next(r["top_item_id"] for r in record["list_stability"] if r["domain"] == "food")
    title = next(t["title"] for t in figures["top_items"]["food"] if t["item_id"] == top)
    assert f'{escape(title)} <span class="muted">{top}</span>' in html
    # Costs: the night's wall seconds of a step (the summary's figure) beside the stage's own.
    assert ">wall seconds</th>" in html and f'<td class="n">{record["seconds"]["enrich"]:,.1f}</td>' in html
    assert set(figures["valid_by_domain"]) == {"food", "kitchen", "overall"}
    for domain in ("food", "kitchen"):
        v = figures["valid_by_domain"][domain]
        assert 0 <= v["popularity"] <= 1 and 0 <= v["model"] <= 1
        assert sum(figures["churn_histogram"][domain]) > 0  # users compared with the first run's lists
        assert 0 < figures["top_items"][domain][0]["share"] <= 1
    examples = figures["examples"]
    assert len(examples) == 3 and all(e["profile"] and e["history"] for e in examples)
    assert all(len(rows) <= 5 for e in examples for rows in e["recommendations"].values())
    assert (
        examples[0]["user_id"] in html and escape(examples[0]["recommendations"]["food"][0]["title"]) in html
    )
    # Each example item with the history item that explains it (the sample's model has a text space).
    first = examples[0]["recommendations"]["food"][0]
    assert first["because_item_id"] and -1 <= first["because_score"] <= 1
    assert "because you had (cosine, closer than N % of the domain)" in html
    closer = f"closer than {first['because_percentile']:.0f} %"
    assert f"{escape(first['because_title'])} ({first['because_score']:.2f}, {closer})" in html
    failed = [json.loads(p.read_text()) for p in records]
    assert [r["status"] for r in sorted(failed, key=lambda r: r["started_at"])] == [
        "completed",
        "completed",
        "failed",
        "completed",
    ]


def test_the_report_draws_every_plot_in_a_real_browser(nights: Nights) -> None:
    """The page loads in headless Chromium without console messages, fetches nothing, and every plot is
    laid out with its marks drawn."""
    page = inspect_page(Path(nights.resumed["report"]))
    assert page["console"] == [] and page["resources"] == []
    assert {p["id"] for p in page["plots"]} == PLOTS
    for p in page["plots"]:
        assert p["width"] > 300 and p["height"] > 100, p
        assert p["drawn"] >= 20 and p["drawn"] >= 0.9 * p["shapes"], p


def test_the_browser_check_sees_a_broken_page(tmp_path: Path) -> None:
    """The check above can fail: an empty plot, a script error and a fetched resource are all seen."""
    page = tmp_path / "broken.html"
    (tmp_path / "style.css").write_text("body { color: #333; }")
    page.write_text(
        '<!DOCTYPE html><html><head><link rel="stylesheet" href="style.css"></head><body>'
        '<figure class="plot" id="plot-x"><svg width="10" height="10"></svg></figure>'
        "<script>nothing()</script></body></html>"
    )
    seen = inspect_page(page)
    assert seen["plots"] == [{"id": "plot-x", "width": 10, "height": 10, "shapes": 0, "drawn": 0}]
    assert any("nothing is not defined" in line for line in seen["console"])
    assert any(r.endswith("style.css") for r in seen["resources"])


def test_report_command_rebuilds_any_kept_night(nights: Nights) -> None:
    first = nights.first["night_id"]
    page = nights.ws / "reports" / f"{first}.html"
    page.unlink()
    out = CliRunner().invoke(app, ["report", "-w", str(nights.ws), "--night", first])
    assert out.exit_code == 0 and out.stdout.strip() == str(page.resolve()) and page.exists()
    newest = CliRunner().invoke(app, ["report", "-w", str(nights.ws), "--json"])
    assert json.loads(newest.stdout)["night_id"] == nights.resumed["night_id"]
    missing = CliRunner().invoke(app, ["report", "-w", str(nights.ws), "--night", "night-nope"])
    assert missing.exit_code == 2 and "error: night 'night-nope' has no record" in missing.stderr
