from __future__ import annotations

import pytest

from sbtrain.config.schema import (
    ModelConfig,
    MoEConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
)
from sbtrain.profiler.counting import count_parameters
from sbtrain.profiler.memory import GIB, estimate_memory_per_rank, stage_parameters

TINY = dict(hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
            vocab_size=256)


def run(pattern: str = "*-*-*-*-", model: dict | None = None, **sections) -> RunConfig:
    return RunConfig(model=ModelConfig(pattern=pattern, **{**TINY, **(model or {})}), **sections)


def test_exact_param_bytes_single_rank():
    cfg = run("L-W-")
    total = count_parameters(cfg.model)["total"]
    bf16 = estimate_memory_per_rank(cfg, 1, device_type="cuda")
    assert bf16["params"] == total
    assert bf16["params_gib"] * GIB == total * 2
    assert bf16["grads_gib"] * GIB == total * 4   # fp32 main grads (grad_reduce_in_fp32)
    assert bf16["optimizer_gib"] * GIB == total * 12
    fp32 = estimate_memory_per_rank(cfg, 1, device_type="cpu")
    assert fp32["params_gib"] * GIB == total * 4
    assert fp32["optimizer_gib"] * GIB == total * 8
    assert estimate_memory_per_rank(cfg, 1, bytes_per_param=4)["params_gib"] * GIB == total * 4


def test_pp2_halves_layer_params():
    cfg1, cfg2 = run(), run(parallel=ParallelConfig(pp=2))
    counts = count_parameters(cfg1.model)
    layers = counts["non_embedding_total"] - counts["final_norm"]
    first, last = stage_parameters(cfg2, 0), stage_parameters(cfg2, 1)
    assert first["dense"] == layers // 2 + counts["embedding"]
    assert last["dense"] == layers // 2 + counts["lm_head"] + counts["final_norm"]
    assert first["dense"] + last["dense"] == stage_parameters(cfg1, 0)["dense"] == counts["total"]


def test_tied_embeddings_copy_on_last_stage():
    cfg = run(model={"untie_embeddings": False}, parallel=ParallelConfig(pp=2))
    assert stage_parameters(cfg, 1)["dense"] - stage_parameters(cfg, 0)["dense"] == 64


def test_tp_splits_projections_not_norms():
    cfg1, cfg2 = run("*-"), run("*-", parallel=ParallelConfig(tp=2))
    replicated = 3 * 64  # two layer norms + final norm
    split1 = stage_parameters(cfg1, 0)["dense"] - replicated
    assert stage_parameters(cfg2, 0)["dense"] == split1 // 2 + replicated


def test_ep_splits_experts():
    moe = MoEConfig(num_experts=4, top_k=1, shared_expert=True)
    cfg1 = run("*E", model={"moe": moe})
    cfg4 = run("*E", model={"moe": moe}, parallel=ParallelConfig(ep=4))
    assert stage_parameters(cfg1, 0)["expert"] == 4 * 3 * 64 * 128
    assert stage_parameters(cfg4, 0)["expert"] == 3 * 64 * 128
    assert stage_parameters(cfg4, 0)["dense"] == stage_parameters(cfg1, 0)["dense"]


def test_distributed_optimizer_shards_over_dp():
    plain = run(parallel=ParallelConfig(dp=4), optim=OptimConfig(distributed_optimizer=False))
    sharded = run(parallel=ParallelConfig(dp=4))
    opt_plain = estimate_memory_per_rank(plain, 4)["optimizer_gib"]
    assert estimate_memory_per_rank(sharded, 4)["optimizer_gib"] == pytest.approx(opt_plain / 4)


def test_activations_scale_and_recompute():
    # Megatron's loss (whole logits): ops.loss's fp32 weight-gradient sum would add a constant
    small = run(train=TrainConfig(micro_batch_size=1, global_batch_size=8, loss_chunk_tokens=0))
    big = run(train=TrainConfig(micro_batch_size=2, global_batch_size=8, loss_chunk_tokens=0))
    recomputed = run(train=TrainConfig(micro_batch_size=2, global_batch_size=8, recompute="full",
                                       loss_chunk_tokens=0))
    a1, a2, ar = (estimate_memory_per_rank(c, 1)["activations_gib"] for c in (small, big, recomputed))
    assert a2 == pytest.approx(2 * a1)
    assert ar < a2


def test_first_stage_holds_pp_microbatches():
    cfg = run(parallel=ParallelConfig(pp=4), train=TrainConfig(global_batch_size=16))
    mem = estimate_memory_per_rank(cfg, 4)
    assert [s["inflight_microbatches"] for s in mem["stages"]] == [4, 3, 2, 1]
    assert mem["stages"][0]["activations_gib"] == pytest.approx(
        4 * mem["stages"][0]["activation_per_microbatch_gib"])
    assert mem["total_gib"] == max(s["total_gib"] for s in mem["stages"])


def test_inflight_capped_by_microbatches_per_step():
    cfg = run(parallel=ParallelConfig(pp=4), train=TrainConfig(micro_batch_size=2,
                                                               global_batch_size=4))
    assert estimate_memory_per_rank(cfg, 4)["stages"][0]["inflight_microbatches"] == 2


def test_sequence_and_context_parallel_shrink_activations():
    base = run(train=TrainConfig(seq_length=64))
    cp = run(parallel=ParallelConfig(sp=2), train=TrainConfig(seq_length=64))
    per_mb = [estimate_memory_per_rank(c, c.parallel.sp)["stages"][0]["activation_per_microbatch_gib"]
              for c in (base, cp)]
    assert per_mb[1] == pytest.approx(per_mb[0] / 2)
