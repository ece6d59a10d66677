"""GroupedExperts (sbtrain.model.experts) against Megatron's SequentialMLP on CPU.

Same module, same weights: SequentialMLP's forward is the reference for the grouped one,
forward and every gradient (tokens, routing probs, each expert's fc1/fc2), with uneven and
zero token counts, with and without the spiking neuron. The checkpoint keys (state dict and
distributed-checkpoint ShardedTensor keys/shapes/offsets) equal those of a model built with
the stock SequentialMLP spec, so existing checkpoints and upcycled states load.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.moe.experts import SequentialMLP

from parallel.init import _sharded_tensors, init_parameters_globally
from sbtrain.config import RunConfig
from sbtrain.config.schema import ModelConfig, MoEConfig, SpikingConfig
from sbtrain.convert.session import one_process_model
from sbtrain.model.experts import GroupedExperts
from sbtrain.model.spec_provider import SpecProvider

COUNTS = [9, 0, 23, 1]   # uneven, one expert without tokens


def moe_cfg(spiking: bool = False) -> RunConfig:
    cfg = RunConfig()
    cfg.model = ModelConfig(pattern="L-WE", hidden_size=32, num_attention_heads=4,
                            num_query_groups=2, ffn_hidden_size=24, vocab_size=64,
                            max_position_embeddings=64, sliding_window=5,
                            moe=MoEConfig(num_experts=len(COUNTS), top_k=1))
    cfg.spiking = SpikingConfig(enabled=spiking)
    return cfg


def _experts(model) -> GroupedExperts:
    found = [m for m in model.modules() if isinstance(m, SequentialMLP)]
    assert len(found) == 1
    return found[0]


def _forward_and_grads(experts, forward, x, counts, probs):
    x = x.clone().requires_grad_()
    probs = probs.clone().requires_grad_()
    out, bias = forward(experts, x, counts, probs)
    assert bias is None
    weights = [p for e in experts.local_experts for p in (e.linear_fc1.weight, e.linear_fc2.weight)]
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(out, [x, probs, *weights], grad)
    return [out.detach(), *grads]


@pytest.mark.parametrize("spiking", [False, True])
def test_grouped_experts_equal_sequential_mlp(spiking):
    with one_process_model(moe_cfg(spiking)) as model:
        init_parameters_globally(model, 1, 0.2, 4)
        experts = _experts(model)
        assert isinstance(experts, GroupedExperts) and experts.per_expert_reason() is None
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(sum(COUNTS), 32, generator=gen)
        probs = torch.rand(sum(COUNTS), generator=gen)
        counts = torch.tensor(COUNTS)
        got = _forward_and_grads(experts, GroupedExperts.forward, x, counts, probs)
        want = _forward_and_grads(experts, SequentialMLP.forward, x, counts, probs)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda m, i=i: f"#{i}: {m}")
    # expert 1 had no tokens: zero weight gradients (fc1, fc2 of expert 1 are items 5, 6)
    assert got[5].abs().sum() == 0 and got[6].abs().sum() == 0
    assert got[3].abs().sum() > 0


def _checkpoint_layout(model) -> tuple[list[str], list[tuple]]:
    state_keys = sorted(k for k in model.state_dict() if "mlp" in k and "_extra_state" not in k)
    sharded = sorted((sh.key, tuple(sh.global_shape), tuple(sh.global_offset), sh.prepend_axis_num)
                     for sh in _sharded_tensors(model.sharded_state_dict()) if ".mlp." in sh.key)
    return state_keys, sharded


def test_checkpoint_keys_equal_sequential_mlp(monkeypatch):
    with one_process_model(moe_cfg()) as model:
        assert isinstance(_experts(model), GroupedExperts)
        grouped = _checkpoint_layout(model)
    monkeypatch.setattr(SpecProvider, "routed_experts", SequentialMLP)
    with one_process_model(moe_cfg()) as model:
        assert type(_experts(model)) is SequentialMLP
        stock = _checkpoint_layout(model)
    assert grouped == stock
    assert "decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight" in grouped[0]
