"""The recommender's parts on small, hand-checkable inputs: metrics, padded tensors and splits, samplers,
the backbone's trimming and masking, and the score contract of every model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bridgerec.models.backbone import SequenceEncoder, domain_view, trim
from bridgerec.models.base import Recommender
from bridgerec.models.batch import Batch
from bridgerec.models.config import ModelConfig
from bridgerec.models.data import Catalog, EvalSplit, SequenceData, Sequences
from bridgerec.models.metrics import hit_rate, ndcg, ndcg_per_user, rank_full, rank_sampled, summarise
from bridgerec.models.optim import Optimizer
from bridgerec.models.registry import ItemTables, build_model
from bridgerec.models.trainer import FitConfig, FitState, kept_rates

# Two domains: "a" has global ids 1..6 (local 1..6), "b" has global ids 7..11 (local 1..5).
CATALOG = Catalog(
    domains=["a", "b"],
    sizes=np.array([6, 5]),
    offsets=np.array([0, 6]),
    item_ids=[f"i{g}" for g in range(1, 12)],
)
SEQS = [[1, 7, 2, 8, 3], [9, 10, 4], [5, 6, 1, 2, 11, 7, 3]]


def sequences(seqs: list[list[int]] = SEQS) -> Sequences:
    lengths = np.array([len(s) for s in seqs])
    return Sequences(
        user_ids=[f"u{i}" for i in range(len(seqs))],
        flat=np.concatenate(seqs).astype(np.int64),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
    )


# -- metrics -------------------------------------------------------------------------------------------
def test_metrics_match_hand_computed_values() -> None:
    ranks = np.array([0, 1, 4, 9, 10, 30])
    assert hit_rate(ranks, 5) == pytest.approx(3 / 6)
    assert hit_rate(ranks, 10) == pytest.approx(4 / 6)
    # 1/log2(2) + 1/log2(3) + 1/log2(6) + 1/log2(11), over 6 users
    expected = (1.0 + 1 / math.log2(3) + 1 / math.log2(6) + 1 / math.log2(11)) / 6
    assert ndcg(ranks, 10) == pytest.approx(expected)
    assert ndcg(ranks, 5) == pytest.approx((1.0 + 1 / math.log2(3) + 1 / math.log2(6)) / 6)
    assert summarise(np.array([2]))["ndcg@20"] == pytest.approx(0.5)  # 1/log2(4)
    per_user = ndcg_per_user(ranks, 10)  # [6]: what a paired comparison of two models differences
    assert per_user == pytest.approx([1.0, 1 / math.log2(3), 1 / math.log2(6), 1 / math.log2(11), 0.0, 0.0])


def test_ranks_count_ties_against_the_positive() -> None:
    scores = torch.tensor([[0.5, 0.1, 0.9, 0.5], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert rank_sampled(scores).tolist() == [2, 0, 3]
    full = torch.tensor([[-torch.inf, 0.3, 0.7, 0.3, 0.1]])
    assert rank_full(full, torch.tensor([1])).tolist() == [2]  # 0.7 and the tied 0.3 rank above
    assert rank_full(full, torch.tensor([2])).tolist() == [0]


# -- padded tensors, splits, leakage -------------------------------------------------------------------
def test_padded_splits_are_leave_one_out_and_never_leak() -> None:
    data = SequenceData(CATALOG, sequences(), max_len=4)
    prefix = data.train_prefix(torch.arange(3))
    valid = data.eval_split("valid", 1, seed=1, short_history=4)
    test = data.eval_split("test", 1, seed=1, short_history=4)
    for u, s in enumerate(SEQS):
        row = [x for x in prefix[u].tolist() if x]
        assert row == s[:-2][-5:]  # the prefix is everything before the validation target (max_len + 1)
        assert valid.target[u] == s[-2] and test.target[u] == s[-1]
        assert [x for x in valid.inputs[u].tolist() if x] == s[:-2][-4:]
        assert [x for x in test.inputs[u].tolist() if x] == s[:-1][-4:]
        # The prefix ends at the item before the validation target: neither target is a training input
        # or a training target.
        assert prefix[u].tolist()[-1] == s[-3]
    export = data.eval_split("export", 0, 0, 1)
    assert [x for x in export.inputs[2].tolist() if x] == SEQS[2][-4:]


def test_the_refit_trains_through_the_validation_target_never_the_test_target() -> None:
    data = SequenceData(CATALOG, sequences(), max_len=4)
    refit = data.through_validation()
    prefix = refit.train_prefix(torch.arange(3))
    for u, s in enumerate(SEQS):
        # everything before the test target (max_len + 1 items): the validation target is the last target
        assert [x for x in prefix[u].tolist() if x] == s[:-1][-5:]
        assert prefix[u].tolist()[-1] == s[-2]
    assert refit.train_lengths.tolist() == [min(len(s) - 1, 5) for s in SEQS]
    assert data.train_lengths.tolist() == [min(len(s) - 2, 5) for s in SEQS]
    # counts: one more interaction per user (its validation target); the test targets never count
    expected = np.bincount(np.concatenate([s[:-1] for s in SEQS]), minlength=12)
    assert refit.item_counts("train").tolist() == expected.tolist()
    assert (refit.item_counts("train") - data.item_counts("train")).sum() == len(SEQS)


def test_items_held_out_as_new_stay_out_of_the_refit() -> None:
    """A held-out (new) item that is a validation target is no target of the refit and is not counted:
    the test still meets it without training interactions. Elsewhere in the prefix it is kept as is."""
    unseen = np.zeros(12, bool)
    unseen[[8, 11]] = True  # 8: user 0's validation target; 11: user 2's input (kept as an input)
    refit = SequenceData(CATALOG, sequences(), max_len=10).through_validation(unseen)
    prefix = refit.train_prefix(torch.arange(3))
    assert prefix[0].tolist()[-1] == 0 and [x for x in prefix[0].tolist() if x] == [1, 7, 2]
    assert prefix[1].tolist()[-1] == 10 and prefix[2].tolist()[-1] == 7
    assert refit.item_counts("train")[[8, 11]].tolist() == [0, 0]
    with pytest.raises(ValueError, match="holdout"):
        SequenceData(CATALOG, sequences(), max_len=10, holdout=0)


def _history(*rows: tuple[int, float, float]) -> FitState:
    """A loop state from (epoch, validation full NDCG@10, lr) rows, best epoch as the loop would keep."""
    state = FitState(history=[{"epoch": e, "valid_full_ndcg@10": v, "lr": lr} for e, v, lr in rows])
    best = max(state.history, key=lambda r: (r["valid_full_ndcg@10"], -r["epoch"]))
    state.best_epoch = best["epoch"]
    return state


def test_kept_rates_are_the_path_of_the_best_weights() -> None:
    cfg = FitConfig(lr=1e-3, weight_decay=0.0, batch_size=8, eval_batch_size=8, epochs=9, patience=9, seed=0,
                    lr_decay=0.2, lr_min=1e-4)  # fmt: skip
    # the default's path on food-kitchen (seed 42): epoch 4 no better, undone; the rate dropped; 5 best
    state = _history((1, 0.025, 1e-3), (2, 0.035, 1e-3), (3, 0.039, 1e-3), (4, 0.038, 1e-3), (5, 0.042, 2e-4))
    assert kept_rates(state, cfg) == [1e-3, 1e-3, 1e-3, 2e-4]
    # the epochs after the best are undone too
    state = _history((1, 0.02, 1e-3), (2, 0.03, 1e-3), (3, 0.029, 1e-3), (4, 0.028, 2e-4))
    assert kept_rates(state, cfg) == [1e-3, 1e-3]
    # at a constant rate a worse epoch's weights went on: it is on the path up to the best
    constant = FitConfig(lr=1e-3, weight_decay=0.0, batch_size=8, eval_batch_size=8, epochs=9, patience=9,
                         seed=0)  # fmt: skip
    state = _history((1, 0.02, 1e-3), (2, 0.019, 1e-3), (3, 0.03, 1e-3), (4, 0.01, 1e-3))
    assert kept_rates(state, constant) == [1e-3, 1e-3, 1e-3]
    # a warm run: epoch 0 is the init; an epoch under it is undone, one above it kept
    state = _history((0, 0.04, 0.0), (1, 0.039, 1e-3), (2, 0.041, 2e-4))
    assert kept_rates(state, cfg) == [2e-4]
    assert kept_rates(_history((0, 0.04, 0.0), (1, 0.03, 1e-3)), cfg) == []  # the init was never beaten


def test_training_batches_cover_every_user_once_and_trim_padding() -> None:
    data = SequenceData(CATALOG, sequences(), max_len=200)
    gen = torch.Generator().manual_seed(0)
    seen = torch.cat(list(data.train_batches(2, gen))).sort().values
    assert seen.tolist() == [0, 1, 2]
    prefix = data.train_prefix(torch.tensor([0, 1]))
    assert prefix.shape == (2, 3)  # longest training prefix among users 0 and 1 is 3 items, not 201


def test_negatives_come_from_the_targets_domain_and_avoid_the_history() -> None:
    catalog = Catalog(["a", "b"], np.array([50, 50]), np.array([0, 50]), [f"i{g}" for g in range(1, 101)])
    rng = np.random.default_rng(0)
    seqs = [[*rng.choice(np.r_[1:11, 51:61], 20, replace=False), 11, 61] for _ in range(50)]
    data = SequenceData(catalog, sequences(seqs), max_len=30)
    prefix = data.train_prefix(torch.arange(50))
    targets = prefix[:, 1:]
    neg = data.sample_negatives(targets, prefix, torch.Generator().manual_seed(3))
    real = targets > 0
    dom = torch.from_numpy(catalog.item_domain)
    assert torch.equal(dom[neg[real]], dom[targets[real]])  # the target's domain, not the input's
    assert (neg[~real] == 0).all()
    # 10 of each domain's 50 items are in every history: 20% clash per draw, 0.8% after two redraws.
    clash = (neg.unsqueeze(-1) == prefix.unsqueeze(1)).any(-1) & real
    assert clash.sum() / real.sum() < 0.03


def test_hidden_domain_examples_hide_every_item_of_the_targets_domain() -> None:
    """Each example is a row's items of the other domains before one of its items t, then t; t needs an
    item of another domain before it. Hand-enumerated: user 0's prefix [1a, 7b, 2a] gives [1, 7] or
    [7, 2]; user 1's [9] gives none; user 2's [5a, 6a, 1a, 2a, 11b] only [5, 6, 1, 2, 11]."""
    data = SequenceData(CATALOG, sequences(), max_len=10)
    prefix = data.train_prefix(torch.arange(3))  # [3, 5]
    seen: dict[int, set[tuple[int, ...]]] = {0: set(), 1: set(), 2: set()}
    for seed in range(100):
        src, rows = data.hidden_domain_examples(prefix, 1.0, torch.Generator().manual_seed(seed))
        assert rows.shape[1] == prefix.shape[1] and src.tolist() == [0, 2]
        for u, row in zip(src.tolist(), rows.tolist(), strict=True):
            seen[u].add(tuple(g for g in row if g))
    assert seen == {0: {(1, 7), (7, 2)}, 1: set(), 2: {(5, 6, 1, 2, 11)}}
    assert len(data.hidden_domain_examples(prefix, 0.0, torch.Generator().manual_seed(0))[0]) == 0

    def drawn(per_row: float) -> float:
        return np.mean(
            [
                len(data.hidden_domain_examples(prefix, per_row, torch.Generator().manual_seed(s))[0])
                for s in range(400)
            ]
        )

    assert 0.9 < drawn(0.5) < 1.1  # two eligible rows, each drawn with probability 0.5
    assert drawn(2.0) == 4 and 4.9 < drawn(2.5) < 5.1  # whole examples per row, then the fraction


def test_a_hidden_domain_example_trains_only_its_last_position_from_the_start_state() -> None:
    """In a batch with hidden-domain rows those rows have one target (the last column), and with
    domain_start its domain thread state is the learned start state: the untouched-domain case."""
    torch.manual_seed(0)
    model = build_model(_config("llm4cdsr", id_embeddings=True, domain_start=True), CATALOG, _tables())
    torch.nn.init.normal_(model.domain_start)
    data = SequenceData(CATALOG, sequences(), max_len=10)
    prefix = data.train_prefix(torch.arange(3))
    src, rows = data.hidden_domain_examples(prefix, 1.0, torch.Generator().manual_seed(0))
    full = torch.cat([prefix, rows])
    batch = Batch(full, torch.zeros(len(full), 4, dtype=torch.long), torch.cat([torch.arange(3), src]),
                  hidden_domain_rows=len(src))  # fmt: skip
    assert torch.equal(batch.targets[:3], prefix[:, 1:])
    assert (batch.targets[3:, :-1] == 0).all() and torch.equal(batch.targets[3:, -1], rows[:, -1])
    model.eval()
    hidden = 0
    for g in model.train_targets(batch):
        for r, c, user in zip(g.rows.tolist(), g.cols.tolist(), g.users, strict=True):
            if r >= 3:
                hidden += 1
                assert c == full.shape[1] - 2 and int(model.domain_of(rows[r - 3, -1])) == g.domain
                assert torch.allclose(user[16:], model.domain_start[g.domain])
                # the hidden rows run as their own trimmed batch (encode_rows): what inference computes
                alone = model.user_vectors(rows[r - 3 : r - 2, :-1], g.domain)[0]
                assert torch.allclose(user, alone, atol=1e-5)
    assert hidden == len(src) == 2


def test_the_training_loop_reaches_a_start_state_only_hidden_domain_examples_train() -> None:
    """Every user here starts in domain a, so no position of the plain prefixes has a target of a without
    an earlier item of a: domain a's start state trains only through the hidden-domain examples."""
    from bridgerec.models.trainer import FitConfig, train_epoch

    seqs = [[1, 7, 2, 8, 3, 9, 4], [2, 9, 3, 10, 5, 6], [4, 11, 5, 7, 6, 1]] * 4
    data = SequenceData(CATALOG, sequences(seqs), max_len=10)
    moved = []
    for share in (0.0, 1.0):
        torch.manual_seed(0)
        model = build_model(_config("llm4cdsr", id_embeddings=True, domain_start=True), CATALOG, _tables())
        cfg = FitConfig(lr=1e-2, weight_decay=0.0, batch_size=4, eval_batch_size=4, epochs=1, patience=1,
                        seed=0, hide_domain=share)  # fmt: skip
        losses = train_epoch(model, data, Optimizer(model, cfg.lr), cfg, 1, None, torch.device("cpu"))
        assert math.isfinite(losses["loss"])
        moved.append(bool(model.domain_start[0].abs().sum() > 0))
        assert model.domain_start[1].abs().sum() > 0  # b's start state: every user's first b item
    assert moved == [False, True]


def test_global_loss_norm_weighs_every_position_the_same() -> None:
    """loss_norm global: a batch's loss is its summed per-position loss over the epoch's mean positions per
    batch, so a batch of long sequences weighs more than one of short ones (batch: the same)."""
    from bridgerec.models.trainer import FitConfig, train_epoch

    torch.manual_seed(0)
    model = build_model(_config("llm4cdsr", dropout=0.0), CATALOG, _tables())
    data = SequenceData(CATALOG, sequences(SEQS * 4), max_len=10)
    prefix = data.train_prefix(torch.arange(12))
    neg = data.sample_negatives(prefix[:, 1:], prefix, torch.Generator().manual_seed(0))
    positions = int((prefix[:, 1:] > 0).sum())  # every target is a training position of llm4cdsr
    with torch.no_grad():
        mean = model.loss(Batch(prefix, neg, torch.arange(12)))[1]["rec"]
        summed = model.loss(Batch(prefix, neg, torch.arange(12), position_norm=7.0))[1]["rec"]
    assert summed == pytest.approx(mean * positions / 7.0, rel=1e-5)
    # loss_norm domain (the authors'): the sum of each target domain's own mean.
    with torch.no_grad():
        groups = model.train_targets(Batch(prefix, neg, torch.arange(12)))
        means = []
        for g in groups:  # dropout is off: the same vectors as in model.loss
            pos, negs = model.item_rows(g.domain, torch.cat([g.targets, g.negatives])).split(len(g.targets))
            s_pos, s_neg = (g.users * pos).sum(-1), (g.users * negs).sum(-1)
            means.append(float((F.softplus(-s_pos) + F.softplus(s_neg)).mean()))
        per_domain = model.loss(Batch(prefix, neg, torch.arange(12), domain_means=True))[1]["rec"]
    assert len(means) == 2 and per_domain == pytest.approx(sum(means), rel=1e-5)
    # The training loop's norm: the prefixes' targets per batch, over the epoch.
    cfg = FitConfig(lr=1e-3, weight_decay=0.0, batch_size=5, eval_batch_size=5, epochs=1, patience=1, seed=0,
                    loss_norm="global")  # fmt: skip
    seen: list[float | None] = []
    original = model.loss
    model.loss = lambda batch: (seen.append(batch.position_norm), original(batch))[1]  # type: ignore[method-assign]
    train_epoch(model, data, Optimizer(model, 1e-3), cfg, 1, None, torch.device("cpu"))
    targets = sum(max(len(q) - 3, 0) for q in SEQS * 4)  # prefix = all but the last 2; targets = prefix - 1
    assert seen and all(n == pytest.approx(targets / 3) for n in seen)  # 12 users in batches of 5: 3


def test_candidates_are_fixed_distinct_unseen_and_from_the_targets_domain(sample_workspace) -> None:
    from bridgerec.storage.workspace import Workspace
    from bridgerec.tasks.train.inputs import load_catalog, load_sequences

    ws = Workspace(sample_workspace)
    catalog, seqs = load_catalog(ws), load_sequences(ws)
    data = SequenceData(catalog, seqs, 50)
    a = data.eval_split("test", 100, seed=7, short_history=5)
    b = SequenceData(catalog, seqs, 200).eval_split("test", 100, seed=7, short_history=5)
    assert torch.equal(a.candidates, b.candidates)  # the same for every model and setting
    cand = a.candidates.numpy()
    assert (cand[:, 0] == catalog.item_local[a.target.numpy()]).all()
    tdom = a.target_domain.numpy()
    for u in range(0, data.n_users, 37):
        negs = cand[u, 1:]
        assert len(set(negs.tolist())) == 100 and (negs >= 1).all() and (negs <= catalog.sizes[tdom[u]]).all()
        seen = seqs.flat[seqs.offsets[u] : seqs.offsets[u + 1]]
        seen_local = {int(catalog.item_local[g]) for g in seen if catalog.item_domain[g] == tdom[u]}
        assert not seen_local & set(negs.tolist())
    # Groups partition the users.
    assert (a.groups["overlap"] ^ a.groups["single"]).all() and (a.groups["short"] ^ a.groups["long"]).all()


# -- backbone ------------------------------------------------------------------------------------------
def test_domain_view_extracts_subsequences_and_latest_positions() -> None:
    ids = torch.tensor([[0, 1, 7, 2, 8], [0, 0, 9, 10, 4]])
    dom = torch.from_numpy(CATALOG.item_domain)[ids]
    sub, last, has = domain_view(dom, ids, 0)
    assert sub.tolist() == [[1, 2], [0, 4]]
    assert has.tolist() == [[False, True, True, True, True], [False, False, False, False, True]]
    assert last[0].tolist() == [0, 0, 0, 1, 1] and last[1, 4] == 1


@pytest.mark.parametrize("causal", [True, False])
def test_trimmed_batches_compute_what_padded_ones_do(causal: bool) -> None:
    torch.manual_seed(0)
    enc = SequenceEncoder(16, 2, 2, 0.0, max_len=10, causal=causal).eval()
    emb = torch.nn.Embedding(12, 16, padding_idx=0)
    ids = torch.tensor([[0] * 7 + [1, 7, 2], [0] * 8 + [3, 4]])
    full = enc(emb(ids), ids)
    short = trim(ids)
    assert short.shape == (2, 3)
    assert torch.allclose(enc(emb(short), short), full[:, -3:], atol=1e-5)
    assert (full[:, :7] == 0).all()  # padding positions are zero


def test_sasrec_layout_computes_what_unmasked_padding_to_max_len_does() -> None:
    """The `sasrec` block layout (the authors' code) pads to max_len and never masks the padding keys;
    ours runs on the trimmed batch with one null key whose logit carries log(#padding up to the query).
    The last position (what inference uses) must match a direct computation on the padded sequence. One
    layer: with more, earlier positions differ by design (theirs count the whole sequence's padding)."""
    torch.manual_seed(0)
    H, M = 8, 12
    enc = SequenceEncoder(H, layers=1, heads=2, dropout=0.0, max_len=M, causal=False, layout="sasrec",
                          input_scale=3.0).eval()  # fmt: skip
    ids = torch.tensor([[0, 0, 4, 2, 9], [3, 1, 5, 7, 2]])  # trimmed: 3 and 5 real items
    emb = torch.randn(2, 5, H)
    got = enc(emb, ids)[:, -1]
    padded = torch.cat([torch.zeros(2, M - 5, dtype=torch.long), ids], 1)  # [2, M]
    keep = (padded > 0).unsqueeze(-1)
    pos = torch.arange(1, M + 1) * (padded > 0)
    x = (torch.cat([torch.zeros(2, M - 5, H), emb], 1) * 3.0 + enc.pos(pos)) * keep
    for b in enc.blocks:
        w, bias = b.qkv.weight.split(H), b.qkv.bias.split(H)
        q_in = b.ln1(x)
        q, k, v = (b._heads(torch.nn.functional.linear(t, wi, bi)) for t, wi, bi in
                   zip([q_in, x, x], w, bias, strict=True))  # fmt: skip
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(H // 2), -1) @ v  # every key, padding too
        x = b.ln2(q_in + b.proj(a.transpose(1, 2).reshape(2, M, H)))
        x = (x + b.ffn(x)) * keep
    want = enc.ln(x)[:, -1]
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("layout", ["pre_ln", "sasrec"])
def test_positions_from_start_make_a_prefix_independent_of_what_follows(layout: str) -> None:
    """`positions: from_start` (the authors' code): the first real item is position 1, whatever the
    padding; so a causal encoder gives a prefix the states the longer sequence has at those positions.
    `from_end` (SASRec.pytorch) gives the latest item position max_len: the same prefix's states move."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(12, 16, padding_idx=0)
    full, prefix = torch.tensor([[0, 3, 1, 4, 1, 5]]), torch.tensor([[0, 0, 0, 3, 1, 4]])

    def states(positions: str) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(1)
        enc = SequenceEncoder(16, 2, 2, 0.0, 10, causal=True, layout=layout, positions=positions).eval()
        return enc(emb(full), full)[:, 1:4], enc(emb(prefix), prefix)[:, 3:]

    a, b = states("from_start")
    assert torch.allclose(a, b, atol=1e-5)
    a, b = states("from_end")
    assert not torch.allclose(a, b, atol=1e-3)


def test_xavier_weight_init_is_the_authors() -> None:
    """`weight_init: xavier` (the authors' `_init_weights` over torch's MultiheadAttention): Xavier-normal
    weight matrices and position table, zero attention biases; the padding position stays zero."""
    torch.manual_seed(0)
    H = 64
    enc = SequenceEncoder(
        H, 2, 1, 0.0, 300, causal=True, layout="sasrec", weight_init="xavier"
    ).requires_grad_(False)
    for block in enc.blocks:
        assert float(block.qkv.weight.std()) == pytest.approx(math.sqrt(2 / (H + 3 * H)), rel=0.05)
        assert float(block.ffn[0].weight.std()) == pytest.approx(math.sqrt(2 / (2 * H)), rel=0.05)
        assert (block.qkv.bias == 0).all() and (block.proj.bias == 0).all()
    assert float(enc.pos.weight[1:].std()) == pytest.approx(math.sqrt(2 / (301 + H)), rel=0.05)
    assert (enc.pos.weight[0] == 0).all()
    default = SequenceEncoder(H, 2, 1, 0.0, 300, causal=True).requires_grad_(False)
    assert float(default.pos.weight[1:].std()) == pytest.approx(0.02, rel=0.05)
    assert (default.blocks[0].qkv.bias != 0).all()


def test_causal_switch_hides_the_future() -> None:
    torch.manual_seed(0)
    emb = torch.nn.Embedding(12, 16, padding_idx=0)
    a, b = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 2, 3, 5]])
    causal = SequenceEncoder(16, 1, 1, 0.0, 10, causal=True).eval()
    assert torch.allclose(causal(emb(a), a)[:, :3], causal(emb(b), b)[:, :3], atol=1e-6)
    bidir = SequenceEncoder(16, 1, 1, 0.0, 10, causal=False).eval()
    assert not torch.allclose(bidir(emb(a), a)[:, :3], bidir(emb(b), b)[:, :3], atol=1e-6)


# -- models: one score contract ------------------------------------------------------------------------
def _tables(seed: int = 0) -> ItemTables:
    # Shape-only stand-ins for the LLM tables in contract tests (the real tables are used end to end in
    # test_train_stage.py); the contract must hold for any table.
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(12, 24)).astype(np.float32)
    g[0] = 0
    local = [rng.normal(size=(n + 1, 12)).astype(np.float32) for n in CATALOG.sizes]
    for t in local:
        t[0] = 0
    return ItemTables(g, local)


def _config(arch: str, **kw) -> ModelConfig:
    base = dict(architecture=arch, hidden=16, layers=2, heads=2, dropout=0.0, max_len=10, causal=True,
                id_embeddings=False, alpha=0.1, beta=0.1, tau=1.0, objective="bce",
                global_dim=24, local_dim=12, profile_dim=8)  # fmt: skip
    return ModelConfig(**(base | kw))


@pytest.mark.parametrize(
    ("arch", "kw"),
    [
        ("sasrec", {}),
        ("sasrec_domain", {}),
        ("llm4cdsr", {}),
        ("llm4cdsr", {"id_embeddings": True}),
        ("llm4cdsr", {"id_embeddings": True, "id_dropout": 0.3}),
        ("llm4cdsr", {"id_embeddings": True, "id_text_fit": True}),
        ("llm4cdsr", {"id_embeddings": True, "id_text_fit": True, "text_prior": True}),
        ("llm4cdsr", {"id_embeddings": True, "id_text_fit": True, "id_text_knn": 2, "text_prior": True}),
        ("llm4cdsr", {"text_prior": True, "task": "cloze"}),
        ("llm4cdsr", {"id_embeddings": True, "task": "cloze"}),
        ("llm4cdsr", {"id_embeddings": True, "adapter_per_domain": True}),
        ("llm4cdsr", {"id_embeddings": True, "item_bias": True, "domain_start": True}),
        ("llm4cdsr", {"id_embeddings": True, "fusion": "null_space", "semantic_dims": 6}),
        (
            "llm4cdsr",
            {"id_embeddings": True, "fusion": "null_space", "semantic_dims": 6, "id_text_fit": True},
        ),
        ("llm4cdsr", {"id_embeddings": True, "domain_start": True}),
        ("llm4cdsr", {"block": "sasrec"}),
        ("sasrec", {"block": "sasrec"}),
    ],
)
def test_user_and_item_vectors_reproduce_the_forward_scores(arch: str, kw: dict) -> None:
    torch.manual_seed(0)
    model = build_model(_config(arch, **kw), CATALOG, _tables()).eval()
    if getattr(model, "domain_start", None) is not None:
        torch.nn.init.normal_(model.domain_start)  # a trained, non-zero start state
    if model.prior_dims:
        model.set_text_prior(2.5)  # a fitted, non-zero text prior weight
    # the last user has no item of domain b
    inputs = torch.tensor([[0, 0, 1, 7, 2, 8], [0, 0, 0, 9, 10, 4], [5, 6, 1, 2, 11, 7], [0, 0, 0, 0, 1, 2]])
    for d, n in enumerate(CATALOG.sizes):
        cand = torch.arange(1, n + 1).repeat(len(inputs), 1)  # every item of the domain
        forward = model.score(inputs, d, cand)
        exported = model.user_vectors(inputs, d) @ model.item_vectors(d)[1:].T
        assert torch.allclose(forward, exported, atol=1e-5)
        # the export's one pass for all domains gives the same user vectors
        assert torch.allclose(model.user_vectors_all(inputs)[d], model.user_vectors(inputs, d), atol=1e-6)


def test_hybrid_items_without_training_interactions_are_their_llm_representation() -> None:
    """llm4cdsr-hybrid: an item with no training interaction scores through its LLM embedding alone (its
    ID rows, trained only as a negative if at all, are left out), in every thread; the others keep theirs."""
    torch.manual_seed(0)
    hybrid = build_model(_config("llm4cdsr", id_embeddings=True), CATALOG, _tables()).eval()
    text_only = build_model(_config("llm4cdsr"), CATALOG, _tables()).eval()
    text_only.load_state_dict({k: v for k, v in hybrid.state_dict().items() if "id_" not in k}, strict=True)
    counts = np.bincount(np.concatenate(SEQS), minlength=CATALOG.n_items + 1)
    counts[[3, 9]] = 0  # a_3 (global 3) and b_3 (global 9) never met in training
    with torch.no_grad():
        before = [hybrid.item_vectors(d) for d in range(2)]
        hybrid.set_trained_items(counts)
        after = [hybrid.item_vectors(d) for d in range(2)]
        plain = [text_only.item_vectors(d) for d in range(2)]
    for d, unknown in ((0, 3), (1, 3)):  # local id 3 in both domains
        assert torch.allclose(after[d][unknown], plain[d][unknown], atol=1e-6)
        assert not torch.allclose(before[d][unknown], plain[d][unknown], atol=1e-6)
        known = [i for i in range(1, CATALOG.sizes[d] + 1) if i != unknown]
        assert torch.allclose(after[d][known], before[d][known], atol=1e-6)
    assert hybrid.state_dict()["id_known"].tolist() == (counts > 0).astype(float).tolist()


def test_per_domain_adapters_add_a_map_of_the_items_own_domain() -> None:
    torch.manual_seed(0)
    model = build_model(_config("llm4cdsr", adapter_per_domain=True), CATALOG, _tables()).eval()
    ids = torch.tensor([0, 2, 8])  # padding, an item of a, one of b
    with torch.no_grad():
        shared = model.adapter(model.E_all[ids])
        assert torch.allclose(model.embed_global(ids)[1:], shared[1:], atol=1e-6)  # zero-initialised
        for layer in model.domain_adapters:
            layer.weight.normal_()
            layer.bias.normal_()
        got = model.embed_global(ids)
        assert torch.all(got[0] == 0)
        assert torch.allclose(got[1], shared[1] + model.domain_adapters[0](model.E_all[2]), atol=1e-5)
        assert torch.allclose(got[2], shared[2] + model.domain_adapters[1](model.E_all[8]), atol=1e-5)


def test_whitened_pca_gives_standardised_leading_principal_coordinates() -> None:
    from bridgerec.models.llm4cdsr import whitened_pca

    g = torch.Generator().manual_seed(0)
    table = torch.randn(301, 10, generator=g) @ torch.diag(torch.arange(10, 0, -1).float())
    table[0] = 0.0
    table[7] = 0.0  # an item without a vector stays zero
    out = whitened_pca(table, 4)
    assert out.shape == (301, 4) and torch.all(out[0] == 0) and torch.all(out[7] == 0)
    real = out[table.abs().sum(1) > 0].double()
    assert torch.allclose(real.std(0) * 2.0, torch.ones(4, dtype=torch.float64), atol=1e-4)  # 1 / sqrt(k)
    cov = (real - real.mean(0)).T @ (real - real.mean(0)) / (len(real) - 1)
    assert torch.allclose(cov, torch.eye(4, dtype=torch.float64) / 4, atol=1e-4)  # uncorrelated
    # the leading directions: the columns with the largest scale, in order
    top = torch.linalg.svd(table[table.abs().sum(1) > 0] - table[table.abs().sum(1) > 0].mean(0))[2][:4]
    assert (top.abs().argmax(1) == torch.arange(4)).all()
    assert torch.equal(whitened_pca(table, 4), out)  # signs fixed: the same on every call


def test_null_space_fusion_puts_the_llm_embedding_and_the_id_rows_in_separate_coordinates() -> None:
    """fusion null_space (AlphaFuse): an item's input and output vector in each thread is [its whitened
    LLM embedding (k, frozen) | its ID row (hidden - k)]; an item without training interactions keeps
    the semantic part whole and has no ID part."""
    torch.manual_seed(0)
    model = build_model(
        _config("llm4cdsr", id_embeddings=True, fusion="null_space", semantic_dims=6), CATALOG, _tables()
    )
    assert not hasattr(model, "adapter") and model.id_all.weight.shape == (12, 10)
    counts = np.bincount(np.concatenate(SEQS), minlength=CATALOG.n_items + 1)
    counts[[3, 9]] = 0
    model.set_trained_items(counts)
    model.eval()
    with torch.no_grad():
        v = model.item_vectors(1)  # [6, 32]: mixed [S 6 | id 10], local [S 6 | id 10]
        assert torch.all(v[0] == 0)
        assert torch.allclose(v[1, :6], model.S_all[7]) and torch.allclose(v[1, 6:16], model.id_all.weight[7])
        assert torch.allclose(v[1, 16:22], model.S_local_1[1]) and torch.allclose(
            v[1, 22:], model.id_local[1].weight[1]
        )
        assert (
            torch.allclose(v[3, :6], model.S_all[9])
            and torch.all(v[3, 6:16] == 0)
            and torch.all(v[3, 22:] == 0)
        )
    assert {"S_all", "S_local_0", "S_local_1"} <= model.frozen_tables()
    assert set(model.frozen_tables()) <= set(model.item_tables())


def test_item_bias_adds_one_learned_offset_per_item_and_the_domain_mean_for_new_items() -> None:
    torch.manual_seed(0)
    model = build_model(_config("llm4cdsr", id_embeddings=True, item_bias=True), CATALOG, _tables()).eval()
    counts = np.bincount(np.concatenate(SEQS), minlength=CATALOG.n_items + 1)
    counts[[3, 9]] = 0  # a_3 and b_3: no training interactions
    model.set_trained_items(counts)
    with torch.no_grad():
        model.bias.weight[1:, 0] = torch.arange(1, 12, dtype=torch.float32)
        inputs = torch.tensor([[0, 1, 7, 2], [0, 0, 9, 10]])
        for d, known in ((0, [1, 2, 4, 5, 6]), (1, [7, 8, 10, 11])):
            v = model.item_vectors(d)  # [n_d + 1, 2H + 1]
            u = model.user_vectors(inputs, d)
            assert torch.all(u[:, -1] == 1) and v[0, -1] == 0
            offset = int(CATALOG.offsets[d])
            mean = float(np.mean(known))  # the bias of global id g is g
            for lid in range(1, CATALOG.sizes[d] + 1):
                g = lid + offset
                assert float(v[lid, -1]) == pytest.approx(g if counts[g] else mean)
            # the score is the threads' dot product plus the bias
            scores = model.score(inputs, d, torch.arange(1, CATALOG.sizes[d] + 1).repeat(2, 1))
            assert torch.allclose(scores, u[:, :-1] @ v[1:, :-1].T + v[1:, -1], atol=1e-5)


def test_ridge_map_recovers_a_linear_map_from_the_weighted_rows_only() -> None:
    from bridgerec.models.llm4cdsr import ridge_map

    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=g)
    true_w, true_b = torch.randn(3, 6, generator=g), torch.randn(3, generator=g)
    y = x @ true_w.T + true_b
    weights = torch.rand(400, generator=g) + 0.5
    weights[:50] = 0.0  # rows without interactions: not fitted on
    y[:50] = 100.0  # (their rows say nothing)
    layer = torch.nn.Linear(6, 3)
    with torch.no_grad():
        ridge_map(layer, x, y, weights)
    # noise-free rows: the held-out fifth picks the weakest penalty, near the exact map
    assert torch.allclose(layer.weight, true_w, atol=0.05) and torch.allclose(layer.bias, true_b, atol=0.05)
    noisy = y + 3.0 * torch.randn(400, 3, generator=g)
    strong = torch.nn.Linear(6, 3)
    with torch.no_grad():
        ridge_map(strong, x, noisy, weights, grid=(100.0,))  # a strong penalty shrinks towards the mean
        assert float(strong.weight.norm()) < 0.5 * float(true_w.norm())
        assert torch.allclose(strong.bias, noisy[50:].mean(0), atol=0.7)


def test_id_text_fit_scores_new_items_with_the_map_fitted_on_warm_items() -> None:
    """llm4cdsr-hybrid with id_text_fit: training is unchanged (no predicted row while training, the
    generators take no gradient); after each epoch the generators are the ridge map from the items' LLM
    embeddings to their own ID rows, and an item without training interactions is scored with it."""
    torch.manual_seed(0)
    model = build_model(_config("llm4cdsr", id_embeddings=True, id_text_fit=True), CATALOG, _tables())
    assert not any(p.requires_grad for p in model.id_from_text_all.parameters())
    counts = np.bincount(np.concatenate(SEQS * 5), minlength=CATALOG.n_items + 1)
    counts[[3, 9]] = 0
    model.set_trained_items(counts)
    with torch.no_grad():
        before = model.id_from_text_all.weight.clone()
        model.end_epoch()
        assert not torch.equal(before, model.id_from_text_all.weight)
        known = torch.from_numpy(counts > 0)
        known[0] = False
        predicted = model.id_from_text_all(model.E_all[known])
        # 24 text dims for 9 known items: the fit reproduces their rows closely
        assert float((predicted - model.id_all.weight[known]).abs().max()) < 0.05
        model.train()
        ids = torch.arange(1, 12)
        own = model.adapter(model.E_all[ids]) + model.id_all(ids) * torch.from_numpy(counts[1:] > 0)[:, None]
        unknown = torch.from_numpy(counts[1:] == 0)
        got = model.embed_global(ids)
        assert torch.allclose(got[~unknown], own[~unknown], atol=1e-6)  # no replacement while training
        text = model.E_all[ids[unknown]]
        assert torch.allclose(got[unknown], model.adapter(text) + model.id_from_text_all(text), atol=1e-6)


def test_knn_rows_average_the_rows_of_the_nearest_known_items() -> None:
    from bridgerec.models.llm4cdsr import knn_rows

    # row 0 padding; 1-4 known, 5-6 unknown. Texts on a circle: 5 sits between 1 and 2, 6 next to 4.
    angle = torch.tensor([0.0, 0.0, 0.5, 2.0, 3.0, 0.2, 3.1])
    text = torch.stack([torch.cos(angle), torch.sin(angle)], 1) * torch.arange(1, 8)[:, None]  # norms differ
    rows = torch.arange(7 * 2, dtype=torch.float32).reshape(7, 2)
    known = torch.tensor([False, True, True, True, True, False, False])
    got = knn_rows(text, rows, known, 2)
    assert torch.equal(got[[0, 1, 2, 3, 4]], torch.zeros(5, 2))  # the padding and known items: zero
    assert torch.allclose(got[5], (rows[1] + rows[2]) / 2)  # cosine: 0.2 is nearest to 0 and 0.5
    assert torch.allclose(got[6], (rows[4] + rows[3]) / 2)  # 3.1: nearest 3.0, then 2.0
    assert torch.allclose(knn_rows(text, rows, known, 10)[5], rows[1:5].mean(0))  # k > known: all of them
    assert torch.equal(knn_rows(text, rows, torch.zeros(7, dtype=torch.bool), 2), torch.zeros(7, 2))


def test_id_text_knn_scores_new_items_with_their_text_neighbours_rows() -> None:
    """id_text_knn: after each epoch an item without training interactions takes, in every thread, the
    mean ID row of its k text-nearest items with them (the ridge generators stay unused); the tables are
    not saved, and a model that loads the weights refits them to the same rows."""
    from bridgerec.models.llm4cdsr import knn_rows

    torch.manual_seed(0)
    config = _config("llm4cdsr", id_embeddings=True, id_text_fit=True, id_text_knn=2)
    model = build_model(config, CATALOG, _tables())
    counts = np.bincount(np.concatenate(SEQS * 5), minlength=CATALOG.n_items + 1)
    counts[[3, 9]] = 0
    model.set_trained_items(counts)
    with torch.no_grad():
        model.end_epoch()
        assert float(model.id_from_text_all.weight.abs().sum()) == 0.0  # no ridge fit
        known = torch.from_numpy(counts > 0)
        known[0] = False
        ids = torch.arange(1, CATALOG.n_items + 1)
        unknown = ~known[1:]
        expected = knn_rows(model.E_all, model.id_all.weight, known, 2)
        model.eval()
        got = model.embed_global(ids)
        text = model.E_all[ids[unknown]]
        assert torch.allclose(got[unknown], model.adapter(text) + expected[ids[unknown]], atol=1e-6)
        own = model.adapter(model.E_all[ids]) + model.id_all(ids)
        assert torch.allclose(got[~unknown], own[~unknown], atol=1e-6)
        for d, n in enumerate(CATALOG.sizes):  # each domain thread: neighbours of its own domain
            start = int(CATALOG.offsets[d])
            mine = known[start : start + n + 1].clone()
            mine[0] = False
            lids = torch.nonzero(~mine[1:]).flatten() + 1
            local = knn_rows(getattr(model, f"E_local_{d}"), model.id_local[d].weight, mine, 2)
            rows = model.embed_local(lids, d) - model.local_proj(getattr(model, f"E_local_{d}")[lids])
            assert torch.allclose(rows, local[lids], atol=1e-6)
        state = model.state_dict()
        assert not any(k.startswith("knn_") for k in state)
        torch.manual_seed(1)
        other = build_model(config, CATALOG, _tables()).eval()
        other.load_state_dict(state)
        for d in range(len(CATALOG.sizes)):
            assert torch.allclose(other.item_vectors(d), model.item_vectors(d), atol=1e-6)


def test_text_prior_adds_the_cosine_of_history_and_item_texts_outside_training() -> None:
    """text_prior: at inference every score gains w * cos(unit-norm sum of the history's unit-norm LLM
    embeddings, the item's unit-norm LLM embedding), computed here by hand; the rest of the score is
    the model's own (w = 0 gives it back exactly). The training objective scores without the prior's
    columns, and the prior reads only the inputs (a later item cannot change it: no leak)."""
    torch.manual_seed(0)
    model = build_model(_config("llm4cdsr", id_embeddings=True, text_prior=True), CATALOG, _tables()).eval()
    plain = build_model(_config("llm4cdsr", id_embeddings=True), CATALOG, _tables()).eval()
    prior = {"text_prior_weight", "text_prior_new_scale"}
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k not in prior})
    assert model.prior_dims == 24 and float(model.text_prior_weight) == 0.0
    inputs = torch.tensor([[0, 0, 1, 7, 2, 8], [0, 0, 0, 9, 10, 4], [0, 0, 0, 0, 1, 2]])
    E = F.normalize(model.E_all, dim=1)
    history = F.normalize(E[inputs].sum(1), dim=1)  # [B, 24]
    with torch.no_grad():
        for d, n in enumerate(CATALOG.sizes):
            cand = torch.arange(1, n + 1).repeat(len(inputs), 1)
            base = plain.score(inputs, d, cand)
            assert torch.allclose(model.score(inputs, d, cand), base, atol=1e-6)  # w = 0
            model.set_text_prior(3.0)
            cosine = history @ E[torch.arange(1, n + 1) + int(CATALOG.offsets[d])].T  # [B, n]
            assert torch.allclose(model.score(inputs, d, cand), base + 3.0 * cosine, atol=1e-5)
            model.set_text_prior(0.0)
        model.set_text_prior(3.0)
        later = inputs.clone()
        later[:, -1] = torch.tensor([3, 11, 5])  # another last item: the prior follows the inputs only
        assert not torch.allclose(
            model.user_vectors(later, 0)[:, -24:], model.user_vectors(inputs, 0)[:, -24:]
        )
        assert torch.allclose(model.user_vectors(inputs, 0)[:, -24:], 3.0 * history, atol=1e-6)
        # the training objective scores item_rows: no prior while training
        assert model.item_rows(0, torch.arange(1, 7)).shape[-1] == model.item_vectors(0).shape[-1] - 24


def test_text_prior_decay_weighs_the_history_by_recency_and_ignores_padding() -> None:
    """text_prior_decay d: the history's text vector is the unit-norm sum of decay^k times the unit-norm
    embedding of the item k places before the latest, computed here by hand; d = 1 is the plain sum. How
    much padding a row has does not change it, and the prior is still read from the inputs only."""
    torch.manual_seed(0)
    model = build_model(_config("llm4cdsr", text_prior=True, text_prior_decay=0.5), CATALOG, _tables()).eval()
    plain = build_model(_config("llm4cdsr", text_prior=True), CATALOG, _tables()).eval()
    E = F.normalize(model.E_all, dim=1)
    inputs = torch.tensor([[0, 0, 1, 7, 2, 8], [0, 0, 0, 9, 10, 4]])
    by_hand = torch.stack(
        [
            F.normalize(E[8] + 0.5 * E[2] + 0.25 * E[7] + 0.125 * E[1], dim=0),
            F.normalize(E[4] + 0.5 * E[10] + 0.25 * E[9], dim=0),
        ]
    )
    with torch.no_grad():
        assert torch.allclose(model.prior_users(inputs), by_hand, atol=1e-6)
        assert torch.allclose(plain.prior_users(inputs), F.normalize(E[inputs].sum(1), dim=1), atol=1e-6)
        padded = torch.cat([torch.zeros(2, 3, dtype=inputs.dtype), inputs], 1)  # more padding, same history
        assert torch.allclose(model.prior_users(padded), by_hand, atol=1e-6)
        model.set_text_prior(2.0)
        assert torch.allclose(model.user_vectors(inputs, 1)[:, -24:], 2.0 * by_hand, atol=1e-6)
    from bridgerec.tasks.train import TrainSettings

    assert TrainSettings().model_spec(global_dim=24, local_dim=12).text_prior_decay == 0.5  # the default
    off = TrainSettings(text_prior=False)
    assert "text_prior_decay" in off.ignored_fields()  # no prior: the decay is not part of the run id


def test_text_prior_new_items_scales_the_prior_of_items_without_training_interactions_only() -> None:
    """text_prior_new_items = c: an item without training interactions (`set_trained_items` count 0)
    scores learned + c * w * cosine, every other item learned + w * cosine, computed against the same
    model at c = 1; the user side and the training rows are unchanged."""
    torch.manual_seed(0)
    boosted = build_model(
        _config("llm4cdsr", id_embeddings=True, text_prior=True, text_prior_new_items=2.5), CATALOG, _tables()
    ).eval()
    model = build_model(_config("llm4cdsr", id_embeddings=True, text_prior=True), CATALOG, _tables()).eval()
    model.load_state_dict(boosted.state_dict())  # c is a buffer of the weights: 2.5 came with them
    assert float(model.text_prior_new_scale) == 2.5
    counts = np.ones(CATALOG.n_items + 1)
    counts[[0, 2, 9]] = 0  # global ids 2 (domain 0) and 9 (domain 1) are new
    for m in (boosted, model):
        m.set_trained_items(counts)
        m.set_text_prior(3.0)
    model.set_text_prior(3.0, 1.0)
    inputs = torch.tensor([[0, 0, 1, 7, 3, 8], [0, 0, 0, 10, 11, 4]])
    E = F.normalize(model.E_all, dim=1)
    history = F.normalize(E[inputs].sum(1), dim=1)  # [B, 24]
    with torch.no_grad():
        for d, n in enumerate(CATALOG.sizes):
            cand = torch.arange(1, n + 1).repeat(len(inputs), 1)
            gids = torch.arange(1, n + 1) + int(CATALOG.offsets[d])
            cosine = history @ E[gids].T  # [B, n]
            extra = 1.5 * 3.0 * cosine * torch.from_numpy(counts[gids.numpy()] == 0)  # (c - 1) * w * cos
            got, plain = boosted.score(inputs, d, cand), model.score(inputs, d, cand)
            assert torch.allclose(got, plain + extra, atol=1e-5)
            assert (counts[gids.numpy()] == 0).any()  # each domain has a new item here
            assert torch.equal(boosted.user_vectors(inputs, d), model.user_vectors(inputs, d))
            assert torch.equal(boosted.item_rows(d, cand[0]), model.item_rows(d, cand[0]))


def _new_share(model: Recommender, split: EvalSplit, k: int) -> float:
    """The new items' share of the split's top-k slots as `evaluate` ranks with the model as set: each
    user's k best less the items a full ranking leaves out (earlier items of the domain, bar the target),
    over k slots per user."""
    from bridgerec.models.evaluate import evaluate

    top = evaluate(model, split, batch_size=2, full=True).top
    assert top is not None and split.candidates is not None
    taken = 0
    for u in range(len(top)):
        d = int(split.target_domain[u])
        marked = model.prior_new_items(d)
        assert marked is not None
        out = set(split.exclude_items[split.exclude_users == u].tolist()) - {int(split.candidates[u, 0])}
        listed = [int(i) for i in top[u][: min(k, model.sizes[d])] if i != 0 and int(i) not in out]
        taken += sum(bool(marked[i]) for i in listed)
    return taken / (k * len(top))


def test_the_text_prior_weight_fitted_on_validation_is_the_best_of_its_grid() -> None:
    """fit_text_prior: for each pair (w, c) of the grids its NDCG@10 is what `evaluate` gives with that
    pair set (full ranking, earlier items left out; c scales the prior of items without training
    interactions, validation targets among them); it leaves the model at the best (the smaller of
    equals), or with `catalogue_share` at the best of the stratified figure that weighs the new-item
    targets as the catalogue's share of new items. c is chosen only with enough validation targets that
    are new items; else it stays (and nothing is reweighted)."""
    from bridgerec.models.evaluate import evaluate, fit_text_prior

    torch.manual_seed(0)
    model = build_model(_config("llm4cdsr", id_embeddings=True, text_prior=True), CATALOG, _tables()).eval()
    seqs = [
        [1, 7, 2, 8, 3, 9],
        [9, 10, 4, 5, 11],
        [5, 6, 1, 2, 11, 7, 3],
        [7, 8, 9, 1, 10, 2],
        [2, 3, 4, 5, 6],
    ]
    split = SequenceData(CATALOG, sequences(seqs), 10).eval_split("valid", 3, 0, 3)
    counts = np.ones(CATALOG.n_items + 1)
    counts[[0, 3, 5, 9, 10]] = 0  # new items: 3, 5 and 10 are validation targets (4 of 5), 9 competes
    model.set_trained_items(counts)
    grid, c_grid = [0.0, 1.0, 4.0, 1000.0], [1.0, 0.5, 3.0]
    fit = fit_text_prior(model, split, grid, batch_size=2, new_items_grid=c_grid, min_new_targets=4, top_k=2)
    assert fit.new_targets == 4 and fit.fitted_new_items
    assert set(fit.ndcg10) == {(w, c) for w in grid for c in c_grid}
    assert (float(model.text_prior_weight), float(model.text_prior_new_scale)) == (fit.weight, fit.new_items)
    best = fit.ndcg10[(fit.weight, fit.new_items)]
    assert best == max(fit.ndcg10.values())
    assert (fit.weight, fit.new_items) == min(k for k, f in fit.ndcg10.items() if f == best)
    assert any(fit.ndcg10[(w, 3.0)] != fit.ndcg10[(w, 1.0)] for w in grid)  # c changes ranks here
    assert len(set(fit.new_share.values())) > 1  # and the new items' exposure
    for (w, c), figure in fit.ndcg10.items():
        model.set_text_prior(w, c)
        full = evaluate(model, split, batch_size=2, full=True).full
        assert full is not None and math.isclose(ndcg(full, 10), figure, abs_tol=1e-12), (w, c)
        new = torch.from_numpy(counts == 0)[split.target].numpy()  # [U] the target is a new item
        assert math.isclose(ndcg(full[new], 10), fit.ndcg10_new[(w, c)], abs_tol=1e-12), (w, c)
        assert math.isclose(ndcg(full[~new], 10), fit.ndcg10_warm[(w, c)], abs_tol=1e-12), (w, c)
        assert math.isclose(fit.new_share[(w, c)], _new_share(model, split, 2), abs_tol=1e-12), (w, c)
    # Weighed to the catalogue: the new-item targets count as the share of items that are new (4 of the
    # catalogue's items: 3, 5, 9, 10), not as the 4 of 5 targets they are.
    weighed = fit_text_prior(
        model, split, grid, batch_size=2, new_items_grid=c_grid, min_new_targets=4, catalogue_share=True
    )
    s = 4 / CATALOG.n_items
    assert fit.share is None and weighed.share is not None and math.isclose(weighed.share, s)
    assert weighed.ndcg10 == fit.ndcg10 and weighed.ndcg10_new == fit.ndcg10_new  # the same ranks
    stratified = {k: (1 - s) * fit.ndcg10_warm[k] + s * fit.ndcg10_new[k] for k in fit.ndcg10}
    top = max(stratified.values())
    assert (weighed.weight, weighed.new_items) == min(
        k for k, f in stratified.items() if math.isclose(f, top)
    )
    assert math.isclose(weighed.chosen_on((weighed.weight, weighed.new_items)), top)
    assert (weighed.weight, weighed.new_items) != (fit.weight, fit.new_items)  # the weighing decides here
    assert (float(model.text_prior_weight), float(model.text_prior_new_scale)) == (
        weighed.weight,
        weighed.new_items,
    )
    model.set_text_prior(0.0, 1.5)
    few = fit_text_prior(
        model, split, grid, batch_size=2, new_items_grid=c_grid, min_new_targets=5, catalogue_share=True
    )
    assert not few.fitted_new_items and {c for _, c in few.ndcg10} == {1.5} and few.new_items == 1.5
    assert few.share is None  # too few new-item targets to weigh: the plain figure chooses w
    with pytest.raises(ValueError, match="no text prior"):
        fit_text_prior(build_model(_config("sasrec"), CATALOG, None), split, grid, 2)


def test_a_floor_on_the_new_item_targets_keeps_the_pairs_below_it_out_of_the_choice() -> None:
    """fit_text_prior with `new_items_floor` (`train.text_prior_new_items_guard: untrained`, the untrained
    model's figure over validation's new-item targets): only the pairs at or above it over those targets
    compete, the best of them overall is chosen (the smaller of equals); where none reaches it the plain
    choice stands (`floor_met` False); without enough new-item targets to choose c there is no floor."""
    from bridgerec.models.evaluate import fit_text_prior

    rng = np.random.default_rng(1)  # 30 users; 6 of their validation targets are the new items 3 and 9
    seqs = [
        list(rng.choice(np.arange(1, 12), size=int(rng.integers(5, 8)), replace=False)) for _ in range(30)
    ]
    split = SequenceData(CATALOG, sequences(seqs), 10).eval_split("valid", 3, 0, 3)
    torch.manual_seed(0)
    model = build_model(_config("llm4cdsr", id_embeddings=True, text_prior=True), CATALOG, _tables()).eval()
    counts = np.ones(CATALOG.n_items + 1)
    counts[[0, 3, 9]] = 0
    model.set_trained_items(counts)
    grid, c_grid = [0.0, 1.0, 4.0, 1000.0], [1.0, 0.5, 3.0]
    plain = fit_text_prior(
        model, split, grid, batch_size=8, new_items_grid=c_grid, min_new_targets=3, top_k=2
    )
    assert plain.new_targets == 6 and plain.new_items_floor is None and plain.floor_met is None
    assert plain.ndcg10_new_se.keys() == plain.ndcg10_new.keys()  # each pair's spread over the 6 targets
    assert all(0 <= se <= 0.5 for se in plain.ndcg10_new_se.values())  # per-user NDCG is in [0, 1]
    floor = max(plain.ndcg10_new.values())  # the best pair on new items: a floor the plain choice misses
    assert plain.ndcg10_new[(plain.weight, plain.new_items)] < floor
    guarded = fit_text_prior(
        model, split, grid, batch_size=8, new_items_grid=c_grid, min_new_targets=3, new_items_floor=floor
    )
    able = {k: f for k, f in plain.ndcg10.items() if plain.ndcg10_new[k] >= floor}
    assert guarded.floor_met and guarded.new_items_floor == floor and 0 < len(able) < len(plain.ndcg10)
    assert guarded.ndcg10 == plain.ndcg10  # the same ranks; only the choice differs
    assert (guarded.weight, guarded.new_items) == min(k for k, f in able.items() if f == max(able.values()))
    assert guarded.ndcg10_new[(guarded.weight, guarded.new_items)] >= floor
    assert (
        guarded.ndcg10[(guarded.weight, guarded.new_items)] <= plain.ndcg10[(plain.weight, plain.new_items)]
    )
    assert (float(model.text_prior_weight), float(model.text_prior_new_scale)) == (
        guarded.weight,
        guarded.new_items,
    )
    # On exposure (`text_prior_new_items_guard: exposure`): the new items' share of the top-k slots (2
    # here: a domain of this catalogue has fewer than 10 items).
    most = max(plain.new_share.values())
    exposed = fit_text_prior(
        model, split, grid, batch_size=8, new_items_grid=c_grid, min_new_targets=3,
        new_items_floor=most, floor_on="exposure", top_k=2,
    )  # fmt: skip
    able = {k: f for k, f in plain.ndcg10.items() if plain.new_share[k] >= most}
    assert exposed.floor_met and exposed.floor_on == "exposure" and exposed.new_share == plain.new_share
    assert (exposed.weight, exposed.new_items) == min(k for k, f in able.items() if f == max(able.values()))
    assert plain.new_share[(plain.weight, plain.new_items)] < most  # the floor moved the choice
    unreachable = fit_text_prior(
        model, split, grid, batch_size=8, new_items_grid=c_grid, min_new_targets=3, new_items_floor=2.0
    )  # NDCG@10 is at most 1: no pair reaches it, the plain choice stands
    assert unreachable.floor_met is False
    assert (unreachable.weight, unreachable.new_items) == (plain.weight, plain.new_items)
    unfitted = fit_text_prior(
        model, split, grid, batch_size=8, new_items_grid=c_grid, min_new_targets=7, new_items_floor=floor
    )  # too few new-item targets to choose c: no floor either
    assert not unfitted.fitted_new_items and unfitted.new_items_floor is None and unfitted.floor_met is None


def test_the_standard_error_of_ndcg_is_its_per_user_spread_over_the_root_of_the_users() -> None:
    """ndcg_standard_error: sample standard deviation of the per-user NDCG@k over sqrt(U); NaN under 2."""
    from bridgerec.models.metrics import ndcg_standard_error

    ranks = np.array([0, 20, 0, 20])  # per-user NDCG@10: 1, 0, 1, 0 -> sd 0.5774 (ddof 1), / sqrt(4)
    assert ndcg_standard_error(ranks, 10) == pytest.approx(np.sqrt(1 / 3) / 2)
    assert ndcg_standard_error(np.array([3, 3, 3]), 10) == 0.0
    assert np.isnan(ndcg_standard_error(np.array([1]), 10))


def test_the_auto_guard_floors_ndcg_where_validation_measures_it_and_exposure_elsewhere() -> None:
    """text_prior_new_items_guard: auto takes the floor on NDCG@10 over validation's new-item targets
    where the untrained model's figure there has a relative standard error within
    text_prior_new_items_guard_rse, the floor on exposure where not (or where it is 0); the other
    guards keep their floor whatever the error."""
    from bridgerec.models.evaluate import PriorFit
    from bridgerec.tasks.train import TrainSettings
    from bridgerec.tasks.train.stage import guard_floor_on, untrained_rse

    def untrained(figure: float, se: float) -> PriorFit:
        key = (4.0, 1.25)
        return PriorFit(
            4.0, 1.25, {key: 0.02}, {key: figure}, {key: 0.02}, 3000, True, ndcg10_new_se={key: se}
        )

    precise, noisy, nothing = untrained(0.03, 0.002), untrained(0.027, 0.0042), untrained(0.0, 0.0)
    assert untrained_rse(precise) == pytest.approx(0.0667, abs=1e-4) and untrained_rse(nothing) == float(
        "inf"
    )
    auto = TrainSettings(text_prior_new_items_guard="auto")
    assert auto.text_prior_new_items_guard_rse == 0.1
    assert [guard_floor_on(auto, u) for u in (precise, noisy, nothing)] == ["ndcg", "exposure", "exposure"]
    strict = auto.model_copy(update={"text_prior_new_items_guard_rse": 0.05})
    assert guard_floor_on(strict, precise) == "exposure"
    for guard, on in (("untrained", "ndcg"), ("exposure", "exposure")):
        fixed = TrainSettings(text_prior_new_items_guard=guard)
        assert {guard_floor_on(fixed, u) for u in (precise, noisy)} == {on}
        assert "text_prior_new_items_guard_rse" in fixed.ignored_fields()  # not in its run id
    assert "text_prior_new_items_guard_rse" not in auto.ignored_fields()


def test_id_dropout_scores_new_items_with_an_id_row_predicted_from_text() -> None:
    """llm4cdsr-hybrid with id_dropout: an item without training interactions gets the ID row its LLM
    embedding predicts (per thread: `id_from_text_*`), the others keep their own at inference; in
    training a random id_dropout share of the known items uses the predicted row too."""
    torch.manual_seed(0)
    model = build_model(_config("llm4cdsr", id_embeddings=True, id_dropout=0.5), CATALOG, _tables())
    with torch.no_grad():
        for layer in [model.id_from_text_all, *model.id_from_text_local]:  # a non-zero generator
            layer.weight.normal_()
            layer.bias.normal_()
    counts = np.bincount(np.concatenate(SEQS), minlength=CATALOG.n_items + 1)
    counts[[3, 9]] = 0  # global 3 (a, local 3) and global 9 (b, local 3) never met in training
    model.set_trained_items(counts)
    model.eval()
    with torch.no_grad():
        vectors = [model.item_vectors(d) for d in range(2)]
        for d, gid in ((0, 3), (1, 9)):
            lid, H = gid - int(CATALOG.offsets[d]), 16
            text_g, text_l = model.E_all[gid], getattr(model, f"E_local_{d}")[lid]
            mixed = model.adapter(text_g) + model.id_from_text_all(text_g)
            local = model.local_proj(text_l) + model.id_from_text_local[d](text_l)
            assert torch.allclose(vectors[d][lid], torch.cat([mixed, local]), atol=1e-5)
            known = 1 if d == 0 else 2
            own = (
                model.adapter(model.E_all[known + int(CATALOG.offsets[d])])
                + model.id_all.weight[known + int(CATALOG.offsets[d])]
            )
            assert torch.allclose(vectors[d][known][:H], own, atol=1e-5)
        assert torch.all(vectors[0][0] == 0) and torch.all(vectors[1][0] == 0)  # padding stays zero
        # training: a fresh draw per call replaces about half of the known items' rows
        model.train()
        ids = torch.arange(1, 12)
        own_rows, text_part = model.id_all(ids), model.adapter(model.E_all[ids])
        replaced = torch.stack(
            [(model.embed_global(ids) - text_part - own_rows).abs().sum(-1) > 1e-4 for _ in range(400)]
        )  # [calls, items]
        known = torch.from_numpy(counts[1:] > 0)
        share = replaced[:, known].float().mean(0)  # per known item
        assert bool(((share > 0.4) & (share < 0.6)).all()), share
        assert bool(replaced[:, ~known].all())  # unknown items: always the predicted row


def test_domain_start_is_the_state_of_a_user_without_items_of_the_domain() -> None:
    """domain_start: a user (or a training position) with no earlier item of the target's domain gets the
    domain thread's learned start state instead of none, and training reaches it through those positions."""
    torch.manual_seed(0)
    model = build_model(_config("llm4cdsr", id_embeddings=True, domain_start=True), CATALOG, _tables())
    assert torch.all(model.domain_start == 0)  # zero init: the same scores as without it
    data = SequenceData(CATALOG, sequences(SEQS * 4), max_len=10)
    prefix = data.train_prefix(torch.arange(12))
    neg = data.sample_negatives(prefix[:, 1:], prefix, torch.Generator().manual_seed(0))
    loss, _ = model.loss(Batch(prefix, neg, torch.arange(12)))
    loss.backward()
    assert model.domain_start.grad is not None and bool((model.domain_start.grad.abs().sum(1) > 0).all())
    model.eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.domain_start)
        only_a = torch.tensor([[0, 0, 0, 1, 2, 3]])
        u = model.user_vectors(only_a, 1)  # domain b: no item
        assert torch.allclose(u[0, 16:], model.domain_start[1])
        assert not torch.allclose(model.user_vectors(only_a, 0)[0, 16:], model.domain_start[0])


@pytest.mark.parametrize("arch", ["sasrec", "sasrec_domain", "llm4cdsr"])
def test_every_model_trains_with_and_without_profiles(arch: str) -> None:
    torch.manual_seed(0)
    data = SequenceData(CATALOG, sequences(SEQS * 4), max_len=10)
    model = build_model(_config(arch), CATALOG, _tables())
    opt = Optimizer(model, lr=1e-2)
    prefix = data.train_prefix(torch.arange(12))
    neg = data.sample_negatives(prefix[:, 1:], prefix, torch.Generator().manual_seed(0))
    has = torch.tensor([True, False] * 6)  # half the users have no profile (capped or failed)
    batch = Batch(prefix, neg, torch.arange(12), torch.randn(12, 8) * has[:, None], has)
    losses = []
    for _ in range(30):
        loss, parts = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] * 0.7
    if arch == "llm4cdsr":
        assert {"rec", "reg", "user"} <= set(parts)
        batch.has_profile = torch.zeros(12, dtype=torch.bool)
        assert "user" not in model.loss(batch)[1]  # no profiles, no profile term
