"""Memory and recomputed FLOPs per ``train.recompute`` policy, and the ``auto`` choice."""

from __future__ import annotations

import dataclasses
import json

import pytest

from sbtrain.cli import main as cli_main
from sbtrain.config import load_config
from sbtrain.config.schema import ModelConfig, ParallelConfig, RunConfig, TrainConfig
from sbtrain.profiler import format_plan, make_plan
from sbtrain.profiler.flops import flops_per_token, gla_flops
from sbtrain.profiler.memory import (
    GIB,
    _logits_bytes,
    activation_bytes_per_token,
    estimate_memory_per_rank,
)
from sbtrain.profiler.recompute import (
    AUTO_MEMORY_FRACTION,
    choose_policy,
    policy_table,
    recompute_flops_per_token,
    resolve_recompute,
)
from tests.parallel.harness import REPO

SB7B = REPO / "examples/configs/spikingbrain_7b.yaml"
SB76B = REPO / "examples/configs/spikingbrain_76b.yaml"


def width_7b(pattern: str = "L-W-" * 4, **train) -> RunConfig:
    """Issue 14 item 7's one-GPU run: 7B width, 8 layers, 8K tokens, micro-batch 1."""
    model = ModelConfig(pattern=pattern, hidden_size=3584, num_attention_heads=28,
                        num_query_groups=4, ffn_hidden_size=18944, vocab_size=152064,
                        max_position_embeddings=131072)
    train = {"seq_length": 8192, "micro_batch_size": 1, "global_batch_size": 8,
             "precision": "bf16", **train}
    return RunConfig(model=model, parallel=ParallelConfig(dp=1), train=TrainConfig(**train))


def gib(cfg: RunConfig, policy: str, world: int = 1) -> float:
    return estimate_memory_per_rank(cfg, world, policy=policy)["total_gib"]


def test_bytes_per_token_of_each_layer_kind():
    """The 7B width in bf16 (a = 2): q = 3584, kv = 512, 28 heads, rank 16, F = 18944."""
    model = width_7b().model
    q, kv, heads, rank = 3584, 512, 28, 16
    fla = (q + 64 * heads) * 4
    ffn = {"none": 3 * 18944 * 2, "selective": 2 * 18944 * 2}
    expect = {
        ("L", "none"): (5 * q + 2 * kv + rank) * 2 + fla,
        ("L", "selective"): (2 * q + 3 * kv + rank) * 2,
        ("W", "none"): (3 * q + 3 * kv) * 2 + heads * 4,
        ("W", "selective"): (3 * q + 3 * kv) * 2 + heads * 4,
        ("H", "none"): (8 * q + 4 * kv) * 2 + fla + heads * 4,
        ("H", "selective"): (4 * q + 3 * kv) * 2 + heads * 4,
    }
    for (mixer, policy), mixer_bytes in expect.items():
        got = activation_bytes_per_token(model, mixer, "-", policy, 2)
        assert got == {"common": 4 * 3584 * 2, "tp_split": mixer_bytes + ffn[policy]}, (mixer,
                                                                                        policy)


@pytest.mark.parametrize("pattern", ["L-W-L-W-", "*-*-", "H-F-H-FE", "L-L-"])
def test_memory_is_monotone_in_the_policy(pattern):
    cfg = width_7b(pattern)
    none, selective, full = (gib(cfg, p) for p in ("none", "selective", "full"))
    assert none >= selective >= full
    assert full < none
    assert selective < none
    if pattern == "*-*-":  # softmax layers: only the SwiGLU products (F = 18944, bf16) go
        assert (none - selective) * GIB == pytest.approx(2 * 8192 * 18944 * 2)


def test_full_keeps_layer_inputs_and_one_layer():
    cfg = width_7b()
    mem = estimate_memory_per_rank(cfg, 1, policy="full")
    tokens, h = 8192, 3584
    per_layer_none = [activation_bytes_per_token(cfg.model, m, f, "none", 2)
                      for m, f in cfg.model.layers]
    biggest = max(p["common"] + p["tp_split"] for p in per_layer_none) * tokens
    logits = _logits_bytes(cfg, 2)  # the last stage's loss, counted once
    final_norm = 2 * tokens * h * 2
    assert mem["activations_gib"] * GIB == pytest.approx(8 * tokens * h * 2 + biggest + final_norm
                                                         + logits)


def test_recompute_flops():
    model = width_7b().model
    assert recompute_flops_per_token(model, 8192, "none") == 0
    assert recompute_flops_per_token(model, 8192, "selective") == 4 * gla_flops(model)
    forward = flops_per_token(model, 8192, training=False)
    assert recompute_flops_per_token(model, 8192, "full") == forward["forward"] - forward["logits"]
    with pytest.raises(ValueError):
        recompute_flops_per_token(model, 8192, "auto")


def test_auto_picks_cheapest_policy_that_fits():
    cfg = width_7b(recompute="auto")
    rows = policy_table(cfg, 1)
    sizes = {r["policy"]: r["total_gib"] for r in rows}
    assert [r["policy"] for r in rows] == ["none", "selective", "full"]
    assert [r["recompute_overhead"] for r in rows] == sorted(r["recompute_overhead"] for r in rows)

    def device_for(total: float) -> float:  # a device whose budget is just above ``total``
        return total / AUTO_MEMORY_FRACTION + 0.01

    assert choose_policy(rows, 1000)[0] == "none"  # loose
    assert choose_policy(rows, device_for(sizes["none"]))[0] == "none"
    assert choose_policy(rows, device_for(sizes["none"]) - 0.02)[0] == "selective"
    policy, why = choose_policy(rows, device_for(sizes["full"]))
    assert policy == "full" and "none, selective would not fit" in why
    policy, why = choose_policy(rows, 1.0)  # tight: nothing fits, full is the smallest
    assert policy == "full" and "no policy fits" in why


def test_resolve_replaces_only_auto():
    auto, report = resolve_recompute(width_7b(recompute="auto"), 1, device_gib=1000)
    assert auto.train.recompute == "none" == report["policy"] and report["requested"] == "auto"
    assert report["budget_gib"] == pytest.approx(900)
    kept, report = resolve_recompute(width_7b(recompute="full"), 1, device_gib=1000)
    assert kept.train.recompute == "full" and report["reason"] == "set in the config"


def test_plan_resolves_auto_against_the_profiler_key_or_largest_device():
    cfg = width_7b(recompute="auto")
    sizes = {r["policy"]: r["total_gib"] for r in policy_table(cfg, 1)}
    between = (sizes["selective"] + sizes["none"]) / 2 / AUTO_MEMORY_FRACTION
    plan = make_plan(cfg, device_memory_gib=[40, between])
    assert plan["recompute"]["policy"] == "selective" == plan["memory"]["recompute"]
    assert plan["memory"]["total_gib"] == pytest.approx(sizes["selective"])
    pinned = dataclasses.replace(cfg, profiler=dataclasses.replace(cfg.profiler,
                                                                   device_memory_gib=1000))
    assert make_plan(pinned, device_memory_gib=[40])["recompute"]["policy"] == "none"
    text = format_plan(plan)
    assert "recompute selective (auto): cheapest policy that fits" in text
    assert "<- used" in text
    json.dumps(plan)


def test_sbtrain_plan_prints_the_choice(capsys):
    assert cli_main(["plan", str(SB7B), "--set", "train.recompute=auto", "--world-size", "2",
                     "--device-gib", "139"]) == 0
    out = capsys.readouterr().out
    assert "recompute none (auto): cheapest policy that fits 125.1 GiB (90% of 139 GiB)" in out
    for policy in ("none", "selective", "full"):
        assert f"\n  {policy:<11}" in out


def test_example_configs_plan_under_every_policy():
    for path in (SB7B, SB76B):
        for policy in ("none", "selective", "full", "auto"):
            plan = make_plan(load_config(path, [f"train.recompute={policy}"]))
            assert plan["recompute"]["policy"] in ("none", "selective", "full")
