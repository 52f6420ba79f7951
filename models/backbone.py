"""The SASRec-style Transformer every thread uses, and the sequence helpers the models share.

Sequences are *left*-padded with id 0, so the most recent item is always in the last column and a
batch can be trimmed to its longest row by keeping the last columns. Positions count back from the
end: the most recent item has position `max_len`, the one before `max_len - 1`, and so on, whatever
the batch's trimmed width, so a trimmed batch computes exactly what the untrimmed one would.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bridgerec.models.config import BlockLayout, ModelConfig, Positions, WeightInit


class Dropout(nn.Module):
    """Inverted dropout drawn with torch.rand: about 2x faster on CPU than nn.Dropout's bernoulli_."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        return x * (torch.rand_like(x) >= self.p) * (1.0 / (1.0 - self.p))


def embed_many(embed: Callable[[Tensor], Tensor], *ids: Tensor) -> list[Tensor]:
    """Embed several id tensors with one call (one table lookup and one sparse gradient per batch)."""
    flat = torch.cat([i.reshape(-1) for i in ids])
    out = embed(flat).split([i.numel() for i in ids])
    return [o.view(*i.shape, -1) for o, i in zip(out, ids, strict=True)]


class Block(nn.Module):
    """Self-attention + point-wise feed-forward, both with residuals, in one of two layouts:

    - `pre_ln` (the default): x + Attn(LN1 x), then x + FFN(LN2 x); keys are the real items only.
    - `sasrec`: the layout of SASRec.pytorch, which the LLM4CDSR authors' code uses: q = LN1 x, keys and
      values from the raw x, x = q + Attn(q, x, x), x = LN2 x, then x + FFN(x). Their sequences are
      padded to max_len and the padding is not masked, so every query also attends to identical
      padding keys (key = the key bias, value = the value bias). One extra "null" key whose logit gets
      + log(max_len - n) computes that without the padding's cost, n = the real items up to the query:
      the padding a copy of the inputs ending at the query has, i.e. what inference sees. (Their code
      counts the whole sequence's padding, which tells a training position how many items follow it;
      at the last position, what inference uses, the two are the same.)
    """

    def __init__(self, hidden: int, heads: int, dropout: float, layout: BlockLayout = "pre_ln") -> None:
        super().__init__()
        assert hidden % heads == 0, f"hidden {hidden} must be divisible by heads {heads}"
        self.heads, self.dropout, self.layout = heads, dropout, layout
        self.ln1 = nn.LayerNorm(hidden, eps=1e-8)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.ln2 = nn.LayerNorm(hidden, eps=1e-8)
        self.ffn = nn.Sequential(
            nn.Linear(hidden, hidden), nn.ReLU(), Dropout(dropout), nn.Linear(hidden, hidden)
        )
        self.drop = Dropout(dropout)

    def _heads(self, t: Tensor) -> Tensor:
        B, L, H = t.shape
        return t.view(B, L, self.heads, H // self.heads).transpose(1, 2)  # [B, heads, L, H/heads]

    @staticmethod
    def attention_bias(allowed: Tensor, null_logit: Tensor, dtype: torch.dtype) -> Tensor:
        """The `sasrec` layout's additive attention mask, built once per sequence for every block.
        allowed: [B, 1, L, L] bool; null_logit: [B, 1, L, 1] the padding keys' extra logit (-inf: none)
        -> [B, 1, L, L + 1] (0 allowed, -inf not; the last column is the null key's)."""
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, -torch.inf
        )
        return torch.cat([mask, null_logit.to(dtype)], -1)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x: [B, L, H]; mask: layout `pre_ln`: [B, 1, L, L] bool, True where query i may attend to key j;
        layout `sasrec`: [B, 1, L, L + 1] `attention_bias` (the last key is the padding's null key)."""
        B, L, H = x.shape
        p = self.dropout if self.training else 0.0
        if self.layout == "pre_ln":
            q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.heads, H // self.heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # [B, heads, L, H/h]
            x = x + self.drop(self.proj(a.transpose(1, 2).reshape(B, L, H)))
            out: Tensor = x + self.drop(self.ffn(self.ln2(x)))
            return out
        w, b = self.qkv.weight.split(H), self.qkv.bias.split(H)
        q_in = self.ln1(x)
        q = self._heads(F.linear(q_in, w[0], b[0]))
        k = self._heads(F.linear(x, w[1], b[1]))
        v = self._heads(F.linear(x, w[2], b[2]))
        null_k = b[1].view(1, self.heads, 1, H // self.heads).expand(B, -1, 1, -1)  # key of a zero input
        null_v = b[2].view(1, self.heads, 1, H // self.heads).expand(B, -1, 1, -1)
        a = F.scaled_dot_product_attention(
            q, torch.cat([k, null_k], 2), torch.cat([v, null_v], 2), attn_mask=mask, dropout_p=p
        )
        x = self.ln2(q_in + self.drop(self.proj(a.transpose(1, 2).reshape(B, L, H))))
        y: Tensor = x + self.drop(self.ffn(x))
        return y


class SequenceEncoder(nn.Module):
    """Item embeddings in, one hidden state per position out (SASRec: positions, blocks, final LN)."""

    def __init__(
        self,
        hidden: int,
        layers: int,
        heads: int,
        dropout: float,
        max_len: int,
        causal: bool,
        layout: BlockLayout = "pre_ln",
        input_scale: float = 1.0,
        positions: Positions = "from_end",
        weight_init: WeightInit = "torch",
    ):
        """causal: a position attends only to itself and earlier positions (required whenever a loss
        sits at every position: otherwise position t sees the input at t + 1, which is its own target).
        layout: see `Block`; input_scale multiplies the item embeddings before the positions are added
        (SASRec.pytorch and the authors' code: sqrt of the embedding width). positions: `from_end` gives
        the latest item position max_len (SASRec.pytorch), `from_start` the first item position 1 (the
        LLM4CDSR authors' code). weight_init `xavier`: Xavier-normal weights and position table, zero
        attention biases (the authors' code); `torch`: torch's defaults, positions N(0, 0.02)."""
        super().__init__()
        self.max_len, self.causal, self.layout, self.input_scale = max_len, causal, layout, input_scale
        self.positions = positions
        self.pos = nn.Embedding(max_len + 1, hidden, padding_idx=0)
        nn.init.normal_(self.pos.weight, std=0.02)
        self.drop = Dropout(dropout)
        self.blocks = nn.ModuleList(Block(hidden, heads, dropout, layout) for _ in range(layers))
        self.ln = nn.LayerNorm(hidden, eps=1e-8)
        if weight_init == "xavier":
            for block in self.blocks:
                assert isinstance(block, Block)
                for layer in (block.qkv, block.proj, block.ffn[0], block.ffn[3]):
                    assert isinstance(layer, nn.Linear)
                    nn.init.xavier_normal_(layer.weight)
                nn.init.zeros_(block.qkv.bias)
                nn.init.zeros_(block.proj.bias)
            nn.init.xavier_normal_(self.pos.weight)
        with torch.no_grad():
            self.pos.weight[0].zero_()

    @classmethod
    def of(cls, config: ModelConfig, input_width: int | None = None) -> SequenceEncoder:
        """The encoder of `config`; with layout `sasrec` the inputs are scaled by sqrt(input_width) (the
        width of the table the items come from; default hidden)."""
        scale = math.sqrt(input_width or config.hidden) if config.block == "sasrec" else 1.0
        return cls(
            config.hidden, config.layers, config.heads, config.dropout, config.max_len, not config.bidirectional,
            config.block, scale, config.positions, config.weight_init,
        )  # fmt: skip

    def forward(self, emb: Tensor, ids: Tensor) -> Tensor:
        # emb: [B, L, H] item embeddings; ids: [B, L] item ids (0 = padding, left-padded)
        L = ids.shape[1]
        keep = ids > 0  # [B, L]
        if self.positions == "from_start":
            positions = keep.cumsum(1).clamp(max=self.max_len) * keep  # [B, L] 1 = the first real item
        else:  # the latest column (the latest item of every row: left-padded) is position max_len
            positions = torch.arange(self.max_len - L + 1, self.max_len + 1, device=ids.device) * keep
        x = self.drop((emb * self.input_scale + self.pos(positions)) * keep.unsqueeze(-1))
        # A query may attend to real keys (and to itself, so an all-padding row has no empty softmax).
        allowed = keep[:, None, :] | torch.eye(L, dtype=torch.bool, device=ids.device)  # [B, L, L]
        if self.causal:
            allowed = allowed & torch.ones(L, L, dtype=torch.bool, device=ids.device).tril()
        mask = allowed.unsqueeze(1)  # [B, 1, L, L]
        if self.layout == "sasrec":
            # Padding keys a max_len-padded copy of the inputs up to each query would have.
            pads = (self.max_len - keep.cumsum(1)).clamp(min=0).to(emb.dtype)  # [B, L]
            null_logit = torch.where(pads > 0, pads.log(), -torch.inf)[:, None, :, None]  # [B, 1, L, 1]
            mask = Block.attention_bias(mask, null_logit, x.dtype)  # [B, 1, L, L + 1]
        for block in self.blocks:
            x = block(x, mask) * keep.unsqueeze(-1)
        out: Tensor = self.ln(x) * keep.unsqueeze(-1)  # [B, L, H], zero at padding
        return out


def trim(ids: Tensor) -> Tensor:
    """Drop the leading columns that are padding in every row (left-padded ids [B, L])."""
    used = int((ids > 0).sum(1).max().item()) if ids.numel() else 0
    return ids[:, ids.shape[1] - max(used, 1) :]


def encode_rows(encode: Callable[..., Tensor], ids: Tensor, split: int, *aligned: Tensor) -> Tensor:
    """`encode(ids, *aligned)` [B, L, H] for a batch whose rows from `split` on are read at their last
    column only (hidden-domain examples): those rows run as a batch of their own, trimmed to their own
    longest row (they lack a whole domain, so they are shorter), and come back left-padded with zero
    states. The last column is what the full batch computes, since a trimmed batch computes what a padded
    one does. `aligned`: tensors [B, L, ...] cut the same way as `ids` (e.g. the cloze mask)."""
    if split >= ids.shape[0]:
        return encode(ids, *aligned)
    rest_ids = trim(ids[split:])  # [A, l]
    width = rest_ids.shape[1]
    rest = encode(rest_ids, *(a[split:, ids.shape[1] - width :] for a in aligned))  # [A, l, H]
    rest = F.pad(rest, (0, 0, ids.shape[1] - rest.shape[1], 0))  # [A, L, H]
    return torch.cat([encode(ids[:split], *(a[:split] for a in aligned)), rest])


def domain_view(domains: Tensor, ids: Tensor, domain: int) -> tuple[Tensor, Tensor, Tensor]:
    """The subsequence of one domain, left-padded, and where each position's latest such item sits.

    domains, ids: [B, L] (domain index and any id of each item; id 0 = padding). Returns
      sub: [B, Ld] the ids of the domain's items, in order, left-padded,
      last: [B, L] for each mixed position t, the column of `sub` holding the latest domain item at or
            before t (clamped to 0 where there is none),
      has: [B, L] bool, whether such an item exists.
    """
    mask = (domains == domain) & (ids > 0)  # [B, L]
    count = mask.cumsum(1)  # [B, L] domain items up to and including t
    total = count[:, -1:]  # [B, 1]
    Ld = max(int(total.max().item()), 1)
    dest = Ld - total + count - 1  # [B, L] column in sub of the item at t (if it is a domain item)
    sub = torch.zeros(ids.shape[0], Ld, dtype=ids.dtype, device=ids.device)
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)
    sub[rows[mask], dest[mask]] = ids[mask]
    has = count > 0
    return sub, dest.clamp(min=0) * has, has
