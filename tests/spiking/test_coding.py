"""Spike coding of integer counts: trains, time steps, round trips, errors, sparsity, energy."""

from __future__ import annotations

import pytest
import torch

from sbtrain.spiking import SCHEMES, decode, encode, energy_estimate, time_steps, window_sparsity

SIGNED = ["ternary", "bitwise_bidirectional", "bitwise_twos_complement"]
UNSIGNED = ["binary", "bitwise"]


def t(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


@pytest.mark.parametrize(
    "scheme, value, train",
    [
        ("binary", 3, [1, 1, 1]),
        ("ternary", -2, [-1, -1]),
        ("bitwise", 5, [1, 0, 1]),
        ("bitwise", 6, [1, 1, 0]),
        ("bitwise_bidirectional", -5, [-1, 0, -1]),
        ("bitwise_twos_complement", 3, [0, 1, 1]),
        ("bitwise_twos_complement", -3, [1, 0, 1]),
        ("bitwise_twos_complement", -4, [1, 1, 0, 0]),
    ],
)
def test_hand_computed_trains(scheme: str, value: int, train: list[int]):
    # two's complement: T = bits(|x|) + 1, so -3 -> 3 bits 101 (-4 + 1), -4 -> 4 bits 1100
    got = encode(t(value), scheme)
    assert got.dtype == torch.int8 and got.shape == (len(train), 1)
    assert got[:, 0].tolist() == train
    assert decode(got, scheme).tolist() == [value]


def test_binary_and_ternary_fire_first():
    assert encode(t(2), "binary", T=4)[:, 0].tolist() == [1, 1, 0, 0]
    assert encode(t(-2, 1), "ternary", T=3).tolist() == [[-1, 1], [-1, 0], [0, 0]]


def test_explicit_T_pads():
    assert encode(t(5), "bitwise", T=6)[:, 0].tolist() == [0, 0, 0, 1, 0, 1]
    assert encode(t(-5), "bitwise_bidirectional", T=4)[:, 0].tolist() == [0, -1, 0, -1]
    # sign extension: -3 in 6 bits is 111101
    assert encode(t(-3), "bitwise_twos_complement", T=6)[:, 0].tolist() == [1, 1, 1, 1, 0, 1]
    # -4 fits in 3 bits (100) although the table's rule asks for 4
    assert encode(t(-4), "bitwise_twos_complement", T=3)[:, 0].tolist() == [1, 0, 0]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_round_trip_random(scheme: str):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-40, 41, (3, 5, 7), generator=g, dtype=torch.int32)
    if scheme in UNSIGNED:
        x = x.abs()
    train = encode(x, scheme)
    assert train.shape == (time_steps(x, scheme), 3, 5, 7)
    back = decode(train, scheme)
    assert back.dtype == torch.int64 and torch.equal(back, x.long())
    assert torch.equal(decode(encode(x, scheme, T=train.shape[0] + 2), scheme), x.long())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_round_trip_edges(scheme: str):
    big = 2**20
    x = t(0, 1, big, 2) if scheme in UNSIGNED else t(0, 1, -1, big, -big, -big + 1)
    assert torch.equal(decode(encode(x, scheme), scheme), x)


def test_round_trip_63_bits():
    x = t(2**62, -(2**62), 2**63 - 1, 0)
    assert torch.equal(decode(encode(x, "bitwise_bidirectional"), "bitwise_bidirectional"), x)
    x = t(2**61, -(2**62) + 1, 2**62 - 1, 0)
    assert torch.equal(decode(encode(x, "bitwise_twos_complement"), "bitwise_twos_complement"), x)
    with pytest.raises(ValueError, match="exceeds 63 bits"):
        encode(t(2**62), "bitwise_twos_complement")


def test_time_steps_by_table():
    assert [time_steps(t(256), s) for s in SCHEMES] == [256, 256, 9, 9, 10]
    assert [time_steps(t(0, 0), s) for s in SCHEMES] == [0, 0, 0, 0, 1]
    assert [time_steps(t(), s) for s in SCHEMES] == [0, 0, 0, 0, 1]
    assert time_steps(t(1), "bitwise") == 1 and time_steps(t(-1), "bitwise_twos_complement") == 2


def test_paper_example_counts_levels():
    # "256 -> 256 binary, 128 ternary, 8 bitwise, 7 bidirectional" counts the levels of a range
    assert time_steps(torch.arange(256), "binary") == 255
    assert time_steps(torch.arange(256), "bitwise") == 8
    assert time_steps(torch.arange(-128, 128), "ternary") == 128
    assert time_steps(torch.arange(-127, 128), "bitwise_bidirectional") == 7


def test_all_zero_input():
    x = torch.zeros(2, 3, dtype=torch.int32)
    for scheme in SCHEMES:
        train = encode(x, scheme)
        assert train.shape[0] == (1 if scheme == "bitwise_twos_complement" else 0)
        assert torch.equal(decode(train, scheme), x.long())


@pytest.mark.parametrize("scheme", UNSIGNED)
def test_negative_input_to_unsigned_scheme(scheme: str):
    with pytest.raises(ValueError, match=rf"{scheme}.*non-negative.*min value -3"):
        encode(t(2, -3, 1), scheme)
    with pytest.raises(ValueError, match="min value -1"):
        time_steps(t(-1), scheme)


@pytest.mark.parametrize(
    "scheme, values, T",
    [("binary", (5,), 4), ("ternary", (-5,), 4), ("bitwise", (8,), 3), ("bitwise_bidirectional", (-8,), 3),
     ("bitwise_twos_complement", (4,), 3), ("bitwise_twos_complement", (-5,), 3), ("bitwise_twos_complement", (0,), 0)],
)
def test_T_too_small(scheme: str, values: tuple[int, ...], T: int):
    with pytest.raises(ValueError, match=rf"T={T} time steps cannot hold.*{scheme}"):
        encode(t(*values), scheme, T=T)


def test_other_errors():
    with pytest.raises(ValueError, match="unknown spike coding scheme"):
        encode(t(1), "rate")
    with pytest.raises(TypeError, match="integer"):
        encode(torch.tensor([1.0]), "binary")
    with pytest.raises(ValueError, match="exceeds 63 bits"):
        encode(t(1), "bitwise", T=64)
    with pytest.raises(ValueError, match="values in"):
        decode(torch.tensor([[2]], dtype=torch.int8), "bitwise")
    with pytest.raises(ValueError, match="values in"):
        decode(torch.tensor([[-1]], dtype=torch.int8), "binary")


def test_window_sparsity_hand_example():
    # bidirectional popcounts of |x|: 0,1,1,2(5=101),1(-8=1000),3(7),2,2 -> 12 spikes / (3 * 8) slots
    x = t(0, 1, -1, 5, -8, 7, 3, -3)
    stats = window_sparsity(x)
    assert stats == {"sparsity": 0.5, "mean_spikes_per_channel": 1.5, "silent_fraction": 0.125,
                     "overflow_fraction": 0.125, "T": 3}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_window_sparsity_is_zero_fraction_when_counts_fit(scheme: str):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-3, 4, (50, 20), generator=g)
    if scheme in UNSIGNED:
        x = x.abs()
    T = 4
    train = encode(x, scheme, T=T)
    stats = window_sparsity(x, scheme, T=T)
    assert stats["overflow_fraction"] == 0.0
    assert stats["sparsity"] == pytest.approx((train == 0).float().mean().item())
    assert stats["silent_fraction"] == pytest.approx((train != 0).sum(0).eq(0).float().mean().item())


def test_window_sparsity_overflow_rule():
    # 1000 ternary spikes in a 3-step window of one entry: no spike dropped, sparsity clipped at 0
    stats = window_sparsity(t(1000, 0), "ternary", T=3)
    assert stats["sparsity"] == 0.0 and stats["mean_spikes_per_channel"] == 500.0
    assert stats["overflow_fraction"] == 0.5 and stats["silent_fraction"] == 0.5
    # -1 sign-extended to the 3-bit window fires on all 3 steps
    assert window_sparsity(t(-1), "bitwise_twos_complement", T=3)["mean_spikes_per_channel"] == 3.0
    with pytest.raises(ValueError, match="window T"):
        window_sparsity(t(1), T=0)


def test_report_sparsity_from_mean_spikes():
    # the report's 1.13 spikes / channel in a 3-step window is 62% sparse (its text says 69.15%)
    x = torch.tensor([1] * 87 + [3] * 13)
    stats = window_sparsity(x)
    assert stats["mean_spikes_per_channel"] == pytest.approx(1.13)
    assert stats["sparsity"] == pytest.approx(1 - 1.13 / 3)


def test_energy_report_figures():
    e = energy_estimate(1.13)
    assert e["spike_pj"] == pytest.approx(0.0339) and round(e["spike_pj"], 3) == 0.034
    assert (e["fp16_mac_pj"], e["int8_mac_pj"]) == (1.5, 0.23)
    assert e["reduction_vs_fp16"] == pytest.approx(0.9774)
    assert e["reduction_vs_int8"] == pytest.approx(0.85261, abs=1e-5)
    assert e["ratio_vs_fp16"] == pytest.approx(1.5 / 0.0339) and e["ratio_vs_int8"] == pytest.approx(0.23 / 0.0339)
    # the report's chain: E rounded to 0.034 pJ -> -97.7% / -85.2% -> 1 / (1 - reduction) = 43.48x / 6.76x
    r = energy_estimate(0.034 / 0.03)
    assert round(r["reduction_vs_fp16"], 3) == 0.977 and round(r["reduction_vs_int8"], 3) == 0.852
    assert round(1 / (1 - round(r["reduction_vs_fp16"], 3)), 2) == 43.48
    assert round(1 / (1 - round(r["reduction_vs_int8"], 3)), 2) == 6.76
    assert energy_estimate(0.0)["ratio_vs_fp16"] == float("inf")
    with pytest.raises(ValueError):
        energy_estimate(-1.0)
