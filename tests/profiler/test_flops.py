from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sbtrain.config.schema import ModelConfig, MoEConfig
from sbtrain.profiler.flops import causal_avg_keys, flops_per_token, window_avg_keys

from .profiler_reference import ReferenceLM

TINY = dict(hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48,
            vocab_size=64, sliding_window=5)
SEQ = 20


def counted_flops(cfg: ModelConfig, training: bool) -> float:
    """FLOPs per token that FlopCounterMode sees in the reference model (fwd, or fwd+bwd)."""
    torch.manual_seed(0)
    model = ReferenceLM(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (SEQ,))
    with FlopCounterMode(display=False) as counter:
        logits = model(tokens)
        if training:
            torch.nn.functional.cross_entropy(logits, tokens).backward()
    return counter.get_total_flops() / SEQ


@pytest.mark.parametrize("training", [False, True])
def test_dense_attention_model_matches_flop_counter(training: bool):
    cfg = ModelConfig(pattern="*-*-", **TINY)
    expected = flops_per_token(cfg, SEQ, training=training)["total"]
    assert expected == pytest.approx(counted_flops(cfg, training), rel=1e-9)


@pytest.mark.parametrize("pattern", ["W-W-", "L-W-", "H-F-", "LEHE*E"])
def test_every_layer_type_matches_flop_counter(pattern: str):
    cfg = ModelConfig(pattern=pattern, moe=MoEConfig(num_experts=4, top_k=2, shared_expert=True,
                                                     expert_ffn_hidden_size=24), **TINY)
    assert flops_per_token(cfg, SEQ, training=False)["total"] == pytest.approx(
        counted_flops(cfg, training=False), rel=1e-9)


def test_training_is_three_times_forward_with_odd_head_dim_and_tied_embeddings():
    cfg = ModelConfig(pattern="F-LE", head_dim=6, untie_embeddings=False, qkv_bias=False,
                      moe=MoEConfig(num_experts=3, top_k=1, shared_expert=False), **TINY)
    result = flops_per_token(cfg, SEQ, training=True)
    assert result["total"] == pytest.approx(counted_flops(cfg, training=True), rel=1e-9)
    assert result["total"] == 3 * result["forward"]


@pytest.mark.parametrize("seq", [1, 2, 5, 6, 7, 31, 64])
@pytest.mark.parametrize("window", [0, 1, 5, 6, 40])
def test_window_average_matches_mask_count(seq: int, window: int):
    i = torch.arange(seq)[:, None]
    j = torch.arange(seq)[None, :]
    visible = (j <= i) & (i - j <= window)
    assert window_avg_keys(seq, window) == pytest.approx(visible.sum().item() / seq, rel=1e-12)


def test_window_wider_than_sequence_is_causal():
    assert window_avg_keys(100, 4096) == causal_avg_keys(100) == 50.5


def test_7b_breakdown_numbers():
    cfg = ModelConfig(pattern="L-W-" * 14, hidden_size=3584, num_attention_heads=28,
                      num_query_groups=4, ffn_hidden_size=18944, vocab_size=152064)
    result = flops_per_token(cfg, 8192, training=True)
    # GLA: 3 * 4 * n_h * d^2 per layer, independent of the sequence length.
    assert result["layers"]["L-"]["attention"] == 3 * 4 * 28 * 128 * 128
    # SWA at 8K: 3 * 4 * n_h * d * avg, avg = (4097*4098/2 + 4095*4097) / 8192.
    avg = (4097 * 4098 / 2 + (8192 - 4097) * 4097) / 8192
    assert result["layers"]["W-"]["attention"] == pytest.approx(3 * 4 * 28 * 128 * avg)
    assert result["logits"] == 3 * 2 * 3584 * 152064
    assert result["total"] == pytest.approx(result["matmul"] + result["attention"])
