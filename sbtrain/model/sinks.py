"""Learnable sink tokens prepended to every sequence (SpikingBrain-76B's 128 "meta tokens").

``SinkTokenGPTModel`` is Megatron's GPTModel with ``sink_tokens`` learned embeddings
(``[S, hidden]``, on the first pipeline stage) placed in front of each sequence's token
embeddings, and removed again before the output layer, so the logits and the loss cover the
real tokens only. In between every layer sees ``S + T`` positions; the mixers know the first
``S`` are sinks (``sink_tokens`` in their specs) and treat them as the report describes: in
softmax attention every token sees all sinks and sinks see only each other
(``ops.attention.attention`` with ``sinks=S``); linear attention runs them as a prefix
(``sbtrain.model.gla.linear_attention``).

RoPE positions run over the whole ``S + T`` sequence (sinks at 0..S-1). Rotary attention
depends only on position differences, so the real tokens' attention among themselves is the
same as without sinks; a converted model keeps its behaviour up to what the sinks add.
Pipeline stages exchange ``S + T`` positions (the trainer's schedule shape includes them).
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt.gpt_model import GPTModel


class SinkTokenGPTModel(GPTModel):
    """GPTModel with ``sink_tokens`` learnable embeddings prepended to every sequence."""

    def __init__(self, *args, sink_tokens: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if sink_tokens < 1:
            raise ValueError(f"SinkTokenGPTModel needs sink_tokens >= 1, got {sink_tokens}")
        self.num_sink_tokens = sink_tokens
        if self.pre_process:
            config = self.config
            self.sink_tokens = torch.nn.Parameter(
                torch.empty(sink_tokens, config.hidden_size, dtype=config.params_dtype))
            config.init_method(self.sink_tokens)
            # A hook (not an overridden _preprocess) so that Megatron's own preprocessing,
            # RoPE length included, sees the S + T positions.
            self.embedding.register_forward_hook(self._prepend_sinks)

    def _prepend_sinks(self, module, inputs, embedded: torch.Tensor) -> torch.Tensor:
        """[T, b, h] token embeddings -> [S + T, b, h]."""
        sinks = self.sink_tokens.to(embedded.dtype).unsqueeze(1)
        return torch.cat([sinks.expand(-1, embedded.shape[1], -1), embedded], dim=0)

    def _preprocess(self, input_ids: torch.Tensor, *args, **kwargs):
        """Megatron's preprocessing, plus an MoE padding mask under sequence parallelism.

        Every sequence-parallel rank carries the same sinks; the MoE load-balancing loss must
        count them once, as one process does, so ranks > 0 mark them as padding. Megatron
        leaves padded tokens out of the routing statistics only (their routing and outputs
        are unchanged). Rank 0 passes an all-False mask: with a mask Megatron counts the
        tokens it sees on every rank, without one it assumes every rank has rank 0's count.
        """
        output = super()._preprocess(input_ids, *args, **kwargs)
        sp_group = self.pg_collection.cp  # parallel.sp: Megatron's context-parallel group
        if self.config.num_moe_experts and sp_group is not None and sp_group.size() > 1:
            batch, seq = input_ids.shape
            padding = torch.zeros(batch, self.num_sink_tokens + seq, dtype=torch.bool,
                                  device=input_ids.device)
            if sp_group.rank() > 0:
                padding[:, :self.num_sink_tokens] = True
            output = (*output[:5], padding, *output[6:])
        return output

    def _postprocess(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self.post_process:
            hidden_states = hidden_states[self.num_sink_tokens:]
        return super()._postprocess(hidden_states, *args, **kwargs)
