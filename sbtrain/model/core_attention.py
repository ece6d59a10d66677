"""Softmax core attention for Megatron's SelfAttention: full causal or sliding window.

Replaces Megatron's local ``DotProductAttention`` (which materialises the S x S scores and
knows no sliding window or document mask) with ``ops.attention.softmax_attention``: SDPA
flash or ``flex_attention`` on GPUs, an explicit masked softmax on the CPU.

``attention_mask`` carries sbtrain's per-token segment ids ([b, s] integers, see
``ops.documents``) or None; attention never crosses a segment boundary.
"""

from __future__ import annotations

import math

import torch
from megatron.core.transformer.module import MegatronModule

from parallel.sequence import sequence_parallel_group


class SoftmaxCoreAttention(MegatronModule):
    """Causal softmax attention over [s, b, heads, d] tensors, GQA-aware.

    Args:
        query_neuron: optional spiking neuron applied to the queries (sliding-window layers).
        window: keys each query sees before itself (4096 = itself + 4096 previous tokens,
            flash-attn's ``window_size=(4096, 0)``); None means full causal attention.
        The other arguments are Megatron's core-attention builder protocol; only the config's
        head counts, the tensor-parallel size and ``softmax_scale`` are used.
    """

    def __init__(self, config, layer_number: int, attn_mask_type=None, attention_type: str = "self",
                 cp_comm_type: str | None = None, softmax_scale: float | None = None,
                 pg_collection=None, window: int | None = None, query_neuron=None,
                 sink_tokens: int = 0) -> None:
        super().__init__(config=config)
        tp = pg_collection.tp.size() if pg_collection is not None else 1
        self.heads_per_partition = config.num_attention_heads // tp
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(self.head_dim)
        self.window = window
        # Spiking (W8ASpike): sliding-window layers spike their queries, per token and head.
        self.query_neuron = query_neuron
        self.sink_tokens = sink_tokens
        self.sp_group = sequence_parallel_group(pg_collection)
        self.layer_number = layer_number

    def neuron_sites(self) -> dict[str, torch.nn.Module | None]:
        """Where this module calls the neuron itself (``sbtrain.spiking.layers.neuron_sites``):
        the queries, when spiking a sliding window; they feed no projection."""
        return {} if self.query_neuron is None else {"query": None}

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None) -> torch.Tensor:
        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError("SoftmaxCoreAttention takes neither attention_bias nor "
                                      "packed_seq_params; packed documents use segment ids")
        seq, batch = query.shape[:2]
        if self.query_neuron is not None:
            query = self.query_neuron(query)
        out = causal_attention(query, key, value, self.window, attention_mask,
                               self.softmax_scale, self.sink_tokens, self.sp_group)
        return out.reshape(seq, batch, -1)


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     window: int | None, segment_ids: torch.Tensor | None, scale: float,
                     sink_tokens: int = 0, sp_group=None) -> torch.Tensor:
    """[s, b, heads, d] q/k/v (GQA) -> [s, b, heads, d]; the first ``sink_tokens`` positions
    are sink tokens (``ops.attention.sink_attention``: seen by every token, attending only
    to each other), the window and ``segment_ids`` ([b, s - sink_tokens]) cover the rest.
    ``sp_group`` (size > 1): the regular positions are this rank's slice of sequences split
    over the group (``parallel.sequence_attention``); every rank holds the same sinks."""
    from ops.attention import sink_attention, softmax_attention

    # [s, b, h, d] -> [b, h, s, d], the layout of SDPA and flex_attention.
    q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
    if sp_group is not None:
        out = _sequence_parallel_attention(q, k, v, window, segment_ids, scale, sink_tokens,
                                           sp_group)
    elif not sink_tokens:
        out = softmax_attention(q, k, v, window=window, segment_ids=segment_ids, scale=scale)
    else:
        sinks = [t[:, :, :sink_tokens] for t in (q, k, v)]
        regular = [t[:, :, sink_tokens:] for t in (q, k, v)]
        out, out_sinks = sink_attention(*regular, *sinks, window=window,
                                        segment_ids=segment_ids, scale=scale)
        out = torch.cat([out_sinks, out], dim=2)
    return out.permute(2, 0, 1, 3)


def _sequence_parallel_attention(q, k, v, window, segment_ids, scale: float, sink_tokens: int,
                                 sp_group) -> torch.Tensor:
    from parallel.sequence_attention import sp_softmax_attention

    if not sink_tokens:
        return sp_softmax_attention(q, k, v, window, scale, sp_group, segment_ids)
    q_sink, k_sink, v_sink = (t[:, :, :sink_tokens] for t in (q, k, v))
    out = sp_softmax_attention(*(t[:, :, sink_tokens:] for t in (q, k, v)), window, scale,
                               sp_group, segment_ids, k_sink, v_sink)
    # sinks attend to each other only, all of them (no causal order): the same on every rank
    groups = q.shape[1] // k.shape[1]
    out_sinks = torch.nn.functional.scaled_dot_product_attention(
        q_sink, k_sink.repeat_interleave(groups, dim=1), v_sink.repeat_interleave(groups, dim=1),
        scale=scale)
    return torch.cat([out_sinks.to(out.dtype), out], dim=2)
