"""Transformers configs of SpikingBrain-style hybrid models (self-contained: torch/transformers only).

This file is copied verbatim into every directory ``sbtrain convert sbtrain-to-hf`` writes, so it
imports nothing from sbtrain. Two model types share one modeling class:

- ``gla_swa``: the official SpikingBrain-7B config (``GLAswaForCausalLM``): GLA on even layers,
  sliding-window attention on odd layers (the official class ignores ``attn_layers`` and fixes
  that layout; so does this one), gate rank 16, gate normalizer 16, ReLU feature map.
- ``spikingbrain_hybrid``: every layout sbtrain trains. ``mixer_types`` (not ``layer_types``: transformers validates that name) has one entry per layer:
  ``gla`` (L), ``sliding_attention`` (W), ``full_attention`` (*), ``hybrid_sliding`` (H: linear +
  sliding-window branch), ``hybrid_full`` (F: linear + full branch); ``mlp_types`` ``dense`` or
  ``moe``; ``num_sink_tokens`` learned tokens are prepended to every sequence.
"""

from __future__ import annotations

from transformers import PretrainedConfig

LAYER_TYPES = {"L": "gla", "W": "sliding_attention", "*": "full_attention",
               "H": "hybrid_sliding", "F": "hybrid_full"}
MLP_TYPES = {"-": "dense", "E": "moe"}


class SpikingBrainConfig(PretrainedConfig):
    """Hybrid GLA / softmax / parallel-hybrid decoder with optional sinks and MoE FFNs."""

    model_type = "spikingbrain_hybrid"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(self, vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                 num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, head_dim=None,
                 mixer_types=None, mlp_types=None, sliding_window=4096,
                 max_position_embeddings=131072, rope_theta=1e6, norm_eps=1e-6,
                 attention_bias=True, gate_low_rank_dim=16, gate_logit_normalizer=16.0,
                 feature_map="relu", shared_projections=True, num_sink_tokens=0,
                 num_experts=16, num_experts_per_tok=1, moe_intermediate_size=None,
                 shared_expert_intermediate_size=None, router_pre_softmax=None,
                 initializer_range=0.02, tie_word_embeddings=False, use_cache=True, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.mixer_types = list(mixer_types or self.default_mixer_types(num_hidden_layers))
        self.mlp_types = list(mlp_types or ["dense"] * num_hidden_layers)
        self.sliding_window = sliding_window
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.norm_eps = norm_eps
        self.attention_bias = attention_bias
        self.gate_low_rank_dim = gate_low_rank_dim
        self.gate_logit_normalizer = gate_logit_normalizer
        self.feature_map = feature_map
        self.shared_projections = shared_projections
        self.num_sink_tokens = num_sink_tokens
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_intermediate_size = moe_intermediate_size or intermediate_size
        self.shared_expert_intermediate_size = shared_expert_intermediate_size
        # Megatron's router: softmax over all experts before top-1, over the chosen ones otherwise
        self.router_pre_softmax = (num_experts_per_tok == 1 if router_pre_softmax is None
                                   else router_pre_softmax)
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.validate_layout()

    @staticmethod
    def default_mixer_types(num_layers):
        return ["sliding_attention" if i % 2 else "gla" for i in range(num_layers)]

    def validate_layout(self):
        """One-line errors naming the key, for configs this code cannot run."""
        for key, values, known in (("mixer_types", self.mixer_types, LAYER_TYPES.values()),
                                   ("mlp_types", self.mlp_types, MLP_TYPES.values())):
            if len(values) != self.num_hidden_layers:
                raise ValueError(f"config key {key!r} has {len(values)} entries for "
                                 f"num_hidden_layers={self.num_hidden_layers}")
            unknown = sorted(set(values) - set(known))
            if unknown:
                raise ValueError(f"config key {key!r}: unknown {unknown}; known {sorted(known)}")
        if self.feature_map not in ("relu", "sigmoid"):
            raise ValueError(f"config key 'feature_map': unknown {self.feature_map!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("config key 'num_key_value_heads' must divide num_attention_heads")


class GLAswaConfig(SpikingBrainConfig):
    """The official SpikingBrain-7B config (``model_type: gla_swa``), read and written as published."""

    model_type = "gla_swa"

    def __init__(self, vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                 num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                 attn_layers=None, attn_mode="chunk", use_short_conv=False, conv_size=4,
                 attention_dropout=0.0, hidden_act="swish", sliding_window=4096,
                 max_position_embeddings=131072, rope_theta=1e6, norm_eps=1e-6,
                 elementwise_affine=True, fuse_cross_entropy=True, **kwargs):
        if use_short_conv:
            raise ValueError("config key 'use_short_conv': true is not supported (SpikingBrain-7B "
                             "has no short convolution)")
        for key in ("mixer_types", "mlp_types", "num_sink_tokens", "feature_map"):
            kwargs.pop(key, None)   # fixed by the official layout
        # As the official class: softmax attention on odd layers, whatever attn_layers says.
        self.attn_layers = list(range(1, num_hidden_layers, 2))
        self.attn_mode, self.use_short_conv, self.conv_size = attn_mode, use_short_conv, conv_size
        self.attention_dropout, self.hidden_act = attention_dropout, hidden_act
        self.elementwise_affine, self.fuse_cross_entropy = elementwise_affine, fuse_cross_entropy
        super().__init__(vocab_size=vocab_size, hidden_size=hidden_size,
                         intermediate_size=intermediate_size, num_hidden_layers=num_hidden_layers,
                         num_attention_heads=num_attention_heads,
                         num_key_value_heads=num_key_value_heads, sliding_window=sliding_window,
                         max_position_embeddings=max_position_embeddings, rope_theta=rope_theta,
                         norm_eps=norm_eps, mixer_types=self.default_mixer_types(num_hidden_layers),
                         feature_map="relu", num_sink_tokens=0, **kwargs)
