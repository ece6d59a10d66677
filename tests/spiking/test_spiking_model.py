"""The neuron inside the model: which inputs are spiked, their values, and parity across layouts."""

from __future__ import annotations

import torch

from parallel.init import init_parameters_globally
from sbtrain.config import RunConfig
from sbtrain.config.schema import ModelConfig, SpikingConfig
from sbtrain.convert.session import one_process_model
from tests.parallel.harness import assert_same_curve


def spiking_cfg(pattern: str = "L-W-*E") -> RunConfig:
    cfg = RunConfig()
    cfg.model = ModelConfig(pattern=pattern, hidden_size=32, num_attention_heads=4,
                            num_query_groups=2, ffn_hidden_size=48, vocab_size=64,
                            max_position_embeddings=64, sliding_window=5)
    cfg.spiking = SpikingConfig(enabled=True, k=3.0)
    return cfg


def test_exactly_the_documented_inputs_are_spiked():
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    with one_process_model(spiking_cfg()) as model:
        linears = {name: type(m).__name__ for name, m in model.named_modules()
                   if isinstance(m, (ColumnParallelLinear, RowParallelLinear))}
        gla, swa, full = (model.decoder.layers[i].self_attention for i in range(3))
        assert gla.input_neuron is not None
        assert swa.core_attention.query_neuron is not None
        assert full.core_attention.query_neuron is None      # only sliding-window queries
    spiking = {n for n, kind in linears.items() if kind.startswith("Spiking")}
    assert spiking == {n for n in linears if n != "output_layer" and "gate_up" not in n}
    # q/k/v and o of every mixer, dense MLP, routed and shared experts:
    for part in ("0.self_attention.linear_qkv", "1.self_attention.linear_proj",
                 "2.mlp.experts.local_experts.3.linear_fc2", "2.mlp.shared_experts.linear_fc1",
                 "0.mlp.linear_fc1"):
        assert f"decoder.layers.{part}" in spiking, part


def test_spiking_linear_sees_the_neuron_output():
    from ops.spike import spike_activation

    with one_process_model(spiking_cfg()) as model:
        init_parameters_globally(model, 1, 0.2, 3)
        fc1 = model.decoder.layers[0].mlp.linear_fc1
        x = torch.randn(5, 2, 32)
        out, _ = fc1(x)
    expected = spike_activation(x) @ fc1.weight.detach().T
    torch.testing.assert_close(out.detach(), expected)
    assert not torch.allclose(out.detach(), x @ fc1.weight.detach().T)


def test_spiking_training_matches_across_layouts(planned):
    """TP2 (row-parallel inputs sum |x| over the TP group), PP2 and EP2 reproduce one process
    (the neuron is per token, so sequence slices cannot change it). The runs are in
    tests/parallel/plan.py (one launch per world size)."""
    one, two = planned(1), planned(2)
    assert_same_curve(one["spiking"], two["spiking.tp2"])
    assert_same_curve(one["spiking"], two["spiking.pp2"])
    assert_same_curve(one["spiking_moe"], two["spiking_moe.ep2"])
    # the neuron changed the numbers
    assert abs(one["spiking_off"][0]["loss"] - one["spiking"][0]["loss"]) > 1e-4


def test_firing_statistics_are_logged_and_layout_independent(planned):
    """Logged steps carry the mean |spike count| and firing fraction, summed over all ranks."""
    one, dp2 = planned(1)["spiking"], planned(2)["spiking.dp2"]
    assert len(one) == len(dp2) == 3
    for a, b in zip(one, dp2):
        assert 0.0 < a["spike_firing_rate"] < 1.0 and a["spike_mean_count"] > 0.0
        assert abs(a["spike_firing_rate"] - b["spike_firing_rate"]) < 1e-9
        assert abs(a["spike_mean_count"] - b["spike_mean_count"]) < 1e-9
    assert "spike_firing_rate" not in planned(1)["spiking_off"][0]
