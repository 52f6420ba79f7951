"""The training faults of issue #23 (tests/cases/<folder>, copied from the reports' inputs), each
asserting its folder's expected result, plus variants of each kind the folders do not hold.

Kinds: the sampled-evaluation candidate draw that never ends (22-small-domain-eval-hang: a small
domain, a crawler); a diverged model that trains "successfully" and wins selection
(23-diverged-training).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bridgerec.cli import app
from bridgerec.config import load_settings
from bridgerec.models.config import ModelConfig
from bridgerec.models.data import Catalog, EvalSplit, SequenceData, Sequences
from bridgerec.models.optim import Optimizer
from bridgerec.models.registry import build_model
from bridgerec.models.trainer import FitConfig, TrainingDiverged, train_epoch
from bridgerec.storage.workspace import Workspace
from bridgerec.tasks import StageRun
from bridgerec.tasks.ingest import run_ingest
from bridgerec.tasks.publish import run_publish
from bridgerec.tasks.quality import GateSettings
from bridgerec.tasks.quality.gate import decide
from bridgerec.tasks.train.inputs import load_catalog, load_sequences
from bridgerec.tasks.train.stage import run_train, select_best

CASES = Path(__file__).resolve().parent / "cases"


def _case(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A writable copy of tests/cases/<name>, made the working directory (configs use relative paths)."""
    here = tmp_path / Path(name).name
    shutil.copytree(CASES / name, here)
    monkeypatch.chdir(here)
    return here


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail (instead of hanging the suite) when the block runs longer than `seconds`: SIGALRM raises in
    the main thread wherever it is, also inside a numpy loop between two calls."""

    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _train(settings_file: str = "config.yaml", **update: object) -> dict:
    settings = load_settings(settings_file)
    ws = Workspace(settings.workspace)
    run_ingest(StageRun(settings.ingest, ws))
    return run_train(
        StageRun(settings.train.model_copy(update={"threads": 1, **update}), ws, threads=1)
    ).model_dump()


# ---- 22: a small domain or a heavy user and the sampled candidate draw --------------------------------


def test_22_small_domain_eval_hang_a_crawler_is_evaluated_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """a-crawler-16-items: bot001 has seen all 16 items; with eval_negatives 3 the night used to stop
    with an error naming neither the user nor the domain. Now it trains, and the warning names both."""
    _case("22-small-domain-eval-hang/a-crawler-16-items", tmp_path, monkeypatch)
    with deadline(120), caplog.at_level(logging.WARNING):
        summary = _train()
    assert summary["users"] == 41 and summary["epochs"] == 1
    assert summary["sampled_short_users"] == {"valid": {"food": 1}, "test": {"food": 1}}
    warned = [r.getMessage() for r in caplog.records if "fewer than 3 unseen items" in r.getMessage()]
    assert len(warned) == 2 and all("bot001" in m and "'food'" in m for m in warned)
    assert all(math.isfinite(v) for v in summary["test"]["overall"].values())


def test_22_small_domain_eval_hang_c_110_items_with_100_negatives_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """c-small-domain-110-items: 110 items a domain, the default 100 negatives; the draw used to loop
    for ever (132 uniform draws from 110 items almost never hold 100 distinct ones)."""
    _case("22-small-domain-eval-hang/c-small-domain-110-items", tmp_path, monkeypatch)
    started = time.monotonic()
    with deadline(120):
        summary = _train()
    assert summary["epochs"] == 1 and summary["users"] == 40
    assert summary["sampled_short_users"] == {}  # every user has >= 103 unseen items: 100 negatives each
    ws = Workspace(Path("ws"))
    data = SequenceData(load_catalog(ws), load_sequences(ws), 20)
    _check_candidates(data, data.eval_split("test", 100, seed=0, short_history=5), 100)
    assert time.monotonic() - started < 120


def _check_candidates(data: SequenceData, split: EvalSplit, n: int) -> None:
    """Each row: the target, then min(n, unseen) distinct unseen items of the target's domain, then 0s."""
    cat, seqs = data.catalog, data.sequences
    cand = split.candidates.numpy()
    tdom = split.target_domain.numpy()
    assert cand.shape == (data.n_users, 1 + n)
    for u in range(data.n_users):
        seen = seqs.flat[seqs.offsets[u] : seqs.offsets[u + 1]]
        seen_local = {int(cat.item_local[g]) for g in seen if cat.item_domain[g] == tdom[u]}
        unseen = set(range(1, int(cat.sizes[tdom[u]]) + 1)) - seen_local
        negs = [int(x) for x in cand[u, 1:] if x]
        assert len(negs) == len(set(negs)) == min(n, len(unseen)) == min(n, int(split.unseen[u]))
        assert set(negs) <= unseen
        assert (cand[u, 1 + len(negs) :] == 0).all()  # padding only at the end
        if len(unseen) <= n:
            assert set(negs) == unseen  # a short row holds every unseen item


def _synthetic(domain_sizes: list[int], n_users: int, heavy: int, seed: int = 0) -> SequenceData:
    """Users with 3-7 random items over the domains, plus `heavy` crawler users who saw nearly
    everything (all but 2 items of each domain)."""
    rng = np.random.default_rng(seed)
    sizes = np.array(domain_sizes)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    catalog = Catalog(
        [f"d{i}" for i in range(len(sizes))], sizes, offsets, [str(g) for g in range(sizes.sum())]
    )
    seqs = [list(rng.integers(1, sizes.sum() + 1, rng.integers(3, 8))) for _ in range(n_users)]
    for _ in range(heavy):
        seqs.append([int(o) + i for o, s in zip(offsets, sizes, strict=True) for i in range(1, s - 1)])
    lengths = np.array([len(s) for s in seqs])
    flat = np.concatenate(seqs).astype(np.int64)
    sequences = Sequences(
        [f"u{i}" for i in range(len(seqs))], flat, np.concatenate([[0], np.cumsum(lengths)])
    )
    return SequenceData(catalog, sequences, max_len=20)


@pytest.mark.parametrize("sizes", [[50, 3000], [101, 102], [150, 230], [100, 1000]])
def test_candidate_draw_ends_for_any_domain_size(sizes: list[int]) -> None:
    """Variants of 22: a domain smaller than the candidate count (50), one just over it (101, 102),
    the sizes where the old draw almost never finished (150) or often retried (230), and crawlers."""
    data = _synthetic(sizes, n_users=300, heavy=3)
    with deadline(60):
        split = data.eval_split("valid", 100, seed=3, short_history=5)
        again = data.eval_split("valid", 100, seed=3, short_history=5)
    assert torch.equal(split.candidates, again.candidates)  # seeded: every model sees the same
    _check_candidates(data, split, 100)
    short = data.short_candidate_users(split, 100)
    assert {f"u{i}" for i in range(300, 303)} <= {u for users in short.values() for u in users}  # crawlers
    if sizes[0] <= 100:  # the whole first domain is smaller than 100: all its users are short
        d0_users = int((split.target_domain == 0).sum())
        assert len(short["d0"]) == d0_users


def test_short_candidate_lists_rank_only_real_candidates() -> None:
    """Padding (0) in a candidate row never competes with the target: a model that scores every item
    0 against a target of 0 ranks it last among the real candidates only."""
    from bridgerec.models.evaluate import evaluate

    data = _synthetic([5, 6], n_users=20, heavy=0)
    split = data.eval_split("test", 100, seed=0, short_history=5)
    pop = build_model(ModelConfig(architecture="pop"), data.catalog)
    pop.fit_counts(np.zeros(data.catalog.n_items + 1))  # every score 0: ties count against the target
    ranks = evaluate(pop, split, 64, full=False)
    assert (ranks.sampled == split.unseen).all()  # the number of real negatives, never the padding


# ---- 23: a diverged model -----------------------------------------------------------------------------


def test_23_diverged_training_fails_its_run_and_the_healthy_run_is_published(
    prefect_harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The case's sequence: sasrec at lr 1e6 diverges (exit 2, one error: line naming the epoch), pop
    trains, publish publishes pop."""
    _case("23-diverged-training", tmp_path, monkeypatch)
    settings = load_settings("config.yaml")
    ws = Workspace(settings.workspace)
    run_ingest(StageRun(settings.ingest, ws))
    result = CliRunner().invoke(app, ["train", "--config", "config.yaml", "--json"])
    assert result.exit_code == 2, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: train: run sasrec-") and "diverged in epoch 1" in line
    assert "lower train.lr (now 1e+06)" in line and "not on the leaderboard" in line
    assert "Traceback" not in result.stderr
    answer = json.loads(result.stdout)  # no summary of a failed run: the failure's object
    assert (answer["ok"], answer["exit_code"], answer["command"]) == (False, 2, "train")
    assert "run_id" not in answer
    assert not (ws.root / "train" / "runs.parquet").exists()
    pop = CliRunner().invoke(app, ["train", "--config", "config.yaml", "--model", "pop", "--json"])
    assert pop.exit_code == 0, pop.output
    pop_run = json.loads(pop.stdout)["run_id"]
    published = CliRunner().invoke(app, ["publish", "--config", "config.yaml", "--json"])
    assert published.exit_code == 0, published.output
    assert json.loads(published.stdout)["run_id"] == pop_run
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as con:
        assert con.execute("SELECT DISTINCT run_id FROM latest_recommendations").fetchall() == [(pop_run,)]


def test_selection_never_prefers_a_non_finite_figure() -> None:
    """Variant of 23: a leaderboard written before training checked for divergence holds inf and NaN."""
    rows = [
        {"run_id": "sasrec-inf", "valid_full_ndcg10": math.inf},
        {"run_id": "llm-nan", "valid_full_ndcg10": math.nan},
        {"run_id": "pop", "valid_full_ndcg10": 0.554},
        {"run_id": "none", "valid_full_ndcg10": None},
        {"run_id": "neg-inf", "valid_full_ndcg10": -math.inf},
    ]
    assert select_best(rows, "full")["run_id"] == "pop"


def test_the_gate_refuses_a_non_finite_run_and_ignores_a_non_finite_published_figure() -> None:
    gate = GateSettings()
    refused = decide(gate, math.inf, 0.3, 0.2, "new", "old")
    assert (refused.decision, refused.publish) == ("refused", False) and "diverged" in refused.message
    assert decide(gate, math.nan, None, 0.2, "new", None).publish is False
    # A published run whose figure is broken is not compared with: only the floor applies.
    kept = decide(gate, 0.25, math.nan, 0.2, "new", "old")
    assert (kept.decision, kept.publish, kept.published_ndcg10) == ("first", True, None)
    assert "not compared" in kept.message
    assert decide(gate, 0.25, 0.26, math.nan, "new", "old").decision == "passed"  # no floor to apply


def test_a_non_finite_training_loss_stops_the_epoch_it_happens_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Variant of 23: the loss itself goes NaN (here: one embedding row of a real SASRec set to NaN, as
    an overflow leaves it): training stops in that epoch, naming it and the batch."""
    _case("23-diverged-training", tmp_path, monkeypatch)
    settings = load_settings("config.yaml")
    ws = Workspace(settings.workspace)
    run_ingest(StageRun(settings.ingest, ws))
    catalog = load_catalog(ws)
    data = SequenceData(catalog, load_sequences(ws), 20)
    model = build_model(settings.train.model_spec(), catalog)
    with torch.no_grad():
        next(p for p in model.parameters() if p.dim() == 2)[3] = torch.nan
    cfg = FitConfig(lr=1e-3, weight_decay=0.0, batch_size=8, eval_batch_size=8, epochs=5, patience=5, seed=0)
    with pytest.raises(TrainingDiverged, match=r"diverged in epoch 4: the training loss is nan at batch \d"):
        train_epoch(model, data, Optimizer(model, 1e-3), cfg, 4, None, torch.device("cpu"))


def test_a_run_that_diverges_later_keeps_no_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Variant of 23: lr 1e30 over several epochs: the run fails with its epoch named; nothing reaches
    the leaderboard, and a healthy run trained afterwards is the best one."""
    _case("23-diverged-training", tmp_path, monkeypatch)
    with pytest.raises(TrainingDiverged, match=r"diverged in epoch \d+") as info:
        _train(lr=1e30, epochs=3)
    assert "lower train.lr (now 1e+30)" in str(info.value)
    ws = Workspace(Path("ws"))
    assert ws.read_manifest("train") is None
    healthy = _train(lr=1e-3, epochs=1)
    assert ws.read_manifest("train").stats["best"]["run_id"] == healthy["run_id"]
    settings = load_settings("config.yaml")
    published = run_publish(StageRun(settings.publish, ws, warehouse=settings.warehouse_path, threads=1))
    assert published.run_id == healthy["run_id"]
