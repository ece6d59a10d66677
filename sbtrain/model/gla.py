"""Gated linear attention (SpikingBrain-7B's even layers) as a Megatron-Core mixer.

Per token, with q/k/v from the softmax layer's projections (fused ``linear_qkv``, the same
per-group layout as Megatron's SelfAttention so conversion and TP sharding are shared)::

    q = relu(W_q x + b_q), k = relu(W_k x + b_k), v = W_v x + b_v   (GQA: kv heads per group)
    log a = logsigmoid(W_up W_down x + b_up) / normalizer           (low-rank gate, per kv dim)
    S_t = diag(a_t) S_{t-1} + k_t^T v_t,  o_t = d^-0.5 q_t S_t
    y = W_o concat_heads(RMSNorm_d(o_t))                             (norm weight shared by heads)

No RoPE, no output gate, no short convolution. Tensor parallel over heads: q/k/v, the gate's
up-projection and o are sharded like attention; the gate's down-projection and the norm
weight are replicated (their gradients are made whole across TP, see ``_NormWeight``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from megatron.core.transformer.module import MegatronModule

from ops.comm import SPContext
from ops.documents import Documents
from ops.gla import gla
from ops.gla_gate import gate_log_decay
from ops.rmsnorm import head_rms_norm as fused_head_rms_norm
from parallel.sequence import sp_context
from sbtrain.model.batch import context_of

FEATURE_MAPS = {"relu": F.relu, "sigmoid": torch.sigmoid}


@dataclass
class ProjectionSubmodules:
    """Linear layer classes of a mixer's fused q/k/v and output projection (Megatron's
    Column/RowParallelLinear by default); the GLA and the parallel-hybrid mixers share it."""

    linear_qkv: type
    linear_proj: type


def local_heads(config, tp_group, mixer: str) -> tuple[int, int, int]:
    """(query heads, kv heads, head dim) of this TP rank; heads are sharded over TP."""
    tp = tp_group.size()
    heads, groups, dim = config.num_attention_heads, config.num_query_groups, config.kv_channels
    if heads % tp or groups % tp:
        raise ValueError(f"{mixer} shards heads over TP: {heads} query heads and {groups} kv "
                         f"heads must both divide by tp={tp}")
    return heads // tp, groups // tp, dim


def attention_projections(config, submodules: ProjectionSubmodules, add_qkv_bias: bool, tp_group):
    """(fused q/k/v column-parallel, output row-parallel) in SelfAttention's layout."""
    heads, groups, dim = config.num_attention_heads, config.num_query_groups, config.kv_channels
    qkv = submodules.linear_qkv(
        config.hidden_size, (heads + 2 * groups) * dim, config=config,
        init_method=config.init_method, gather_output=False, bias=add_qkv_bias,
        skip_bias_add=False, is_expert=False, tp_group=tp_group)
    proj = submodules.linear_proj(
        heads * dim, config.hidden_size, config=config,
        init_method=config.output_layer_init_method, bias=False, input_is_parallel=True,
        skip_bias_add=True, is_expert=False, tp_group=tp_group)
    return qkv, proj


class GatedLinearAttention(MegatronModule):
    """SpikingBrain-7B's GLA layer over [s, b, h] hidden states; returns (output, bias)."""

    def __init__(self, config, submodules: ProjectionSubmodules, layer_number: int,
                 pg_collection=None, gate_rank: int = 16, gate_normalizer: float = 16.0,
                 feature_map: str = "relu", add_qkv_bias: bool = True, input_neuron=None,
                 sink_tokens: int = 0, **unused) -> None:
        super().__init__(config=config)
        tp_group = pg_collection.tp
        self.layer_number = layer_number
        self.heads, self.groups, self.head_dim = local_heads(config, tp_group, "GLA")
        groups, dim = config.num_query_groups, config.kv_channels
        self.gate_normalizer = gate_normalizer
        self.feature_map = FEATURE_MAPS[feature_map]
        self.tp_group = tp_group
        self.sp = sp_context(pg_collection)
        self.sink_tokens = sink_tokens
        # Spiking: the gate's down-projection sees the spiked input, as linear_qkv does.
        self.input_neuron = input_neuron
        self.linear_qkv, self.linear_proj = attention_projections(config, submodules, add_qkv_bias,
                                                                  tp_group)
        # Low-rank gate: hidden -> rank (replicated) -> kv dims (sharded with the kv heads).
        self.gate_down = torch.nn.Linear(config.hidden_size, gate_rank, bias=False,
                                         dtype=config.params_dtype)
        # Always a plain ColumnParallelLinear: W8ASpike spikes the gate's input x (collapsing
        # both factors into one projection), never this rank-16 intermediate.
        self.gate_up = ColumnParallelLinear(
            gate_rank, groups * dim, config=config, init_method=config.init_method,
            gather_output=False, bias=True, skip_bias_add=False, is_expert=False, tp_group=tp_group)
        self.g_norm_weight = torch.nn.Parameter(torch.ones(dim))
        self.norm_eps = config.layernorm_epsilon

    def neuron_sites(self) -> dict[str, torch.nn.Module | None]:
        """Where this mixer calls the neuron itself, site -> the projection the spikes feed
        (``sbtrain.spiking.layers.neuron_sites``): the gate's input, when spiking."""
        return {} if self.input_neuron is None else {"gate_down": self.gate_down}

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                packed_seq_params=None, **unused) -> tuple[torch.Tensor, torch.Tensor | None]:
        documents, sp = context_of(attention_mask, packed_seq_params, self.sp)
        qkv, gate = self.project(hidden_states)
        out = checkpointed(self.config, self.core, qkv, gate, documents, sp)
        seq, batch = hidden_states.shape[:2]
        return self.linear_proj(out.transpose(0, 1).reshape(seq, batch, -1))

    def project(self, hidden_states: torch.Tensor):
        """[s, b, h] -> the fused q/k/v projection and the gate's pre-activation [s, b, G*d]."""
        qkv, _ = self.linear_qkv(hidden_states)
        gate_input = hidden_states if self.input_neuron is None else self.input_neuron(hidden_states)
        gate, _ = self.gate_up(self.gate_down(gate_input))
        return qkv, gate

    def core(self, qkv: torch.Tensor, gate: torch.Tensor, documents: Documents | None,
             sp: SPContext | None):
        """Projections -> feature maps, decay, recurrence and output norm, [b, s, H, d]: most of
        the layer's activations, and what ``train.recompute: selective`` recomputes."""
        q, k, v, log_decay = self.heads_and_decay(qkv, gate)
        return self.output_norm(self.mix(q, k, v, log_decay, documents, sp))

    def heads_and_decay(self, qkv: torch.Tensor, gate: torch.Tensor):
        """-> q [b, s, H, d], k/v/log-decay [b, s, G, d] (local heads)."""
        seq, batch = qkv.shape[:2]
        q, k, v = split_qkv(qkv, self.heads, self.groups, self.head_dim)
        log_decay = gate_log_decay(gate, self.gate_normalizer)
        log_decay = log_decay.view(seq, batch, self.groups, self.head_dim)
        q, k = self.feature_map(q), self.feature_map(k)
        return (t.transpose(0, 1) for t in (q, k, v, log_decay))

    def mix(self, q, k, v, log_decay, documents: Documents | None, sp: SPContext | None) -> torch.Tensor:
        """The gated recurrence (ops.gla); packed documents restart the state per segment."""
        return linear_attention(q, k, v, log_decay, documents, self.head_dim ** -0.5,
                                self.sink_tokens, sp)

    def output_norm(self, out: torch.Tensor) -> torch.Tensor:
        return head_rms_norm(out, self.g_norm_weight, self.norm_eps, self.tp_group)


def checkpointed(config, fn, *args):
    """``fn(*args)``, as a non-reentrant activation checkpoint when ``train.recompute`` is
    ``selective`` (Megatron granularity ``selective``, see ``megatron_config.recompute_fields``):
    only the arguments are kept and ``fn`` runs again in backward (same ops, same results).
    Under ``full`` Megatron already recomputes the whole layer."""
    if config.recompute_granularity == "selective" and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def split_qkv(qkv: torch.Tensor, heads: int, groups: int, head_dim: int):
    """Megatron's fused per-group [s, b, groups * (heads/groups + 2) * d] projection ->
    q [s, b, heads, d], k and v [s, b, groups, d] (local heads)."""
    seq, batch = qkv.shape[:2]
    per_group = heads // groups
    qkv = qkv.view(seq, batch, groups, (per_group + 2) * head_dim)
    q, k, v = torch.split(qkv, [per_group * head_dim, head_dim, head_dim], dim=-1)
    return q.reshape(seq, batch, heads, head_dim), k, v


def linear_attention(q, k, v, log_decay, documents: Documents | torch.Tensor | None, scale: float,
                     sink_tokens: int = 0, sp: SPContext | None = None) -> torch.Tensor:
    """``ops.gla.gla`` over [b, s, heads, d] inputs whose first ``sink_tokens`` positions are sinks.

    Without sinks every row (or every document of ``documents``, [b, s - sink_tokens] ids)
    starts from a zero state. With sinks, the sinks run the recurrence first and the state
    they leave is the initial state of every row and every document: a learned prefix that
    no document boundary erases (the report leaves sinks in linear attention open).
    ``sp``: the regular positions are this rank's slice of sequences split over an SP group.
    """
    out, _ = gla(q, k, v, log_decay, scale=scale, documents=documents, sinks=sink_tokens, sp=sp)
    return out


def head_rms_norm(out: torch.Tensor, weight: torch.Tensor, eps: float, tp_group) -> torch.Tensor:
    """Per-head RMSNorm over d in fp32 with one weight [d] shared by all heads (ops.rmsnorm)."""
    # Each TP rank sees only its heads, so the shared weight's gradient is partial:
    # copy_to_tensor_model_parallel_region all-reduces it over TP in backward.
    weight = copy_to_tensor_model_parallel_region(weight, group=tp_group)
    return fused_head_rms_norm(out, weight, eps)
