"""MPNet as a vLLM pooling model, so `enrich.model` can be all-mpnet-base-v2 (or any MPNet embedder).

vLLM 0.32 ships no MPNet (Song et al., "MPNet: Masked and Permuted Pre-training for Language
Understanding", NeurIPS 2020). Its encoder is BERT's (post-LayerNorm blocks, GELU MLP, learned absolute
positions offset by the padding index) plus one thing vLLM's attention kernels cannot take: a relative
position bias, T5's (Raffel et al., JMLR 2020, section 2.1): every query-key offset falls in one of 32
log-spaced buckets (16 per direction, exact below 8, logarithmic up to 128), each bucket has one learned
scalar per head, and that scalar is added to every layer's attention scores. So the attention here is
torch's scaled-dot-product attention over the step's sequences padded to the longest, with the bias and
the padding as its additive mask; everything else runs on vLLM's layers (its linear layers, hence its
tensor parallelism and its W8A8 kernels) and pooler (mean pooling from the folder's sentence-transformers
config, then normalisation).

`register()` adds the architecture to vLLM's registry; vLLM calls it in every process it starts (the
`vllm.general_plugins` entry point in pyproject.toml), and `start_engine` calls it before an engine starts.
The vectors match sentence-transformers' for the same folder (tests/test_enrich_units.py compares them on a
small random MPNet against transformers' own implementation).

Shapes: T tokens in an engine step (every sequence whole: a bidirectional pooling model is never
chunked, so a sequence starts where its position is 0), B sequences, L the longest, H hidden, N heads
(on this rank), D = H / N.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURES = ("MPNetForMaskedLM", "MPNetModel")
PADDING_IDX = 1  # MPNet's <pad>; positions count from PADDING_IDX + 1, as in RoBERTa


def relative_buckets(offset: torch.Tensor, num_buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    """T5's bidirectional bucket of each key - query `offset` (any shape, int64 -> int64 in
    [0, num_buckets)): the upper half of the buckets for keys after the query, the lower half for keys
    at or before it; within a half, exact offsets below a quarter of `num_buckets`, then log-spaced up to
    `max_distance`, beyond which every offset shares the half's last bucket."""
    half = num_buckets // 2
    exact = half // 2
    bucket = (offset > 0).long() * half
    distance = offset.abs()
    far = (
        exact
        + (
            torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact) * (half - exact)
        ).long()
    )
    return bucket + torch.where(distance < exact, distance, far.clamp(max=half - 1))


def sequence_layout(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Each token's sequence index [T] and the sequences' lengths [B], from the step's `positions` [T]
    (a sequence starts at position 0); and L, the longest."""
    seq = torch.cumsum(positions == 0, 0) - 1
    lengths = torch.bincount(seq)
    return seq, lengths, int(lengths.max()) if lengths.numel() else 0


class MPNetLayer(nn.Module):
    """One post-LayerNorm encoder block: x = LN(x + attn(x)); x = LN(x + MLP(x))."""

    def __init__(self, config: Any, quant_config: Any, prefix: str) -> None:
        super().__init__()
        from vllm.distributed import get_tensor_model_parallel_world_size
        from vllm.model_executor.layers.activation import get_act_fn
        from vllm.model_executor.layers.linear import (
            ColumnParallelLinear,
            QKVParallelLinear,
            RowParallelLinear,
        )

        hidden, heads = config.hidden_size, config.num_attention_heads
        self.n_head = heads // get_tensor_model_parallel_world_size()
        self.head_dim = hidden // heads
        self.qkv = QKVParallelLinear(
            hidden, self.head_dim, heads, bias=True, quant_config=quant_config, prefix=f"{prefix}.qkv"
        )
        self.o = RowParallelLinear(hidden, hidden, bias=True, quant_config=quant_config, prefix=f"{prefix}.o")
        self.ln_attn = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.up = ColumnParallelLinear(
            hidden, config.intermediate_size, bias=True, quant_config=quant_config, prefix=f"{prefix}.up"
        )
        self.act = get_act_fn(config.hidden_act)
        self.down = RowParallelLinear(
            config.intermediate_size, hidden, bias=True, quant_config=quant_config, prefix=f"{prefix}.down"
        )
        self.ln_out = nn.LayerNorm(hidden, eps=config.layer_norm_eps)

    def forward(
        self, x: torch.Tensor, slots: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor
    ) -> torch.Tensor:
        """x [T, H]; `slots` each token's (sequence, position); mask [B, N, L, L] additive."""
        qkv, _ = self.qkv(x)  # [T, 3 * N * D]
        b, n, longest = mask.shape[0], self.n_head, mask.shape[-1]
        padded = qkv.new_zeros(b, longest, 3, n, self.head_dim)
        padded[slots] = qkv.view(-1, 3, n, self.head_dim)
        q, k, v = padded.permute(2, 0, 3, 1, 4)  # each [B, N, L, D]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # softmax(q k^T / sqrt(D) + mask) v
        attended, _ = self.o(y.transpose(1, 2)[slots].reshape(x.shape[0], n * self.head_dim))
        x = self.ln_attn(x + attended)
        hidden, _ = self.up(x)
        out, _ = self.down(self.act(hidden))
        return self.ln_out(x + out)


class MPNetEmbeddingModel(nn.Module):
    """MPNet's encoder for vLLM's pooling runner: token ids [T] and positions [T] -> hidden states [T, H];
    vLLM's pooler turns them into one vector per sequence."""

    is_pooling_model = True
    attn_type = "encoder_only"  # bidirectional: vLLM neither chunks nor prefix-caches its sequences
    default_seq_pooling_type = "MEAN"  # all-mpnet-base-v2's; a folder's sentence-transformers config wins
    default_tok_pooling_type = "ALL"

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__()
        from vllm.model_executor.layers.pooler import DispatchPooler
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

        config = vllm_config.model_config.hf_config
        self.config = config
        self.word_embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = VocabParallelEmbedding(config.max_position_embeddings, config.hidden_size)
        self.ln_embed = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.relative_attention_bias = nn.Embedding(
            config.relative_attention_num_buckets, config.num_attention_heads
        )
        self.layers = nn.ModuleList(
            MPNetLayer(config, vllm_config.quant_config, f"{prefix}layers.{i}")
            for i in range(config.num_hidden_layers)
        )
        self.pooler = DispatchPooler.for_embedding(vllm_config.model_config.pooler_config)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)

    def _mask(self, lengths: torch.Tensor, longest: int, dtype: torch.dtype) -> torch.Tensor:
        """[B, N, L, L]: the relative position bias of this rank's heads, -inf on padded keys."""
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        pos = torch.arange(longest, device=lengths.device)
        buckets = relative_buckets(pos[None, :] - pos[:, None], self.config.relative_attention_num_buckets)
        bias = self.relative_attention_bias(buckets).permute(2, 0, 1)  # [N_total, L, L]
        n = bias.shape[0] // get_tensor_model_parallel_world_size()
        bias = bias[get_tensor_model_parallel_rank() * n :][:n].to(dtype)
        padded = pos[None, :] >= lengths[:, None]  # [B, L] keys past a sequence's end
        return bias[None].masked_fill(padded[:, None, None, :], float("-inf"))

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        intermediate_tensors: Any = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = inputs_embeds if inputs_embeds is not None else self.word_embeddings(input_ids)
        x = self.ln_embed(x + self.position_embeddings(positions + PADDING_IDX + 1))
        seq, lengths, longest = sequence_layout(positions)
        if longest == 0:
            return x
        slots = (seq, positions)
        mask = self._mask(lengths, longest, x.dtype)
        for layer in self.layers:
            x = layer(x, slots, mask)
        return x

    # The checkpoint's names (MPNetModel's, with or without MPNetForMaskedLM's "mpnet." prefix) -> ours:
    # prefixes first, then the parts inside a layer's names.
    _PREFIXES = (
        ("embeddings.LayerNorm.", "ln_embed."),
        ("embeddings.", ""),
        ("encoder.relative_attention_bias.", "relative_attention_bias."),
        ("encoder.layer.", "layers."),
    )
    _INFIXES = (
        (".attention.attn.o.", ".o."),
        (".attention.LayerNorm.", ".ln_attn."),
        (".intermediate.dense.", ".up."),
        (".output.dense.", ".down."),
        (".output.LayerNorm.", ".ln_out."),
    )
    _QKV: ClassVar[dict[str, str]] = {
        ".attention.attn.q.": "q",
        ".attention.attn.k.": "k",
        ".attention.attn.v.": "v",
    }

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load a Hugging Face MPNet checkpoint; the masked-LM head and the tanh pooler are not used."""
        from vllm.model_executor.model_loader.weight_utils import default_weight_loader

        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("mpnet.")
            if name.startswith(("lm_head.", "pooler.")) or name.endswith("position_ids"):
                continue
            shard = next((s for old, s in self._QKV.items() if old in name), None)
            prefix = next((p for p in self._PREFIXES if name.startswith(p[0])), ("", ""))
            name = prefix[1] + name.removeprefix(prefix[0])
            for old, new in self._INFIXES:
                name = name.replace(old, new)
            if shard is not None:
                old = next(o for o in self._QKV if o in name)
                name = name.replace(old, ".qkv.")
                params[name].weight_loader(params[name], tensor, shard)  # type: ignore[attr-defined]
            else:
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(name)
        return loaded


def register() -> None:
    """Make vLLM's registry run MPNet checkpoints with `MPNetEmbeddingModel` (idempotent)."""
    from vllm import ModelRegistry

    for arch in ARCHITECTURES:
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, MPNetEmbeddingModel)
