"""Which class fills each slot of a layer: the one place that decides (pattern -> layer specs).

Modelled on Megatron-Core's ``BackendSpecProvider`` (``megatron/core/models/backends.py``):
:class:`SpecProvider` answers Megatron's questions (which column/row parallel linear, which
norm, which activation, which experts) and ours (which mixer for a pattern symbol, with which
parameters). With the spiking neuron on (``spiking.enabled``), the linears it returns are the
spiking ones and the mixers get the neuron for the sites they declare; nothing rewrites a spec
after it is built.

How parameters travel follows how Megatron builds each slot: ``ModuleSpec(params=...)`` where
Megatron calls ``build_module`` (the ``self_attention`` mixer), a ``functools.partial`` where it
calls the builder directly (``core_attention``, the MLP / MoE and the routed experts).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import BackendSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from ops.swiglu import SwiGLU
from sbtrain.config.schema import MIXER_SYMBOLS, ModelConfig, SpikingConfig
from sbtrain.model.core_attention import SoftmaxCoreAttention
from sbtrain.model.experts import GroupedExperts
from sbtrain.model.gla import GatedLinearAttention, ProjectionSubmodules
from sbtrain.model.parallel_hybrid import ParallelHybridAttention
from sbtrain.spiking.layers import Neuron, spiking_linear


class SpecProvider(BackendSpecProvider):
    """The modules of one model: local (non-TE) Megatron modules, ``ops.swiglu`` in every MLP,
    ``GroupedExperts`` as routed experts, sbtrain's mixers; spiking linears when ``neuron``.
    """

    routed_experts: type = GroupedExperts
    """The MoE's experts slot (a test swaps in Megatron's SequentialMLP to compare keys)."""

    def __init__(self, model: ModelConfig, neuron: Neuron | None = None,
                 softmax_exchanges: dict[str, str] | None = None) -> None:
        self.model = model
        self.neuron = neuron
        self.softmax_exchanges = softmax_exchanges or {"window": "tails", "full": "tails"}
        """How softmax mixers exchange under sp > 1, per layer kind (``window``, ``full``):
        parallel.sp_softmax_exchange resolved (``sbtrain.profiler.comm.softmax_exchanges``)."""

    def _exchange(self, window: int | None) -> str:
        return self.softmax_exchanges["full" if window is None else "window"]

    # -- Megatron's BackendSpecProvider questions -------------------------------------------
    def column_parallel_linear(self) -> type:
        return self._linear(ColumnParallelLinear)

    def row_parallel_linear(self) -> type:
        return self._linear(RowParallelLinear)

    def _linear(self, base: type) -> type:
        return base if self.neuron is None else spiking_linear(base, self.neuron)

    def fuse_layernorm_and_linear(self) -> bool:
        return False

    def column_parallel_layer_norm_linear(self) -> type | None:
        return None

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False,
                   has_residual: bool = False) -> type:
        # What get_gpt_layer_local_spec picks for RMSNorm (LocalSpecProvider's own answer
        # rebinds a module global on the way); sbtrain's models are RMSNorm throughout.
        return WrappedTorchNorm

    def core_attention(self, window: int | None = None) -> Callable:
        """Softmax core attention; sliding-window layers spike their queries (W8ASpike)."""
        return functools.partial(SoftmaxCoreAttention, window=window,
                                 sink_tokens=self.model.sink_tokens,
                                 query_neuron=self._window_neuron(window),
                                 softmax_exchange=self._exchange(window))

    def grouped_mlp_modules(self, moe_use_grouped_gemm: bool) -> Callable:
        """Routed experts: SequentialMLP's parameters, one grouped GEMM (``GroupedExperts``)."""
        return functools.partial(self.routed_experts, submodules=self._mlp_submodules())

    def activation_func(self) -> type:
        # Megatron applies this module to the whole [.., 2F] fc1 output because the config
        # sets use_te_activation_func (megatron_config.py); plain silu would fail in fc2.
        return SwiGLU

    # -- sbtrain's slots ----------------------------------------------------------------------
    def _mlp_submodules(self) -> MLPSubmodules:
        return MLPSubmodules(linear_fc1=self.column_parallel_linear(),
                             linear_fc2=self.row_parallel_linear(),
                             activation_func=self.activation_func())

    def _window_neuron(self, window: int | None) -> Neuron | None:
        return self.neuron if window is not None else None

    def _projections(self) -> ProjectionSubmodules:
        return ProjectionSubmodules(linear_qkv=self.column_parallel_linear(),
                                    linear_proj=self.row_parallel_linear())

    def softmax_attention(self, window: int | None) -> ModuleSpec:
        """Megatron's SelfAttention around sbtrain's core attention (``*``, ``W``)."""
        return ModuleSpec(
            module=SelfAttention,
            params={"attn_mask_type": AttnMaskType.causal},
            submodules=SelfAttentionSubmodules(
                linear_qkv=self.column_parallel_linear(), core_attention=self.core_attention(window),
                linear_proj=self.row_parallel_linear(), q_layernorm=IdentityOp,
                k_layernorm=IdentityOp))

    def gated_linear_attention(self) -> ModuleSpec:
        """SpikingBrain-7B's GLA (``L``); the neuron spikes its gate's input."""
        gla = self.model.gla
        return ModuleSpec(
            module=GatedLinearAttention,
            params=dict(gate_rank=gla.gate_rank, gate_normalizer=gla.gate_normalizer,
                        feature_map=gla.feature_map, add_qkv_bias=self.model.qkv_bias,
                        sink_tokens=self.model.sink_tokens, input_neuron=self.neuron),
            submodules=self._projections())

    def parallel_hybrid(self, window: int | None) -> ModuleSpec:
        """The 76B's linear + softmax mixer (``H`` with a window, ``F`` without)."""
        return ModuleSpec(
            module=ParallelHybridAttention,
            params=dict(window=window, shared_projections=self.model.hybrid.shared_projections,
                        sink_tokens=self.model.sink_tokens, add_qkv_bias=self.model.qkv_bias,
                        query_neuron=self._window_neuron(window),
                        softmax_exchange=self._exchange(window)),
            submodules=self._projections())

    def mlp(self, ffn: str) -> Callable:
        """Dense MLP (``-``) or MoE (``E``: routed experts plus the shared expert)."""
        return get_mlp_module_spec_for_backend(
            backend=self, num_experts=self.model.moe.num_experts if ffn == "E" else None,
            moe_grouped_gemm=False, use_te_activation_func=True)

    def layer(self, mixer: str, ffn: str) -> ModuleSpec:
        """One TransformerLayer: RMSNorm, the mixer of ``mixer``, RMSNorm, the FFN of ``ffn``."""
        norm = self.layer_norm(rms_norm=True, has_residual=True)
        return ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=MIXERS[mixer](self),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=self.mlp(ffn),
            mlp_bda=get_bias_dropout_add,
            # get_gpt_layer_local_spec's map (checkpoint keys of TE-fused layouts)
            sharded_state_dict_keys_map={
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
            }))


# mixer symbol -> the provider's spec of the layer's self_attention slot
MIXERS: dict[str, Callable[[SpecProvider], ModuleSpec]] = {
    "*": lambda p: p.softmax_attention(window=None),
    "W": lambda p: p.softmax_attention(window=p.model.sliding_window),
    "L": SpecProvider.gated_linear_attention,
    "H": lambda p: p.parallel_hybrid(window=p.model.sliding_window),
    "F": lambda p: p.parallel_hybrid(window=None),
}


def build_layer_specs(model: ModelConfig, spiking: SpikingConfig | None = None,
                      softmax_exchanges: dict[str, str] | None = None) -> list:
    """One TransformerLayer spec per layer of ``model.pattern`` (spiking linears if enabled;
    ``softmax_exchanges``: the SP exchange per softmax layer kind, ``window`` and ``full``)."""
    neuron = None
    if spiking is not None and spiking.enabled:
        neuron = Neuron(spiking.k, spiking.vth_min, spiking.vth_max)
    provider = SpecProvider(model, neuron, softmax_exchanges)
    specs = []
    for index, (mixer, ffn) in enumerate(model.layers):
        if mixer not in MIXERS:
            raise NotImplementedError(
                f"layer {index}: mixer {mixer!r} ({MIXER_SYMBOLS[mixer]}) has no implementation "
                f"yet; available: {sorted(MIXERS)}")
        specs.append(provider.layer(mixer, ffn))
    return specs
