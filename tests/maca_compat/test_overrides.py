"""Pins what maca_compat/overrides.py says we rely on inside megatron-core: each test reads the
installed megatron-core's code or signatures, so an upgrade that moves a dependency fails here
(naming it) before a parity test fails for a reason that is hard to see. The behaviour built
on them is tested elsewhere (sinks: tests/model/test_parallel_hybrid.py and the 76B parity
runs; slice RoPE and the MoE padding mask: the SP parity runs in tests/parallel/plan.py;
grouped experts: tests/model/test_experts.py). Plus the startup version check."""

from __future__ import annotations

import ast
import inspect
import logging
import re
import textwrap

import pytest
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.moe.experts import SequentialMLP

from maca_compat.overrides import OVERRIDES, check_megatron_version, installed_megatron_version
from maca_compat.patches import MEGATRON_CORE_VERSION


def _source(function) -> str:
    return textwrap.dedent(inspect.getsource(function))


def _params(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_every_override_names_an_existing_pinning_test():
    tests = {name for name in globals() if name.startswith("test_")}
    assert {o.test for o in OVERRIDES} <= tests
    for override in OVERRIDES:
        assert override.relies_on and override.reason, override.ours


def test_preprocess_tuple_index_5_is_the_padding_mask():
    assert _params(GPTModel._preprocess)[:2] == ["self", "input_ids"]
    tree = ast.parse(_source(GPTModel._preprocess))
    tuples = [node.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
              and any(getattr(t, "id", None) == "preproc_output" for t in node.targets)
              and isinstance(node.value, ast.Tuple)]
    assert len(tuples) == 1, "GPTModel._preprocess no longer builds one preproc_output tuple"
    names = [getattr(e, "id", None) for e in tuples[0].elts]
    assert names.index("padding_mask") == 5, names
    # forward passes the padding mask on from that tuple (not from its own argument)
    assert "self._preprocess(" in _source(GPTModel.forward)


def test_postprocess_receives_the_decoder_output_first():
    assert _params(GPTModel._postprocess)[:2] == ["self", "hidden_states"]
    assert re.search(r"self\._postprocess\(\s*hidden_states=hidden_states,", _source(GPTModel.forward))


def test_rope_length_is_computed_after_the_embedding():
    source = _source(GPTModel._preprocess)
    embed = source.index("decoder_input = self.embedding(")
    rope_len = source.index("self.rotary_pos_emb.get_rotary_seq_len(")
    assert embed < rope_len
    assert "decoder_input, self.config" in source[rope_len:rope_len + 200]


def test_rotary_embedding_is_looked_up_per_call():
    source = _source(GPTModel._preprocess)
    assert "rotary_pos_emb = self.rotary_pos_emb(" in source
    assert "self.rotary_pos_emb = " in _source(GPTModel.__init__)


def test_sequential_mlp_forward_and_experts():
    assert _params(SequentialMLP.forward) == ["self", "permuted_local_hidden_states",
                                              "tokens_per_expert", "permuted_probs"]
    init = _source(SequentialMLP.__init__)
    assert "self.local_experts = torch.nn.ModuleList()" in init


def test_installed_megatron_is_the_reviewed_version():
    assert installed_megatron_version() == MEGATRON_CORE_VERSION
    assert check_megatron_version() is None


def test_another_megatron_version_warns_naming_both(caplog):
    with caplog.at_level(logging.WARNING, logger="sbtrain.maca_compat"):
        message = check_megatron_version("0.20.0")
    assert message and "megatron-core 0.20.0 is installed" in message
    assert f"reviewed against {MEGATRON_CORE_VERSION}" in message
    assert message in caplog.text


@pytest.mark.parametrize("override", OVERRIDES, ids=lambda o: o.ours.rsplit(".", 1)[-1])
def test_override_names_resolve(override):
    """Both sides of every entry exist (a rename on either side fails here)."""
    import importlib

    for dotted in (override.ours, override.theirs):
        parts = dotted.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
                break
            except ImportError:
                continue
        for attr in parts[cut:]:
            if attr == "embedding" or attr == "rotary_pos_emb":
                assert attr in _source(obj.__init__), dotted  # instance attributes
                break
            obj = getattr(obj, attr)


def test_setup_checks_the_version(monkeypatch, caplog):
    """``maca_compat.runtime.setup`` (every trainer and conversion start) runs the check."""
    from maca_compat import overrides, runtime
    from maca_compat.platform import get_platform

    monkeypatch.setattr(overrides, "installed_megatron_version", lambda: "0.20.0")
    monkeypatch.setattr(runtime, "apply_patches", lambda vendor: [])
    monkeypatch.setattr(runtime, "apply_comm_env", lambda platform, **kw: None)
    with caplog.at_level(logging.WARNING, logger="sbtrain.maca_compat"):
        runtime.setup(get_platform())
    assert "megatron-core 0.20.0 is installed" in caplog.text


def _call_keywords(function, callee: str) -> list[set[str]]:
    """Keyword names of every call in ``function`` whose callee's source text is ``callee``."""
    tree = ast.parse(_source(function))
    return [{k.arg for k in node.keywords} for node in ast.walk(tree)
            if isinstance(node, ast.Call) and ast.unparse(node.func) == callee]


def _accepts(function, names: set[str]) -> bool:
    params = inspect.signature(function).parameters
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return var_kw or names <= set(params)


def test_core_attention_slot_protocol():
    from megatron.core.transformer.attention import Attention, SelfAttention

    from sbtrain.model.core_attention import SoftmaxCoreAttention

    (build,) = _call_keywords(Attention.__init__, "submodules.core_attention")
    assert build == {"config", "layer_number", "attn_mask_type", "attention_type",
                     "cp_comm_type", "softmax_scale", "pg_collection"}
    assert _accepts(SoftmaxCoreAttention.__init__, build)
    # (_run_core_attention also forwards **extra_kwargs: empty unless a caller passes
    # core_attention_extra_kwargs, which SelfAttention does not)
    calls = [c - {None} for c in
             _call_keywords(Attention._run_core_attention, "apply_module(self.core_attention)")
             + _call_keywords(Attention.forward, "apply_module(self.core_attention)")]
    assert calls and all(c == {"attn_mask_type", "attention_bias", "packed_seq_params"}
                         for c in calls), calls
    assert _params(SoftmaxCoreAttention.forward)[:5] == ["self", "query", "key", "value",
                                                         "attention_mask"]
    assert _accepts(SoftmaxCoreAttention.forward, calls[0])
    assert issubclass(SelfAttention, Attention)


def test_self_attention_slot_protocol():
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from sbtrain.model.gla import GatedLinearAttention
    from sbtrain.model.parallel_hybrid import ParallelHybridAttention

    (call,) = _call_keywords(TransformerLayer._forward_attention, "self.self_attention")
    assert {"attention_mask", "rotary_pos_emb"} <= call
    for mixer in (GatedLinearAttention, ParallelHybridAttention):
        assert _params(mixer.forward)[:3] == ["self", "hidden_states", "attention_mask"]
        assert _accepts(mixer.forward, call), mixer
    assert "rotary_pos_emb" in _params(ParallelHybridAttention.forward)
    # the (output, bias) pair goes to the bias-dropout-add
    assert "attention_output_with_bias" in _source(TransformerLayer._forward_attention)
    assert "self.self_attn_bda(" in _source(TransformerLayer._forward_attention)


def test_mlp_activation_and_fc2_are_looked_up_per_call():
    from megatron.core.transformer.mlp import MLP

    source = _source(MLP.forward)
    te_branch = source.index("if self.config.use_te_activation_func:")
    assert "self.activation_func(intermediate_parallel)" in source[te_branch:te_branch + 300]
    assert "apply_module(self.linear_fc2)(" in source or "self.linear_fc2(" in source
    assert "self.activation_func = " in _source(MLP.__init__)


def test_parallel_linear_input_and_attributes():
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    for linear in (ColumnParallelLinear, RowParallelLinear):
        assert _params(linear.forward)[:2] == ["self", "input_"], linear
        assert "self.tp_group = " in _source(linear.__init__), linear
    assert "self.input_is_parallel = input_is_parallel" in _source(RowParallelLinear.__init__)


def test_output_processor_keywords():
    from sbtrain.trainer import _chunked_loss

    (call,) = _call_keywords(GPTModel._postprocess, "output_processor")
    assert {"hidden_states", "output_layer", "output_weight", "labels"} <= call
    assert _accepts(_chunked_loss, call)
    assert "output_processor" in _params(GPTModel.forward)


def test_provider_layer_matches_the_local_gpt_layer():
    import dataclasses

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from sbtrain.config.schema import ModelConfig
    from sbtrain.model.spec_provider import SpecProvider

    ours = SpecProvider(ModelConfig(pattern="*-")).layer("*", "-")
    stock = get_gpt_layer_local_spec(normalization="RMSNorm")
    assert ours.module is stock.module
    same = ("input_layernorm", "self_attn_bda", "pre_cross_attn_layernorm", "cross_attention",
            "cross_attn_bda", "pre_mlp_layernorm", "mlp_bda", "sharded_state_dict_keys_map")
    for name in same:
        assert getattr(ours.submodules, name) == getattr(stock.submodules, name), name
    attention, stock_attention = ours.submodules.self_attention, stock.submodules.self_attention
    assert (attention.module, attention.params) == (stock_attention.module, stock_attention.params)
    for field in dataclasses.fields(attention.submodules):
        if field.name != "core_attention":   # sbtrain's, by design
            assert getattr(attention.submodules, field.name) == \
                getattr(stock_attention.submodules, field.name), field.name
    mlp, stock_mlp = ours.submodules.mlp, stock.submodules.mlp
    assert mlp.func == stock_mlp.func
    for name in ("linear_fc1", "linear_fc2"):   # the activation is ops.swiglu by design
        assert getattr(mlp.keywords["submodules"], name) is \
            getattr(stock_mlp.keywords["submodules"], name)


def test_packed_seq_params_reads():
    """What megatron-core reads from packed_seq_params is what BatchContext provides (the
    cu_seqlens_* only behind ``qkv_format == 'thd'``, which BatchContext is not); that every layer
    receives it, full recompute included: tests/model/test_batch_context.py, test_recompute.py."""
    import importlib
    import pathlib

    from sbtrain.model.batch import BatchContext

    modules = ["models.gpt.gpt_model", "transformer.transformer_block", "transformer.transformer_layer",
               "transformer.attention", "models.common.embeddings.rotary_pos_embedding", "transformer.mlp"]
    sources = [inspect.getsource(importlib.import_module(f"megatron.core.{m}")) for m in modules]
    moe = pathlib.Path(importlib.import_module("megatron.core.transformer.moe").__file__).parent
    sources += [path.read_text() for path in moe.glob("*.py")]
    reads = {name for source in sources for name in re.findall(r"packed_seq_params\.(\w+)", source)}
    thd_only = {"cu_seqlens_q", "cu_seqlens_kv", "cu_seqlens_q_padded", "cu_seqlens_kv_padded"}
    provided = {"qkv_format", "cp_group", "max_seqlen_q", "max_seqlen_kv", "tokens_per_sample"}
    assert reads <= provided | thd_only, reads - provided - thd_only
    context = BatchContext()
    assert all(hasattr(context, name) for name in provided) and context.qkv_format != "thd"


def test_ddp_hook_skips_fused_main_grads():
    """The behaviour is run in tests/ops/test_grad_accum_fusion.py (with this very hook) and the
    wgrad_fusion probe (whole DDP); here the source lines it rests on."""
    from megatron.core.distributed.distributed_data_parallel import DistributedDataParallel as DDP

    hook = _source(DDP._make_backward_post_hook)
    assert re.search(r"if param\.grad is not None and \(\s*not param\.grad_added_to_main_grad or "
                     r"getattr\(param, 'zero_out_wgrad', False\)\s*\):\s*param\.main_grad\.add_\(param\.grad\.data\)",
                     hook), "DDP's hook no longer skips the add for grad_added_to_main_grad"
    assert "param.grad = None" in hook
    for method in (DDP.__init__, DDP.zero_grad_buffer):
        assert "param.grad_added_to_main_grad = False" in _source(method), method.__name__


def test_output_layer_fusion_flag_and_tied_zero_out():
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    assert "self.gradient_accumulation_fusion = config.gradient_accumulation_fusion" in \
        _source(ColumnParallelLinear.__init__)
    setup = _source(LanguageModule.setup_embeddings_and_output_layer)
    assert re.search(r"pipeline_model_parallel_size == 1:.*?self\.shared_embedding_or_output_weight\(\)"
                     r"\.zero_out_wgrad = True", setup, flags=re.S)
