"""LLM4CDSR: a mixed thread over adapted global LLM embeddings, one thread per domain over local LLM
embeddings, their scores fused; the adapter regularised contrastively (alpha) and the mixed thread
guided by LLM user profiles (beta).

Per target t (an item of domain d, predicted from the items before it):

    s(t, i) = <h_mix[t-1], adapter(E_all[i]) (+ id_all[i])> + <h_d[last d item before t], E_d[i] (+ id_d[i])>

trained with BCE against one negative from domain d, plus alpha * L_reg + beta * L_user. Every thread
is scored on the same items. `id_embeddings` adds trainable ID embeddings to the LLM embeddings in every
thread (our hybrid); with it off this is the paper's model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from bridgerec.models.backbone import SequenceEncoder, domain_view, embed_many, gather_positions, trim
from bridgerec.models.base import GLOBAL_IDS, Batch, Recommender, next_item_bce
from bridgerec.models.data import Catalog
from torch import Tensor, nn


def soft_contrastive(x: Tensor, y: Tensor, tau: float) -> Tensor:
    """CLIP-style loss with soft targets (the paper's L_reg / L_user). x, y: [n, H] paired rows.

    logits = x y^T / tau; targets = softmax(tau * (x x^T + y y^T) / 2) row-wise; both directions.
    """
    logits = x @ y.T / tau  # [n, n]
    targets = F.softmax(tau * (x @ x.T + y @ y.T) / 2, dim=-1).detach()  # symmetric
    row = -(targets * F.log_softmax(logits, dim=-1)).sum(-1)
    col = -(targets * F.log_softmax(logits.T, dim=-1)).sum(-1)
    return (row.mean() + col.mean()) / 2


class LLM4CDSR(Recommender):
    name = "llm4cdsr"

    def __init__(
        self,
        catalog: Catalog,
        global_table: Tensor,  # [N + 1, Dg] frozen LLM embeddings by global id (row 0 = zeros)
        local_tables: list[Tensor],  # per domain [n_d + 1, Dl] frozen LLM embeddings by local id
        profile_dim: int,  # Dp of the profile vectors (0 = no profile guidance)
        hidden: int,
        layers: int,
        heads: int,
        dropout: float,
        max_len: int,
        causal: bool,
        id_embeddings: bool = False,
        alpha: float = 0.1,
        beta: float = 0.1,
        tau: float = 1.0,
        **_: object,
    ) -> None:
        super().__init__(catalog)
        self.alpha, self.beta, self.tau, self.id_embeddings = alpha, beta, tau, id_embeddings
        self.register_buffer("E_all", global_table.float())
        for d, table in enumerate(local_tables):
            self.register_buffer(f"E_local_{d}", table.float())
        Dg, Dl = global_table.shape[1], local_tables[0].shape[1]
        # The paper's adapter: two linear maps, D -> D/2 -> hidden.
        self.adapter = nn.Sequential(nn.Linear(Dg, Dg // 2), nn.Linear(Dg // 2, hidden))
        # Local tables enter the domain threads frozen; a linear map only if their width differs.
        self.local_proj = nn.Identity() if Dl == hidden else nn.Linear(Dl, hidden, bias=False)
        self.mixed = SequenceEncoder(hidden, layers, heads, dropout, max_len, causal)
        self.threads = nn.ModuleList(
            SequenceEncoder(hidden, layers, heads, dropout, max_len, causal) for _ in self.sizes
        )
        if id_embeddings:
            self.id_all = nn.Embedding(catalog.n_items + 1, hidden, padding_idx=0, sparse=True)
            self.id_local = nn.ModuleList(
                nn.Embedding(n + 1, hidden, padding_idx=0, sparse=True) for n in self.sizes
            )
            for e in [self.id_all, *self.id_local]:
                nn.init.normal_(e.weight, std=0.02)
                e.weight.data[0].zero_()
        self.user_adapter = (
            nn.Sequential(nn.Linear(profile_dim, profile_dim // 2), nn.Linear(profile_dim // 2, hidden))
            if profile_dim and beta > 0
            else None
        )

    def item_tables(self) -> dict[str, int]:
        domains = range(self.n_domains)
        tables = {"E_all": GLOBAL_IDS} | {f"E_local_{d}": d for d in domains}
        if self.id_embeddings:
            tables |= {"id_all.weight": GLOBAL_IDS} | {f"id_local.{d}.weight": d for d in domains}
        return tables

    def frozen_tables(self) -> set[str]:
        return {"E_all", *(f"E_local_{d}" for d in range(self.n_domains))}

    # -- item embeddings of each thread ---------------------------------------------------------------
    def embed_global(self, gids: Tensor) -> Tensor:
        """[...] global ids -> [..., H]; the adapter runs once per distinct id of the batch."""
        uniq, inverse = torch.unique(gids, return_inverse=True)
        table = self.adapter(self.E_all[uniq])  # [n_unique, H]
        if self.id_embeddings:
            table = table + self.id_all(uniq)
        return (table * (uniq > 0).unsqueeze(-1))[inverse]

    def embed_local(self, lids: Tensor, domain: int) -> Tensor:
        """[...] local ids of `domain` -> [..., H] (zero for id 0)."""
        e = self.local_proj(getattr(self, f"E_local_{domain}")[lids])
        if self.id_embeddings:
            e = e + self.id_local[domain](lids)
        return e

    # -- training -------------------------------------------------------------------------------------
    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        inputs, targets, negatives = batch.inputs, batch.targets, batch.negatives  # [B, L] global ids
        in_dom, in_loc = self.domain_of(inputs), self.local(inputs)
        tgt_dom = self.domain_of(targets)  # [B, L], -1 where no target

        # Mixed thread over adapted global embeddings (one adapter pass for all ids of the batch).
        x, e_pos, e_neg = embed_many(self.embed_global, inputs, targets, negatives)  # [B, L, H] each
        h_mix = self.mixed(x, inputs)  # [B, L, H]
        pos = (h_mix * e_pos).sum(-1)  # [B, L]
        neg = (h_mix * e_neg).sum(-1)  # [B, L]

        # Domain threads: run each over its subsequence, then add, at every position whose target is in
        # that domain, the score of its state after the latest item of that domain (none: no term).
        for d, thread in enumerate(self.threads):
            sub, last, has = domain_view(in_dom, in_loc, d)  # [B, Ld], [B, L], [B, L]
            rows = torch.nonzero(has[:, -1]).flatten()  # [R] users with an item of d (the rest: no term)
            sub, last, here = sub[rows], last[rows], (tgt_dom[rows] == d) & has[rows]  # [R, Ld], [R, L]
            x_d, e_pos, e_neg = embed_many(
                lambda ids, d=d: self.embed_local(ids, d),
                sub,
                self.local(targets[rows]) * here,
                self.local(negatives[rows]) * here,
            )
            h_d = gather_positions(thread(x_d, sub), last)  # [R, L, H]
            pos = pos.index_add(0, rows, (h_d * e_pos).sum(-1) * here)
            neg = neg.index_add(0, rows, (h_d * e_neg).sum(-1) * here)
        rec = next_item_bce(pos, neg, targets > 0)
        total, parts = rec, {"rec": float(rec.detach())}

        if self.alpha > 0:
            reg = self._adapter_regularisation(batch.prefix)
            if reg is not None:
                total = total + self.alpha * reg
                parts["reg"] = float(reg.detach())
        if self.user_adapter is not None and batch.has_profile is not None and batch.has_profile.sum() >= 2:
            # Users without a profile (capped or failed) simply have no term here.
            keep = batch.has_profile
            u = self.user_adapter(batch.profile[keep])  # [n, H]
            user = soft_contrastive(u, h_mix[keep, -1], self.tau)
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
    def user_vectors(self, inputs: Tensor, domain: int) -> Tensor:
        inputs = trim(inputs)  # [B, L]
        h_mix = self.mixed(self.embed_global(inputs), inputs)[:, -1]  # [B, H]
        sub, _, _ = domain_view(self.domain_of(inputs), self.local(inputs), domain)  # [B, Ld]
        h_dom = self.threads[domain](self.embed_local(sub, domain), sub)[:, -1]  # [B, H] (0 if no item)
        return torch.cat([h_mix, h_dom], dim=-1)  # [B, 2H]

    def user_vectors_all(self, inputs: Tensor) -> list[Tensor]:
        """The mixed thread once for every domain (it is the longest sequence: most of the export)."""
        inputs = trim(inputs)  # [B, L]
        h_mix = self.mixed(self.embed_global(inputs), inputs)[:, -1]  # [B, H]
        dom, loc = self.domain_of(inputs), self.local(inputs)
        out = []
        for d, thread in enumerate(self.threads):
            sub, _, _ = domain_view(dom, loc, d)  # [B, Ld]
            h_dom = thread(self.embed_local(sub, d), sub)[:, -1]  # [B, H]
            out.append(torch.cat([h_mix, h_dom], dim=-1))  # [B, 2H]
        return out

    def item_vectors(self, domain: int) -> Tensor:
        local = torch.arange(self.sizes[domain] + 1, device=self.E_all.device)  # [n_d + 1]
        gids = (local + self.offsets[domain]) * (local > 0)
        return torch.cat([self.embed_global(gids), self.embed_local(local, domain)], dim=-1)  # [n_d+1, 2H]

    def score(self, inputs: Tensor, domain: int, candidates: Tensor) -> Tensor:
        """The fused score, thread by thread: <h_mix, adapted global> + <h_domain, local>."""
        inputs = trim(inputs)
        h_mix = self.mixed(self.embed_global(inputs), inputs)[:, -1]  # [B, H]
        sub, _, _ = domain_view(self.domain_of(inputs), self.local(inputs), domain)
        h_dom = self.threads[domain](self.embed_local(sub, domain), sub)[:, -1]  # [B, H]
        gids = (candidates + self.offsets[domain]) * (candidates > 0)  # [B, C]
        mixed = (self.embed_global(gids) * h_mix.unsqueeze(1)).sum(-1)  # [B, C]
        local = (self.embed_local(candidates, domain) * h_dom.unsqueeze(1)).sum(-1)  # [B, C]
        return mixed + local
