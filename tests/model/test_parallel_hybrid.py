"""SpikingBrain-76B's parallel hybrid mixers (H/F) and sink tokens against an independent reference.

One-process models (gloo world of 1, CPU, fp32) compared with ``parallel_hybrid_reference``
(fp64 loops written from the report), plus the properties the report states for sink tokens.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sbtrain.config import RunConfig
from sbtrain.config.schema import GLAConfig, HybridConfig, ModelConfig
from sbtrain.convert.mapping import hf_to_sbtrain, sbtrain_to_official
from sbtrain.convert.session import model_tensors, one_process_model
from ops.documents import segment_ids_from_tokens
from tests.model.parallel_hybrid_reference import reference_logits
from tests.model.test_hybrid_model import logits, random_model

SEQ = 20


def tiny_cfg(pattern: str = "H-F-H-F-", sinks: int = 3, shared: bool = True,
             window: int = 4) -> RunConfig:
    cfg = RunConfig()
    cfg.model = ModelConfig(pattern=pattern, hidden_size=32, num_attention_heads=4,
                            num_query_groups=2, ffn_hidden_size=48, vocab_size=64,
                            max_position_embeddings=64, sliding_window=window,
                            sink_tokens=sinks, gla=GLAConfig(),
                            hybrid=HybridConfig(shared_projections=shared))
    return cfg


def _compare(cfg: RunConfig, tokens: torch.Tensor, segments: torch.Tensor | None) -> None:
    with one_process_model(cfg) as model:
        random_model(model, cfg)
        ours = logits(model, tokens, segments)
        weights = {k: v.double() for k, v in model_tensors(model).items()}
    ref = torch.stack([
        reference_logits(t, weights, cfg.model, None if segments is None else segments[b].long())
        for b, t in enumerate(tokens)]).float()
    assert ours.shape == ref.shape == (*tokens.shape, 64)
    err = (ours - ref).abs().max().item()
    assert err < 1e-4 * ref.abs().max().item(), err


@pytest.mark.parametrize("sinks,shared", [(3, True), (3, False), (0, True)])
def test_parallel_hybrid_matches_reference(sinks, shared):
    cfg = tiny_cfg(sinks=sinks, shared=shared)
    tokens = torch.randint(0, 64, (2, SEQ), generator=torch.Generator().manual_seed(0))
    _compare(cfg, tokens, None)


def test_parallel_hybrid_with_document_mask_matches_reference():
    """Documents restart the linear state from the sinks' state and never see each other."""
    cfg = tiny_cfg()
    tokens = torch.randint(1, 64, (2, SEQ), generator=torch.Generator().manual_seed(1))
    tokens[0, 6] = tokens[0, 13] = tokens[1, 9] = 0
    _compare(cfg, tokens, segment_ids_from_tokens(tokens, eod=0))


def _sink_outputs(model, tokens: torch.Tensor) -> torch.Tensor:
    """Hidden states of the sink positions after the last layer."""
    captured = {}
    hook = model.decoder.register_forward_hook(lambda m, i, out: captured.update(h=out))
    try:
        logits(model, tokens)
    finally:
        hook.remove()
    return captured["h"][: model.num_sink_tokens]


def test_sinks_see_only_sinks_and_every_token_sees_them():
    cfg = tiny_cfg(window=2)
    gen = torch.Generator().manual_seed(2)
    a = torch.randint(0, 64, (1, SEQ), generator=gen)
    b = torch.randint(0, 64, (1, SEQ), generator=gen)
    with one_process_model(cfg) as model:
        random_model(model, cfg)
        # sinks attend only to each other (softmax) and run first (linear): input-independent
        torch.testing.assert_close(_sink_outputs(model, a), _sink_outputs(model, b),
                                   rtol=0, atol=0)
        base = logits(model, a)
        with torch.no_grad():
            model.sink_tokens[1] += 1.0
        moved = logits(model, a)
    # every position, even the last one (far outside the window of 2), reads the sinks
    assert (moved - base).abs().amax(-1).min() > 1e-4


def test_loss_covers_real_tokens_only():
    cfg = tiny_cfg()
    tokens = torch.randint(0, 64, (2, SEQ), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(SEQ).expand_as(tokens)
    with one_process_model(cfg) as model:
        random_model(model, cfg)
        loss = model(tokens, positions, None, labels=tokens)
        full = logits(model, tokens)
    assert loss.shape == (2, SEQ)
    expected = torch.nn.functional.cross_entropy(full.reshape(-1, 64), tokens.reshape(-1),
                                                 reduction="none").view(2, SEQ)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_qwen2_converts_into_parallel_hybrid():
    """Each branch starts from the source attention; norms start at one; sinks are fresh."""
    cfg = tiny_cfg(shared=False)
    with one_process_model(dataclasses.replace(cfg, model=dataclasses.replace(
            cfg.model, pattern="*-*-*-*-", sink_tokens=0))) as qwen_like:
        random_model(qwen_like, cfg)
        dense = model_tensors(qwen_like)
    hf = _as_qwen2(dense, cfg.model)
    state = hf_to_sbtrain(hf, cfg.model, "qwen2", seed=5)
    with one_process_model(cfg) as model:
        assert set(state) == set(model_tensors(model))
    attn = "decoder.layers.1.self_attention."
    torch.testing.assert_close(state[attn + "softmax_branch.linear_qkv.weight"],
                               dense[attn + "linear_qkv.weight"], rtol=0, atol=0)
    torch.testing.assert_close(state[attn + "linear_qkv.weight"], dense[attn + "linear_qkv.weight"],
                               rtol=0, atol=0)
    assert torch.equal(state[attn + "linear_norm_weight"], torch.ones(8))
    assert state["sink_tokens"].shape == (3, 32) and state["sink_tokens"].std() > 0.01


def _as_qwen2(state: dict, model: ModelConfig) -> dict:
    from sbtrain.convert.mapping import split_qkv

    hf = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"],
          "model.norm.weight": state["decoder.final_layernorm.weight"],
          "lm_head.weight": state["output_layer.weight"]}
    for i in range(model.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        hf[dst + "input_layernorm.weight"] = state[src + "input_layernorm.weight"]
        hf[dst + "post_attention_layernorm.weight"] = state[src + "pre_mlp_layernorm.weight"]
        for kind in ("weight", "bias"):
            parts = split_qkv(state[src + f"self_attention.linear_qkv.{kind}"],
                              model.num_query_groups, model.kv_channels)
            for name, t in zip("qkv", parts):
                hf[dst + f"self_attn.{name}_proj.{kind}"] = t
        hf[dst + "self_attn.o_proj.weight"] = state[src + "self_attention.linear_proj.weight"]
        gate, up = state[src + "mlp.linear_fc1.weight"].chunk(2)
        hf[dst + "mlp.gate_proj.weight"], hf[dst + "mlp.up_proj.weight"] = gate, up
        hf[dst + "mlp.down_proj.weight"] = state[src + "mlp.linear_fc2.weight"]
    return hf


def test_export_refuses_what_the_official_layout_cannot_hold():
    with pytest.raises(ValueError, match="sink tokens"):
        sbtrain_to_official({}, tiny_cfg(pattern="L-W-").model)
    with pytest.raises(ValueError, match="layer 0"):
        sbtrain_to_official({"embedding.word_embeddings.weight": torch.zeros(1),
                             "decoder.final_layernorm.weight": torch.zeros(1),
                             "output_layer.weight": torch.zeros(1)}, tiny_cfg(sinks=0).model)
