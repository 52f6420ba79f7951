"""Issue #11: the popularity baseline, the training objectives, no target leakage, beyond-accuracy figures
and selection by full-ranking validation, each against a hand computation on a tiny fixture (and the
objectives' losses falling on the bundled sample)."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bridgerec.models.batch import Batch, cloze_mask
from bridgerec.models.config import ModelConfig
from bridgerec.models.data import Catalog, SequenceData, Sequences
from bridgerec.models.evaluate import beyond_accuracy, evaluate, popularity_tables
from bridgerec.models.objectives import draw_shared_negatives, sampling_probs
from bridgerec.models.optim import Optimizer
from bridgerec.models.registry import ItemTables, build_model
from bridgerec.models.trainer import FitConfig, FitState, Ranks, fit, rank_share, train_epoch, validate
from bridgerec.tasks.train import TrainSettings
from bridgerec.tasks.train.stage import select_best

# Two domains: "a" = global ids 1..6 (local 1..6), "b" = global ids 7..11 (local 1..5).
CATALOG = Catalog(["a", "b"], np.array([6, 5]), np.array([0, 6]), [f"i{g}" for g in range(1, 12)])
SEQS = [[1, 7, 2, 8, 3], [9, 10, 4], [5, 6, 1, 2, 11, 7, 3], [2, 1, 8, 9, 5]]


def _sequences(seqs: list[list[int]]) -> Sequences:
    lengths = np.array([len(s) for s in seqs])
    return Sequences(
        [f"u{i}" for i in range(len(seqs))],
        np.concatenate(seqs).astype(np.int64),
        np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
    )


def _tables() -> ItemTables:
    rng = np.random.default_rng(0)
    g = rng.normal(size=(12, 24)).astype(np.float32)
    local = [rng.normal(size=(n + 1, 12)).astype(np.float32) for n in CATALOG.sizes]
    g[0] = 0
    for t in local:
        t[0] = 0
    return ItemTables(g, local)


def _spec(arch: str, **kw) -> ModelConfig:
    """The shipped defaults (TrainSettings), small, dropout off so that forward passes are comparable."""
    settings = TrainSettings(hidden=16, layers=2, heads=2, dropout=0.0, max_len=10).model_copy(update=kw)
    return dataclasses.replace(settings.model_spec(24, 12, 0), architecture=arch)


# -- pop ---------------------------------------------------------------------------------------------
def test_pop_ranks_by_training_prefix_counts_leaving_seen_items_out() -> None:
    data = SequenceData(CATALOG, _sequences(SEQS), max_len=10)
    # Training prefixes (all but the last two items): [1, 7, 2], [9], [5, 6, 1, 2, 11], [2, 1, 8].
    counts = data.item_counts("train")
    assert counts.tolist() == [0, 3, 3, 0, 0, 1, 1, 1, 1, 1, 0, 1]
    model = build_model(ModelConfig("pop"), CATALOG)
    model.fit_counts(counts)
    ranks = evaluate(model, data.eval_split("test", 1, seed=0, short_history=3), 8, full=True)
    # Hand ranking (ties against the target), each user's earlier items of the target's domain left out:
    # u0 target 3 (a, count 0); seen 1, 2; others 4:0 5:1 6:1 -> 3 score >= 0 -> rank 3.
    # u1 target 4 (a, 0); nothing seen in a; 1:3 2:3 3:0 5:1 6:1 -> rank 5.
    # u2 target 3 (a, 0); seen 5, 6, 1, 2; 4:0 -> rank 1.
    # u3 target 5 (a, 1); seen 2, 1; 3:0 4:0 6:1 -> rank 1 (6 ties).
    assert ranks.full.tolist() == [3, 5, 1, 1]
    # Top lists: the most counted unseen items first; u2 may only get 3 and 4.
    assert set(ranks.top[2][:2].tolist()) == {3, 4}
    assert ranks.top[1][:2].tolist() in ([1, 2], [2, 1])
    # Publishing counts every known interaction; user . item = count, so FAISS ranks as the counts do.
    model.serving_update(data)
    assert model.item_vectors(1)[1:, 0].tolist() == [2, 2, 2, 1, 1]  # 7, 8, 9, 10, 11 over all items
    u = model.user_vectors(torch.zeros(3, 4, dtype=torch.long), 1)
    assert torch.equal(u @ model.item_vectors(1).T, model.item_vectors(1).T.expand(3, -1))


# -- objectives: each loss equals a direct computation -------------------------------------------------
def _batch(seed: int = 0, k: int = 4) -> tuple[SequenceData, Batch]:
    data = SequenceData(CATALOG, _sequences(SEQS * 3), max_len=10)
    gen = torch.Generator().manual_seed(seed)
    prefix = data.train_prefix(torch.arange(12))
    batch = Batch(prefix, data.sample_negatives(prefix[:, 1:], prefix, gen), torch.arange(12))
    probs = sampling_probs(torch.from_numpy(data.item_counts("train")), [6, 5], [0, 6], "popularity")
    batch.shared = draw_shared_negatives(probs, k, gen)
    return data, batch


def _direct_loss(model, batch: Batch, objective: str) -> torch.Tensor:
    """Position by position, with the model's own score function (user vector . item vector)."""
    terms = []
    for g in model.train_targets(batch):
        # the rows the objective scores: the inference vectors less the text prior's columns (not trained)
        items = model.item_vectors(g.domain)[:, : g.users.shape[1]]  # [n_d + 1, D]
        for p in range(len(g.targets)):
            u, t = g.users[p], int(g.targets[p])
            if objective == "bce":
                s_pos, s_neg = u @ items[t], u @ items[int(g.negatives[p])]
                terms.append(-torch.nn.functional.logsigmoid(s_pos) - torch.nn.functional.logsigmoid(-s_neg))
            elif objective == "ce":
                terms.append(-torch.log_softmax(items[1:] @ u, 0)[t - 1])
            else:
                negs, logk = batch.shared.items[g.domain].tolist(), batch.shared.log_expected[g.domain]
                logits = [u @ items[t] - logk[t]] + [u @ items[j] - logk[j] for j in negs if j != t]
                terms.append(-torch.log_softmax(torch.stack(logits), 0)[0])
    return torch.stack(terms).mean()


@pytest.mark.parametrize("objective", ["bce", "sampled_softmax", "ce"])
@pytest.mark.parametrize("arch", ["sasrec", "sasrec_domain", "llm4cdsr"])
def test_each_objective_equals_a_direct_computation(arch: str, objective: str) -> None:
    torch.manual_seed(0)
    model = build_model(_spec(arch, objective=objective, alpha=0.0), CATALOG, _tables()).eval()
    _, batch = _batch()
    with torch.no_grad():
        loss = model.loss(batch)[0]
        assert float(loss) == pytest.approx(float(_direct_loss(model, batch, objective)), rel=1e-5)


def test_bce_per_thread_negatives_equal_a_direct_computation() -> None:
    """`bce_negatives: per_thread` (the authors' code): the negative's score is the mixed thread's score of
    its own negative (a global id from the domain of the position's input item) plus the domain thread's
    score of a negative from the target's domain."""
    torch.manual_seed(0)
    model = build_model(_spec("llm4cdsr", objective="bce", alpha=0.0, bce_negatives="per_thread"),
                        CATALOG, _tables()).eval()  # fmt: skip
    data, batch = _batch()
    gen = torch.Generator().manual_seed(5)
    batch.mixed_negatives = data.sample_negatives(batch.targets, batch.prefix, gen, domain_of=batch.inputs)
    real = (batch.targets > 0) & (batch.inputs > 0)  # (a first item's negative: the target's domain)
    input_dom, neg_dom = (data.item_domain[t[real]] for t in (batch.inputs, batch.mixed_negatives))
    assert torch.equal(input_dom, neg_dom) and (input_dom != data.item_domain[batch.targets[real]]).any()
    H = model.config.hidden
    terms = []
    with torch.no_grad():
        for g in model.train_targets(batch):
            items = model.item_vectors(g.domain)[:, : 2 * H]  # [n_d + 1, 2H]: [adapted global, local]
            for p in range(len(g.targets)):
                u, t = g.users[p], int(g.targets[p])
                gid = g.mixed_negatives[p : p + 1]
                s_neg = u[:H] @ model.embed_global(gid)[0] + u[H:] @ items[int(g.negatives[p]), H:]
                terms.append(-F.logsigmoid(u @ items[t]) - F.logsigmoid(-s_neg))
        assert float(model.loss(batch)[0].detach()) == pytest.approx(
            float(torch.stack(terms).mean()), rel=1e-5
        )


@pytest.mark.parametrize(
    ("model", "objective", "applies"),
    [("llm4cdsr", "bce", True), ("llm4cdsr-hybrid", "sampled_softmax", False), ("sasrec", "bce", False)],
)
def test_bce_negatives_is_part_of_the_run_id_only_where_it_applies(
    model: str, objective: str, applies: bool
) -> None:
    from bridgerec.storage.workspace import config_hash

    per_thread = TrainSettings(model=model, objective=objective)
    assert per_thread.bce_negatives == "per_thread" and per_thread.bce_negatives_apply == applies
    fused = per_thread.model_copy(update={"bce_negatives": "fused"})
    assert (config_hash(per_thread) != config_hash(fused)) == applies
    # the trainer draws the mixed thread's own negatives exactly where the setting applies
    assert per_thread.model_spec().per_thread_negatives == applies
    assert not fused.model_spec().per_thread_negatives


def test_sampled_softmax_log_q_is_log_of_the_expected_count() -> None:
    probs = sampling_probs(torch.tensor([0, 3, 1, 0, 5]), [2, 2], [0, 2], "popularity")
    # domain a: counts 3, 1 -> weights 4, 2; domain b: counts 0, 5 -> weights 1, 6
    assert probs[0].tolist() == pytest.approx([0, 4 / 6, 2 / 6])
    assert probs[1].tolist() == pytest.approx([0, 1 / 7, 6 / 7])
    shared = draw_shared_negatives(probs, 8, torch.Generator().manual_seed(0))
    assert shared.log_expected[1][2] == pytest.approx(math.log(8 * 6 / 7))
    assert (shared.items[0] > 0).all() and (shared.items[0] <= 2).all()


@pytest.mark.parametrize("objective", ["bce", "sampled_softmax", "ce"])
def test_each_objective_falls_on_the_sample(sample_workspace, objective: str) -> None:
    from bridgerec.storage.workspace import Workspace
    from bridgerec.tasks.train.inputs import load_catalog, load_sequences

    ws = Workspace(sample_workspace)
    catalog = load_catalog(ws)
    data = SequenceData(catalog, load_sequences(ws), max_len=20)
    torch.manual_seed(0)
    spec = ModelConfig(
        "sasrec", hidden=16, layers=1, dropout=0.0, max_len=20, objective=objective, negatives=64
    )
    model = build_model(spec, catalog)
    opt = Optimizer(model, lr=5e-3)
    gen = torch.Generator().manual_seed(0)
    users = next(data.train_batches(128, gen))
    prefix = data.train_prefix(users)
    batch = Batch(prefix, data.sample_negatives(prefix[:, 1:], prefix, gen), users)
    probs = sampling_probs(
        torch.from_numpy(data.item_counts()), model.sizes, list(catalog.offsets), "popularity"
    )
    losses = []
    for _ in range(15):
        batch.shared = draw_shared_negatives(probs, 64, gen)
        loss = model.loss(batch)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.9 * losses[0], losses  # softmax over thousands of items falls slower than BCE


# -- no target leakage -----------------------------------------------------------------------------------
def _leaks(model, batch: Batch) -> float:
    """The largest change of any training position's vector when the items after it (its target included)
    are replaced by other items of the same domains. Zero iff no position sees its own target."""
    base = {(g.domain, int(r), int(c)): u for g in model.train_targets(batch) for r, c, u in zip(g.rows, g.cols, g.users, strict=True)}  # fmt: skip
    worst = 0.0
    prefix = batch.prefix
    dom = torch.from_numpy(CATALOG.item_domain)[prefix]
    for t in range(prefix.shape[1] - 1):
        changed = prefix.clone()
        later = (torch.arange(prefix.shape[1]) > t) & (prefix > 0)
        # another item of the same domain: a -> the next local id cyclically, b likewise
        size = torch.from_numpy(CATALOG.sizes)[dom.clamp(min=0)]
        off = torch.from_numpy(CATALOG.offsets)[dom.clamp(min=0)]
        shifted = off + (prefix - off) % size + 1
        changed[later] = shifted[later]
        other = Batch(changed, batch.negatives, batch.users)
        for g in model.train_targets(other):
            for r, c, u in zip(g.rows, g.cols, g.users, strict=True):
                if int(c) <= t:
                    worst = max(worst, float((u - base[(g.domain, int(r), int(c))]).abs().max()))
    return worst


@pytest.mark.parametrize("block", ["pre_ln", "sasrec"])
@pytest.mark.parametrize("arch", ["sasrec", "sasrec_domain", "llm4cdsr"])
def test_no_training_position_can_attend_to_its_own_target(arch: str, block: str) -> None:
    torch.manual_seed(0)
    _, batch = _batch()
    model = build_model(_spec(arch, block=block), CATALOG, _tables()).train()  # the shipped default: causal
    with torch.no_grad():
        assert _leaks(model, batch) < 1e-5
        # The check can fail: the authors' bidirectional attention lets positions see their targets.
        leaky = build_model(_spec(arch, causal=False, block=block), CATALOG, _tables()).train()
        assert _leaks(leaky, batch) > 1e-3


# -- training tasks: last position, cloze ----------------------------------------------------------------
def _task_batch(task: str, seed: int = 0, share: float = 0.3) -> Batch:
    """The fixture's prefixes as one batch of `task` (cloze: a seeded mask), with two hidden-domain rows."""
    data = SequenceData(CATALOG, _sequences(SEQS * 3), max_len=10)
    gen = torch.Generator().manual_seed(seed)
    prefix = data.train_prefix(torch.arange(12))
    hidden = data.hidden_domain_examples(prefix, 1.0, gen)[1]
    prefix = torch.cat([prefix, hidden[:2]])
    cloze = cloze_mask(prefix, share, gen, 2) if task == "cloze" else None
    batch = Batch(prefix, prefix[:0], torch.arange(14), hidden_domain_rows=2, task=task, cloze=cloze)
    batch.negatives = data.sample_negatives(batch.targets, prefix, gen)
    return batch


def _vectors(model, batch: Batch) -> dict[tuple[int, int, int], torch.Tensor]:
    return {(g.domain, int(r), int(c)): u for g in model.train_targets(batch) for r, c, u in zip(g.rows, g.cols, g.users, strict=True)}  # fmt: skip


def _other_items(prefix: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """`prefix` with the items at `where` replaced by the next item of their own domain (cyclically)."""
    dom = torch.from_numpy(CATALOG.item_domain)[prefix].clamp(min=0)
    size, off = torch.from_numpy(CATALOG.sizes)[dom], torch.from_numpy(CATALOG.offsets)[dom]
    return torch.where(where & (prefix > 0), off + (prefix - off) % size + 1, prefix)


def test_task_targets_and_the_cloze_mask_have_the_expected_shapes() -> None:
    last, cloze = _task_batch("last"), _task_batch("cloze", share=0.5)
    L1 = last.prefix.shape[1]
    assert last.inputs.shape == last.targets.shape == (14, L1 - 1)
    assert (last.targets[:, :-1] == 0).all() and torch.equal(last.targets[:, -1], last.prefix[:, -1])
    assert cloze.inputs.shape == cloze.targets.shape == cloze.cloze.shape == (14, L1)
    m = cloze.cloze
    assert m[:, -1].all() and not (m & (cloze.prefix == 0)).any()  # every last item, never padding
    assert not m[12:, :-1].any()  # hidden-domain rows: their last item only
    assert torch.equal(cloze.targets, cloze.prefix * m)
    real = (cloze.prefix[:12, :-1] > 0).sum()
    assert 0.3 < float(m[:12, :-1].sum() / real) < 0.7  # about `share` of the other items
    draws = cloze_mask(torch.randint(1, 12, (400, 30)), 0.2, torch.Generator().manual_seed(1))
    assert float(draws[:, :-1].float().mean()) == pytest.approx(0.2, abs=0.01)


def test_cloze_training_vectors_never_see_a_masked_item() -> None:
    """Every training vector of the cloze task is a function of the unmasked items only: replacing every
    masked item (the targets) by another item of its domain changes none, in either block layout. The
    check can fail: without the mask token the same batch's vectors change."""
    for block in ("sasrec", "pre_ln"):
        torch.manual_seed(0)
        model = build_model(_spec("llm4cdsr", task="cloze", block=block, id_embeddings=True), CATALOG, _tables()).train()  # fmt: skip
        batch = _task_batch("cloze")
        with torch.no_grad():
            base = _vectors(model, batch)
            changed = dataclasses.replace(batch, prefix=_other_items(batch.prefix, batch.cloze))
            moved = _vectors(model, changed)
            assert base.keys() == moved.keys() and len(base) == int(batch.cloze.sum())
            assert max(float((base[k] - moved[k]).abs().max()) for k in base) < 1e-5
            unmasked = dataclasses.replace(changed, cloze=torch.zeros_like(batch.cloze))
            seen = model.encode(unmasked.inputs, range(2)).mixed  # the targets read as items
            assert (
                float((seen - model.encode(batch.inputs, range(2), masked=batch.cloze).mixed).abs().max())
                > 1e-3
            )


def test_last_position_task_lets_attention_look_both_ways_without_seeing_the_target() -> None:
    """Task last, bidirectional: the only targets are the last items, which are not inputs; replacing them
    changes no training vector. The same bidirectional attention with task next does see targets."""
    torch.manual_seed(0)
    model = build_model(_spec("llm4cdsr", task="last", causal=False), CATALOG, _tables()).train()
    batch = _task_batch("last")
    with torch.no_grad():
        base = _vectors(model, batch)
        assert {c for (_, _, c) in base} == {batch.inputs.shape[1] - 1} and len(base) == 14
        last_col = torch.zeros_like(batch.prefix, dtype=torch.bool)
        last_col[:, -1] = True
        moved = _vectors(model, dataclasses.replace(batch, prefix=_other_items(batch.prefix, last_col)))
        assert max(float((base[k] - moved[k]).abs().max()) for k in base) < 1e-5
        _, next_batch = _batch()
        assert (
            _leaks(build_model(_spec("llm4cdsr", causal=False), CATALOG, _tables()).train(), next_batch)
            > 1e-3
        )


@pytest.mark.parametrize("block", ["sasrec", "pre_ln"])
def test_cloze_inference_is_the_training_state_of_a_masked_last_item(block: str) -> None:
    """A cloze model's user vector (the history, then a mask token of the target's domain) is the training
    vector of a prefix whose last item is masked and is of that domain: training and serving read the
    same state. Its score contract holds as for every model."""
    torch.manual_seed(0)
    model = build_model(_spec("llm4cdsr", task="cloze", block=block), CATALOG, _tables()).eval()
    torch.nn.init.normal_(model.mask_mixed)
    torch.nn.init.normal_(model.mask_local)
    batch = _task_batch("cloze", share=0.0)  # only the last items masked
    main = batch.main_rows
    with torch.no_grad():
        trained = _vectors(model, batch)
        inputs = batch.prefix[:main, :-1]
        for d in range(2):
            served = model.user_vectors(inputs, d)[:, : 2 * model.config.hidden]  # the prior aside
            for r in range(main):
                key = (d, r, batch.prefix.shape[1] - 1)
                if key in trained:
                    assert torch.allclose(trained[key], served[r], atol=1e-5)
        assert sum(1 for k in trained if k[1] < main) == main
        cand = torch.arange(1, 7).repeat(main, 1)
        assert torch.allclose(
            model.score(inputs, 0, cand),
            model.user_vectors(inputs, 0) @ model.item_vectors(0)[1:].T,
            atol=1e-5,
        )
        assert torch.allclose(model.user_vectors_all(inputs)[1], model.user_vectors(inputs, 1))


@pytest.mark.parametrize("task", ["last", "cloze"])
def test_each_task_trains_through_the_loop_and_its_loss_falls(task: str) -> None:
    torch.manual_seed(0)
    data = SequenceData(CATALOG, _sequences(SEQS * 8), max_len=10)
    model = build_model(
        _spec("llm4cdsr", task=task, causal=task == "next", id_embeddings=True), CATALOG, _tables()
    )
    optimizer = Optimizer(model, 1e-2)
    cfg = FitConfig(lr=1e-2, weight_decay=0.0, batch_size=8, eval_batch_size=64, epochs=1, patience=1, seed=0,
                    hide_domain=1.0, loss_norm="global")  # fmt: skip
    losses = [train_epoch(model, data, optimizer, cfg, e, None, torch.device("cpu"))["rec"] for e in range(8)]
    assert losses[-1] < 0.8 * losses[0], losses
    valid = data.eval_split("valid", 2, seed=0, short_history=3)
    assert evaluate(model, valid, 64, full=True).full.shape == (32,)


@pytest.mark.parametrize("task", ["last", "cloze"])
def test_data_parallel_shares_of_a_task_batch_add_up_to_its_loss(task: str) -> None:
    """Each DDP rank trains its rows of the global batch (`rank_share`): with task last or cloze the
    shares keep the task and their rows of the cloze mask, so the ranks' targets are the batch's and the
    mean of their recommendation losses is the one-process loss (adapter and profile terms off: those
    see each rank's share, docs/train.md)."""
    model = build_model(
        _spec("llm4cdsr", task=task, causal=False, id_embeddings=True, objective="bce", alpha=0.0, beta=0.0),
        CATALOG,
        _tables(),
    )
    batch = _task_batch(task, seed=3)
    whole = float(model.loss(batch)[0].detach())
    shares = [rank_share(batch, Ranks(rank=r, world=2)) for r in range(2)]
    assert all(s.task == task for s in shares)
    assert torch.equal(torch.cat([s.targets for s in shares]), batch.targets)
    assert sum(s.hidden_domain_rows for s in shares) == batch.hidden_domain_rows
    assert np.mean([float(model.loss(s)[0].detach()) for s in shares]) == pytest.approx(whole, rel=1e-5)


# -- beyond accuracy -------------------------------------------------------------------------------------
def test_coverage_popular_share_and_percentile_match_hand_values() -> None:
    # 200 items in domain a (the 1% most popular: 2 items), 5 in b (1%: at least 1 item).
    catalog = Catalog(["a", "b"], np.array([200, 5]), np.array([0, 200]), [f"i{g}" for g in range(1, 206)])
    counts = np.zeros(206, np.int64)
    counts[1:201] = np.arange(200)  # a: local l has count l - 1: locals 200 and 199 are the top 1%
    counts[201:206] = [5, 5, 1, 0, 0]  # b: locals 1 and 2 tie at the top; the first by id is the 1%
    tables = popularity_tables(counts, catalog)
    popular, pct = tables.popular, tables.percentile
    assert np.flatnonzero(popular).tolist() == [199, 200, 201]
    assert pct[200] == pytest.approx(100 * 199.5 / 200) and pct[201] == pytest.approx(100 * 4 / 5)
    assert np.flatnonzero(tables.new).tolist() == [1, 204, 205]  # count 0: a's local 1, b's 4 and 5
    top = np.array([[200, 199, 1], [200, 5, 0], [1, 2, 4]])  # local ids; 0 = no recommendation
    tdom = np.array([0, 0, 1])
    got = beyond_accuracy(top, tdom, catalog, tables)
    # distinct: a {200, 199, 1, 5}, b {1, 2, 4} -> 7 of 205 items; popular: a200, a199, a200, b1 of 8 recs
    assert got["coverage@3"] == pytest.approx(7 / 205)
    assert got["top1pct_share@3"] == pytest.approx(4 / 8)
    expected = [99.75, 99.25, 0.25, 99.75, 2.25, 80.0, 80.0, 20.0]
    assert got["pop_percentile@3"] == pytest.approx(np.mean(expected))
    assert got["new_item_share@3"] == pytest.approx(2 / 8)  # a1 and b4: no training interactions


# -- selection by full-ranking validation ----------------------------------------------------------------
def test_best_run_is_picked_by_full_ranking_validation() -> None:
    rows = [
        {"run_id": "bce", "valid_ndcg10": 0.30, "valid_full_ndcg10": 0.010},
        {"run_id": "softmax", "valid_ndcg10": 0.25, "valid_full_ndcg10": 0.031},
        {"run_id": "old", "valid_ndcg10": 0.40, "valid_full_ndcg10": None},  # no full figure: last
        {"run_id": "pop", "valid_ndcg10": 0.17, "valid_full_ndcg10": 0.005},
    ]
    assert select_best(rows, "full")["run_id"] == "softmax"
    assert select_best(rows, "sampled")["run_id"] == "old"


def test_early_stopping_keeps_the_epoch_with_the_best_full_ranking_validation() -> None:
    torch.manual_seed(0)
    data = SequenceData(CATALOG, _sequences(SEQS * 8), max_len=10)
    valid = data.eval_split("valid", 2, seed=0, short_history=3)
    model = build_model(_spec("sasrec", objective="ce"), CATALOG)
    cfg = FitConfig(lr=3e-2, weight_decay=0.0, batch_size=8, eval_batch_size=64, epochs=6, patience=6, seed=0)
    saved = {}
    state = fit(model, data, valid, cfg, torch.device("cpu"), on_epoch=lambda m, o, s, best: saved.update({s.epoch: best}), log=lambda _: None)  # fmt: skip
    full = [h["valid_full_ndcg@10"] for h in state.history]
    first_best = int(np.argmax(full)) + 1  # the hand pick: highest full NDCG@10, the earliest on ties
    assert state.best_epoch == first_best and state.best_valid == pytest.approx(max(full))
    assert saved[first_best] is True


def test_fit_scores_new_items_by_the_epochs_map_then_hands_back_their_neighbours_rows() -> None:
    """id_text_knn (on by default): `fit` trains and validates every epoch with the ridge map's rows
    for items without training interactions, and returns a model that scores them with the mean ID row
    of their k text-nearest items with them."""
    from bridgerec.models.llm4cdsr import knn_rows

    torch.manual_seed(0)
    data = SequenceData(CATALOG, _sequences(SEQS * 8), max_len=10)
    valid = data.eval_split("valid", 2, seed=0, short_history=3)
    model = build_model(_spec("llm4cdsr", id_text_knn=2), CATALOG, _tables())
    counts = data.item_counts("train")
    assert (counts[1:] == 0).sum() >= 2  # items first seen at validation or test: no training row
    model.set_trained_items(counts)
    cfg = FitConfig(lr=3e-2, weight_decay=0.0, batch_size=8, eval_batch_size=64, epochs=2, patience=2, seed=0)
    during: list[int] = []
    fit(model, data, valid, cfg, torch.device("cpu"), on_epoch=lambda m, o, s, best: during.append(m.knn), log=lambda _: None)  # fmt: skip
    assert during == [0, 0] and model.knn == 2
    assert float(model.id_from_text_all.weight.abs().sum()) > 0  # the epochs fitted the ridge map
    known = torch.from_numpy(counts > 0)
    known[0] = False
    new = torch.nonzero(~known[1:]).flatten() + 1
    with torch.no_grad():
        model.eval()
        rows = knn_rows(model.E_all, model.id_all.weight, known, 2)[new]
        assert torch.allclose(model.embed_global(new), model.adapter(model.E_all[new]) + rows, atol=1e-6)


def test_lr_decay_goes_on_from_the_best_epoch_at_a_lower_rate_and_resumes_the_same() -> None:
    """`lr_decay`: after an epoch no better than the best, the weights and Adam moments are the best
    epoch's again and the rate is lr_decay times lower; a run stopped and resumed from its checkpoint
    (weights, optimizer, FitState) trains exactly as the uninterrupted run."""
    data = SequenceData(CATALOG, _sequences(SEQS * 8), max_len=10)
    valid = data.eval_split("valid", 2, seed=0, short_history=3)
    cfg = FitConfig(lr=1e-1, weight_decay=0.0, batch_size=8, eval_batch_size=64, epochs=8, patience=8, seed=0,
                    lr_decay=0.5)  # fmt: skip

    def weights(m: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in m.state_dict().items()}

    def run(
        epochs: int, start: tuple[torch.nn.Module, FitState, list] | None = None
    ) -> tuple[torch.nn.Module, FitState, list, dict[int, dict[str, torch.Tensor]]]:
        if start is None:
            torch.manual_seed(0)
            model, state, opt_state = build_model(_spec("sasrec", objective="ce"), CATALOG), None, None
        else:
            model, state, opt_state = start
        after: dict[int, dict[str, torch.Tensor]] = {}
        kept: list = []

        def on_epoch(m, o, s, best) -> None:  # what a checkpoint would hold
            after[s.epoch] = weights(m)
            kept[:] = [o.state_dict()]

        state = fit(
            model, data, valid, dataclasses.replace(cfg, epochs=epochs), torch.device("cpu"), None,
            state, opt_state, on_epoch, log=lambda _: None,
        )  # fmt: skip
        return model, state, copy.deepcopy(kept[0]), after

    _, whole, _, after = run(8)
    lrs = [h["lr"] for h in whole.history]
    scores = [h["valid_full_ndcg@10"] for h in whole.history]
    best_so_far, best_epoch, scale = -math.inf, 0, 1.0
    for epoch, (score, lr) in enumerate(zip(scores, lrs, strict=True), start=1):
        assert lr == pytest.approx(cfg.lr * scale)
        if score > best_so_far:
            best_so_far, best_epoch = score, epoch
        else:  # a plateau: back to the best epoch's weights, half the rate from the next epoch on
            scale *= 0.5
            assert all(torch.equal(after[epoch][k], after[best_epoch][k]) for k in after[epoch])
    assert scale < 1, "the fixture's rate is high enough for at least one plateau"
    assert whole.lr_scale == scale and whole.best_epoch == best_epoch

    model, half, opt_state, _ = run(4)
    _, resumed, _, _ = run(8, (model, copy.deepcopy(half), opt_state))
    assert [h["lr"] for h in resumed.history] == lrs
    assert [h["valid_full_ndcg@10"] for h in resumed.history] == pytest.approx(scores)


def test_lr_min_ends_the_run_at_the_plateau_that_would_go_below_it() -> None:
    """`lr_min` under `lr_decay`: the run trains as without it until a plateau would set a rate below
    lr_min; that plateau ends it (`FitState.stopped`), on the best epoch's weights, and a resumed run
    that had stopped there trains no further."""
    data = SequenceData(CATALOG, _sequences(SEQS * 8), max_len=10)
    valid = data.eval_split("valid", 2, seed=0, short_history=3)
    cfg = FitConfig(lr=1e-1, weight_decay=0.0, batch_size=8, eval_batch_size=64, epochs=12, patience=12, seed=0,
                    lr_decay=0.5)  # fmt: skip

    def run(lr_min: float) -> tuple[torch.nn.Module, FitState]:
        torch.manual_seed(0)
        model = build_model(_spec("sasrec", objective="ce"), CATALOG)
        state = fit(
            model, data, valid, dataclasses.replace(cfg, lr_min=lr_min), torch.device("cpu"), log=lambda _: None
        )  # fmt: skip
        return model, state

    _, free = run(0.0)
    lrs = [h["lr"] for h in free.history]
    drops = sorted({lr for lr in lrs if lr < cfg.lr}, reverse=True)
    assert len(drops) >= 2, "the fixture plateaus at least twice in 12 epochs"
    floor = drops[0]  # the first drop is allowed, the second would go below the floor
    model, stopped = run(floor)
    ended = lrs.index(drops[1])  # 0-based index of the first epoch at the second drop's rate
    assert stopped.stopped == "lr_min" and stopped.epoch == ended  # that epoch never trained
    assert [h["lr"] for h in stopped.history] == lrs[:ended]
    assert [h["valid_full_ndcg@10"] for h in stopped.history] == pytest.approx(
        [h["valid_full_ndcg@10"] for h in free.history[:ended]]
    )
    assert stopped.lr_scale == pytest.approx(floor / cfg.lr)
    score, _ = validate(model, valid, cfg, torch.device("cpu"))
    assert score == pytest.approx(stopped.best_valid)  # the best epoch's weights, restored
    again = fit(model, data, valid, dataclasses.replace(cfg, lr_min=floor), torch.device("cpu"), None,
                copy.deepcopy(stopped), log=lambda _: None)  # fmt: skip
    assert again.epoch == stopped.epoch
