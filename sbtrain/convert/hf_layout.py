"""sbtrain's one-process state dict <-> the weight names of ``sbtrain.hf`` (every pattern).

The names extend the official SpikingBrain-7B layout (``sbtrain.convert.mapping``) to the
76B-style layers; ``sbtrain/hf/modeling_spikingbrain.py`` documents them. A model whose
pattern the official class holds (GLA on even, SWA on odd layers, dense, no sinks, the
official gate) is written as ``model_type: gla_swa``; every other one as
``spikingbrain_hybrid``. Both directions are pure renames and splits (lossless).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from sbtrain.config.schema import ModelConfig
from sbtrain.convert.mapping import fuse_qkv, official_config, split_qkv

MIXER_TYPES = {"L": "gla", "W": "sliding_attention", "*": "full_attention",
               "H": "hybrid_sliding", "F": "hybrid_full"}
AUTO_MAP = {
    "gla_swa": {"AutoConfig": "configuration_spikingbrain.GLAswaConfig",
                "AutoModelForCausalLM": "modeling_spikingbrain.GLAswaForCausalLM"},
    "spikingbrain_hybrid": {"AutoConfig": "configuration_spikingbrain.SpikingBrainConfig",
                            "AutoModelForCausalLM": "modeling_spikingbrain.SpikingBrainForCausalLM"},
}


def is_official_layout(model: ModelConfig) -> bool:
    """True when the official ``GLAswaForCausalLM`` can hold ``model`` unchanged."""
    try:
        official_config(model, torch.bfloat16)
    except ValueError:
        return False
    # the official class derives head_dim = hidden / heads and always has q/k/v biases
    head_dim_implied = model.kv_channels * model.num_attention_heads == model.hidden_size
    return not model.sink_tokens and model.qkv_bias and head_dim_implied


def hf_config(model: ModelConfig, dtype: torch.dtype, token_ids: dict[str, int]) -> dict:
    """config.json (with ``auto_map``) of the HF directory exported from ``model``."""
    if is_official_layout(model):
        config = official_config(model, dtype)
    else:
        config = _hybrid_config(model, dtype)
    config["auto_map"] = AUTO_MAP[config["model_type"]]
    config.update(token_ids)
    return config


def _hybrid_config(model: ModelConfig, dtype: torch.dtype) -> dict:
    moe = model.moe
    return {
        "architectures": ["SpikingBrainForCausalLM"], "model_type": "spikingbrain_hybrid",
        "mixer_types": [MIXER_TYPES[m] for m, _ in model.layers],
        "mlp_types": ["moe" if f == "E" else "dense" for _, f in model.layers],
        "hidden_size": model.hidden_size, "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers, "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups, "head_dim": model.kv_channels,
        "sliding_window": model.sliding_window,
        "max_position_embeddings": model.max_position_embeddings, "rope_theta": model.rope_theta,
        "norm_eps": model.norm_eps, "attention_bias": model.qkv_bias,
        "gate_low_rank_dim": model.gla.gate_rank,
        "gate_logit_normalizer": model.gla.gate_normalizer, "feature_map": model.gla.feature_map,
        "shared_projections": model.hybrid.shared_projections,
        "num_sink_tokens": model.sink_tokens, "num_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "moe_intermediate_size": moe.expert_ffn_hidden_size or model.ffn_hidden_size,
        "shared_expert_intermediate_size": model.ffn_hidden_size if moe.shared_expert else None,
        "router_pre_softmax": moe.top_k == 1, "vocab_size": model.vocab_size,
        "tie_word_embeddings": not model.untie_embeddings,
        "initializer_range": model.init_method_std, "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def _layer_pairs(model: ModelConfig, i: int, mixer: str, ffn: str) -> list[tuple[str, str, str]]:
    """(sbtrain name, HF name, how) for layer ``i``; ``how`` is ``copy``, ``qkv:<part>`` (one
    of q/k/v of a fused projection), ``fc1:<part>`` (gate/up of a fused SwiGLU fc1)."""
    src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
    attn, hf = src + "self_attention.", dst + "attn."
    pairs = [(src + "input_layernorm.weight", dst + "attn_norm.weight", "copy"),
             (src + "pre_mlp_layernorm.weight", dst + "mlp_norm.weight", "copy")]
    branches = [("", "")]
    if mixer in "HF" and not model.hybrid.shared_projections:
        branches.append(("softmax_branch.", "softmax_"))
    for ours, theirs in branches:
        for kind in ("weight", "bias") if model.qkv_bias else ("weight",):
            pairs += [(f"{attn}{ours}linear_qkv.{kind}", f"{hf}{theirs}{p}_proj.{kind}", f"qkv:{p}")
                      for p in "qkv"]
        pairs.append((f"{attn}{ours}linear_proj.weight", f"{hf}{theirs}o_proj.weight", "copy"))
    if mixer == "L":
        pairs += [(attn + "gate_down.weight", hf + "gk_proj.0.weight", "copy"),
                  (attn + "gate_up.weight", hf + "gk_proj.1.weight", "copy"),
                  (attn + "gate_up.bias", hf + "gk_proj.1.bias", "copy"),
                  (attn + "g_norm_weight", hf + "g_norm.weight", "copy")]
    if mixer in "HF":
        pairs += [(attn + "linear_norm_weight", hf + "linear_norm.weight", "copy"),
                  (attn + "softmax_norm_weight", hf + "softmax_norm.weight", "copy")]
    mlps = [(src + "mlp.", dst + "mlp.")]
    if ffn == "E":
        pairs.append((src + "mlp.router.weight", dst + "mlp.router.weight", "copy"))
        mlps = [(f"{src}mlp.experts.local_experts.{e}.", f"{dst}mlp.experts.{e}.")
                for e in range(model.moe.num_experts)]
        if model.moe.shared_expert:
            mlps.append((src + "mlp.shared_experts.", dst + "mlp.shared_expert."))
    for ours, theirs in mlps:
        pairs += [(ours + "linear_fc1.weight", theirs + "gate_proj.weight", "fc1:gate"),
                  (ours + "linear_fc1.weight", theirs + "up_proj.weight", "fc1:up"),
                  (ours + "linear_fc2.weight", theirs + "down_proj.weight", "copy")]
    return pairs


def name_pairs(model: ModelConfig) -> list[tuple[str, str, str]]:
    """Every (sbtrain name, HF name, how) of ``model``, in export order."""
    pairs = [("embedding.word_embeddings.weight", "model.embeddings.weight", "copy")]
    if model.sink_tokens:
        pairs.append(("sink_tokens", "model.sink_tokens", "copy"))
    for i, (mixer, ffn) in enumerate(model.layers):
        pairs += _layer_pairs(model, i, mixer, ffn)
    pairs.append(("decoder.final_layernorm.weight", "model.norm.weight", "copy"))
    if model.untie_embeddings:
        pairs.append(("output_layer.weight", "lm_head.weight", "copy"))
    return pairs


def _part(tensor: torch.Tensor, how: str, model: ModelConfig) -> torch.Tensor:
    if how == "copy":
        return tensor
    kind, part = how.split(":")
    if kind == "qkv":
        q, k, v = split_qkv(tensor, model.num_query_groups, model.kv_channels)
        return {"q": q, "k": k, "v": v}[part]
    gate, up = tensor.chunk(2)
    return gate if part == "gate" else up


def iter_hf_tensors(state: dict[str, torch.Tensor], model: ModelConfig,
                    dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor in ``dtype``) one at a time: the export never holds a converted copy
    of the whole model."""
    for ours, theirs, how in name_pairs(model):
        yield theirs, _part(state[ours], how, model).to(dtype).contiguous()


def hf_to_sbtrain_state(hf: dict[str, torch.Tensor], model: ModelConfig,
                        source: str = "the HF directory") -> dict[str, torch.Tensor]:
    """Inverse of :func:`iter_hf_tensors`; a missing HF tensor names the key and ``source``."""
    def get(name: str) -> torch.Tensor:
        if name not in hf:
            raise KeyError(f"{source}: tensor {name!r} is missing (pattern {model.pattern!r})")
        return hf[name]

    groups: dict[str, dict[str, torch.Tensor]] = {}
    for ours, theirs, how in name_pairs(model):
        groups.setdefault(ours, {})[how] = get(theirs)
    out = {}
    for ours, parts in groups.items():
        if "copy" in parts:
            out[ours] = parts["copy"]
        elif "fc1:gate" in parts:
            out[ours] = torch.cat([parts["fc1:gate"], parts["fc1:up"]])
        else:
            out[ours] = fuse_qkv(parts["qkv:q"], parts["qkv:k"], parts["qkv:v"],
                                 model.num_query_groups)
    if not model.untie_embeddings and "lm_head.weight" in hf:
        raise ValueError(f"{source}: has lm_head.weight but model.untie_embeddings is false")
    return out


def check_hybrid_matches(config: dict, model: ModelConfig, source: str) -> None:
    """A ``spikingbrain_hybrid`` config.json must describe ``model``'s layout key by key."""
    expected = _hybrid_config(model, torch.float32)
    keys = ("mixer_types", "mlp_types", "num_sink_tokens", "shared_projections", "num_experts",
            "num_experts_per_tok", "head_dim", "feature_map")
    wrong = [f"{key}={config.get(key)!r}, the YAML gives {expected[key]!r}"
             for key in keys if key in config and config[key] != expected[key]]
    if wrong:
        raise ValueError(f"{source}/config.json does not match the YAML model: " + "; ".join(wrong))


def check_shapes(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                 model: ModelConfig, source: str) -> None:
    """One line naming the HF tensor whose shape the YAML model cannot take."""
    hf_names: dict[str, list[str]] = {}
    for ours, theirs, _ in name_pairs(model):
        hf_names.setdefault(ours, []).append(theirs)
    for key, tensor in state.items():
        if key in expected and tuple(tensor.shape) != tuple(expected[key].shape):
            names = "/".join(hf_names.get(key, [key]))
            raise ValueError(f"{source}: {names} converts to shape {tuple(tensor.shape)}, the "
                             f"YAML model's {key} is {tuple(expected[key].shape)}")
