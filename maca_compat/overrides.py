"""Megatron-core internals our classes rely on, beside the patch list (``patches.py``).

``patches.py`` rebinds megatron-core names at run time. The entries below change nothing in
megatron-core: they are our subclasses and attribute swaps that depend on how megatron-core
0.19.2 (``MEGATRON_CORE_VERSION``) is built inside: private methods we override, private
tuples we index, attributes we replace after construction. Each entry says what it relies on,
why we depend on it, and the test in ``tests/maca_compat/test_overrides.py`` that pins it
(reads megatron-core's code or signature, so an upgrade that moves it fails there first).

``check_megatron_version()`` (called by ``maca_compat.runtime.setup``) warns when the
installed megatron-core is not the version this list and the patch list were reviewed
against.
"""

from __future__ import annotations

import dataclasses
import logging

from maca_compat.patches import MEGATRON_CORE_VERSION

logger = logging.getLogger("sbtrain.maca_compat")


@dataclasses.dataclass(frozen=True)
class Override:
    """One dependency on megatron-core internals."""

    ours: str
    """Our class or function (dotted)."""
    theirs: str
    """The megatron-core name it depends on (dotted)."""
    relies_on: str
    reason: str
    test: str
    """The test in tests/maca_compat/test_overrides.py that pins ``relies_on``."""


_GPT = "megatron.core.models.gpt.gpt_model.GPTModel"
OVERRIDES: tuple[Override, ...] = (
    Override(
        "sbtrain.model.sinks.SinkTokenGPTModel._preprocess", f"{_GPT}._preprocess",
        "private; GPTModel.forward calls it with input_ids first and unpacks its tuple, whose "
        "index 5 is the MoE padding mask (replaced by ours)",
        "under sequence parallelism the sink tokens must count once in the MoE load-balancing "
        "statistics; the padding mask is the only input that excludes tokens from them",
        "test_preprocess_tuple_index_5_is_the_padding_mask"),
    Override(
        "sbtrain.model.sinks.SinkTokenGPTModel._postprocess", f"{_GPT}._postprocess",
        "private; receives the decoder output as hidden_states [s, b, h] before the output "
        "layer and the loss",
        "the sink positions are dropped before the logits, so the loss covers real tokens",
        "test_postprocess_receives_the_decoder_output_first"),
    Override(
        "sbtrain.model.sinks.SinkTokenGPTModel._prepend_sinks", f"{_GPT}.embedding",
        "a forward hook on GPTModel.embedding: _preprocess embeds before it computes the RoPE "
        "length from the embedded sequence",
        "RoPE and every layer must see S + T positions without copying Megatron's _preprocess",
        "test_rope_length_is_computed_after_the_embedding"),
    Override(
        "parallel.sequence.install_slice_rotary", f"{_GPT}.rotary_pos_emb",
        "GPTModel._preprocess calls self.rotary_pos_emb (the attribute, looked up per call), "
        "so a module swapped in after construction is used",
        "under sequence parallelism each rank needs RoPE at its slice's global positions",
        "test_rotary_embedding_is_looked_up_per_call"),
    Override(
        "sbtrain.model.experts.GroupedExperts.forward",
        "megatron.core.transformer.moe.experts.SequentialMLP.forward",
        "the forward signature (permuted_local_hidden_states, tokens_per_expert, "
        "permuted_probs) and SequentialMLP.local_experts[i].linear_fc1/linear_fc2",
        "one grouped GEMM over SequentialMLP's parameters and checkpoint layout",
        "test_sequential_mlp_forward_and_experts"),
    Override(
        "sbtrain.model.core_attention.SoftmaxCoreAttention",
        "megatron.core.transformer.attention.Attention.__init__",
        "Attention builds its core_attention slot with the keywords config, layer_number, "
        "attn_mask_type, attention_type, cp_comm_type, softmax_scale, pg_collection and calls "
        "it as (query, key, value, attention_mask, attn_mask_type=, attention_bias=, "
        "packed_seq_params=)",
        "sliding windows, sinks, documents and SP need sbtrain's attention op inside "
        "Megatron's SelfAttention (its projections, RoPE and checkpoint keys stay stock)",
        "test_core_attention_slot_protocol"),
    Override(
        "sbtrain.model.gla.GatedLinearAttention.forward",
        "megatron.core.transformer.transformer_layer.TransformerLayer._forward_attention",
        "TransformerLayer calls its self_attention slot as (hidden_states, attention_mask=, "
        "rotary_pos_emb=, ...) and feeds the (output, bias) result to self_attn_bda; "
        "ParallelHybridAttention.forward relies on the same",
        "GLA and the parallel-hybrid mixer fill the self_attention slot of a stock layer",
        "test_self_attention_slot_protocol"),
    Override(
        "sbtrain.model.recompute.install_ffn_activation_recompute",
        "megatron.core.transformer.mlp.MLP.forward",
        "with use_te_activation_func MLP.forward applies self.activation_func (looked up per "
        "call, so a module swapped in after construction is used) to the whole fc1 output and "
        "calls self.linear_fc2 as a module (its forward hooks run)",
        "selective recompute drops the SwiGLU product after fc2 without copying MLP.forward",
        "test_mlp_activation_and_fc2_are_looked_up_per_call"),
    Override(
        "sbtrain.spiking.layers.spiking_linear",
        "megatron.core.tensor_parallel.layers.RowParallelLinear.forward",
        "Column/RowParallelLinear.forward take the input first (input_); the layers keep "
        "tp_group, and RowParallelLinear input_is_parallel, as attributes",
        "the neuron spikes a linear's input in a subclass, TP-aware for row-parallel inputs",
        "test_parallel_linear_input_and_attributes"),
    Override(
        "sbtrain.trainer._chunked_loss", f"{_GPT}._postprocess",
        "with output_processor, _postprocess returns output_processor(hidden_states=, "
        "output_layer=, output_weight=, labels=, ...) instead of the logits / loss",
        "train.loss_chunk_tokens computes the loss from the hidden states without logits",
        "test_output_processor_keywords"),
    Override(
        "sbtrain.model.spec_provider.SpecProvider.layer",
        "megatron.core.models.gpt.gpt_layer_specs.get_gpt_layer_local_submodules",
        "the layer around the mixer (norm classes, bias-dropout-add, "
        "sharded_state_dict_keys_map, SelfAttention's params) is the one "
        "get_gpt_layer_local_spec builds for RMSNorm",
        "checkpoint keys and numerics of stock local GPT layers, with sbtrain's slots filled",
        "test_provider_layer_matches_the_local_gpt_layer"),
    Override(
        "sbtrain.model.batch.BatchContext", "megatron.core.packed_seq_params.PackedSeqParams",
        "GPTModel forwards packed_seq_params untouched to every layer's self_attention and core "
        "attention (full recompute by keyword, not saved as a tensor) and reads only qkv_format, "
        "cp_group, max_seqlen_q/kv (RoPE length), tokens_per_sample and, for qkv_format 'thd' "
        "only, cu_seqlens_*",
        "the per-micro-batch context (documents, SP metadata) reaches every mixer through "
        "Megatron's per-batch carrier, built once instead of per layer",
        "test_packed_seq_params_reads"),
    Override(
        "ops.main_grad.grad_for_autograd",
        "megatron.core.distributed.distributed_data_parallel.DistributedDataParallel."
        "_make_backward_post_hook",
        "DDP's hook on each parameter's AccumulateGrad adds param.grad into param.main_grad unless "
        "param.grad_added_to_main_grad (and not zero_out_wgrad), then sets param.grad = None; "
        "DDP sets grad_added_to_main_grad = False on every trained parameter in __init__ and "
        "zero_grad_buffer, and main_grad is a view of its buffer",
        "gradient-accumulation fusion in ops.loss and ops.grouped_mlp: the weight gradients go "
        "into main_grad in the op and DDP's add is skipped, Megatron's own protocol",
        "test_ddp_hook_skips_fused_main_grads"),
    Override(
        "sbtrain.trainer._chunked_loss",
        "megatron.core.tensor_parallel.layers.ColumnParallelLinear.__init__",
        "the output layer keeps config.gradient_accumulation_fusion as its "
        "gradient_accumulation_fusion attribute; LanguageModule.setup_embeddings_and_output_layer "
        "marks the embedding shared with the output layer on one stage zero_out_wgrad",
        "the chunked loss fuses exactly when Megatron's output layer would, and a tied "
        "embedding's own gradient still reaches main_grad",
        "test_output_layer_fusion_flag_and_tied_zero_out"),
)


def installed_megatron_version() -> str:
    """megatron-core's version without a local build tag (``0.19.2+f6a5b40`` -> ``0.19.2``)."""
    from megatron.core import package_info  # deferred: costs seconds; only at setup

    return package_info.__version__.split("+")[0]


def check_megatron_version(installed: str | None = None) -> str | None:
    """Warn (and return the message) when megatron-core is not the reviewed version."""
    installed = installed or installed_megatron_version()
    if installed == MEGATRON_CORE_VERSION:
        return None
    message = (f"megatron-core {installed} is installed; sbtrain's patch list "
               f"(maca_compat/patches.py) and its dependencies on megatron-core internals "
               f"(maca_compat/overrides.py) were reviewed against {MEGATRON_CORE_VERSION}: "
               f"run tests/maca_compat before trusting a run, or install "
               f"megatron-core=={MEGATRON_CORE_VERSION}")
    logger.warning(message)
    return message
