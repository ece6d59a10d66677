"""Pattern string -> one Megatron ModuleSpec per layer (local, non-TE modules)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

from sbtrain.config.schema import MIXER_SYMBOLS, ModelConfig, SpikingConfig

# mixer symbol -> function(model_cfg, ffn_symbol) -> ModuleSpec of a whole TransformerLayer.
_LAYER_BUILDERS: dict[str, Callable] = {}


def register_mixer(symbol: str) -> Callable[[Callable], Callable]:
    """Register the layer-spec builder for a mixer symbol (this module registers the built-in
    ones; the registry is local to this module, so importing it changes nothing else)."""

    def wrap(fn: Callable) -> Callable:
        _LAYER_BUILDERS[symbol] = fn
        return fn

    return wrap


def _local_layer(model: ModelConfig, ffn: str):
    """Megatron's local (non-TE) layer spec: RMSNorm, SelfAttention, MLP or MoE, with
    ``ops.swiglu`` as the activation of every MLP (dense, shared expert, each expert)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    layer = get_gpt_layer_local_spec(
        num_experts=model.moe.num_experts if ffn == "E" else None,
        moe_grouped_gemm=False,
        normalization="RMSNorm",
    )
    return _with_grouped_experts(_with_swiglu(layer))


def _with_grouped_experts(layer):
    """``layer`` with an MoE's routed experts built as ``GroupedExperts`` (one grouped GEMM
    per projection, SequentialMLP's parameters and checkpoint keys); other layers unchanged."""
    from sbtrain.model.experts import GroupedExperts

    mlp = layer.submodules.mlp
    moe = mlp.keywords.get("submodules") if isinstance(mlp, functools.partial) else None
    if moe is None or not hasattr(moe, "experts"):
        return layer
    experts = functools.partial(GroupedExperts, *moe.experts.args, **moe.experts.keywords)
    mlp = functools.partial(mlp.func, *mlp.args,
                            **{**mlp.keywords, "submodules": dataclasses.replace(moe, experts=experts)})
    return dataclasses.replace(layer, submodules=dataclasses.replace(layer.submodules, mlp=mlp))


def _with_swiglu(spec):
    """A copy of a spec tree whose every ``MLPSubmodules`` has ``activation_func=SwiGLU``.

    Megatron applies that module to the whole [.., 2F] fc1 output because the config sets
    ``use_te_activation_func`` (megatron_config.py); an MLP left without it would apply
    plain silu to 2F columns and fail in fc2. Walks ModuleSpecs, submodule dataclasses and
    ``functools.partial`` builders, as ``sbtrain.spiking.layers.with_spiking_linears`` does.
    """
    from megatron.core.transformer.mlp import MLPSubmodules

    from ops.swiglu import SwiGLU

    if isinstance(spec, MLPSubmodules):
        return dataclasses.replace(spec, activation_func=SwiGLU)
    if isinstance(spec, functools.partial):
        keywords = {k: _with_swiglu(v) for k, v in spec.keywords.items()}
        return functools.partial(spec.func, *spec.args, **keywords)
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        changes = {f.name: _with_swiglu(getattr(spec, f.name))
                   for f in dataclasses.fields(spec) if f.init}
        return dataclasses.replace(spec, **changes)
    return spec


def _with_mixer(layer, mixer_spec):
    """``layer`` with its self-attention spec replaced (the rest of the layer is kept)."""
    submodules = dataclasses.replace(layer.submodules, self_attention=mixer_spec)
    return dataclasses.replace(layer, submodules=submodules)


def _softmax_layer(model: ModelConfig, ffn: str, window: int | None):
    from sbtrain.model.core_attention import SoftmaxCoreAttention

    layer = _local_layer(model, ffn)
    attention = layer.submodules.self_attention
    core = functools.partial(SoftmaxCoreAttention, window=window, sink_tokens=model.sink_tokens)
    attention = dataclasses.replace(
        attention, submodules=dataclasses.replace(attention.submodules, core_attention=core))
    return _with_mixer(layer, attention)


def _full_attention_layer(model: ModelConfig, ffn: str):
    return _softmax_layer(model, ffn, window=None)


def _sliding_window_layer(model: ModelConfig, ffn: str):
    return _softmax_layer(model, ffn, window=model.sliding_window)


def _gla_layer(model: ModelConfig, ffn: str):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.spec_utils import ModuleSpec

    from sbtrain.model.gla import GatedLinearAttention, ProjectionSubmodules

    gla = ModuleSpec(
        module=GatedLinearAttention,
        params=dict(gate_rank=model.gla.gate_rank, gate_normalizer=model.gla.gate_normalizer,
                    feature_map=model.gla.feature_map, add_qkv_bias=model.qkv_bias,
                    sink_tokens=model.sink_tokens),
        submodules=ProjectionSubmodules(linear_qkv=ColumnParallelLinear,
                                        linear_proj=RowParallelLinear),
    )
    return _with_mixer(_local_layer(model, ffn), gla)


def _parallel_hybrid_layer(model: ModelConfig, ffn: str, window: int | None):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.spec_utils import ModuleSpec

    from sbtrain.model.gla import ProjectionSubmodules
    from sbtrain.model.parallel_hybrid import ParallelHybridAttention

    mixer = ModuleSpec(
        module=ParallelHybridAttention,
        params=dict(window=window, shared_projections=model.hybrid.shared_projections,
                    sink_tokens=model.sink_tokens, add_qkv_bias=model.qkv_bias),
        submodules=ProjectionSubmodules(linear_qkv=ColumnParallelLinear,
                                        linear_proj=RowParallelLinear),
    )
    return _with_mixer(_local_layer(model, ffn), mixer)


register_mixer("*")(_full_attention_layer)
register_mixer("W")(_sliding_window_layer)
register_mixer("L")(_gla_layer)
register_mixer("H")(lambda model, ffn: _parallel_hybrid_layer(model, ffn, model.sliding_window))
register_mixer("F")(lambda model, ffn: _parallel_hybrid_layer(model, ffn, None))


def build_layer_specs(model: ModelConfig, spiking: SpikingConfig | None = None) -> list:
    """One TransformerLayer spec per layer of ``model.pattern`` (spiking linears if enabled)."""
    neuron = None
    if spiking is not None and spiking.enabled:
        from sbtrain.spiking.layers import Neuron

        neuron = Neuron(spiking.k, spiking.vth_min, spiking.vth_max)
    specs = []
    for index, (mixer, ffn) in enumerate(model.layers):
        if mixer not in _LAYER_BUILDERS:
            raise NotImplementedError(
                f"layer {index}: mixer {mixer!r} ({MIXER_SYMBOLS[mixer]}) has no implementation "
                f"yet; available: {sorted(_LAYER_BUILDERS)}"
            )
        spec = _LAYER_BUILDERS[mixer](model, ffn)
        specs.append(spec if neuron is None else _spiking(spec, neuron))
    return specs


def _spiking(layer, neuron):
    """Spiking parallel linears everywhere, plus the neuron on GLA's gate input and on
    sliding-window queries (SpikingBrain's W8ASpike spikes exactly these inputs)."""
    from sbtrain.model.gla import GatedLinearAttention
    from sbtrain.model.parallel_hybrid import ParallelHybridAttention
    from sbtrain.spiking.layers import with_spiking_linears

    layer = with_spiking_linears(layer, neuron)
    mixer = layer.submodules.self_attention
    if mixer.module is GatedLinearAttention:
        mixer = dataclasses.replace(mixer, params={**mixer.params, "input_neuron": neuron})
    elif mixer.module is ParallelHybridAttention:
        if mixer.params["window"] is not None:
            mixer = dataclasses.replace(mixer, params={**mixer.params, "query_neuron": neuron})
    else:
        core = mixer.submodules.core_attention
        if isinstance(core, functools.partial) and core.keywords.get("window") is not None:
            core = functools.partial(core, query_neuron=neuron)
            mixer = dataclasses.replace(
                mixer, submodules=dataclasses.replace(mixer.submodules, core_attention=core))
    return _with_mixer(layer, mixer)
