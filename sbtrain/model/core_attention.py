"""Softmax core attention for Megatron's SelfAttention: full causal or sliding window.

Replaces Megatron's local ``DotProductAttention`` (which materialises the S x S scores and
knows no sliding window or document mask) with ``ops.attention.attention``: SDPA flash or
``flex_attention`` on GPUs, an explicit masked softmax on the CPU; sinks and sequence
parallelism are arguments of the op. This module keeps the Megatron adapter: the layout and
the query neuron.

The micro-batch's documents and SP slice metadata arrive in ``packed_seq_params`` as a
``sbtrain.model.batch.BatchContext`` (segment ids in ``attention_mask`` still work for direct
model calls); attention never crosses a segment boundary.
"""

from __future__ import annotations

import math

import torch
from megatron.core.transformer.module import MegatronModule

from ops.attention import attention
from ops.comm import SPContext
from ops.documents import Documents
from parallel.sequence import sp_context, with_exchange
from sbtrain.model.batch import context_of


class SoftmaxCoreAttention(MegatronModule):
    """Causal softmax attention over [s, b, heads, d] tensors, GQA-aware.

    Args:
        query_neuron: optional spiking neuron applied to the queries (sliding-window layers).
        window: keys each query sees before itself (4096 = itself + 4096 previous tokens,
            flash-attn's ``window_size=(4096, 0)``); None means full causal attention.
        softmax_exchange: this layer's exchange under sp > 1 (tails, halo, ulysses), chosen
            for its kind (``sbtrain.profiler.comm.softmax_exchanges``).
        The other arguments are Megatron's core-attention builder protocol; only the config's
        head counts, the tensor-parallel size and ``softmax_scale`` are used.
    """

    def __init__(self, config, layer_number: int, attn_mask_type=None, attention_type: str = "self",
                 cp_comm_type: str | None = None, softmax_scale: float | None = None,
                 pg_collection=None, window: int | None = None, query_neuron=None,
                 sink_tokens: int = 0, softmax_exchange: str = "tails") -> None:
        super().__init__(config=config)
        tp = pg_collection.tp.size() if pg_collection is not None else 1
        self.heads_per_partition = config.num_attention_heads // tp
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(self.head_dim)
        self.window = window
        # Spiking (W8ASpike): sliding-window layers spike their queries, per token and head.
        self.query_neuron = query_neuron
        self.sink_tokens = sink_tokens
        self.sp = sp_context(pg_collection, softmax_exchange)
        self.softmax_exchange = softmax_exchange
        self.layer_number = layer_number

    def neuron_sites(self) -> dict[str, torch.nn.Module | None]:
        """Where this module calls the neuron itself (``sbtrain.spiking.layers.neuron_sites``):
        the queries, when spiking a sliding window; they feed no projection."""
        return {} if self.query_neuron is None else {"query": None}

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None) -> torch.Tensor:
        if attention_bias is not None:
            raise NotImplementedError("SoftmaxCoreAttention takes no attention_bias")
        documents, sp = context_of(attention_mask, packed_seq_params, self.sp)
        seq, batch = query.shape[:2]
        if self.query_neuron is not None:
            query = self.query_neuron(query)
        out = causal_attention(query, key, value, self.window, documents, self.softmax_scale,
                               self.sink_tokens, with_exchange(sp, self.softmax_exchange))
        return out.reshape(seq, batch, -1)


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     window: int | None, documents: Documents | torch.Tensor | None, scale: float,
                     sink_tokens: int = 0, sp: SPContext | None = None) -> torch.Tensor:
    """[s, b, heads, d] q/k/v (GQA) -> [s, b, heads, d] through ``ops.attention.attention``:
    the first ``sink_tokens`` positions are sink tokens, the window and ``documents``
    ([b, s - sink_tokens] segment ids) cover the rest; ``sp``: the regular positions are this
    rank's slice."""
    # [s, b, h, d] -> [b, h, s, d], the op's layout (SDPA's and flex_attention's).
    q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
    out = attention(q, k, v, window=window, documents=documents, sinks=sink_tokens, sp=sp, scale=scale)
    return out.permute(2, 0, 1, 3)
