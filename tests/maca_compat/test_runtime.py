"""``maca_compat.runtime.setup`` leaves torch.compile alone, and a CPU model step is the same
with dynamo on as with it off (it used to disable dynamo for the whole process on a CPU).

With sbtrain's config (megatron fusions off, ``megatron_config.py``), the one torch.compile'd
megatron-core function a CPU forward and backward reach is the MoE router's
``_apply_expert_bias``; the second test runs an MoE hybrid model both ways and checks that
dynamo really traced something, and that loss and every gradient are bit-identical.
"""

from __future__ import annotations

import os

import torch
import torch._dynamo as dynamo
from torch._dynamo.utils import counters

from maca_compat import runtime
from maca_compat.platform import get_platform
from parallel.init import init_parameters_globally
from sbtrain.config import RunConfig
from sbtrain.config.schema import ModelConfig, MoEConfig
from sbtrain.convert.session import one_process_model


def test_setup_leaves_torch_compile_as_the_user_set_it(monkeypatch):
    monkeypatch.delenv("TORCH_COMPILE_DISABLE", raising=False)
    monkeypatch.setattr(dynamo.config, "disable", False)
    platform = get_platform()
    assert platform.vendor == "cpu"
    runtime.setup(platform)
    assert dynamo.config.disable is False
    assert "TORCH_COMPILE_DISABLE" not in os.environ


def _moe_cfg() -> RunConfig:
    cfg = RunConfig()
    cfg.model = ModelConfig(pattern="LEWE", hidden_size=32, num_attention_heads=4,
                            num_query_groups=2, ffn_hidden_size=24, vocab_size=64,
                            max_position_embeddings=64, sliding_window=5,
                            moe=MoEConfig(num_experts=4))
    return cfg


def _loss_and_grads(model, tokens):
    model.zero_grad(set_to_none=True)
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    loss = model(tokens, positions, None, labels=tokens).float().mean()
    loss.backward()
    return [loss.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_cpu_model_step_is_the_same_with_dynamo_on(monkeypatch):
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with one_process_model(_moe_cfg()) as model:
        init_parameters_globally(model, 1, 0.02, 4)
        with dynamo.config.patch(disable=True):
            eager = _loss_and_grads(model, tokens)
        dynamo.reset()
        counters.clear()
        with dynamo.config.patch(disable=False):
            traced = _loss_and_grads(model, tokens)
        assert counters["frames"]["ok"] >= 1      # dynamo ran (the router's expert bias)
        dynamo.reset()
    assert len(eager) == len(traced) > 10
    for i, (want, got) in enumerate(zip(eager, traced)):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m, i=i: f"#{i}: {m}")
