"""Cold start: the new-items hold-out and the untouched-domain inputs on a tiny catalogue built so every
right answer is known, their evaluation end to end, and ingest keeping items without interactions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from bridgerec.models.base import Recommender
from bridgerec.models.coldstart import (
    chance_ndcg,
    choose_new_items,
    subset_split,
    untouched_inputs,
    without_items,
)
from bridgerec.models.config import ModelConfig
from bridgerec.models.data import Catalog, SequenceData, Sequences
from bridgerec.models.evaluate import evaluate, rank_among
from bridgerec.storage.workspace import Workspace
from bridgerec.tasks import StageRun
from bridgerec.tasks.ingest import IngestOutputs, IngestSettings, run_ingest
from bridgerec.tasks.train.coldstart import ColdStart
from bridgerec.tasks.train.settings import ColdStartSettings
from tests.train_data import write_csv

# Two domains of ten items, one per theme: a_t = global id t + 1, b_t = global id t + 11 (t = 0..9).
CATALOG = Catalog(
    domains=["a", "b"],
    sizes=np.array([10, 10]),
    offsets=np.array([0, 10]),
    item_ids=[f"a{t}" for t in range(10)] + [f"b{t}" for t in range(10)],
)
THEME = np.concatenate([[-1], np.arange(10), np.arange(10)])  # [N + 1] theme of each global id


def a(t: int) -> int:
    return t + 1


def b(t: int) -> int:
    return t + 11


def sequences(seqs: list[list[int]]) -> Sequences:
    lengths = np.array([len(s) for s in seqs])
    return Sequences(
        [f"u{i}" for i in range(len(seqs))],
        np.concatenate(seqs).astype(np.int64),
        np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
    )


class ThemeModel(Recommender):
    """A content-based recommender whose answers are known: an item's vector is the one-hot of its theme
    (what an LLM reads in its text), a user's the sum over the input items. With `untrained`, those items'
    rows are zero: an ID model's rows of items it never trained on."""

    def __init__(self, catalog: Catalog, untrained: np.ndarray | None = None) -> None:
        super().__init__(catalog, ModelConfig(architecture="pop"))  # a config of no learned weights
        table = np.zeros((catalog.n_items + 1, 10), np.float32)
        table[np.arange(1, catalog.n_items + 1), THEME[1:]] = 1.0
        if untrained is not None:
            table[untrained] = 0.0
        self.register_buffer("table", torch.from_numpy(table))

    def user_vectors_all(self, inputs: Tensor, domains: Sequence[int] | None = None) -> list[Tensor]:
        user = self.table[inputs].sum(1)  # [B, 10]; padding rows are zero
        return [user for _ in (range(self.n_domains) if domains is None else domains)]

    def item_rows(self, domain: int, lids: Tensor) -> Tensor:
        return self.table[self.global_ids(domain, lids)]  # [..., 10], row 0 (padding) is zero


# u0..u4: theme t in domain b, then the new item a_t of the same theme as the test target.
# u5..u9: the same with warm items a_5..a_9. w: a held-out item inside the history; z: left with two items.
# v0, v1: histories spanning both domains (the untouched-domain users).
SEQS = (
    [[b(t), b((t + 1) % 10), b(t), a(t)] for t in range(10)]
    + [[a(0), b(3), b(4), b(3)]]  # w: a_0 is held out: it leaves the history
    + [[a(1), b(2), b(5)]]  # z: without a_1, two interactions: dropped
    + [[a(7), b(6), a(6)], [b(8), a(9), b(8), b(9)]]  # v0 (target a_6), v1 (target b_9)
)


def test_choose_new_items_latest_first_appearance_else_seeded_random() -> None:
    seqs = sequences(SEQS)
    first_seen = np.full(CATALOG.n_items + 1, np.nan)
    first_seen[1:] = np.arange(CATALOG.n_items)  # a_0 oldest ... b_9 newest
    first_seen[[a(0), a(1), a(2), a(3), a(4)]] = 100 + np.arange(5)  # the newest items of domain a
    held = choose_new_items(CATALOG, seqs, 0.5, seed=0, first_seen=first_seen)
    assert np.flatnonzero(held).tolist() == [a(0), a(1), a(2), a(3), a(4), b(5), b(6), b(7), b(8), b(9)]
    # No timestamps: a seeded draw of the same size per domain, the same on every call.
    random = choose_new_items(CATALOG, seqs, 0.5, seed=3)
    assert (random == choose_new_items(CATALOG, seqs, 0.5, seed=3)).all()
    assert random[1:11].sum() == 5 and random[11:].sum() == 5 and not random[0]
    # At least one per domain, and never an item nobody interacted with.
    one = sequences([[a(0), b(0), a(1)]])
    assert np.flatnonzero(choose_new_items(CATALOG, one, 0.01, seed=0)).tolist() in ([1, 11], [2, 11])


def test_held_out_items_leave_every_input_and_training_target() -> None:
    held = np.zeros(CATALOG.n_items + 1, bool)
    held[[a(0), a(1), a(2), a(3), a(4)]] = True
    out = without_items(sequences(SEQS), held)
    kept = [
        out.sequences.flat[s:e].tolist()
        for s, e in zip(out.sequences.offsets[:-1], out.sequences.offsets[1:], strict=True)
    ]
    assert out.users.tolist() == [*range(11), 12, 13]  # z (row 11) is dropped
    assert out.dropped_users == 1 and out.removed_interactions == 1  # a_0 from w's history
    assert kept[10] == [b(3), b(4), b(3)]
    for row in kept:  # a held-out item is only ever a test target (the last item)
        assert not held[row[:-1]].any()
    data = SequenceData(CATALOG, out.sequences, max_len=5)
    assert not held[data.train_prefix(torch.arange(data.n_users))].any()
    assert not held[data.eval_split("valid", 3, 0, 1).target].any()
    # new_items_in_validation: a held-out validation target stays, out of training still
    held = held.copy()
    held[b(6)] = True  # v0's and u6's validation item (u6 has it earlier too: that one goes)
    both = without_items(sequences(SEQS), held, keep_validation=True)
    data = SequenceData(CATALOG, both.sequences, max_len=5)
    assert not held[data.train_prefix(torch.arange(data.n_users))].any()
    offsets, flat = both.sequences.offsets, both.sequences.flat
    for row, u in enumerate(both.users.tolist()):
        seq, original = flat[offsets[row] : offsets[row + 1]].tolist(), SEQS[u]
        assert seq[-1] == original[-1] and not held[seq[:-2]].any()  # held: only in the last two places
        if held[original[-2]]:
            assert seq[-2] == original[-2]  # kept as the validation target
    assert any(held[SEQS[u][-2]] for u in both.users.tolist())  # the case occurs here
    valid = SequenceData(CATALOG, both.sequences, max_len=5).eval_split("valid", 3, 0, 1)
    assert held[valid.target].any()


def test_new_items_evaluation_known_answers() -> None:
    """The content model ranks every new item first (its theme is the user's); an ID model whose rows of
    the new items are untrained ranks them last (ties count against the target), below chance."""
    held = np.zeros(CATALOG.n_items + 1, bool)
    held[[a(0), a(1), a(2), a(3), a(4)]] = True
    out = without_items(sequences(SEQS), held)
    data = SequenceData(CATALOG, out.sequences, max_len=5)
    test = data.eval_split("test", 3, seed=0, short_history=1)
    cold = ColdStart(
        ColdStartSettings(new_items=True), source_users=len(SEQS), held=out, selection="first_seen"
    )
    for model, new_ndcg in ((ThemeModel(CATALOG), 1.0), (ThemeModel(CATALOG, untrained=held), None)):
        ranks = evaluate(model, test, 64, full=True)
        rows, summary = cold.evaluate(model, CATALOG, data.sequences, test, ranks, 64, True, "cpu", True, 5)
        new = summary["new_items"]
        assert new["users"] == 5 and new["items_held_out"] == 5 and new["removed_interactions"] == 1
        among = new["among_new_items"]  # the target against the 5 held-out items of domain a only
        assert among["candidates"] == {"a": 5, "b": 0}
        assert among["chance_ndcg@10"] == pytest.approx(chance_ndcg(np.array([5])))
        among_rows = [r for r in rows if r["protocol"] == "among_new_items"]
        assert {r["split"] for r in among_rows} == {"test_new_items"}
        assert {r["users"] for r in among_rows if r["group"] == "overall"} == {5}
        if new_ndcg is not None:
            assert new["full"]["overall"]["ndcg@10"] == 1.0 and new["a"]["ndcg@10"] == 1.0
            assert new["auc"]["a"] == 1.0  # above all 9 other items of domain a
            assert among["overall"]["ndcg@10"] == 1.0 and among["a"]["hr@10"] == 1.0
        else:
            # all five held-out rows are zero: the target ties with the other four, rank 4 of 5
            assert among["a"]["ndcg@10"] == pytest.approx(1 / np.log2(6))
            # rank 9 of 10 in the full ranking (all ten items of domain a tie at 0), 3 of 4 sampled
            assert new["full"]["a"]["ndcg@10"] == pytest.approx(1 / np.log2(11))
            assert new["a"]["ndcg@10"] == pytest.approx(1 / np.log2(5))
            assert new["full"]["a"]["ndcg@10"] < new["chance_ndcg@10"]["full"]["a"]
            assert new["auc"]["a"] == 0.0  # ties count against it: no other item ranked below
        assert new["chance_ndcg@10"]["full"]["a"] == pytest.approx(chance_ndcg(np.array([10])))
        assert new["chance_ndcg@10"]["sampled"]["a"] == pytest.approx(chance_ndcg(np.array([4])))
        assert summary["warm_items"]["users"] == test.target.shape[0] - 5
        splits = {r["split"] for r in rows}
        assert splits == {"test_new_items", "test_warm_items"}
        assert {r["users"] for r in rows if r["split"] == "test_new_items" and r["group"] == "overall"} == {5}


def test_rank_among_is_the_full_ranking_restricted_to_the_members() -> None:
    data = SequenceData(CATALOG, sequences(SEQS[:10]), max_len=5)
    test = data.eval_split("test", 3, seed=0, short_history=1)
    model = ThemeModel(CATALOG, untrained=np.array([a(0), a(2), a(7)]))  # ties at zero for some targets
    full = evaluate(model, test, 64, full=True).full
    assert full is not None
    everything = torch.ones(CATALOG.n_items + 1, dtype=torch.bool)
    assert rank_among(model, test, everything, 4).tolist() == full.tolist()  # the same exclusions and ties
    members = torch.zeros(CATALOG.n_items + 1, dtype=torch.bool)
    members[[a(0), a(2), a(5), a(7), a(9)]] = True
    mask = members[test.target].numpy()
    sub = subset_split(test, mask, "test_members")
    among = rank_among(model, sub, members, 4)
    assert (among <= full[mask]).all() and (among < 5).all()  # fewer competitors, five at most
    assert among.tolist() == [4, 4, 0, 4, 0]  # a0, a2, a7 zero rows tie with the other two; a5, a9 first
    with pytest.raises(ValueError, match="not among the members"):
        rank_among(model, test, members, 4)


def test_untouched_domain_hides_the_target_domain_and_text_bridges_it() -> None:
    seqs = sequences(SEQS)
    users, inputs = untouched_inputs(CATALOG, seqs, max_len=4)
    assert users.tolist() == [10, 11, 12, 13]  # w, z, v0, v1: two domains before the target
    assert inputs[0].tolist() == [0, 0, 0, a(0)]  # w's target b_3: b_3 and b_4 hidden
    assert inputs[1].tolist() == [0, 0, 0, a(1)]  # z's target b_5: b_2 hidden
    assert inputs[2].tolist() == [0, 0, 0, b(6)]  # v0's target a_6: a_7 hidden
    assert inputs[3].tolist() == [0, 0, 0, a(9)]  # v1's target b_9: both b_8 hidden
    data = SequenceData(CATALOG, seqs, max_len=4)
    test = data.eval_split("test", 3, seed=0, short_history=1)
    cold = ColdStart(ColdStartSettings(untouched_domain=True), source_users=len(SEQS))
    model = ThemeModel(CATALOG)
    ranks = evaluate(model, test, 64, full=True)
    rows, summary = cold.evaluate(model, CATALOG, seqs, test, ranks, 64, True, "cpu", True, 4)
    untouched = summary["untouched_domain"]
    assert untouched["users"] == 4
    # v0 and v1: the other domain's item of the same theme ranks the target first. w and z (an item of
    # another theme) leave the target tied at zero with the nine other items of b: rank 9, nothing excluded.
    assert untouched["full"]["a"]["ndcg@10"] == 1.0
    assert untouched["full"]["b"]["ndcg@10"] == pytest.approx((1.0 + 2 / np.log2(11)) / 3)
    assert untouched["chance_ndcg@10"]["full"]["b"] == pytest.approx(chance_ndcg(np.array([10])))
    assert {r["split"] for r in rows} == {"test_untouched"}
    assert "note" not in summary
    _, id_summary = cold.evaluate(model, CATALOG, seqs, test, ranks, 64, True, "cpu", False, 4)
    assert "untrained row" in id_summary["note"]


def test_chance_ndcg_matches_its_formula() -> None:
    assert chance_ndcg(np.array([1])) == 1.0
    assert chance_ndcg(np.array([101])) == pytest.approx(sum(1 / np.log2(r + 2) for r in range(10)) / 101)
    assert chance_ndcg(np.array([4, 1000])) == pytest.approx(
        (sum(1 / np.log2(r + 2) for r in range(4)) / 4 + sum(1 / np.log2(r + 2) for r in range(10)) / 1000)
        / 2
    )


def test_ingest_keeps_items_without_interactions_and_still_reconciles(tmp_path: Path) -> None:
    items = [{"item_id": f"f{i}", "domain": "food", "title": f"food {i}"} for i in range(6)]
    items += [{"item_id": "NEW1", "domain": "food", "title": "a new tea"}]
    items += [{"item_id": "NEW2", "domain": "kitchen", "title": "a new kettle"}]
    items += [
        {"item_id": "k0", "domain": "kitchen", "title": "pan"},
        {"item_id": "k1", "domain": "kitchen", "title": "pot"},
    ]
    items += [{"item_id": "", "domain": "food", "title": "no id"}]  # quarantined
    inter = [
        {"user_id": u, "item_id": i, "domain": d, "position": str(p)}
        for u, seq in {"u1": ["f0", "f1", "k0", "f2"], "u2": ["f1", "f2", "f3"], "u3": ["f4", "k1"]}.items()
        for p, i in enumerate(seq)
        for d in ["kitchen" if i.startswith("k") else "food"]
    ]
    raw_items, raw_inter = write_csv(tmp_path / "items.csv", items), write_csv(tmp_path / "inter.csv", inter)
    ws = Workspace(tmp_path / "ws")
    summary = run_ingest(StageRun(IngestSettings(items=raw_items, interactions=raw_inter), ws))
    acc = summary.accounting["items"]
    # u3 is a short sequence: f4 and k1 lose their only interactions (filtered); f5, NEW1, NEW2 never had one.
    assert acc["read"] == 11 and acc["kept"] == 8 and acc["kept_without_interactions"] == 3
    assert acc["filtered_by_reason"] == {"no_kept_interactions": 2}
    assert acc["quarantined"] == 1
    assert acc["read"] == acc["kept"] + acc["quarantined"] + acc["filtered"]
    assert summary.items == 8 and summary.items_without_interactions == 3
    assert summary.items_per_domain == {"food": 6, "kitchen": 2}
    out = IngestOutputs(ws)
    assert sorted(out.items_without_interactions()) == ["NEW1", "NEW2", "f5"]
    gids = out.table("items", columns=["global_id"])["global_id"].to_pylist()
    assert sorted(gids) == list(range(1, 9))  # one dense id space, new items included
    # The setting drops them instead, counted as filtered.
    dropped = run_ingest(
        StageRun(
            IngestSettings(items=raw_items, interactions=raw_inter, items_without_interactions="drop"),
            Workspace(tmp_path / "ws2"),
        )
    )
    acc = dropped.accounting["items"]
    assert acc["kept"] == 5 and acc["kept_without_interactions"] == 0
    assert acc["filtered_by_reason"] == {"no_interactions": 3, "no_kept_interactions": 2}
    assert acc["read"] == acc["kept"] + acc["quarantined"] + acc["filtered"]


def test_new_items_by_first_appearance_from_ingest_timestamps(tmp_path: Path) -> None:
    """With timestamps, the hold-out takes each domain's items that appeared last (here one per domain)."""
    from bridgerec.tasks.train.coldstart import first_seen, prepare
    from bridgerec.tasks.train.inputs import load_catalog, load_sequences

    items = [{"item_id": f"{d}{i}", "domain": d, "title": f"{d} {i}"} for d in ("f", "k") for i in range(4)]
    inter = [
        {"user_id": u, "item_id": i, "domain": i[0], "timestamp": str(1_600_000_000 + 3600 * t)}
        for u, seq in {
            "u1": [("f0", 10), ("k0", 20), ("f1", 30), ("k3", 95)],
            "u2": [("k1", 15), ("f2", 25), ("k2", 40), ("f3", 90)],
            "u3": [("f0", 12), ("k1", 22), ("f1", 35), ("k2", 50)],
        }.items()
        for i, t in seq
    ]
    ws = Workspace(tmp_path / "ws")
    run_ingest(
        StageRun(
            IngestSettings(
                items=write_csv(tmp_path / "i.csv", items), interactions=write_csv(tmp_path / "x.csv", inter)
            ),
            ws,
        )
    )
    catalog = load_catalog(ws)
    seen = first_seen(ws, catalog.n_items)
    gid = {item: g for g, item in enumerate(catalog.item_ids, 1)}
    hours = (seen - 1_600_000_000) / 3600
    assert hours[gid["f0"]] == 10 and hours[gid["k1"]] == 15 and hours[gid["f3"]] == 90 and np.isnan(seen[0])
    sequences, cold = prepare(ColdStartSettings(new_items=True), catalog, load_sequences(ws), ws, seed=0)
    assert cold.selection == "first_seen"
    assert sorted(catalog.item_ids[g - 1] for g in np.flatnonzero(cold.held.held)) == ["f3", "k3"]
    assert cold.held.removed_interactions == 0 and len(sequences.lengths) == 3  # both are last items
