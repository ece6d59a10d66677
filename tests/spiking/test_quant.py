"""W8ASpike weights: the INT8 group-wise quantiser, which weights it touches, and its config."""

from __future__ import annotations

import pytest
import torch
import yaml

from parallel.init import init_parameters_globally
from sbtrain.config import ConfigError, RunConfig, load_config, validate
from sbtrain.config.schema import ModelConfig, SpikingConfig
from sbtrain.convert.session import one_process_model
from sbtrain.spiking.quant import (
    apply_weight_quant,
    dequantize_int8_groupwise,
    fake_quant_int8_groupwise,
    quantize_int8_groupwise,
)


def test_hand_computed_groups_and_tail():
    # Row 0: groups [0.5, -1.27, 0.3, 0] (scale 1.27/127 = 0.01) and [2.54, 1, -0.08, 0.02]
    # (scale 0.02); row 1 is all zero. Group size 4 over 10 columns leaves a 2-column tail
    # [0.2, -0.6] (row 0, scale 0.6/127) that takes its scale from its own columns.
    w = torch.tensor([[0.5, -1.27, 0.3, 0.0, 2.54, 1.0, -0.08, 0.02, 0.2, -0.6],
                      [0.0] * 10])
    codes, scales = quantize_int8_groupwise(w, group_size=4)
    assert codes.dtype == torch.int8 and scales.shape == (2, 3)
    assert codes[0].tolist() == [50, -127, 30, 0, 127, 50, -4, 1, 42, -127]
    assert codes[1].tolist() == [0] * 10
    torch.testing.assert_close(scales, torch.tensor([[0.01, 0.02, 0.6 / 127], [0.0, 0.0, 0.0]]))
    expected = torch.tensor([[0.5, -1.27, 0.3, 0.0, 2.54, 1.0, -0.08, 0.02, 42 * 0.6 / 127, -0.6],
                             [0.0] * 10])
    torch.testing.assert_close(fake_quant_int8_groupwise(w, 4), expected)
    torch.testing.assert_close(dequantize_int8_groupwise(codes, scales, 4), expected)


@pytest.mark.parametrize("cols", [256, 300])
def test_error_bound_range_and_idempotence(cols: int):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, cols, generator=g) * torch.rand(64, 1, generator=g) * 3
    w[3, 5] = 40.0                                   # an outlier only coarsens its own group
    codes, scales = quantize_int8_groupwise(w)
    q = fake_quant_int8_groupwise(w)
    per_col = scales.repeat_interleave(128, dim=1)[:, :cols]
    assert int(codes.abs().max()) == 127 and codes.dtype == torch.int8
    # round to nearest: no element moves by more than half its group's scale (+ fp32 slack)
    assert bool(((w - q).abs() <= per_col / 2 * (1 + 1e-5)).all())
    assert float(scales[3, 0]) == pytest.approx(40.0 / 127)
    assert float(scales[3, 1]) < float(scales[3, 0]) / 3
    # q lies on its own grid: quantising again moves nothing beyond fp32 rounding of n * s
    torch.testing.assert_close(fake_quant_int8_groupwise(q), q, rtol=1e-6, atol=0)
    assert q.dtype == w.dtype and q.shape == w.shape


def test_bf16_weights_come_back_in_bf16():
    w = torch.randn(4, 130).to(torch.bfloat16)
    q = fake_quant_int8_groupwise(w)
    assert q.dtype == torch.bfloat16
    reference = fake_quant_int8_groupwise(w.float()).to(torch.bfloat16)
    assert torch.equal(q, reference)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="2-D"):
        quantize_int8_groupwise(torch.ones(8))
    with pytest.raises(ValueError, match="group_size"):
        quantize_int8_groupwise(torch.ones(2, 8), group_size=0)
    codes, scales = quantize_int8_groupwise(torch.ones(2, 8), group_size=4)
    with pytest.raises(ValueError, match="do not match"):
        dequantize_int8_groupwise(codes, scales, group_size=8)


def quant_cfg(enabled: bool = True) -> RunConfig:
    cfg = RunConfig()
    # hidden 160: q/k/v, fc1 and the GLA gate see two groups per row (128 + a 32-column tail)
    cfg.model = ModelConfig(pattern="L-WE", hidden_size=160, num_attention_heads=4,
                            num_query_groups=2, ffn_hidden_size=48, vocab_size=64,
                            max_position_embeddings=64, sliding_window=5)
    cfg.spiking = SpikingConfig(enabled=enabled)
    return cfg


def test_exactly_the_spiked_projections_are_quantised():
    with one_process_model(quant_cfg()) as model:
        init_parameters_globally(model, 1, 0.2, 2)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        names = apply_weight_quant(model, "int8_g128")
        after = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = {f"decoder.layers.0.self_attention.{p}.weight"
                for p in ("linear_qkv", "linear_proj", "gate_down")}
    expected |= {"decoder.layers.0.mlp.linear_fc1.weight", "decoder.layers.0.mlp.linear_fc2.weight",
                 "decoder.layers.1.self_attention.linear_qkv.weight",
                 "decoder.layers.1.self_attention.linear_proj.weight"}
    expected |= {f"decoder.layers.1.mlp.{part}.{fc}.weight" for fc in ("linear_fc1", "linear_fc2")
                 for part in ("shared_experts", *(f"experts.local_experts.{e}" for e in range(4)))}
    assert set(names) == expected and len(names) == 17
    for name in before:
        if name in expected:
            torch.testing.assert_close(after[name], fake_quant_int8_groupwise(before[name]),
                                       rtol=0, atol=0)
            assert not torch.equal(after[name], before[name]), name
        else:   # embeddings, LM head, router, norms, biases, GLA's gate_up
            assert torch.equal(after[name], before[name]), name


def test_quantisation_needs_spiked_projections():
    with one_process_model(quant_cfg(enabled=False)) as model:
        assert apply_weight_quant(model, "none") == []
        with pytest.raises(ValueError, match="spiking.enabled"):
            apply_weight_quant(model, "int8_g128")
        with pytest.raises(ValueError, match="unknown weight quantisation"):
            apply_weight_quant(model, "int4")


def test_weight_quant_config_key(tmp_path):
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump({"spiking": {"enabled": True, "weight_quant": "int8_g128"}}))
    assert load_config(path).spiking.weight_quant == "int8_g128"
    with pytest.raises(ConfigError, match="w.yaml: 'spiking.weight_quant': .*needs spiking.enabled"):
        load_config(path, ["spiking.enabled=false"])
    with pytest.raises(ConfigError, match="'spiking.weight_quant': unknown weight quantisation 'int4'"):
        load_config(path, ["spiking.weight_quant=int4"])
    # training keeps float weights, so a training launch refuses the evaluation mode
    with pytest.raises(ConfigError, match="'spiking.weight_quant': .*evaluation mode"):
        validate(load_config(path), world_size=1)
    validate(load_config(path, ["spiking.weight_quant=none"]), world_size=1)
