"""The elementwise fusions change nothing on CPU: the tiny 7B and 76B models give the same loss
and gradients with ``ops.swiglu`` / ``ops.rmsnorm`` / ``ops.gla_gate`` wired in as with the code
they replaced (Megatron's unfused SwiGLU path and the inline torch formulas)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP

from ops.swiglu import SwiGLU, swiglu
from sbtrain.config import load_config
from sbtrain.convert.session import one_process_model
from sbtrain.model import gla, parallel_hybrid
from tests.model.test_hybrid_model import random_model

REPO = Path(__file__).resolve().parents[2]
CONFIGS = ["spikingbrain_7b_tiny.yaml", "spikingbrain_76b_tiny.yaml"]


def _stock_gate(gate, normalizer=1.0, negate=False):
    """The model's gate formulas before ops.gla_gate (gla.py / parallel_hybrid.py)."""
    if negate:
        return F.logsigmoid(-gate.float())
    return F.logsigmoid(gate.float()) / normalizer


def _stock_norm(out, weight, eps):
    """The model's per-head norm before ops.rmsnorm (gla.head_rms_norm)."""
    x = out.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (x * weight.float()).to(out.dtype)


def _loss_and_grads(model, tokens):
    model.zero_grad(set_to_none=True)
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    loss = model(tokens, positions, None, labels=tokens).float().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _use_stock_paths(model, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gla, "gate_log_decay", _stock_gate)
    monkeypatch.setattr(parallel_hybrid, "gate_log_decay", _stock_gate)
    monkeypatch.setattr(gla, "fused_head_rms_norm", _stock_norm)
    # Megatron's own unfused glu (chunk, config.activation_func, multiply) in every MLP
    for module in model.modules():
        if isinstance(module, MLP):
            monkeypatch.setattr(module.config, "use_te_activation_func", False)


@pytest.mark.parametrize("config", CONFIGS)
def test_fused_ops_keep_loss_and_grads(config: str, monkeypatch: pytest.MonkeyPatch):
    cfg = load_config(REPO / "examples" / "configs" / config)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    calls = []
    reference = swiglu.registry.reference
    monkeypatch.setattr(reference, "fn", lambda x, _fn=reference.fn: calls.append(1) or _fn(x))
    with one_process_model(cfg) as model:
        random_model(model, cfg)
        mlps = [m for m in model.modules() if isinstance(m, MLP)]
        assert mlps and all(isinstance(m.activation_func, SwiGLU) for m in mlps)
        loss, grads = _loss_and_grads(model, tokens)
        assert len(calls) >= len(cfg.model.layers)  # at least one MLP per layer ran the op
        with monkeypatch.context() as stock:
            _use_stock_paths(model, stock)
            calls.clear()
            stock_loss, stock_grads = _loss_and_grads(model, tokens)
            assert not calls
    assert abs(loss.item() - stock_loss.item()) <= 1e-6, (loss, stock_loss)
    assert grads.keys() == stock_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, stock_grads[name], rtol=1e-6, atol=1e-7, msg=name)
