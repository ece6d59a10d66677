"""Sequence-parallel traffic model: exact bytes worked out by hand from the ring formulas.

Base: examples/configs/tiny.yaml (hidden 64, 4 heads, 2 kv heads, D = 16, b = 2, global batch
8) with sp = 4, so P - 1 = 3, T = 64 and a slice of s = 16 tokens; bf16 activations (cuda).
An all-gather of n bytes per rank costs 3n, an all-reduce of P*n bytes 2 * 3/4 * 4n = 6n.
"""

from __future__ import annotations

import json

import pytest

from parallel.sequence import sp_context, with_exchange
from sbtrain.config import ConfigError, load_config
from sbtrain.profiler import format_plan, make_plan
from sbtrain.profiler.comm import exchange_bytes, softmax_exchanges, sp_comm_per_rank

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
    # Ulysses' all-to-alls (ULYSSES) are not rerun under selective, once more under full
    assert comm("model.pattern=H-", "train.recompute=selective")["exchange_bytes"]["window"][
        "ulysses"] == ULYSSES
    assert comm("model.pattern=H-", "train.recompute=full")["exchange_bytes"]["window"][
        "ulysses"] == ULYSSES + LENGTH + ULYSSES_FWD


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


# Ulysses: q, o [b=2, 4 heads, s=16, D=16] and k, v [b, 2 kv heads, s, D] bf16 = 2*2048 + 2*1024
# bytes; each all-to-all sends 3/4 of its tensor, forward (q/k/v, o) and backward (their grads).
ULYSSES_FWD = 3 * (2 * 2 * 4 * 16 * 16 * 2 + 2 * 2 * 2 * 16 * 16 * 2) // 4
ULYSSES = LENGTH + 2 * ULYSSES_FWD


def test_ulysses_bytes_and_eligibility():
    assert ULYSSES_FWD == 9_216
    result = comm("model.pattern=L-W-*-")
    # every exchange that can serve each kind, eligible or not; the window fits in a slice
    assert result["exchange_bytes"] == {"window": {"halo": LENGTH + 2 * HALO, "tails": 18_456, "ulysses": ULYSSES},
                                        "full": {"tails": 36_888, "ulysses": ULYSSES}}
    # 2 kv heads do not divide by sp 4: not eligible, auto keeps the exchanges of keys
    assert "kv heads (2) per TP rank must divide by sp = 4" in result["ulysses"]["blocker"]
    assert comm("model.pattern=L-")["exchange_bytes"] == {}
    # MHA (4 kv heads): q, k, v, o all [b, 4, s, D]; the same bytes whatever the window
    mha = comm("model.pattern=W-*-", "model.num_query_groups=4", "parallel.sp_softmax_exchange=ulysses")
    forward = 3 * 4 * (2 * 4 * 16 * 16 * 2) // 4
    assert mha["ulysses"]["blocker"] is None and mha["exchanges"] == {"window": "ulysses", "full": "ulysses"}
    for code in ("W", "*"):
        layer = mha["layers"][code]
        assert (layer["forward_bytes"], layer["backward_bytes"]) == (LENGTH + forward, forward) == (12_312, 12_288)
        assert [c["op"] for c in layer["collectives"]] == ["all_gather"] + ["all_to_all"] * 4
    # documents: the whole sequence's ids, an all-gather of [b, s] int32 (3 * 128 bytes)
    docs = comm("model.pattern=*-", "model.num_query_groups=4", "parallel.sp_softmax_exchange=ulysses",
                "data.document_mask=true")
    assert docs["layers"]["*"]["forward_bytes"] == LENGTH + forward + 3 * 2 * 16 * 4


def test_auto_chooses_per_layer_kind_by_bytes():
    # MHA at sp 4: the window's halo (n each way) beats Ulysses; full attention's all-gather of
    # every key ([b, 8, 16, D]: 3n + 6n) loses to Ulysses' 24,600 bytes
    auto = comm("model.pattern=W-*-", "model.num_query_groups=4", "parallel.sp_softmax_exchange=auto")
    costs = auto["exchange_bytes"]
    assert auto["exchanges"] == {"window": "halo", "full": "ulysses"}
    assert costs["full"]["ulysses"] == LENGTH + 2 * 12_288 < costs["full"]["tails"] == LENGTH + 9 * 8_192
    assert costs["window"]["halo"] < costs["window"]["ulysses"] < costs["window"]["tails"]
    # slices shorter than the window (T = 16: 4 tokens < 8): no halo; Ulysses beats the tails
    short = comm("model.pattern=W-", "model.num_query_groups=4", "train.seq_length=16",
                 "parallel.sp_softmax_exchange=auto")
    assert set(short["exchange_bytes"]["window"]) == {"tails", "ulysses"}
    assert short["exchanges"] == {"window": "ulysses"}
    # not eligible (2 kv heads): never chosen by auto; written explicitly: an error naming the key
    assert comm("model.pattern=W-*-", "parallel.sp_softmax_exchange=auto")["exchanges"] == {
        "window": "halo", "full": "tails"}
    with pytest.raises(ConfigError, match="kv heads") as info:
        comm("model.pattern=W-*-", "parallel.sp_softmax_exchange=ulysses")
    assert info.value.key == "parallel.sp_softmax_exchange"


def test_sp1_gives_no_section():
    cfg = load_config(TINY)
    assert sp_comm_per_rank(cfg, 1)["enabled"] is False
    plan = make_plan(cfg)
    assert plan["sp_comm"]["enabled"] is False
    assert "sequence-parallel" not in format_plan(plan)
    text = format_plan(make_plan(load_config(TINY, ["parallel.sp=4"])))
    assert "sequence-parallel traffic per rank (sp 4, slice 16 tokens" in text
    assert "full-attention layer/mb by exchange: tails 36.02 KiB <- used, ulysses 18.02 KiB" in text


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
    # 28 heads, 4 kv heads (2 * 28 + 2 * 4 heads of [1, 16384, 128] bf16, 7/8 of it), forward
    # + grads + recompute: 28 and 4 do not divide by sp 8, so Ulysses is counted, not chosen
    assert result["exchange_bytes"]["window"]["ulysses"] == 2 * 7 * 8 + 3 * 7 * (
        64 * 16_384 * 128 * 2) // 8 == 704_643_184
    assert result["ulysses"]["blocker"] and result["exchanges"] == {"window": "tails"}


# parallel.sp_softmax_exchange: the base's window 8 fits in the 16-token slices, so halo runs.
# The halo sends its last window [b=2, 2*Hkv=4, w=8, D=16] bf16 = tail(8) = 2,048 bytes to the
# next rank and receives as much (forward), and the gradient back the same way (backward).
HALO = tail(8)


def test_halo_tails_and_full_bytes_by_exchange():
    assert HALO == 2_048
    by_exchange = {name: comm("model.pattern=W-*-", f"parallel.sp_softmax_exchange={name}")
                   for name in ("tails", "halo", "auto")}
    tails, halo, auto = (by_exchange[name] for name in ("tails", "halo", "auto"))
    # tails: all-gather of every rank's tail (3n) and the all-reduce of [P, tail] (6n)
    assert tails["exchanges"] == {"window": "tails", "full": "tails"}
    assert tails["layers"]["W"]["exchange"] == {"window": "tails"}
    assert (tails["layers"]["W"]["forward_bytes"], tails["layers"]["W"]["backward_bytes"]) == (
        LENGTH + 3 * HALO, 6 * HALO) == (6_168, 12_288)
    # halo: one send/recv of n each way; the slice-length all-gather stays
    assert halo["exchanges"] == {"window": "halo", "full": "tails"}
    window = halo["layers"]["W"]
    assert window["exchange"] == {"window": "halo"}
    assert (window["forward_bytes"], window["backward_bytes"], window["total_bytes"]) == (
        LENGTH + HALO, HALO, LENGTH + 2 * HALO) == (2_072, 2_048, 4_120)
    assert [c["op"] for c in window["collectives"]] == ["all_gather", "send_recv", "send_recv"]
    # full attention gathers every key under any setting: [b, 4, s=16, D] bf16 = 4,096 bytes
    for result in by_exchange.values():
        full = result["layers"]["*"]
        assert full["exchange"] == {"full": "tails"}
        assert (full["forward_bytes"], full["backward_bytes"]) == (24 + 3 * 4_096, 6 * 4_096)
    # auto picks the cheaper one: the halo's 4,120 bytes against the tails' 18,456
    assert auto["exchanges"] == halo["exchanges"] and auto["layers"] == halo["layers"]
    assert auto["step_bytes"] == 4 * (4_120 + 36_888) < tails["step_bytes"] == 4 * (18_456 + 36_888)
    assert halo["exchange_bytes"]["window"]["halo"] == 4_120


def test_halo_bytes_with_documents_recompute_and_fp32():
    docs = comm("model.pattern=W-", "parallel.sp_softmax_exchange=halo", "data.document_mask=true")
    assert docs["layers"]["W"]["forward_bytes"] == LENGTH + HALO + 2 * 8 * 4     # + [b, w] int32
    again = comm("model.pattern=W-", "parallel.sp_softmax_exchange=halo", "train.recompute=full")
    assert again["layers"]["W"]["recompute_bytes"] == LENGTH + HALO
    fp32 = comm("model.pattern=W-", "parallel.sp_softmax_exchange=halo", device_type="cpu")
    assert fp32["layers"]["W"]["backward_bytes"] == tail(8, itemsize=4) == 4_096


def test_auto_and_halo_keep_tails_when_a_slice_is_shorter_than_the_window():
    # T = 16: slices of 4 tokens < window 8, so the window reaches several ranks back
    for name in ("halo", "auto"):
        short = comm("model.pattern=W-", "train.seq_length=16", f"parallel.sp_softmax_exchange={name}")
        assert short["exchanges"] == {"window": "tails"}
        assert short["layers"]["W"]["forward_bytes"] == LENGTH + 3 * tail(4) == 3_096


def test_the_run_gets_the_exchanges_the_plan_counts():
    # the builder hands softmax_exchanges' choice to the mixers; each sets it on the
    # micro-batch's SP context (with_exchange); an unresolved auto is refused there
    for seq in (16, 64):                   # slices shorter than / at least the window
        cfg = load_config(TINY, ["parallel.sp=4", "model.sliding_window=8", f"train.seq_length={seq}",
                                 "model.pattern=W-*-", "parallel.sp_softmax_exchange=auto"])
        assert softmax_exchanges(cfg) == sp_comm_per_rank(cfg, 4)["exchanges"]
    assert sp_context(None, "ulysses") is None                   # sp 1: nothing to exchange
    assert with_exchange(None, "halo") is None
    with pytest.raises(ValueError, match="unknown softmax exchange 'auto'"):
        sp_context(None, "auto")
    sp1 = load_config(TINY, ["parallel.sp_softmax_exchange=ulysses"])
    assert softmax_exchanges(sp1) == {"window": "tails", "full": "tails"}  # nothing is split
    # sp 2 with H = 2 Hkv: the full tails ([b, 4, 32, D] bf16 = n: n + 2n) and Ulysses (q/k/v
    # 2n and o n, half of each, both ways) tie; a tie keeps the exchange of keys
    sp2 = load_config(TINY, ["parallel.sp=2", "parallel.sp_softmax_exchange=auto"])
    assert exchange_bytes(sp2, "full") == {"tails": 8 + 3 * 8_192, "ulysses": 8 + 3 * 8_192}
    assert softmax_exchanges(sp2)["full"] == "tails"


def test_plan_text_names_the_exchange():
    text = format_plan(make_plan(load_config(TINY, ["parallel.sp=4", "model.sliding_window=8",
                                                    "model.pattern=H-F-",
                                                    "parallel.sp_softmax_exchange=auto"])))
    assert "GLA state + window send/recv" in text
    assert "GLA state + full K/V all-gather" in text
    assert "window-attention layer/mb by exchange: halo 4.02 KiB <- used, tails 18.02 KiB" in text
    assert "(ulysses not eligible: query heads (4) and kv heads (2) per TP rank" in text
    mha = format_plan(make_plan(load_config(TINY, ["parallel.sp=4", "model.pattern=H-F-",
                                                   "model.num_query_groups=4",
                                                   "parallel.sp_softmax_exchange=auto"])))
    assert "GLA state + full K/V all-to-all" in mha and "not eligible" not in mha


def test_7b_at_128k_sp8_halo_doc_numbers():
    # docs/sequence_parallel.md: one window [1, 8, 4096, 128] bf16 = 8 MiB each way, recompute on
    cfg = load_config(SEVEN_B, ["parallel.sp=8", "train.seq_length=131072",
                                "parallel.sp_softmax_exchange=auto"])
    swa = sp_comm_per_rank(cfg, 16)["layers"]["W"]
    window = 1 * 8 * 4096 * 128 * 2
    assert (swa["forward_bytes"], swa["backward_bytes"]) == (7 * 8 + window, window)
    assert swa["total_bytes"] == 2 * (7 * 8 + window) + window == 25_165_936
