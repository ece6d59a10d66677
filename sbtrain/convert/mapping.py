"""Weight-name and layout mapping between HF checkpoints and sbtrain's Megatron model.

Pure functions over state dicts of full (unsharded) tensors. Three layouts meet here:

- HF ``Qwen2ForCausalLM``: ``model.embed_tokens``, ``model.layers.i.self_attn.{q,k,v,o}_proj``,
  ``mlp.{gate,up,down}_proj``, ``input_layernorm``, ``post_attention_layernorm``, ``lm_head``.
- The official SpikingBrain-7B layout (``GLAswaForCausalLM``, ``model_type: gla_swa``):
  ``model.embeddings``, ``model.layers.i.attn.*``, ``attn_norm``, ``mlp_norm``, GLA layers add
  ``attn.gk_proj.0`` (hidden -> 16), ``attn.gk_proj.1`` (16 -> kv dims, with bias) and
  ``attn.g_norm``.
- sbtrain (Megatron GPTModel, one process): q/k/v fused in ``linear_qkv`` grouped per kv head
  ``[q heads of group g | k_g | v_g]`` for g in groups; SwiGLU ``linear_fc1 = [gate; up]``.
"""

from __future__ import annotations

import math

import torch

from sbtrain.config.schema import ModelConfig

# Where the two HF layouts keep the per-layer pieces both share.
_HF_NAMES = {
    "qwen2": dict(embed="model.embed_tokens.weight", attn="self_attn", attn_norm="input_layernorm",
                  mlp_norm="post_attention_layernorm"),
    "gla_swa": dict(embed="model.embeddings.weight", attn="attn", attn_norm="attn_norm",
                    mlp_norm="mlp_norm"),
}
# The official code initialises its new GLA projections with xavier_uniform(gain=2^-2.5) and
# zero bias (gla_attention.py `_initialize_weights`); the converter does the same.
GLA_GATE_INIT_GAIN = 2 ** -2.5


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """Row-stack q/k/v weights (or biases) into Megatron's per-group ``linear_qkv`` order."""
    per_group = [t.reshape(groups, -1, *t.shape[1:]) for t in (q, k, v)]
    return torch.cat(per_group, dim=1).reshape(-1, *q.shape[1:])


def split_qkv(qkv: torch.Tensor, groups: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """Inverse of :func:`fuse_qkv`."""
    grouped = qkv.reshape(groups, -1, *qkv.shape[1:])
    q_rows = grouped.shape[1] - 2 * head_dim
    q, k, v = torch.split(grouped, [q_rows, head_dim, head_dim], dim=1)
    return tuple(t.reshape(-1, *qkv.shape[1:]) for t in (q, k, v))


def hf_layout(hf_config: dict, source: str = "config.json") -> str:
    """``qwen2``, ``gla_swa`` or ``spikingbrain_hybrid`` (sbtrain's own export, every pattern)
    from a HF config.json dict; anything else is an error naming ``source``."""
    kind = hf_config.get("model_type")
    if kind not in (*_HF_NAMES, "spikingbrain_hybrid"):
        raise ValueError(f"{source}/config.json: unsupported model_type {kind!r}; sbtrain "
                         f"converts {sorted([*_HF_NAMES, 'spikingbrain_hybrid'])}")
    return kind


def hf_to_sbtrain(hf: dict[str, torch.Tensor], model: ModelConfig, layout: str,
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """HF tensors -> the state dict of sbtrain's one-process model (``model.pattern``).

    Every sbtrain layer ``i`` takes HF layer ``i``'s attention, MLP and norms. GLA layers
    without GLA weights in ``hf`` (a Qwen2 source) get a fresh gate (xavier, gain 2^-2.5,
    zero bias, drawn from ``seed``) and a unit output norm.
    """
    names = _HF_NAMES[layout]
    out = {"embedding.word_embeddings.weight": hf[names["embed"]],
           "decoder.final_layernorm.weight": hf["model.norm.weight"],
           "output_layer.weight": hf.get("lm_head.weight", hf[names["embed"]])}
    gen = torch.Generator().manual_seed(seed)
    if model.sink_tokens:
        # Sink tokens are new (unpublished init): N(0, init_method_std), like a fresh embedding.
        sinks = torch.randn(model.sink_tokens, model.hidden_size, generator=gen)
        out["sink_tokens"] = (sinks * model.init_method_std).to(out["output_layer.weight"].dtype)
    for i, (mixer, ffn) in enumerate(model.layers):
        if ffn != "-":
            raise NotImplementedError(f"layer {i}: converting into MoE layers is not supported "
                                      "here; convert the dense model and upcycle")
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn = src + names["attn"] + "."
        out[dst + "input_layernorm.weight"] = hf[src + names["attn_norm"] + ".weight"]
        out[dst + "pre_mlp_layernorm.weight"] = hf[src + names["mlp_norm"] + ".weight"]
        for kind in ("weight", "bias") if model.qkv_bias else ("weight",):
            parts = [hf[f"{attn}{p}_proj.{kind}"] for p in "qkv"]
            out[dst + f"self_attention.linear_qkv.{kind}"] = fuse_qkv(*parts, model.num_query_groups)
        out[dst + "self_attention.linear_proj.weight"] = hf[attn + "o_proj.weight"]
        if mixer == "L":
            out.update(_gla_extras(hf, attn, dst, model, gen))
        if mixer in "HF":
            out.update(_parallel_hybrid_extras(out, dst, model))
        mlp = src + "mlp."
        out[dst + "mlp.linear_fc1.weight"] = torch.cat(
            [hf[mlp + "gate_proj.weight"], hf[mlp + "up_proj.weight"]])
        out[dst + "mlp.linear_fc2.weight"] = hf[mlp + "down_proj.weight"]
    return out


def _gla_extras(hf: dict, attn: str, dst: str, model: ModelConfig, gen: torch.Generator) -> dict:
    dst += "self_attention."
    if attn + "gk_proj.0.weight" in hf:
        return {dst + "gate_down.weight": hf[attn + "gk_proj.0.weight"],
                dst + "gate_up.weight": hf[attn + "gk_proj.1.weight"],
                dst + "gate_up.bias": hf[attn + "gk_proj.1.bias"],
                dst + "g_norm_weight": hf[attn + "g_norm.weight"]}
    dtype = hf[attn + "q_proj.weight"].dtype
    kv_dim = model.num_query_groups * model.kv_channels
    rank = model.gla.gate_rank
    return {dst + "gate_down.weight": _xavier((rank, model.hidden_size), gen).to(dtype),
            dst + "gate_up.weight": _xavier((kv_dim, rank), gen).to(dtype),
            dst + "gate_up.bias": torch.zeros(kv_dim, dtype=dtype),
            dst + "g_norm_weight": torch.ones(model.kv_channels, dtype=dtype)}


def _parallel_hybrid_extras(out: dict, dst: str, model: ModelConfig) -> dict:
    """H/F layers: both branches start from the source attention (with separate projections
    the softmax branch gets its own copy of q/k/v/o) and the branch norms from ones."""
    attn = dst + "self_attention."
    dtype = out[attn + "linear_proj.weight"].dtype
    extras = {attn + "linear_norm_weight": torch.ones(model.kv_channels, dtype=dtype),
              attn + "softmax_norm_weight": torch.ones(model.kv_channels, dtype=dtype)}
    if not model.hybrid.shared_projections:
        for name in ("linear_qkv.weight", "linear_qkv.bias", "linear_proj.weight"):
            if attn + name in out:
                extras[attn + "softmax_branch." + name] = out[attn + name].clone()
    return extras


def _xavier(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    fan_out, fan_in = shape
    bound = GLA_GATE_INIT_GAIN * math.sqrt(6.0 / (fan_in + fan_out))
    return (torch.rand(shape, generator=gen) * 2 - 1) * bound


def sbtrain_to_official(state: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """sbtrain's one-process state dict -> the official ``GLAswaForCausalLM`` tensor names."""
    if model.sink_tokens:
        raise ValueError("the gla_swa layout has no sink tokens; a model with "
                         "model.sink_tokens cannot be exported to it")
    out = {"model.embeddings.weight": state["embedding.word_embeddings.weight"],
           "model.norm.weight": state["decoder.final_layernorm.weight"],
           "lm_head.weight": state["output_layer.weight"]}
    for i, (mixer, ffn) in enumerate(model.layers):
        if ffn != "-" or mixer not in ("L", "W", "*"):
            raise ValueError(f"layer {i} ({mixer}{ffn}): the gla_swa layout holds only GLA and "
                             "softmax-attention layers with dense MLPs")
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[dst + "attn_norm.weight"] = state[src + "input_layernorm.weight"]
        out[dst + "mlp_norm.weight"] = state[src + "pre_mlp_layernorm.weight"]
        attn = src + "self_attention."
        for kind in ("weight", "bias") if model.qkv_bias else ("weight",):
            q, k, v = split_qkv(state[attn + f"linear_qkv.{kind}"], model.num_query_groups,
                                model.kv_channels)
            for name, tensor in zip("qkv", (q, k, v)):
                out[dst + f"attn.{name}_proj.{kind}"] = tensor
        out[dst + "attn.o_proj.weight"] = state[attn + "linear_proj.weight"]
        if mixer == "L":
            out[dst + "attn.gk_proj.0.weight"] = state[attn + "gate_down.weight"]
            out[dst + "attn.gk_proj.1.weight"] = state[attn + "gate_up.weight"]
            out[dst + "attn.gk_proj.1.bias"] = state[attn + "gate_up.bias"]
            out[dst + "attn.g_norm.weight"] = state[attn + "g_norm_weight"]
        gate, up = state[src + "mlp.linear_fc1.weight"].chunk(2)
        out[dst + "mlp.gate_proj.weight"] = gate
        out[dst + "mlp.up_proj.weight"] = up
        out[dst + "mlp.down_proj.weight"] = state[src + "mlp.linear_fc2.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def check_hf_matches(hf_config: dict, model: ModelConfig) -> None:
    """Raise naming every ``model.*`` YAML key whose value disagrees with the HF config."""
    pairs = {
        "hidden_size": ("hidden_size", model.hidden_size),
        "num_attention_heads": ("num_attention_heads", model.num_attention_heads),
        "num_query_groups": ("num_key_value_heads", model.num_query_groups),
        "ffn_hidden_size": ("intermediate_size", model.ffn_hidden_size),
        "vocab_size": ("vocab_size", model.vocab_size),
        "num_layers (pattern)": ("num_hidden_layers", model.num_layers),
        "rope_theta": ("rope_theta", model.rope_theta),
        "untie_embeddings": ("tie_word_embeddings", not model.untie_embeddings),
    }
    wrong = [f"model.{ours}={mine!r} but HF {theirs}={hf_config.get(theirs)!r}"
             for ours, (theirs, mine) in pairs.items()
             if theirs in hf_config and hf_config[theirs] != mine]
    if model.kv_channels * model.num_attention_heads != model.hidden_size:
        wrong.append(f"model.head_dim={model.kv_channels}: HF layouts use hidden/heads")
    if wrong:
        raise ValueError("the YAML model does not match the HF checkpoint: " + "; ".join(wrong))


def official_config(model: ModelConfig, dtype: torch.dtype, eod_id: int | None = None) -> dict:
    """config.json of the official SpikingBrain-7B class for ``model``.

    The official config class ignores ``attn_layers`` and always puts softmax attention on
    odd layers, so only that layout is exported faithfully; others are refused.
    """
    mixers = [mixer for mixer, _ in model.layers]
    expected = ["L" if i % 2 == 0 else "W" for i in range(len(mixers))]
    if mixers != expected:
        raise ValueError(f"the official gla_swa class fixes GLA on even and SWA on odd layers; "
                         f"pattern {model.pattern!r} cannot be exported to it")
    if model.gla.gate_normalizer != 16 or model.gla.gate_rank != 16 or model.gla.feature_map != "relu":
        raise ValueError("the official gla_swa class fixes gate rank 16, normalizer 16 and ReLU")
    return {
        "architectures": ["GLAswaForCausalLM"], "model_type": "gla_swa",
        "attn_layers": list(range(1, len(mixers), 2)), "attn_mode": "chunk",
        "use_short_conv": False, "conv_size": 4, "attention_dropout": 0.0,
        "hidden_size": model.hidden_size, "intermediate_size": model.ffn_hidden_size,
        "hidden_act": "swish", "num_hidden_layers": len(mixers),
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups,
        "sliding_window": model.sliding_window,
        "max_position_embeddings": model.max_position_embeddings,
        "rope_theta": model.rope_theta, "norm_eps": model.norm_eps, "elementwise_affine": True,
        "vocab_size": model.vocab_size, "tie_word_embeddings": not model.untie_embeddings,
        "initializer_range": model.init_method_std, "fuse_cross_entropy": True,
        "use_cache": True, "torch_dtype": str(dtype).removeprefix("torch."),
        **({"bos_token_id": eod_id, "eos_token_id": eod_id} if eod_id is not None else {}),
    }
