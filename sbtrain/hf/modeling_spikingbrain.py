"""Transformers modeling code of SpikingBrain-style hybrids (self-contained: torch/transformers,
optionally fla). Copied verbatim into every exported directory; loads the official
SpikingBrain-7B checkpoints (``gla_swa``) and every layout sbtrain trains (``spikingbrain_hybrid``).

Weight names follow the official 7B layout (``model.embeddings``, ``model.layers.i.attn.*``,
``attn_norm``, ``mlp_norm``, ``mlp.{gate,up,down}_proj``, ``model.norm``, ``lm_head``) and extend
it for the 76B-style layers: ``attn.linear_norm`` / ``attn.softmax_norm`` (per-branch head norms),
``attn.softmax_{q,k,v,o}_proj`` (separate projections), ``model.sink_tokens`` [S, hidden],
``mlp.router``, ``mlp.experts.<e>.*``, ``mlp.shared_expert.*``.

Generation keeps a :class:`SpikingBrainCache`: the recurrent state of every linear branch
(constant in the context length), the sinks' keys/values plus the last ``sliding_window``
keys/values of sliding-window softmax branches, and all keys/values of full-attention ones.
Everything runs in plain torch on any device; ``fla.ops.gla.chunk_gla`` is used on CUDA when
installed (``spikingbrain_attention.py``). Left padding is not supported (batches of
equal-length prompts only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_spikingbrain import GLAswaConfig, SpikingBrainConfig
from .spikingbrain_attention import Positions, linear_attention, rope, softmax_attention

WINDOWED = ("sliding_attention", "hybrid_sliding")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * self.weight.float()).to(x.dtype)


class SpikingBrainCache:
    """Per-layer generation state. ``seen``: regular (non-sink) tokens processed so far."""

    is_compileable = False
    is_spikingbrain_cache = True   # recognised by attribute: remote-code copies are other classes

    def __init__(self, num_layers: int):
        self.layers = [dict() for _ in range(num_layers)]
        self.seen = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def memory_bytes(self, layer_idx: int) -> int:
        return sum(t.numel() * t.element_size() for t in self.layers[layer_idx].values())

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        for layer in self.layers:
            for key, t in layer.items():
                layer[key] = t.index_select(0, beam_idx.to(t.device))


# transformers 5.2x renamed the output field past_key_values to cache; use whichever exists.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def build_projections(owner: nn.Module, config, prefix: str = "") -> None:
    """q/k/v/o of one attention on ``owner`` (Qwen2 layout: biases on q/k/v only)."""
    hidden, dim = config.hidden_size, config.head_dim
    heads, groups = config.num_attention_heads, config.num_key_value_heads
    bias = config.attention_bias
    setattr(owner, prefix + "q_proj", nn.Linear(hidden, heads * dim, bias=bias))
    setattr(owner, prefix + "k_proj", nn.Linear(hidden, groups * dim, bias=bias))
    setattr(owner, prefix + "v_proj", nn.Linear(hidden, groups * dim, bias=bias))
    setattr(owner, prefix + "o_proj", nn.Linear(heads * dim, hidden, bias=False))


def project_qkv(owner: nn.Module, x: torch.Tensor, config, prefix: str = ""):
    """[B, T, hidden] -> q [B, T, H, d], k, v [B, T, G, d]."""
    batch, seq = x.shape[:2]
    dim, heads, groups = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    q = getattr(owner, prefix + "q_proj")(x).view(batch, seq, heads, dim)
    k = getattr(owner, prefix + "k_proj")(x).view(batch, seq, groups, dim)
    v = getattr(owner, prefix + "v_proj")(x).view(batch, seq, groups, dim)
    return q, k, v


class GatedLinearAttention(nn.Module):
    """SpikingBrain-7B's GLA: feature-mapped q/k, low-rank data-dependent decay, head RMSNorm."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        build_projections(self, config)
        kv_dim = config.num_key_value_heads * config.head_dim
        self.gk_proj = nn.Sequential(nn.Linear(config.hidden_size, config.gate_low_rank_dim, bias=False),
                                     nn.Linear(config.gate_low_rank_dim, kv_dim, bias=True))
        self.g_norm = RMSNorm(config.head_dim, config.norm_eps)
        self.feature_map = F.relu if config.feature_map == "relu" else torch.sigmoid

    def forward(self, x, where: Positions, layer: dict):
        cfg = self.config
        q, k, v = project_qkv(self, x, cfg)
        q, k = self.feature_map(q), self.feature_map(k)
        log_decay = F.logsigmoid(self.gk_proj(x).float()) / cfg.gate_logit_normalizer
        log_decay = log_decay.view_as(k)
        out, layer["state"] = linear_attention(q, k, v, log_decay, cfg.head_dim ** -0.5,
                                               layer.get("state"))
        return self.o_proj(self.g_norm(out).flatten(2))


class SoftmaxAttention(nn.Module):
    """Qwen2 attention with RoPE: sliding window (``sliding_attention``) or full causal."""

    def __init__(self, config, window):
        super().__init__()
        self.config, self.window = config, window
        build_projections(self, config)

    def forward(self, x, where: Positions, layer: dict):
        cfg = self.config
        q, k, v = project_qkv(self, x, cfg)
        q, k = rope(q, where.pos, cfg.rope_theta), rope(k, where.pos, cfg.rope_theta)
        out = softmax_attention(q, k, v, where, layer, "", self.window, cfg.head_dim ** -0.5)
        return self.o_proj(out.flatten(2))


class ParallelHybridAttention(nn.Module):
    """SpikingBrain-76B's intra-layer hybrid: key-gated linear branch (sigmoid q/k, decay
    1 - k) + softmax branch (window or full), each head-RMSNormed, summed before o_proj
    (shared projections) or projected apart and summed (separate projections)."""

    def __init__(self, config, window):
        super().__init__()
        self.config, self.window = config, window
        build_projections(self, config)
        if not config.shared_projections:
            build_projections(self, config, "softmax_")
        self.linear_norm = RMSNorm(config.head_dim, config.norm_eps)
        self.softmax_norm = RMSNorm(config.head_dim, config.norm_eps)

    def forward(self, x, where: Positions, layer: dict):
        cfg = self.config
        q, k, v = project_qkv(self, x, cfg)
        log_decay = F.logsigmoid(-k.float())          # log(1 - sigmoid(k)), no cancellation
        linear, layer["state"] = linear_attention(torch.sigmoid(q), torch.sigmoid(k), v, log_decay,
                                                  cfg.head_dim ** -0.5, layer.get("state"))
        linear = self.linear_norm(linear).flatten(2)
        prefix = "" if cfg.shared_projections else "softmax_"
        if prefix:
            q, k, v = project_qkv(self, x, cfg, prefix)
        q, k = rope(q, where.pos, cfg.rope_theta), rope(k, where.pos, cfg.rope_theta)
        soft = softmax_attention(q, k, v, where, layer, "", self.window, cfg.head_dim ** -0.5)
        soft = self.softmax_norm(soft).flatten(2)
        if cfg.shared_projections:
            return self.o_proj(linear + soft)
        return self.o_proj(linear) + self.softmax_o_proj(soft)


class MLP(nn.Module):
    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Megatron's MoE as sbtrain trains it: softmax router (before top-k for top-1, over the
    chosen experts otherwise), probability-weighted routed experts, plus the shared expert."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(config.hidden_size, config.moe_intermediate_size)
                                     for _ in range(config.num_experts))
        width = config.shared_expert_intermediate_size
        self.shared_expert = MLP(config.hidden_size, width) if width else None

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        logits = self.router(flat)
        top_k = self.config.num_experts_per_tok
        if self.config.router_pre_softmax:
            probs, chosen = torch.softmax(logits.float(), -1).topk(top_k, dim=-1)
        else:
            top, chosen = logits.topk(top_k, dim=-1)
            probs = torch.softmax(top.float(), -1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            if rows.numel():
                weight = probs[rows, slot].to(flat.dtype)[:, None]
                out.index_add_(0, rows, expert(flat[rows]) * weight)
        if self.shared_expert is not None:
            out = out + self.shared_expert(flat)
        return out.view_as(x)


def build_mixer(config, layer_type: str) -> nn.Module:
    window = config.sliding_window if layer_type in WINDOWED else None
    if layer_type == "gla":
        return GatedLinearAttention(config)
    if layer_type in ("sliding_attention", "full_attention"):
        return SoftmaxAttention(config, window)
    return ParallelHybridAttention(config, window)


class HybridBlock(nn.Module):
    def __init__(self, config, index: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.attn = build_mixer(config, config.mixer_types[index])
        self.mlp_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = (MoE(config) if config.mlp_types[index] == "moe"
                    else MLP(config.hidden_size, config.intermediate_size))

    def forward(self, x, where: Positions, layer: dict):
        x = x + self.attn(self.attn_norm(x), where, layer)
        return x + self.mlp(self.mlp_norm(x))


class SpikingBrainPreTrainedModel(PreTrainedModel):
    config_class = SpikingBrainConfig
    base_model_prefix = "model"
    _no_split_modules = ["HybridBlock"]
    _supports_sdpa = True

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, HybridModel) and module.sink_tokens is not None:
            nn.init.normal_(module.sink_tokens, std=std)


class HybridModel(SpikingBrainPreTrainedModel):
    """Embeddings (+ sink tokens), hybrid blocks, final norm; hidden states of regular tokens."""

    def __init__(self, config):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        sinks = config.num_sink_tokens
        self.sink_tokens = nn.Parameter(torch.zeros(sinks, config.hidden_size)) if sinks else None
        self.layers = nn.ModuleList(HybridBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, value):
        self.embeddings = value

    def forward(self, input_ids: torch.Tensor, cache: SpikingBrainCache) -> torch.Tensor:
        x = self.embeddings(input_ids)
        sinks = self.config.num_sink_tokens
        first = cache.seen == 0
        start = sinks + cache.seen
        pos = torch.arange(start, start + x.shape[1], device=x.device)
        is_sink = torch.zeros(x.shape[1], dtype=torch.bool, device=x.device)
        if sinks and first:   # sinks run once, in front of the first tokens (RoPE 0..S-1)
            x = torch.cat([self.sink_tokens.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
            pos = torch.cat([torch.arange(sinks, device=x.device), pos])
            is_sink = torch.cat([torch.ones(sinks, dtype=torch.bool, device=x.device), is_sink])
        where = Positions(pos, is_sink)
        for block, layer in zip(self.layers, cache.layers):
            x = block(x, where, layer)
        cache.seen += input_ids.shape[1]
        return self.norm(x[:, int(is_sink.sum()):])


class SpikingBrainForCausalLM(SpikingBrainPreTrainedModel, GenerationMixin):
    """Causal LM head over :class:`HybridModel`; ``labels`` are shifted inside (pass input_ids)."""

    _tied_weights_keys = ({"lm_head.weight": "model.embeddings.weight"}
                          if int(__import__("transformers").__version__.split(".")[0]) >= 5
                          else ["lm_head.weight"])

    def __init__(self, config):
        super().__init__(config)
        self.model = HybridModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embeddings

    def set_input_embeddings(self, value):
        self.model.embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False   # the recurrent state lives in SpikingBrainCache, not a KV cache

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, cache: SpikingBrainCache | None = None,
                past_key_values: SpikingBrainCache | None = None, use_cache: bool | None = None,
                logits_to_keep: int = 0, **unused) -> CausalLMOutputWithPast:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("attention_mask with padding is not supported: the recurrent state "
                             "would absorb pad tokens; pass prompts of equal length")
        state = _our_cache(cache, past_key_values)
        if state is None:
            state = SpikingBrainCache(self.config.num_hidden_layers)
        hidden = self.model(input_ids, state)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden).float()
        loss = None
        if labels is not None:
            shifted = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], 1)
            loss = F.cross_entropy(logits.flatten(0, 1), shifted.flatten(), ignore_index=-100)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        kept = state if use_cache else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: kept})

    def prepare_inputs_for_generation(self, input_ids, cache=None, past_key_values=None,
                                      attention_mask=None, use_cache=True, **unused):
        state = _our_cache(cache, past_key_values)
        if state is not None:   # feed only the tokens the state has not seen
            input_ids = input_ids[:, state.seen:]
        return {"input_ids": input_ids, "cache": state, "attention_mask": attention_mask,
                "use_cache": use_cache, "logits_to_keep": 1 if state is None else 0}

    def _reorder_cache(self, cache, beam_idx):
        cache.reorder_cache(beam_idx)
        return cache


class GLAswaForCausalLM(SpikingBrainForCausalLM):
    """The official SpikingBrain-7B class name and config (``model_type: gla_swa``)."""

    config_class = GLAswaConfig


def _our_cache(*candidates):
    """Our cache from whichever argument carries it (transformers renamed past_key_values to
    cache in 5.2x; a cache of another kind, e.g. an empty DynamicCache, means none)."""
    return next((c for c in candidates if getattr(c, "is_spikingbrain_cache", False)), None)
