"""MoE upcycling (SpikingBrain-76B): dense FFN -> N routed experts (top-1) + 1 shared expert.

Why a uniform router reproduces the dense model. sbtrain sets ``moe_router_pre_softmax=True``
for top-1 (``sbtrain.model.megatron_config._moe_fields``); Megatron's
``topk_routing_with_score_function`` (megatron/core/transformer/moe/moe_utils.py, softmax score
function) then computes ``scores = softmax(logits)`` in fp32 and ``probs, idx = topk(scores, 1)``
WITHOUT renormalising, and ``MoELayer`` returns ``shared(x) + probs[idx] * E_idx(x)``. A zero
router weight makes every logit 0, so every score is exactly 1/N (whichever expert top-1 picks,
all experts are identical copies): ``MoE(x) = E(x) + E(x)/N = (1 + 1/N) E(x)``. An expert that is
exactly alpha^3 * FFN (``scheme="exact"``) then gives FFN(x), since alpha^3 = 1/(1 + 1/N). With
``scheme="paper"`` (alpha on gate, up and down) the expert is down(silu(alpha g) * alpha u) * alpha,
which is alpha^3 * FFN only up to silu's non-linearity, so the identity holds for the scaled FFN
instead: MoE(x) = (1 + 1/N) FFN_alpha(x). The aux loss only adds gradients in training; it does
not change the forward output. All models here are one-process CPU fp32 models.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
import yaml

from parallel.init import init_parameters_globally
from sbtrain.config import RunConfig
from sbtrain.config.schema import ModelConfig, MoEConfig
from sbtrain.convert.session import load_tensors, load_weights, model_tensors, one_process_model
from sbtrain.convert.session import save_weights
from sbtrain.convert.upcycle import (
    dense_pattern,
    main,
    upcycle_alpha,
    upcycle_checkpoint,
    upcycle_state,
)

N = 4
MODEL = dict(hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48,
             vocab_size=64, max_position_embeddings=64)
MOE_LAYER = 1
MLP = f"decoder.layers.{MOE_LAYER}.mlp."


def run_cfg(pattern: str, num_experts: int = N, **moe) -> RunConfig:
    cfg = RunConfig()
    cfg.model = ModelConfig(pattern=pattern, **MODEL,
                            moe=MoEConfig(num_experts=num_experts, top_k=1, shared_expert=True,
                                          **moe))
    return cfg


def hidden_input() -> torch.Tensor:
    return torch.randn(10, 2, MODEL["hidden_size"], generator=torch.Generator().manual_seed(0))


TOKENS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))


def outputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer MOE_LAYER's FFN output on a fixed hidden tensor, full-model logits)."""
    model.eval()
    positions = torch.arange(TOKENS.shape[1]).expand_as(TOKENS)
    with torch.no_grad():
        mlp_out, bias = model.decoder.layers[MOE_LAYER].mlp(hidden_input())
        assert bias is None
        return mlp_out, model(TOKENS, positions, None)


@pytest.fixture(scope="module")
def dense():
    """A random dense "*-*-" model: its state, FFN output at layer 1 and logits."""
    cfg = run_cfg("*-*-")
    with one_process_model(cfg) as model:
        init_parameters_globally(model, 3, 0.2, cfg.model.num_layers)
        mlp_out, logits = outputs(model)
        state = {k: v.clone() for k, v in model_tensors(model).items()}
    return dict(cfg=cfg, state=state, mlp=mlp_out, logits=logits)


def moe_outputs(state: dict, cfg: RunConfig, router: torch.Tensor | None = None):
    with one_process_model(cfg) as model:
        load_tensors(model, state)
        if router is not None:
            with torch.no_grad():
                model.decoder.layers[MOE_LAYER].mlp.router.weight.copy_(router)
        return outputs(model)


def swiglu(x: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor) -> torch.Tensor:
    gate, up = fc1.chunk(2, dim=0)          # Megatron's linear_fc1 rows are [gate; up]
    return (F.silu(x @ gate.T) * (x @ up.T)) @ fc2.T


def test_alpha():
    assert upcycle_alpha(MoEConfig(num_experts=16, top_k=1, shared_expert=True)) == \
        pytest.approx(0.980, abs=5e-4)
    assert upcycle_alpha(MoEConfig(num_experts=4, top_k=1)) == pytest.approx(1.25 ** (-1 / 3))
    assert upcycle_alpha(MoEConfig(num_experts=16, top_k=2, shared_expert=False)) == \
        pytest.approx(8 ** (1 / 3))
    assert dense_pattern("H-H-|HEFE") == "H-H-|H-F-"


def test_upcycled_state_layout_and_scaling(dense):
    cfg = run_cfg("*-*E")
    alpha = upcycle_alpha(cfg.model.moe)
    state = upcycle_state(dense["state"], cfg.model, seed=5)
    with one_process_model(cfg) as model:
        assert state.keys() == model_tensors(model).keys()
    src = dense["state"]
    experts = [f"{MLP}experts.local_experts.{e}." for e in range(N)] + [f"{MLP}shared_experts."]
    for owner in experts:
        for fc in ("linear_fc1.weight", "linear_fc2.weight"):
            # Each of gate, up (the two halves of fc1) and down (fc2) is alpha x dense, exactly.
            assert torch.equal(state[owner + fc], src[MLP + fc] * alpha), owner + fc
    assert state[experts[0] + "linear_fc1.weight"].data_ptr() != \
        state[experts[1] + "linear_fc1.weight"].data_ptr()
    for key, value in src.items():
        if not key.startswith(MLP):
            assert torch.equal(state[key], value), key
    router = state[MLP + "router.weight"]
    assert router.shape == (N, MODEL["hidden_size"])
    assert 0.5 * cfg.model.init_method_std < router.std() < 2 * cfg.model.init_method_std
    assert torch.equal(router, upcycle_state(src, cfg.model, seed=5)[MLP + "router.weight"])
    assert not torch.equal(router, upcycle_state(src, cfg.model, seed=6)[MLP + "router.weight"])


def test_uniform_router_reproduces_dense_model_exactly(dense):
    """scheme="exact": alpha^(3/2) on up and down, so each expert is exactly alpha^3 FFN."""
    cfg = run_cfg("*-*E")
    state = upcycle_state(dense["state"], cfg.model, scheme="exact")
    zero = torch.zeros(N, MODEL["hidden_size"])
    mlp_out, logits = moe_outputs(state, cfg, router=zero)
    torch.testing.assert_close(mlp_out, dense["mlp"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, dense["logits"], rtol=1e-5, atol=1e-5)


def test_uniform_router_with_paper_scaling(dense):
    """scheme="paper" (alpha on gate, up, down): MoE(x) = (1 + 1/N) FFN_alpha(x), which is
    alpha^3 (1 + 1/N) FFN(x) = FFN(x) only up to silu(alpha g) != alpha silu(g)."""
    cfg = run_cfg("*-*E")
    alpha = upcycle_alpha(cfg.model.moe)
    state = upcycle_state(dense["state"], cfg.model)
    zero = torch.zeros(N, MODEL["hidden_size"])
    mlp_out, _ = moe_outputs(state, cfg, router=zero)
    fc1, fc2 = dense["state"][MLP + "linear_fc1.weight"], dense["state"][MLP + "linear_fc2.weight"]
    x = hidden_input()
    torch.testing.assert_close(swiglu(x, fc1, fc2), dense["mlp"], rtol=1e-5, atol=1e-5)
    expected = (1 + 1 / N) * swiglu(x, alpha * fc1, alpha * fc2)
    torch.testing.assert_close(mlp_out, expected, rtol=1e-5, atol=1e-5)
    # Close to the dense FFN (a few % at alpha = 0.93), but not equal.
    rel = ((mlp_out - dense["mlp"]).norm() / dense["mlp"].norm()).item()
    assert 1e-4 < rel < 0.05, rel


@pytest.mark.parametrize("std", [1.0, None])
def test_non_uniform_router_changes_the_output(dense, std):
    """Negative control: a random router (here N(0,1), or the upcycled N(0, 0.02) init) gives
    the chosen expert a probability != 1/N, so the output moves away from the dense one."""
    cfg = run_cfg("*-*E")
    state = upcycle_state(dense["state"], cfg.model, scheme="exact", seed=1)
    router = None if std is None else \
        std * torch.randn(N, MODEL["hidden_size"], generator=torch.Generator().manual_seed(9))
    mlp_out, logits = moe_outputs(state, cfg, router=router)
    assert (mlp_out - dense["mlp"]).abs().max() > (1e-2 if std else 1e-3)
    assert (logits - dense["logits"]).abs().max() > 1e-3


def test_rejects_what_cannot_be_upcycled(dense):
    with pytest.raises(ValueError, match="expert_ffn_hidden_size"):
        upcycle_state(dense["state"], run_cfg("*-*E", expert_ffn_hidden_size=24).model)
    moe_state = upcycle_state(dense["state"], run_cfg("*-*E").model)
    with pytest.raises(ValueError, match="not dense"):
        upcycle_state(moe_state, run_cfg("*E*E").model)
    with pytest.raises(ValueError, match="scheme"):
        upcycle_state(dense["state"], run_cfg("*-*E").model, scheme="random")


def write_yaml(path, pattern: str) -> str:
    model = dict(pattern=pattern, **MODEL,
                 moe=dict(num_experts=N, top_k=1, shared_expert=True))
    path.write_text(yaml.safe_dump({"model": model, "train": {"seed": 7}}))
    return str(path)


def test_upcycle_checkpoint_round_trip(dense, tmp_path):
    dense_yaml = write_yaml(tmp_path / "d.yaml", "*-*-")
    moe_yaml = write_yaml(tmp_path / "m.yaml", "*-*E")
    with one_process_model(dense["cfg"]) as model:
        load_tensors(model, dense["state"])
        save_weights(model, tmp_path / "dense")
    # Explicit dense config, and the derived one (MoE config with '-' for 'E') via the CLI.
    upcycle_checkpoint(tmp_path / "dense", dense_yaml, moe_yaml, tmp_path / "moe")
    assert main(["--dense", str(tmp_path / "dense"), "--config", moe_yaml,
                 "--out", str(tmp_path / "moe_cli")]) == 0
    cfg = run_cfg("*-*E")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=7))
    want = upcycle_state(dense["state"], cfg.model, seed=7)
    for out in ("moe", "moe_cli"):
        with one_process_model(cfg) as model:
            assert load_weights(model, tmp_path / out) == 0
            got = model_tensors(model)
            assert got.keys() == want.keys()
            for key in want:
                assert torch.equal(got[key], want[key]), (out, key)
    # A dense config that is not the MoE one with '-' for 'E' is refused.
    other = write_yaml(tmp_path / "o.yaml", "*-W-")
    with pytest.raises(ValueError, match="not the MoE pattern"):
        upcycle_checkpoint(tmp_path / "dense", other, moe_yaml, tmp_path / "bad")
