"""Pattern string -> one Megatron ModuleSpec per layer (local, non-TE modules)."""

from __future__ import annotations

from collections.abc import Callable

from sbtrain.config.schema import MIXER_SYMBOLS, ModelConfig

# mixer symbol -> function(model_cfg, ffn_symbol) -> ModuleSpec of a whole TransformerLayer.
_LAYER_BUILDERS: dict[str, Callable] = {}


def register_mixer(symbol: str) -> Callable[[Callable], Callable]:
    """Register the layer-spec builder for a mixer symbol (called explicitly, not on import)."""

    def wrap(fn: Callable) -> Callable:
        _LAYER_BUILDERS[symbol] = fn
        return fn

    return wrap


def _attention_layer(model: ModelConfig, ffn: str):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(
        num_experts=model.moe.num_experts if ffn == "E" else None,
        moe_grouped_gemm=False,
        normalization="RMSNorm",
    )


register_mixer("*")(_attention_layer)


def build_layer_specs(model: ModelConfig) -> list:
    """One TransformerLayer spec per layer of ``model.pattern``."""
    specs = []
    for index, (mixer, ffn) in enumerate(model.layers):
        if mixer not in _LAYER_BUILDERS:
            raise NotImplementedError(
                f"layer {index}: mixer {mixer!r} ({MIXER_SYMBOLS[mixer]}) has no implementation "
                f"yet; available: {sorted(_LAYER_BUILDERS)}"
            )
        specs.append(_LAYER_BUILDERS[mixer](model, ffn))
    return specs
