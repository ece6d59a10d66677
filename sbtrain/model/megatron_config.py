"""The one adapter from sbtrain's config sections to Megatron's TransformerConfig."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from maca_compat.platform import get_platform, grad_accum_fusion_enabled
from sbtrain.config.schema import RunConfig


def to_megatron_config(cfg: RunConfig, params_dtype: torch.dtype):
    """Map ``cfg`` onto a megatron ``TransformerConfig``; the rest of sbtrain reads only ours."""
    m, p = cfg.model, cfg.parallel
    moe = _moe_fields(cfg) if m.has_moe else {}
    recompute = recompute_fields(cfg.train.recompute)
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        ffn_hidden_size=m.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=m.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
        # Fusions need apex/TE or CUDA kernels; the plain paths are exact and portable.
        bias_activation_fusion=False,
        # Despite the name, no TE: every MLP applies the module in MLPSubmodules.activation_func
        # to the whole fc1 output; spec_provider puts ops.swiglu.SwiGLU there (Triton on GPUs).
        use_te_activation_func=True,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        # Weight gradients accumulated straight into DDP's fp32 main_grad (no bf16 wgrad + add)
        # where the platform has the GEMM for it; see maca_compat.fused_optim.wgrad_gemm_accum.
        gradient_accumulation_fusion=grad_accum_fusion_enabled(get_platform()),
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        expert_model_parallel_size=p.ep,
        context_parallel_size=p.sp,
        sequence_parallel=p.tp_sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        # Per-layer checkpoint keys (decoder.layers.<i>.*): hybrid patterns give layers different
        # parameters, which the default stacked [num_layers, ...] keys cannot describe.
        hetereogenous_dist_checkpoint=True,
        # Upstream bug: batched p2p with pp=2 on gloo swaps send_prev/send_next messages.
        batch_p2p_comm=False,
        **moe,
        **recompute,
    )


def recompute_fields(policy: str) -> dict:
    """TransformerConfig fields of a resolved ``train.recompute`` policy.

    ``full``: every layer keeps only its input (Megatron's uniform full recompute, one layer
    per checkpoint). ``selective``: granularity ``selective`` with no Megatron module; sbtrain's
    GLA / parallel-hybrid mixers see it and checkpoint their cores (``gla.checkpointed``), and
    the builder makes every dense FFN and shared expert drop its SwiGLU product until backward
    (``sbtrain.model.recompute``). Megatron's modules are left out: ``core_attn`` (SDPA-flash / flex keep only q/k/v, the
    output and the log-sum-exp, so recomputing the softmax core frees one q-sized tensor for a
    whole attention forward), ``mlp`` (recomputes both FFN GEMMs, nearly a full layer), and
    ``layernorm`` / ``moe_act``: megatron-core 0.19.2's ``CheckpointWithoutOutput`` sets
    ``self.fp8 = fp8 is not None``, so without fp8 it still takes its Transformer-Engine path
    (NameError: FP8GlobalStateManager); ``moe_act`` also needs grouped GEMM.
    """
    if policy == "full":
        return dict(recompute_granularity="full", recompute_method="uniform",
                    recompute_num_layers=1)
    if policy == "selective":
        return dict(recompute_granularity="selective", recompute_modules=[])
    if policy == "none":
        return {}
    raise ValueError(f"train.recompute {policy!r} must be resolved to none, selective or full "
                     "first (sbtrain.profiler.recompute.resolve_recompute)")


def _moe_fields(cfg: RunConfig) -> dict:
    m = cfg.model
    moe = m.moe
    return dict(
        num_moe_experts=moe.num_experts,
        moe_router_topk=moe.top_k,
        moe_ffn_hidden_size=moe.expert_ffn_hidden_size or m.ffn_hidden_size,
        moe_shared_expert_intermediate_size=m.ffn_hidden_size if moe.shared_expert else None,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=moe.aux_loss_coeff,
        moe_token_dispatcher_type=moe.dispatcher,
        # Top-1 routing needs the softmax before top-k, else every routed weight is 1.0.
        moe_router_pre_softmax=moe.top_k == 1,
        moe_grouped_gemm=False,
        moe_layer_freq=[1 if ffn == "E" else 0 for _, ffn in m.layers],
    )
