"""SpikingBrain-76B's intra-layer parallel hybrid mixer (pattern symbols ``H`` and ``F``).

Every layer runs two attention branches on the same normed input x and sums them::

    q, k, v = W_qkv x + b                       (Megatron's fused per-group layout, GQA)
    linear:  S_t = diag(1 - k'_t) S_{t-1} + k'_t^T v_t,  o1_t = d^-0.5 q'_t S_t
             with q' = sigmoid(q), k' = sigmoid(k): the gate is tied to the key (g = 1 - k'),
             no gate parameters, no RoPE (log g = logsigmoid(-k), computed without cancellation)
    softmax: o2 = softmax attention of RoPE(q), RoPE(k), v: a sliding window (``H``) or full
             causal (``F``, the 76B's layers 7, 14, 21, 28)
    y = W_o (RMSNorm_1(o1) + RMSNorm_2(o2))      (per-head RMSNorm over d, one weight per branch)

``shared_projections`` (the default) gives both branches the one q/k/v/o set above. Off, the
softmax branch has its own q/k/v and o (``softmax_branch.linear_qkv`` / ``.linear_proj``) and
``y = W_o1 RMSNorm_1(o1) + W_o2 RMSNorm_2(o2)``. The report does not say which; the shared
reading is the default because it is the one whose parameter count matches "76B-A12B"
(docs/76b.md §2: 76.06 B / 11.89 B shared vs 76.88 B / 12.72 B separate).

Sink tokens (``sink_tokens`` > 0, set model-wide, see ``sbtrain.model.sinks``) are the first
positions of the hidden states: the softmax branch uses ``ops.attention.attention``, the
linear branch runs them as a prefix whose final state starts every row and document.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule

from ops.comm import SPContext
from ops.documents import Documents
from ops.gla_gate import gate_log_decay
from parallel.sequence import sp_context, with_exchange
from sbtrain.model.batch import context_of
from sbtrain.model.core_attention import causal_attention
from sbtrain.model.gla import (
    ProjectionSubmodules,
    attention_projections,
    checkpointed,
    head_rms_norm,
    linear_attention,
    local_heads,
    split_qkv,
)


class ParallelHybridAttention(MegatronModule):
    """Linear + softmax attention summed in one layer over [s, b, h]; returns (output, bias).

    Args:
        window: previous tokens each softmax query sees (``H``), None for full attention (``F``).
        shared_projections: one q/k/v/o set for both branches (see the module docstring).
        sink_tokens: leading positions of the sequence that are sink tokens.
        query_neuron: spiking neuron on the softmax branch's queries (sliding-window layers).
        The other arguments follow Megatron's attention builder protocol.
    """

    def __init__(self, config, submodules: ProjectionSubmodules, layer_number: int,
                 pg_collection=None, window: int | None = None, shared_projections: bool = True,
                 sink_tokens: int = 0, add_qkv_bias: bool = True, query_neuron=None,
                 softmax_exchange: str = "tails", **unused) -> None:
        super().__init__(config=config)
        tp_group = pg_collection.tp
        self.layer_number = layer_number
        self.heads, self.groups, self.head_dim = local_heads(config, tp_group, "the parallel hybrid")
        self.window, self.sink_tokens = window, sink_tokens
        self.shared_projections = shared_projections
        self.query_neuron = query_neuron
        self.tp_group = tp_group
        self.sp = sp_context(pg_collection, softmax_exchange)
        self.softmax_exchange = softmax_exchange
        self.norm_eps = config.layernorm_epsilon
        self.linear_qkv, self.linear_proj = attention_projections(config, submodules, add_qkv_bias,
                                                                  tp_group)
        if not shared_projections:
            self.softmax_branch = torch.nn.Module()
            qkv, proj = attention_projections(config, submodules, add_qkv_bias, tp_group)
            self.softmax_branch.linear_qkv, self.softmax_branch.linear_proj = qkv, proj
        self.linear_norm_weight = torch.nn.Parameter(torch.ones(self.head_dim))
        self.softmax_norm_weight = torch.nn.Parameter(torch.ones(self.head_dim))

    def neuron_sites(self) -> dict[str, torch.nn.Module | None]:
        """Where this mixer calls the neuron itself (``sbtrain.spiking.layers.neuron_sites``):
        the softmax branch's queries, when spiking a sliding window; they feed no projection."""
        return {} if self.query_neuron is None else {"query": None}

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                rotary_pos_emb=None, packed_seq_params=None,
                **unused) -> tuple[torch.Tensor, torch.Tensor | None]:
        documents, sp = context_of(attention_mask, packed_seq_params, self.sp)
        seq, batch = hidden_states.shape[:2]
        q, k, v = self._qkv(self.linear_qkv, hidden_states)
        # train.recompute: selective keeps only q/k/v here and reruns the branch in backward
        linear_out = checkpointed(self.config, self._linear_branch, q, k, v, documents, sp)
        if not self.shared_projections:
            q, k, v = self._qkv(self.softmax_branch.linear_qkv, hidden_states)
        softmax_out = self._softmax_branch(q, k, v, documents, sp, rotary_pos_emb)
        softmax_out = head_rms_norm(softmax_out, self.softmax_norm_weight, self.norm_eps,
                                    self.tp_group)
        if self.shared_projections:
            return self.linear_proj((linear_out + softmax_out).reshape(seq, batch, -1))
        out, _ = self.linear_proj(linear_out.reshape(seq, batch, -1))
        out_softmax, _ = self.softmax_branch.linear_proj(softmax_out.reshape(seq, batch, -1))
        return out + out_softmax, None

    def _qkv(self, linear_qkv, hidden_states: torch.Tensor):
        qkv, _ = linear_qkv(hidden_states)
        return split_qkv(qkv, self.heads, self.groups, self.head_dim)

    def _linear_branch(self, q, k, v, documents: Documents | None, sp: SPContext | None) -> torch.Tensor:
        """[s, b, heads, d] -> [s, b, heads, d]: the key-gated recurrence, head-normed."""
        # log(1 - sigmoid(k)) = logsigmoid(-k): exact where sigmoid(k) rounds to 1
        log_decay = gate_log_decay(k, negate=True)
        q, k = torch.sigmoid(q), torch.sigmoid(k)
        q, k, v, log_decay = (t.transpose(0, 1) for t in (q, k, v, log_decay))
        out = linear_attention(q, k, v, log_decay, documents, self.head_dim ** -0.5,
                               self.sink_tokens, sp)
        # normed before the transpose: the norm's rows are contiguous in [b, s, heads, d]
        out = head_rms_norm(out, self.linear_norm_weight, self.norm_eps, self.tp_group)
        return out.transpose(0, 1)

    def _softmax_branch(self, q, k, v, documents: Documents | None, sp: SPContext | None,
                        rotary_pos_emb) -> torch.Tensor:
        from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

        if rotary_pos_emb is not None:
            if not isinstance(rotary_pos_emb, tuple):
                rotary_pos_emb = (rotary_pos_emb, rotary_pos_emb)
            q = apply_rotary_pos_emb(q, rotary_pos_emb[0], config=self.config)
            k = apply_rotary_pos_emb(k, rotary_pos_emb[1], config=self.config)
        if self.query_neuron is not None:
            q = self.query_neuron(q)
        return causal_attention(q, k, v, self.window, documents, self.head_dim ** -0.5,
                                self.sink_tokens, with_exchange(sp, self.softmax_exchange))
