"""Sequence-parallel traffic model: exact bytes worked out by hand from the ring formulas.

Base: examples/configs/tiny.yaml (hidden 64, 4 heads, 2 kv heads, D = 16, b = 2, global batch
8) with sp = 4, so P - 1 = 3, T = 64 and a slice of s = 16 tokens; bf16 activations (cuda).
An all-gather of n bytes per rank costs 3n, an all-reduce of P*n bytes 2 * 3/4 * 4n = 6n.
"""

from __future__ import annotations

import json

from sbtrain.config import load_config
from sbtrain.profiler import format_plan, make_plan
from sbtrain.profiler.comm import sp_comm_per_rank

TINY = "examples/configs/tiny.yaml"
SEVEN_B = "examples/configs/spikingbrain_7b.yaml"

# GLA packet [b=2, Hkv=2, K=16, V+1=17] fp32 = 4352 bytes, independent of T.
GLA_FWD, GLA_BWD = 3 * 4352, 6 * 4352
LENGTH = 3 * 8                                   # all-gather of one int64


def tail(width: int, itemsize: int = 2) -> int:
    """Bytes of one K/V tail [b=2, 2*Hkv=4, width, D=16]."""
    return 2 * 4 * width * 16 * itemsize


def comm(*overrides: str, device_type: str = "cuda", world_size: int = 4) -> dict:
    cfg = load_config(TINY, ["parallel.sp=4", "model.sliding_window=8", *overrides])
    return sp_comm_per_rank(cfg, world_size, device_type=device_type)


def test_gla_bytes_do_not_grow_with_seq_length():
    for seq in (64, 256):
        gla = comm("model.pattern=L-", f"train.seq_length={seq}")["layers"]["L"]
        assert (gla["forward_bytes"], gla["backward_bytes"]) == (13_056, 26_112)
        assert (gla["forward_bytes"], gla["backward_bytes"]) == (GLA_FWD, GLA_BWD)
        assert gla["recompute_bytes"] == 0 and gla["total_bytes"] == 39_168


def test_window_bytes_stop_growing_once_the_slice_exceeds_the_window():
    # window 8: slices of 4 and 8 tokens send all of themselves, longer ones only 8 tokens
    expected = {16: LENGTH + 3 * tail(4), 32: LENGTH + 3 * tail(8), 64: LENGTH + 3 * tail(8),
                256: LENGTH + 3 * tail(8)}
    assert expected == {16: 3_096, 32: 6_168, 64: 6_168, 256: 6_168}
    for seq, forward in expected.items():
        layer = comm("model.pattern=W-", f"train.seq_length={seq}")["layers"]["W"]
        assert layer["forward_bytes"] == forward
        assert layer["backward_bytes"] == 6 * tail(min(8, seq // 4))


def test_full_attention_bytes_scale_with_the_slice():
    short = comm("model.pattern=*-", "train.seq_length=64")["layers"]["*"]
    long = comm("model.pattern=*-", "train.seq_length=256")["layers"]["*"]
    assert (short["forward_bytes"], short["backward_bytes"]) == (24 + 12_288, 24_576)
    assert (long["forward_bytes"], long["backward_bytes"]) == (24 + 49_152, 98_304)
    assert long["backward_bytes"] == 4 * short["backward_bytes"]


def test_hybrid_mixers_sum_their_branches_and_step_totals():
    result = comm("model.pattern=L-W-*-H-F-")
    layers = result["layers"]
    assert {code: info["count"] for code, info in layers.items()} == {
        "L": 1, "W": 1, "*": 1, "H": 1, "F": 1}
    assert layers["H"]["forward_bytes"] == GLA_FWD + LENGTH + 3 * tail(8) == 19_224
    assert layers["F"]["backward_bytes"] == GLA_BWD + 6 * tail(16) == 50_688
    # L 39,168 + W 18,456 + * 36,888 + H 57,624 + F 76,056 per micro-batch; 8 / (2 * dp 1) = 4
    assert result["num_microbatches"] == 4
    assert result["stages"][0]["bytes_per_microbatch"] == 228_192
    assert result["step_bytes"] == 4 * 228_192
    json.dumps(result)


def test_recompute_repeats_forward_collectives():
    plain = comm("model.pattern=L-W-*-")
    again = comm("model.pattern=L-W-*-", "train.recompute=full")
    forward = 13_056 + 6_168 + 12_312
    assert plain["step_bytes"] == 4 * (39_168 + 18_456 + 36_888) == 378_048
    assert again["step_bytes"] == 378_048 + 4 * forward == 504_192
    for code in ("L", "W", "*"):
        assert again["layers"][code]["recompute_bytes"] == plain["layers"][code]["forward_bytes"]
    # selective reruns the linear-attention cores only (their state exchange included)
    selective = comm("model.pattern=L-W-*-", "train.recompute=selective")
    assert selective["step_bytes"] == 378_048 + 4 * 13_056
    assert [selective["layers"][c]["recompute_bytes"] for c in ("L", "W", "*")] == [13_056, 0, 0]
    hybrid = comm("model.pattern=H-F-", "train.recompute=selective")["layers"]
    assert hybrid["H"]["recompute_bytes"] == hybrid["F"]["recompute_bytes"] == 13_056
    assert comm("model.pattern=H-", "train.recompute=selective")["ulysses"]["kinds"]["window"][
        "recompute_bytes"] == 0


def test_documents_precision_tp_and_worst_stage():
    docs = comm("model.pattern=L-W-", "data.document_mask=true")["layers"]
    assert docs["L"]["forward_bytes"] == GLA_FWD + 3 * 2 * 2 * 4           # [b, 2] int32
    assert docs["W"]["forward_bytes"] == LENGTH + 3 * tail(8) + 3 * 2 * 8 * 4  # [b, w] int32
    fp32 = comm("model.pattern=W-", device_type="cpu")["layers"]["W"]
    assert fp32["forward_bytes"] == LENGTH + 3 * tail(8, itemsize=4) == 12_312
    tp2 = comm("model.pattern=L-", "parallel.tp=2", world_size=8)["layers"]["L"]
    assert tp2["forward_bytes"] == 3 * 2 * 1 * 16 * 17 * 4                  # Hkv = 1
    staged = comm("model.pattern=L-W-*-*-", "parallel.pp=2", world_size=8)
    assert [s["bytes_per_microbatch"] for s in staged["stages"]] == [39_168 + 18_456, 2 * 36_888]
    assert staged["worst_stage"] == 1 and staged["step_bytes"] == 4 * 2 * 36_888


def test_ulysses_comparison():
    ulysses = comm("model.pattern=L-W-*-")["ulysses"]
    # q, o [b, s, 4*16] and k, v [b, s, 2*16] bf16 = 2*2048 + 2*1024; 3/4 of it leaves the rank
    forward = 3 * (2 * 2 * 16 * 64 * 2 + 2 * 2 * 16 * 32 * 2) // 4
    assert forward == 9_216
    assert set(ulysses["kinds"]) == {"window", "full"}
    for kind, halo in (("window", 18_456), ("full", 36_888)):
        info = ulysses["kinds"][kind]
        assert (info["forward_bytes"], info["total_bytes"]) == (forward, 2 * forward)
        assert info["halo_total_bytes"] == halo
    assert not ulysses["heads_divisible"]                    # 2 kv heads, sp 4
    assert comm("model.pattern=L-")["ulysses"]["kinds"] == {}


def test_sp1_gives_no_section():
    cfg = load_config(TINY)
    assert sp_comm_per_rank(cfg, 1)["enabled"] is False
    plan = make_plan(cfg)
    assert plan["sp_comm"]["enabled"] is False
    assert "sequence-parallel" not in format_plan(plan)
    text = format_plan(make_plan(load_config(TINY, ["parallel.sp=4"])))
    assert "sequence-parallel traffic per rank (sp 4, slice 16 tokens" in text
    assert "Ulysses" in text


def test_7b_at_128k_sp8_doc_numbers():
    # docs/sequence_parallel.md: b 1, Hkv 4, D 128, s 16,384, window 4096, bf16, recompute
    result = sp_comm_per_rank(load_config(SEVEN_B, stage="cpt-128k"), 16)
    packet, halo = 1 * 4 * 128 * 129 * 4, 1 * 8 * 4096 * 128 * 2
    gla, swa = result["layers"]["L"], result["layers"]["W"]
    assert gla["total_bytes"] == 2 * 7 * packet + 2 * 7 * packet == 7_397_376
    assert swa["total_bytes"] == 2 * (7 * 8 + 7 * halo) + 2 * 7 * halo == 234_881_136
    assert result["num_microbatches"] == 32
    # pp 2: each stage holds 7 L and 7 W layers
    assert result["step_bytes"] == 32 * 7 * (7_397_376 + 234_881_136) == 54_270_386_688
    # (2 * 28 + 2 * 4) heads of [1, 16384, 128] bf16, 7/8 of it, forward + grads + recompute
    ulysses = result["ulysses"]["kinds"]["window"]
    assert ulysses["total_bytes"] == 3 * 7 * (64 * 16_384 * 128 * 2) // 8 == 704_643_072
