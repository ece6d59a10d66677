from __future__ import annotations

import pytest

from sbtrain.config.schema import ModelConfig, MoEConfig
from sbtrain.profiler.counting import count_parameters

from .profiler_reference import ReferenceLM

QWEN7B = dict(hidden_size=3584, num_attention_heads=28, num_query_groups=4, ffn_hidden_size=18944,
              vocab_size=152064, qkv_bias=True, untie_embeddings=True)
QWEN7B_PARAMS = 7_615_616_512


def spikingbrain_76b() -> ModelConfig:
    """Report layout, 1-based: LA+FA at 7, 14, 21, 28, LA+SWA elsewhere; dense FFN at 1,2,3,5,7,9,11."""
    full, dense = {7, 14, 21, 28}, {1, 2, 3, 5, 7, 9, 11}
    pattern = "".join(("F" if i in full else "H") + ("-" if i in dense else "E") for i in range(1, 29))
    return ModelConfig(pattern=pattern, moe=MoEConfig(num_experts=16, top_k=1, shared_expert=True),
                       **QWEN7B)


def test_qwen25_7b_exact():
    counts = count_parameters(ModelConfig(pattern="*-" * 28, **QWEN7B))
    assert counts["total"] == QWEN7B_PARAMS
    assert counts["active"] == QWEN7B_PARAMS
    assert counts["embedding"] == counts["lm_head"] == 152064 * 3584


def test_spikingbrain_7b_exact():
    counts = count_parameters(ModelConfig(pattern="L-W-" * 14, **QWEN7B))
    gla_extra = 3584 * 16 + 16 * 512 + 512 + 128
    assert counts["total"] == QWEN7B_PARAMS + 14 * gla_extra == 7_616_542_976
    assert counts["layers"]["L-"]["count"] == counts["layers"]["W-"]["count"] == 14
    assert counts["layers"]["L-"]["total"] - counts["layers"]["W-"]["total"] == gla_extra


def test_spikingbrain_76b_matches_report_derivation():
    counts = count_parameters(spikingbrain_76b())
    # spikingbrain.md §2.1: shared attention projections -> 76.05 B total / 11.9 B active.
    assert counts["total"] == pytest.approx(76.05e9, rel=0.01)
    assert counts["active"] == pytest.approx(11.9e9, rel=0.01)
    assert counts["layers"]["HE"]["count"] + counts["layers"]["FE"]["count"] == 21
    expert = 3 * 3584 * 18944
    assert counts["total"] - counts["active"] == 21 * 15 * expert


def test_tied_embeddings_drop_lm_head():
    tied = count_parameters(ModelConfig(pattern="*-" * 28, **{**QWEN7B, "untie_embeddings": False}))
    assert tied["total"] == QWEN7B_PARAMS - 152064 * 3584
    assert tied["lm_head"] == 0


@pytest.mark.parametrize("cfg", [
    ModelConfig(pattern="*-W-L-H-F-", hidden_size=32, num_attention_heads=4, num_query_groups=2,
                ffn_hidden_size=48, vocab_size=64),
    ModelConfig(pattern="LEHEFE*-", hidden_size=32, num_attention_heads=4, num_query_groups=1,
                head_dim=6, ffn_hidden_size=40, vocab_size=50, qkv_bias=False, untie_embeddings=False,
                moe=MoEConfig(num_experts=3, top_k=2, shared_expert=False, expert_ffn_hidden_size=24)),
])
def test_total_matches_reference_module_numel(cfg: ModelConfig):
    model = ReferenceLM(cfg)
    assert count_parameters(cfg)["total"] == sum(p.numel() for p in model.parameters())
