"""LLM4CDSR: a mixed thread over adapted global LLM embeddings, one thread per domain over local LLM
embeddings, their scores fused; the adapter regularised contrastively (alpha) and the mixed thread
guided by LLM user profiles (beta).

Per target t (an item of domain d, predicted from the items before it):

    s(t, i) = <h_mix[t-1], adapter(E_all[i]) (+ id_all[i])> + <h_d[last d item before t], E_d[i] (+ id_d[i])>

trained with the configured objective (models/objectives.py; the paper: BCE against one negative from
domain d), plus alpha * L_reg + beta * L_user. Every thread
is scored on the same items. `id_embeddings` adds trainable ID embeddings to the LLM embeddings in every
thread (our hybrid); with it off this is the paper's model. `id_dropout` > 0 adds, per thread, an ID row
predicted from the item's LLM embedding (DropoutNet: it stands in for a random share of ID rows while
training) and scores items without training interactions with it. `domain_start` gives each domain thread
a learned state for users with no earlier item of the domain (else h_d = 0 there).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bridgerec.models.backbone import SequenceEncoder, domain_view, embed_many, encode_rows, trim
from bridgerec.models.base import GLOBAL_IDS, Recommender
from bridgerec.models.batch import Batch, Targets
from bridgerec.models.config import ModelConfig
from bridgerec.models.data import Catalog
from bridgerec.models.objectives import objective_loss


def soft_contrastive(x: Tensor, y: Tensor, tau: float) -> Tensor:
    """CLIP-style loss with soft targets (the paper's L_reg / L_user). x, y: [n, H] paired rows.

    logits = x y^T / tau; targets = softmax(tau * (x x^T + y y^T) / 2) row-wise; both directions.
    """
    logits = x @ y.T / tau  # [n, n]
    targets = F.softmax(tau * (x @ x.T + y @ y.T) / 2, dim=-1).detach()  # symmetric
    row = -(targets * F.log_softmax(logits, dim=-1)).sum(-1)
    col = -(targets * F.log_softmax(logits.T, dim=-1)).sum(-1)
    return (row.mean() + col.mean()) / 2


@dataclass
class DomainThread:
    """One domain thread's states over a batch (`LLM4CDSR.encode`)."""

    states: Tensor  # [B, Ld, H] the state after each item of the domain's subsequence (zero where not run)
    last: Tensor  # [B, L] for each mixed position, the column of `states` of the latest domain item
    has: Tensor  # [B, L] bool, whether the user has an item of the domain at or before that position


@dataclass
class Threads:
    """Every thread's states over a batch of mixed sequences (`LLM4CDSR.encode`)."""

    mixed: Tensor  # [B, L, H] the mixed thread's state after each position
    domains: dict[int, DomainThread]


def ridge_map(
    layer: nn.Linear, x: Tensor, y: Tensor, weights: Tensor, grid: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0)
) -> None:
    """Set `layer` (x -> y) to the weighted ridge regression of y [n, H] on x [n, D] over the rows with
    weight > 0 (the bias unpenalised), in float64. The penalty is lambda times the mean feature variance,
    lambda from `grid` by the weighted squared error on a held-out fifth of the rows (every fifth row),
    then refitted on all of them."""
    keep = torch.nonzero(weights > 0).flatten()
    if len(keep) < 5:  # too few items to fit and check a map: the generator stays as it is
        return
    X = torch.cat([x[keep].double(), x.new_ones(len(keep), 1, dtype=torch.float64)], 1)  # [n, D + 1]
    Y, w = y[keep].double(), weights[keep].double()  # [n, H], [n]
    held = torch.arange(len(keep), device=x.device) % 5 == 4

    def solve(rows: Tensor, lam: float) -> Tensor:
        A = X[rows].T @ (X[rows] * w[rows, None]) / w[rows].sum()  # [D + 1, D + 1]
        B = X[rows].T @ (Y[rows] * w[rows, None]) / w[rows].sum()  # [D + 1, H]
        penalty = (
            torch.diag(A).clone()[:-1].mean() * lam * torch.ones(A.shape[0], dtype=A.dtype, device=A.device)
        )
        penalty[-1] = 0.0  # the bias
        solution: Tensor = torch.linalg.solve(A + torch.diag(penalty), B)  # [D + 1, H]
        return solution

    def error(beta: Tensor) -> float:
        residual = ((X[held] @ beta - Y[held]) ** 2).sum(1)
        return float((residual * w[held]).sum() / w[held].sum())

    best = min(grid, key=lambda lam: error(solve(~held, lam)))
    beta = solve(torch.ones_like(held), best)  # [D + 1, H]
    layer.weight.copy_(beta[:-1].T.to(layer.weight.dtype))
    layer.bias.copy_(beta[-1].to(layer.bias.dtype))


def knn_rows(text: Tensor, rows: Tensor, known: Tensor, k: int, chunk: int = 1024) -> Tensor:
    """text [n, D] LLM embeddings, rows [n, H] ID rows, known [n] bool -> [n, H]: each item that is not
    `known` (row 0 aside) gets the mean of the rows of the k `known` items nearest to it by cosine of
    `text` (k-nearest-neighbour regression; all of them when fewer than k), the others zero. The cost
    is (unknown x known) dot products of width D, in chunks of `chunk` unknown items."""
    out = torch.zeros_like(rows)
    keys = torch.nonzero(known).flatten()
    queries = torch.nonzero(~known).flatten()
    queries = queries[queries > 0]
    if not len(keys) or not len(queries):
        return out
    unit = F.normalize(text.float(), dim=1)
    key_text, key_rows = unit[keys].T, rows[keys]  # [D, n_known], [n_known, H]
    for q in torch.split(queries, chunk):
        nearest = (unit[q] @ key_text).topk(min(k, len(keys)), dim=1).indices  # [b, k]
        out[q] = key_rows[nearest].mean(1).to(out.dtype)
    return out


def _knn_stale(module: nn.Module, _: object) -> None:
    """After weights are loaded, the id_text_knn tables no longer match the ID rows: refit on first use."""
    setattr(module, "knn_current", False)  # noqa: B010 (an LLM4CDSR; the hook's type says Module)


def whitened_pca(table: Tensor, k: int) -> Tensor:
    """table: [n + 1, D] (row 0 = padding) -> [n + 1, k] the rows' coordinates along the k leading
    principal directions of the non-zero rows, each standardised to unit variance and scaled by
    1 / sqrt(k) (rows of about unit norm); each direction's sign fixed (largest loading positive), row 0
    and all-zero rows zero. AlphaFuse's semantic-anchored part (the standardised row space)."""
    real = table.abs().sum(1) > 0  # [n + 1]
    x = table[real].double()
    if len(x) < 2:
        return table.new_zeros(table.shape[0], k)
    centred = x - x.mean(0)
    vh = torch.linalg.svd(centred, full_matrices=False)[2]  # vh: [min(n, D), D]
    basis = vh[:k]  # [k', D] (k' = min(k, rank))
    flip = torch.sign(basis.gather(1, basis.abs().argmax(1, keepdim=True)))
    coords = centred @ (basis * flip).T  # [n, k']
    coords = coords / coords.std(0).clamp(min=1e-12) / math.sqrt(k)
    out = table.new_zeros(table.shape[0], k)
    out[real, : coords.shape[1]] = coords.to(table.dtype)
    return out


class LLM4CDSR(Recommender):
    name = "llm4cdsr"
    E_all: Tensor  # buffer: [N + 1, Dg] the global LLM table (the local ones: `E_local_<d>`)
    id_known: Tensor  # buffer: [N + 1] 1.0 for items with training interactions (with id_embeddings)
    S_all: Tensor  # buffer, fusion null_space: [N + 1, semantic_dims] (the local ones: `S_local_<d>`)
    text_prior_weight: Tensor  # buffer, text_prior: [1] the weight w of the prior's cosine
    text_prior_new_scale: Tensor  # buffer, text_prior: [1] c, w * c on items without training interactions
    knn_all: Tensor  # buffer, id_text_knn (not saved): [N + 1, width] (the local ones: `knn_local_<d>`)

    def __init__(
        self,
        catalog: Catalog,
        config: ModelConfig,
        global_table: Tensor,  # [N + 1, Dg] frozen LLM embeddings by global id (row 0 = zeros)
        local_tables: list[Tensor],  # per domain [n_d + 1, Dl] frozen LLM embeddings by local id
    ) -> None:
        super().__init__(catalog, config)
        hidden, profile_dim = config.hidden, config.profile_dim
        self.alpha, self.beta, self.tau, self.id_embeddings = (
            config.alpha,
            config.beta,
            config.tau,
            config.id_embeddings,
        )
        self.register_buffer("E_all", global_table.float())
        for d, table in enumerate(local_tables):
            self.register_buffer(f"E_local_{d}", table.float())
        Dg, Dl = global_table.shape[1], local_tables[0].shape[1]
        self.fusion = config.fusion
        if self.fusion == "null_space":
            self._build_null_space(config.semantic_dims)
        else:
            self._build_adapters(config, Dg, Dl)
        self.mixed = SequenceEncoder.of(config, Dg)
        self.threads = nn.ModuleList(SequenceEncoder.of(config, Dl) for _ in self.sizes)
        self._build_id_rows(config, catalog.n_items, Dg, Dl)
        self.train_counts: Tensor | None = None  # [N + 1] training interactions (`set_trained_items`)
        # Where a user has no earlier item of the target's domain, that thread has no state: with
        # domain_start it contributes a learned one (zero init: the same as none at the start).
        self.domain_start = (
            nn.Parameter(torch.zeros(len(self.sizes), hidden))
            if config.domain_start and config.task != "cloze"  # cloze: every thread has its mask token
            else None
        )
        if config.task == "cloze":  # the mask token of each thread's input (BERT4Rec's [mask])
            self.mask_mixed = nn.Parameter(torch.zeros(hidden))
            self.mask_local = nn.Parameter(torch.zeros(len(self.sizes), hidden))
        self.user_adapter = (
            nn.Sequential(nn.Linear(profile_dim, profile_dim // 2), nn.Linear(profile_dim // 2, hidden))
            if profile_dim and self.beta > 0
            else None
        )
        self.prior_dims = Dg if config.text_prior else 0
        if config.text_prior:  # the text prior's weight w (0 until `fit_text_prior` sets it) and c
            self.register_buffer("text_prior_weight", torch.zeros(1))
            self.register_buffer("text_prior_new_scale", torch.full((1,), float(config.text_prior_new_items)))

    def _build_adapters(self, config: ModelConfig, Dg: int, Dl: int) -> None:
        """fusion add: the paper's adapter (two linear maps, D -> D/2 -> hidden) for the mixed thread,
        with adapter_per_domain a zero-initialised linear map of the item's own domain added; the local
        tables enter the domain threads frozen (a linear map only if their width differs from hidden)."""
        hidden = config.hidden
        self.adapter = nn.Sequential(nn.Linear(Dg, Dg // 2), nn.Linear(Dg // 2, hidden))
        if config.adapter_init == "xavier":
            # torch's default Linear init (uniform +-1/sqrt(fan_in), bias too) makes the adapted items
            # nearly identical at the start (the biases dominate the small PCA inputs); Xavier weights and
            # zero biases keep the items apart.
            for layer in self.adapter:
                assert isinstance(layer, nn.Linear)
                nn.init.xavier_normal_(layer.weight)
                nn.init.zeros_(layer.bias)
        self.domain_adapters = None
        if config.adapter_per_domain:
            self.domain_adapters = nn.ModuleList(nn.Linear(Dg, hidden) for _ in self.sizes)
            for layer in self.domain_adapters:
                assert isinstance(layer, nn.Linear)
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        self.local_proj = nn.Identity() if Dl == hidden else nn.Linear(Dl, hidden, bias=False)

    def _build_null_space(self, k: int) -> None:
        """fusion null_space (AlphaFuse, Hu et al., SIGIR 2025): each thread's item input is the item's
        LLM embedding in the first k coordinates, whitened along its k leading principal directions and
        frozen (`whitened_pca`), and its ID row in the other hidden - k coordinates, the directions the
        language table leaves empty; no adapter."""
        self.register_buffer("S_all", whitened_pca(self.E_all, k))  # [N + 1, k]
        for d in range(len(self.sizes)):
            self.register_buffer(f"S_local_{d}", whitened_pca(getattr(self, f"E_local_{d}"), k))

    def _build_id_rows(self, config: ModelConfig, n_items: int, Dg: int, Dl: int) -> None:
        """id_embeddings: trainable ID rows per thread (hidden wide; hidden - semantic_dims with fusion
        null_space), and with id_dropout or id_text_fit their generators from the LLM embeddings."""
        width = config.hidden - (config.semantic_dims if self.fusion == "null_space" else 0)
        if self.id_embeddings:
            self.id_all = nn.Embedding(n_items + 1, width, padding_idx=0, sparse=True)
            self.id_local = nn.ModuleList(
                nn.Embedding(n + 1, width, padding_idx=0, sparse=True) for n in self.sizes
            )
            for e in [self.id_all, *self.id_local]:
                nn.init.normal_(e.weight, std=0.02)
                e.weight.data[0].zero_()
            # [N + 1] 1.0 for the items with training interactions (set by `set_trained_items`). An item
            # without any has an ID row that only ever met the loss as a negative (or never): it enters
            # every score as its LLM-derived representation alone, as a new item does after a warm start.
            self.register_buffer("id_known", torch.ones(n_items + 1))
        self.bias = None
        if config.item_bias:  # one learned score offset per item (zero at the start)
            self.bias = nn.Embedding(n_items + 1, 1, padding_idx=0, sparse=True)
            nn.init.zeros_(self.bias.weight)
        # ID dropout (DropoutNet): an ID row predicted from the LLM embeddings, per thread. Trained by
        # standing in for a random id_dropout share of the ID rows; it is the ID row of every item without
        # training interactions. Zero init: it starts as "no ID row".
        # With id_text_fit the same generators are fitted in closed form after each epoch (`end_epoch`).
        self.id_dropout = config.id_dropout if self.id_embeddings else 0.0
        self.text_rows = self.id_embeddings and (self.id_dropout > 0 or config.id_text_fit)
        if self.text_rows:
            self.id_from_text_all = nn.Linear(Dg, width)
            self.id_from_text_local = nn.ModuleList(nn.Linear(Dl, width) for _ in self.sizes)
            for layer in [self.id_from_text_all, *self.id_from_text_local]:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
                layer.requires_grad_(not config.id_text_fit)
        # id_text_knn: outside training (`set_serving`), instead of the fitted map, an item without
        # training interactions takes the mean ID row of its k text-nearest items with them (`knn_rows`),
        # per thread, by id: [N + 1, width] for the mixed thread, [n_d + 1, width] per domain thread.
        # Derived from the weights, so not saved: refitted on first use after the weights are loaded,
        # the trained items change or training ends (zero at the start, as the generators are).
        self.knn, self.knn_current = 0, True
        if self.text_rows and config.id_text_fit and config.id_text_knn:
            self.set_id_text_knn(config.id_text_knn)
            self.knn_current = True  # zero tables: what the zero-initialised generators predict

    def item_tables(self) -> dict[str, int]:
        domains = range(self.n_domains)
        tables = {"E_all": GLOBAL_IDS} | {f"E_local_{d}": d for d in domains}
        if self.fusion == "null_space":
            tables |= {"S_all": GLOBAL_IDS} | {f"S_local_{d}": d for d in domains}
        if self.bias is not None:
            tables |= {"bias.weight": GLOBAL_IDS}
        if self.id_embeddings:
            tables |= {"id_all.weight": GLOBAL_IDS, "id_known": GLOBAL_IDS}
            tables |= {f"id_local.{d}.weight": d for d in domains}
        return tables

    def set_trained_items(self, counts: np.ndarray) -> None:
        """counts: [N + 1] training interactions per global id. The ID rows of items without any are
        left out of every score (their LLM embedding alone represents them)."""
        if self.id_embeddings:
            known = torch.as_tensor(np.asarray(counts) > 0, dtype=self.id_known.dtype)
            self.id_known.copy_(known.to(self.id_known.device))
            self.train_counts = torch.as_tensor(np.asarray(counts), dtype=torch.float64)
            self.knn_current = False  # the neighbours are other items now

    @torch.no_grad()
    def end_epoch(self) -> None:
        """id_text_fit: fit each thread's ID-row generator to the ID rows of the items with training
        interactions (`ridge_map`), or with id_text_knn their nearest neighbours' mean (`fit_knn`); what an
        item without interactions is scored with."""
        if self.knn:
            self.fit_knn()
            return
        if not (self.config.id_text_fit and self.text_rows and self.train_counts is not None):
            return
        counts = self.train_counts
        ridge_map(self.id_from_text_all, self.E_all[1:], self.id_all.weight[1:], counts[1:])
        for d, size in enumerate(self.sizes):
            start = int(self.offsets[d]) + 1
            text = getattr(self, f"E_local_{d}")[1:]  # [n_d, Dl]
            weights = counts[start : start + size]
            generator, rows = self.id_from_text_local[d], self.id_local[d]
            assert isinstance(generator, nn.Linear) and isinstance(rows, nn.Embedding)
            ridge_map(generator, text, rows.weight[1:], weights)

    def set_serving(self, on: bool) -> None:
        """id_text_knn's rows score new items once training is over; while it trains and validates each
        epoch, the ridge map does (its per-epoch validation is what `fit` stops and selects on)."""
        if self.text_rows and self.config.id_text_fit:
            self.set_id_text_knn(self.config.id_text_knn if on else 0)

    def set_id_text_knn(self, k: int) -> None:
        """Score items without training interactions with the mean ID row of their k text-nearest items
        with them (k > 0; tables refitted on first use) or with the ridge map (0); the same weights serve
        both, so a saved run can be scored either way. Needs id_text_fit and ID embeddings."""
        if not (self.text_rows and self.config.id_text_fit):
            raise ValueError("id_text_knn needs id_text_fit and id_embeddings")
        if k and not hasattr(self, "knn_all"):
            width = self.id_all.weight.shape[1]
            self.register_buffer(
                "knn_all", self.id_all.weight.new_zeros(self.id_all.weight.shape), persistent=False
            )
            for d, n in enumerate(self.sizes):
                self.register_buffer(f"knn_local_{d}", self.E_all.new_zeros(n + 1, width), persistent=False)
            self.register_load_state_dict_post_hook(_knn_stale)  # type: ignore[no-untyped-call]
        self.knn, self.knn_current = k, False

    @torch.no_grad()
    def fit_knn(self) -> None:
        """id_text_knn: each thread's rows of the items without training interactions (`id_known` 0), the
        mean of the ID rows of their k nearest items with them by the cosine of the thread's LLM
        embeddings (the mixed thread over all domains, a domain thread over its domain)."""
        known = self.id_known.bool().clone()  # [N + 1]
        known[0] = False
        self.knn_all.copy_(knn_rows(self.E_all, self.id_all.weight, known, self.knn))
        for d, size in enumerate(self.sizes):
            start = int(self.offsets[d])
            mine = known[start : start + size + 1].clone()  # [n_d + 1] by local id
            mine[0] = False
            rows = self.id_local[d]
            assert isinstance(rows, nn.Embedding)
            table = knn_rows(getattr(self, f"E_local_{d}"), rows.weight, mine, self.knn)
            getattr(self, f"knn_local_{d}").copy_(table)
        self.knn_current = True

    def frozen_tables(self) -> set[str]:
        tables = {"E_all", *(f"E_local_{d}" for d in range(self.n_domains))}
        if self.fusion == "null_space":
            tables |= {"S_all", *(f"S_local_{d}" for d in range(self.n_domains))}
        return tables

    # -- item embeddings of each thread ---------------------------------------------------------------
    def _id_rows(self, rows: Tensor, gids: Tensor, text: Tensor, domain: int | None = None) -> Tensor:
        """The ID part of items' embeddings in the mixed thread (domain None) or a domain thread. rows:
        [..., H] their ID rows; gids: [...] global ids; text: [..., D] their LLM embeddings. An item
        without training interactions has no ID row of its own: zero, or with ID dropout or id_text_fit
        the row predicted from its text (`_predicted_rows`), which with ID dropout also stands in for a
        random `id_dropout` share of the others while training."""
        use = self.id_known[gids]  # [...] 1 = the item's own ID row
        if not self.text_rows:
            return rows * use.unsqueeze(-1)
        if self.training and self.id_dropout > 0:
            use = use * (torch.rand_like(use) >= self.id_dropout)
        use = use.unsqueeze(-1)
        mixed: Tensor = use * rows + (1 - use) * self._predicted_rows(gids, text, domain)
        return mixed

    def _predicted_rows(self, gids: Tensor, text: Tensor, domain: int | None) -> Tensor:
        """[...] global ids, [..., D] their LLM embeddings -> [..., H] the ID rows their text predicts: the
        thread's generator, or with id_text_knn its nearest-neighbour table (refitted first if stale)."""
        if not self.knn:
            generator = self._generator(domain)
            assert generator is not None
            predicted: Tensor = generator(text)
            return predicted
        if not self.knn_current:
            self.fit_knn()
        if domain is None:
            return self.knn_all[gids]
        lids = (gids - self.offsets[domain]).clamp(min=0)  # the padding (gid 0) reads row 0
        table: Tensor = getattr(self, f"knn_local_{domain}")
        return table[lids]

    def _generator(self, domain: int | None = None) -> nn.Module | None:
        """The ID-row generator of the mixed thread (domain None) or of a domain thread, if any."""
        if not self.text_rows:
            return None
        return self.id_from_text_all if domain is None else self.id_from_text_local[domain]

    def adapt(self, x: Tensor) -> Tensor:
        """The adapter, [n, Dg] -> [n, H]: the paper's two linear maps D -> D/2 -> hidden, applied as their
        product (W2 W1 x + W2 b1 + b2: the same function and the same gradients for W1, b1, W2, b2, with
        Dg * H multiply-adds per row instead of Dg * Dg/2 + Dg/2 * H, half at these widths)."""
        first, second = self.adapter
        assert isinstance(first, nn.Linear) and isinstance(second, nn.Linear)
        weight = second.weight @ first.weight  # [H, Dg]
        bias = second.weight @ first.bias + second.bias  # [H]
        return F.linear(x, weight, bias)

    def embed_global(self, gids: Tensor) -> Tensor:
        """[...] global ids -> [..., H]; the adapter runs once per distinct id of the batch."""
        uniq, inverse = torch.unique(gids, return_inverse=True)
        text = self.E_all[uniq]  # [n_unique, Dg]
        if self.fusion == "null_space":  # [semantic k | ID hidden - k]
            return (torch.cat([self.S_all[uniq], self._id_rows(self.id_all(uniq), uniq, text)], -1))[inverse]
        table = self.adapt(text)  # [n_unique, H]
        if self.domain_adapters is not None:
            dom = self.domain_of(uniq)  # [n_unique], -1 for the padding
            for d, layer in enumerate(self.domain_adapters):
                members = torch.nonzero(dom == d).flatten()
                table = table.index_add(0, members, layer(text[members]))
        if self.id_embeddings:
            table = table + self._id_rows(self.id_all(uniq), uniq, text)
        rows: Tensor = (table * (uniq > 0).unsqueeze(-1))[inverse]
        return rows

    def embed_local(self, lids: Tensor, domain: int) -> Tensor:
        """[...] local ids of `domain` -> [..., H] (zero for id 0)."""
        text = getattr(self, f"E_local_{domain}")[lids]  # [..., Dl]
        if self.fusion == "null_space":  # [semantic k | ID hidden - k], zero for id 0
            gids = self.global_ids(domain, lids)
            ids = self._id_rows(self.id_local[domain](lids), gids, text, domain)
            return torch.cat([getattr(self, f"S_local_{domain}")[lids], ids * (lids > 0).unsqueeze(-1)], -1)
        e: Tensor = self.local_proj(text)
        if self.id_embeddings:
            gids = self.global_ids(domain, lids)
            real = (lids > 0).unsqueeze(-1)  # padding keeps a zero row (a predicted row has a bias)
            e = e + self._id_rows(self.id_local[domain](lids), gids, text, domain) * real
        return e

    # -- the sequence encoder: one pass for training, validation, the export and publish ----------------
    def encode(
        self,
        inputs: Tensor,
        domains: Sequence[int],
        split: int | None = None,
        wanted: Tensor | None = None,
        masked: Tensor | None = None,
        append_mask: bool = False,
    ) -> Threads:
        """inputs: [B, L] left-padded global ids -> the mixed thread's states and those of the domain threads
        in `domains`. Rows from `split` on (hidden-domain examples, read at their last column only) run
        through the mixed thread as a batch of their own (`encode_rows`). A domain thread runs on the rows
        with an item of its domain, and of those only the rows where `wanted` [n_domains, B] holds (training:
        a target in the domain); the other rows keep zero states. masked: [B, L] bool (task cloze), the
        items each thread reads as its mask token. append_mask (cloze inference): a masked item after the
        history, of the domain each thread is asked for (the last max_len - 1 items kept), so the last
        column is the state a cloze model predicts the next item from; the states are then [B, L + 1, H]."""
        split = inputs.shape[0] if split is None else split
        per_domain = {d: inputs for d in domains}
        if append_mask:
            inputs = inputs[:, -(self.config.max_len - 1) :]
            for d in domains:  # a placeholder item of domain d, masked: its identity is never read
                placeholder = inputs.new_full((inputs.shape[0], 1), int(self.offsets[d]) + 1)
                per_domain[d] = torch.cat([inputs, placeholder], 1)  # [B, L + 1]
            masked = torch.zeros_like(per_domain[domains[0]], dtype=torch.bool)
            masked[:, -1] = True
        aligned = () if masked is None else (masked,)
        h_mix = encode_rows(self._mixed_thread, per_domain[domains[0]], split, *aligned)  # [B, L, H]
        threads = {}
        for d in domains:
            threads[d] = self._domain_thread(per_domain[d], d, None if wanted is None else wanted[d], masked)
        return Threads(h_mix, threads)

    def _mixed_thread(self, ids: Tensor, masked: Tensor | None = None) -> Tensor:
        """ids: [B, L] global ids -> [B, L, H] the mixed thread's states (masked items: the mask token)."""
        emb = self.embed_global(ids)  # [B, L, H]
        if masked is not None:
            emb = torch.where(masked.unsqueeze(-1), self.mask_mixed, emb)
        states: Tensor = self.mixed(emb, ids)
        return states

    def _domain_thread(
        self, ids: Tensor, d: int, wanted: Tensor | None, masked: Tensor | None
    ) -> DomainThread:
        """ids: [B, L] mixed global ids -> domain d's thread over its subsequence, run on the rows with an
        item of d (and `wanted` [B]); masked [B, L]: the items read as the thread's mask token."""
        dom = self.domain_of(ids)  # [B, L]
        sub, last, has = domain_view(dom, self.local(ids), d)  # [B, Ld], [B, L], [B, L]
        run = has[:, -1] if wanted is None else has[:, -1] & wanted
        present = torch.nonzero(run).flatten()  # [R] the rows the thread runs on
        emb = self.embed_local(sub[present], d)  # [R, Ld, H]
        if masked is not None:
            cols = torch.arange(1, ids.shape[1] + 1, device=ids.device).expand_as(ids)
            src, _, _ = domain_view(dom, cols, d)  # [B, Ld] mixed column + 1 of each item of sub
            sub_masked = (src > 0) & masked.gather(1, (src - 1).clamp(min=0))  # [B, Ld]
            emb = torch.where(sub_masked[present].unsqueeze(-1), self.mask_local[d], emb)
        h_r = self.threads[d](emb, sub[present])  # [R, Ld, H]
        states = h_r.new_zeros(sub.shape[0], *h_r.shape[1:]).index_copy(0, present, h_r)  # [B, Ld, H]
        return DomainThread(states, last, has)

    def fused_state(self, threads: Threads, domain: int, rows: Tensor, cols: Tensor) -> Tensor:
        """rows, cols: [P] positions of the mixed inputs -> [P, 2H] the user side [h_mix, h_d] there, for a
        target in `domain`: h_d is the domain thread after the latest item of the domain up to that
        position; where there is none, zero (or with domain_start the domain's learned start state)."""
        thread = threads.domains[domain]
        has = thread.has[rows, cols].unsqueeze(-1)  # [P, 1]
        h_dom = thread.states[rows, thread.last[rows, cols]] * has  # [P, H]
        if self.domain_start is not None:
            h_dom = torch.where(has, h_dom, self.domain_start[domain])
        user = [threads.mixed[rows, cols], h_dom]
        if self.bias is not None:  # the item bias enters every score once
            user.append(h_dom.new_ones(len(rows), 1))
        return torch.cat(user, -1)  # [P, 2H (+ 1)]

    # -- training -------------------------------------------------------------------------------------
    def _train_forward(self, batch: Batch) -> tuple[list[Targets], Tensor]:
        """The fused user-side vector at every training position, grouped by the target's domain. Returns
        the groups and the mixed thread's states [B, L, H]."""
        targets = batch.targets  # [B, L] global ids
        tgt_dom = self.domain_of(targets)  # [B, L], -1 where no target
        wanted = torch.stack([(tgt_dom == d).any(1) for d in range(self.n_domains)])  # [n_domains, B]
        threads = self.encode(batch.inputs, range(self.n_domains), batch.main_rows, wanted, batch.cloze)
        mixed_neg = batch.mixed_negatives  # [B, L] global ids, or None (bce_negatives fused)
        groups = []
        for d in range(self.n_domains):
            rows, cols = torch.nonzero(tgt_dom == d, as_tuple=True)  # [P] positions whose target is in d
            groups.append(
                Targets(
                    domain=d,
                    users=self.fused_state(threads, d, rows, cols),  # [P, 2H]
                    targets=self.local(targets[rows, cols]),
                    negatives=self.local(batch.negatives[rows, cols]),
                    rows=rows,
                    cols=cols,
                    mixed_negatives=None if mixed_neg is None else mixed_neg[rows, cols],
                )
            )
        return groups, threads.mixed

    def train_targets(self, batch: Batch) -> list[Targets]:
        return self._train_forward(batch)[0]

    def item_rows(self, domain: int, lids: Tensor) -> Tensor:
        gids = self.global_ids(domain, lids)
        rows = [self.embed_global(gids), self.embed_local(lids, domain)]
        if self.bias is not None:
            rows.append(self.item_bias(domain, lids))
        return torch.cat(rows, -1)  # [..., 2H (+ 1)]

    def serving_rows(self, domain: int, lids: Tensor) -> Tensor:
        rows = self.item_rows(domain, lids)  # [..., 2H (+ 1)]
        if not self.prior_dims:
            return rows
        gids = self.global_ids(domain, lids)
        prior = self.prior_items(gids)  # [..., Dg]
        if self.id_embeddings:  # items without training interactions: w * c
            c = self.text_prior_new_scale
            prior = prior * (1.0 + (c - 1.0) * (1.0 - self.id_known[gids])).unsqueeze(-1)
        return torch.cat([rows, prior], -1)  # [..., 2H (+ 1) + Dg]

    def per_thread_rows(self, domain: int, mixed_gids: Tensor, lids: Tensor) -> Tensor:
        rows = [self.embed_global(mixed_gids), self.embed_local(lids, domain)]
        if self.bias is not None:  # the domain thread's negative is the target domain's item
            rows.append(self.item_bias(domain, lids))
        return torch.cat(rows, -1)  # [n, 2H (+ 1)]

    def item_bias(self, domain: int, lids: Tensor) -> Tensor:
        """[...] local ids of `domain` -> [..., 1] their learned biases; an item without training
        interactions gets the mean bias of the domain's items with them (held fixed), padding zero."""
        assert self.bias is not None
        gids = self.global_ids(domain, lids)
        start, n = int(self.offsets[domain]) + 1, self.sizes[domain]
        known = self.id_known[start : start + n]  # [n_d]
        mean = ((self.bias.weight[start : start + n, 0] * known).sum() / known.sum().clamp(min=1)).detach()
        use = self.id_known[gids].unsqueeze(-1)
        bias: Tensor = (use * self.bias(gids) + (1 - use) * mean) * (lids > 0).unsqueeze(-1)
        return bias

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        groups, h_mix = self._train_forward(batch)
        rec = objective_loss(self, groups, batch)
        total, parts = rec, {"rec": float(rec.detach())}
        main = batch.main_rows  # the auxiliary losses see each user's own prefix once
        if self.alpha > 0:
            reg = self._adapter_regularisation(batch.prefix[:main])
            if reg is not None:
                total = total + self.alpha * reg
                parts["reg"] = float(reg.detach())
        has_profile = batch.has_profile[:main] if batch.has_profile is not None else None
        if (
            self.user_adapter is not None
            and batch.profile is not None
            and has_profile is not None
            and has_profile.sum() >= 2
        ):
            # Users without a profile (capped or failed) simply have no term here.
            u = self.user_adapter(batch.profile[:main][has_profile])  # [n, H]
            user = soft_contrastive(u, h_mix[:main][has_profile, -1], self.tau)
            total = total + self.beta * user
            parts["user"] = float(user.detach())
        return total, parts

    def _adapter_regularisation(self, prefix: Tensor) -> Tensor | None:
        """L_reg: one random item of one domain and one of another, per user with both in the prefix."""
        dom = self.domain_of(prefix)  # [B, L+1]
        real = prefix > 0
        noise = torch.rand(prefix.shape, device=prefix.device)
        first = torch.where(real, noise, -1.0).argmax(1)  # [B] a random item of the prefix
        first_dom = dom.gather(1, first[:, None])  # [B, 1]
        other_ok = real & (dom != first_dom)
        second = torch.where(other_ok, torch.rand(prefix.shape, device=prefix.device), -1.0).argmax(1)
        keep = other_ok.any(1)
        if keep.sum() < 2:
            return None
        rows = torch.nonzero(keep).flatten()
        x, y = embed_many(self.embed_global, prefix[rows, first[rows]], prefix[rows, second[rows]])  # [n, H]
        return soft_contrastive(x, y, self.tau)

    # -- inference: one vector per user and per item, score = dot product ------------------------------
    def user_vectors_all(self, inputs: Tensor, domains: Sequence[int] | None = None) -> list[Tensor]:
        """The state after the last item, [B, 2H] per domain asked for; the mixed thread runs once."""
        inputs = trim(inputs)  # [B, L]
        domains = range(self.n_domains) if domains is None else domains
        threads = self.encode(inputs, domains, append_mask=self.config.task == "cloze")
        rows = torch.arange(inputs.shape[0], device=inputs.device)  # [B]
        cols = torch.full_like(rows, threads.mixed.shape[1] - 1)  # [B] the last column
        users = [self.fused_state(threads, d, rows, cols) for d in domains]
        if self.prior_dims:
            prior = self.text_prior_weight * self.prior_users(inputs)  # [B, Dg]
            users = [torch.cat([u, prior], -1) for u in users]
        return users

    # -- the text prior: w * cos(history text, item text) added to every score at inference -----------
    def prior_items(self, gids: Tensor) -> Tensor:
        """[...] global ids -> [..., Dg] the items' unit-norm LLM embeddings (zero for the padding)."""
        return F.normalize(self.E_all[gids], dim=-1)

    def prior_users(self, inputs: Tensor) -> Tensor:
        """inputs: [B, L] left-padded global ids -> [B, Dg] the unit-norm, recency-weighted sum of the
        history's unit-norm LLM embeddings, sum_k decay^k e(item k places before the latest) with decay =
        `text_prior_decay` (1: the plain sum, the user of the text-only bound, bench/coldstart_text.py),
        so that prior . item is the cosine of the item's text with the history's."""
        decay = self.config.text_prior_decay
        items = self.prior_items(inputs)  # [B, L, Dg], zero rows for the padding
        if decay != 1.0:  # the latest item (last column) weighs 1; padding adds nothing at any weight
            L = inputs.shape[1]
            weights = decay ** torch.arange(L - 1, -1, -1, device=inputs.device, dtype=items.dtype)  # [L]
            items = items * weights[:, None]
        return F.normalize(items.sum(1), dim=-1)

    def set_text_prior(self, weight: float, new_items: float | None = None) -> None:
        self.text_prior_weight.fill_(weight)
        if new_items is not None:
            self.text_prior_new_scale.fill_(new_items)

    def prior_new_items(self, domain: int) -> Tensor | None:
        if not (self.prior_dims and self.id_embeddings):
            return None
        start = int(self.offsets[domain])
        new = self.id_known[start : start + self.sizes[domain] + 1] == 0  # [n_d + 1], from local id 0
        new[0] = False  # the padding row
        return new
