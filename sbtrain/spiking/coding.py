"""Spike coding of integer spike counts (SpikingBrain report Sec. 3.2, ``Int2Spike/neuron.py``).

A count tensor ``x`` (integers, any shape) becomes a spike train ``[T, *x.shape]`` with a
new leading time dim, and back. Schemes (``T`` is the time steps the values need):

=========================  ==========  ==============================  =========================
scheme                     values      T                               decode
=========================  ==========  ==============================  =========================
binary                     {0, 1}      max(x); needs x >= 0            sum_t s_t
ternary                    {-1, 0, 1}  max|x|                          sum_t s_t
bitwise                    {0, 1}      ceil(log2(max + 1)); x >= 0     sum_t 2^(T-1-t) s_t
bitwise_bidirectional      {-1, 0, 1}  ceil(log2(max|x| + 1))          sum_t 2^(T-1-t) s_t
bitwise_twos_complement    {0, 1}      ceil(log2(max|x| + 1)) + 1      as bitwise, MSB weight -2^(T-1)
=========================  ==========  ==============================  =========================

Bitwise trains are MSB first. Binary fires at the first ``x`` steps; ternary fires
``sign(x)`` at the first ``|x|`` steps. An all-zero (or empty) input needs ``T = 0`` steps,
except two's complement, which always keeps its sign bit (``T >= 1``).

The report's example "256 -> 256 steps binary, 128 ternary, 8 bitwise, 7 bidirectional"
counts *levels* of a value range, not one value: 256 levels are [0, 255] for the unsigned
codes (255 binary steps, 8 bits) and a symmetric range of about +-127 for the signed ones
(127 ternary steps, 7 bidirectional bits). The table's rules, applied to the single count
256, give 256 / 256 / 9 / 9 / 10 steps; this module implements the table.

Sparsity and energy follow Sec. 5.5 of the report (see :func:`window_sparsity`, its
histogram form :func:`histogram_window_sparsity`, and :func:`energy_estimate`).
"""

from __future__ import annotations

import torch
from torch import Tensor

SCHEMES = ("binary", "ternary", "bitwise", "bitwise_bidirectional", "bitwise_twos_complement")
_UNSIGNED = frozenset({"binary", "bitwise"})
_SIGNED_VALUES = frozenset({"ternary", "bitwise_bidirectional"})
_BITWISE = frozenset({"bitwise", "bitwise_bidirectional", "bitwise_twos_complement"})
# int64 weights 2^(T-1) must not overflow
MAX_BITS = 63

# Energy per operation at 45 nm, as used by the SpikingBrain report (Sec. 5.5; the figures
# are Horowitz, "Computing's energy problem", ISSCC 2014).
FP16_MAC_PJ = 1.5
INT8_MAC_PJ = 0.23
INT8_ADD_PJ = 0.03


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown spike coding scheme {scheme!r}; expected one of {SCHEMES}")


def _as_counts(counts: Tensor, scheme: str) -> Tensor:
    """``counts`` as int64, checked for the scheme (unsigned schemes reject negative values)."""
    _check_scheme(scheme)
    if counts.dtype.is_floating_point or counts.dtype.is_complex or counts.dtype == torch.bool:
        raise TypeError(f"spike coding needs an integer count tensor, got {counts.dtype}")
    x = counts.long()
    if scheme in _UNSIGNED and x.numel() and (low := int(x.min())) < 0:
        raise ValueError(f"scheme {scheme!r} encodes non-negative counts only; got min value {low}")
    return x


def _needed_steps(x: Tensor, scheme: str) -> int:
    """Time steps needed by the int64 counts ``x`` (already checked)."""
    peak = int(x.abs().max()) if x.numel() else 0
    if scheme in ("binary", "ternary"):
        return peak
    bits = peak.bit_length()
    return bits + 1 if scheme == "bitwise_twos_complement" else bits


def time_steps(counts: Tensor, scheme: str) -> int:
    """Number of time steps ``scheme`` needs for every value of ``counts`` (see the module table)."""
    return _needed_steps(_as_counts(counts, scheme), scheme)


def _fits(x: Tensor, scheme: str, T: int) -> bool:
    """Whether every value of ``x`` is representable in ``T`` steps of ``scheme``."""
    if scheme == "bitwise_twos_complement" and T < 1:
        return False
    return bool(_fits_each(x, scheme, T).all())


def _fits_each(x: Tensor, scheme: str, T: int) -> Tensor:
    """Per entry: whether its own train fits in ``T`` steps."""
    if scheme == "bitwise_twos_complement":
        return (x >= -(1 << (T - 1))) & (x <= (1 << (T - 1)) - 1)
    if scheme in ("binary", "ternary"):
        return x.abs() <= T
    return x.abs() <= (1 << T) - 1


def _resolve_T(x: Tensor, scheme: str, T: int | None) -> int:
    """The explicit ``T`` checked against the values, or the needed steps."""
    T = _needed_steps(x, scheme) if T is None else T
    if scheme in _BITWISE and T > MAX_BITS:
        raise ValueError(f"scheme {scheme!r}: T={T} exceeds {MAX_BITS} bits (int64 weights)")
    if T < 0 or not _fits(x, scheme, T):
        raise ValueError(f"T={T} time steps cannot hold these counts with scheme {scheme!r}; "
                         f"it needs T >= {_needed_steps(x, scheme)}")
    return T


def _time_index(T: int, x: Tensor) -> Tensor:
    """``[T, 1, ..., 1]`` step index broadcasting against ``x``."""
    return torch.arange(T, device=x.device).view(T, *([1] * x.dim()))


def encode(counts: Tensor, scheme: str, T: int | None = None) -> Tensor:
    """Spike train of ``counts`` under ``scheme``.

    Args:
        counts: integer tensor of any shape.
        scheme: one of ``SCHEMES``.
        T: time steps; default the steps the values need (:func:`time_steps`). A larger ``T``
            pads (leading zero bits, sign-extended for two's complement; trailing silence for
            binary/ternary); a smaller one raises ``ValueError``.

    Returns:
        int8 ``[T, *counts.shape]`` with values in {0, 1} or {-1, 0, 1}.
    """
    x = _as_counts(counts, scheme)
    T = _resolve_T(x, scheme, T)
    t = _time_index(T, x)
    if scheme in ("binary", "ternary"):
        train = torch.sign(x) * (x.abs() > t)
    elif scheme == "bitwise":
        train = (x >> (T - 1 - t)) & 1
    elif scheme == "bitwise_bidirectional":
        train = torch.sign(x) * ((x.abs() >> (T - 1 - t)) & 1)
    else:
        train = ((x & ((1 << T) - 1)) >> (T - 1 - t)) & 1
    return train.to(torch.int8)


def _bit_weights(T: int, train: Tensor, twos_complement: bool) -> Tensor:
    """``[T, 1, ..., 1]`` int64 weights ``2^(T-1-t)``, the MSB negative for two's complement."""
    w = torch.tensor([1 << (T - 1 - t) for t in range(T)], dtype=torch.int64, device=train.device)
    if twos_complement and T:
        w[0] = -w[0]
    return w.view(T, *([1] * (train.dim() - 1)))


def decode(train: Tensor, scheme: str) -> Tensor:
    """Counts (int64, ``train.shape[1:]``) of a spike train ``[T, ...]`` made by :func:`encode`."""
    _check_scheme(scheme)
    if train.dim() == 0:
        raise ValueError("a spike train needs a leading time dim")
    s = train.long()
    allowed = (-1, 0, 1) if scheme in _SIGNED_VALUES else (0, 1)
    if s.numel() and (int(s.min()) < allowed[0] or int(s.max()) > allowed[-1]):
        raise ValueError(f"scheme {scheme!r} spike trains hold values in {allowed}; "
                         f"got range [{int(s.min())}, {int(s.max())}]")
    T = s.shape[0]
    if scheme in ("binary", "ternary"):
        return s.sum(0)
    if T > MAX_BITS:
        raise ValueError(f"scheme {scheme!r}: T={T} exceeds {MAX_BITS} bits (int64 weights)")
    return (s * _bit_weights(T, s, scheme == "bitwise_twos_complement")).sum(0)


def _popcount(a: Tensor) -> Tensor:
    """Set bits of each non-negative int64 (SWAR: a handful of ops instead of 63 shifts)."""
    a = a - ((a >> 1) & 0x5555555555555555)
    a = (a & 0x3333333333333333) + ((a >> 2) & 0x3333333333333333)
    a = (a + (a >> 4)) & 0x0F0F0F0F0F0F0F0F
    a = a + (a >> 8)
    a = a + (a >> 16)
    a = a + (a >> 32)
    return a & 0x7F


def _spikes_per_entry(x: Tensor, scheme: str, width: int) -> Tensor:
    """Nonzero steps of each entry's train; two's complement sign-extends to ``width`` bits."""
    if scheme in ("binary", "ternary"):
        return x.abs()
    if scheme == "bitwise_twos_complement":
        return _popcount(x & ((1 << width) - 1))
    return _popcount(x.abs())


def window_sparsity(counts: Tensor, scheme: str = "bitwise_bidirectional", T: int = 3) -> dict:
    """Firing statistics of ``counts`` coded with ``scheme`` in a window of ``T`` steps (report Sec. 5.5).

    The report expands the counts with bidirectional bitwise coding into a 3-step window,
    fills the unused bits with 0 and reports the fraction of zero entries (69.15% at k=3).
    It does not say how counts that need more than ``T`` steps are treated. Rule here: no
    spike is dropped. Each entry keeps all the spikes of its full train (two's complement
    sign-extended to ``max(T, steps needed)`` bits), and

        sparsity = max(0, 1 - total_spikes / (T * numel)).

    When every count fits in the window this is exactly the fraction of zeros of the
    ``[T, ...]`` spike tensor. Counts that overflow the window only lower it, so the value
    is conservative; ``overflow_fraction`` says how many entries needed more than ``T``.

    Returns:
        ``{"sparsity", "mean_spikes_per_channel", "silent_fraction", "overflow_fraction", "T"}``:
        mean spikes per entry, fraction of entries that never fire, fraction of entries
        needing more than ``T`` steps, and the window.
    """
    x = _as_counts(counts, scheme)
    if T < 1:
        raise ValueError(f"window T must be >= 1, got {T}")
    if not x.numel():
        raise ValueError("window_sparsity needs at least one count")
    values, freqs = torch.unique(x, return_counts=True)
    return histogram_window_sparsity(values, freqs, scheme, T)


def histogram_window_sparsity(values: Tensor, freqs: Tensor, scheme: str = "bitwise_bidirectional",
                              T: int = 3) -> dict:
    """:func:`window_sparsity` of a count tensor given by its histogram.

    ``freqs[i]`` entries hold the count ``values[i]``; entries with frequency 0 are ignored
    (also for the two's complement width). Used to aggregate many activations without
    keeping them (``sbtrain spikestats``).
    """
    if T < 1:
        raise ValueError(f"window T must be >= 1, got {T}")
    if values.shape != freqs.shape or values.dim() != 1:
        raise ValueError(f"values and freqs must be 1-D of one shape, got {tuple(values.shape)} "
                         f"and {tuple(freqs.shape)}")
    present = freqs > 0
    x, f = _as_counts(values[present], scheme), freqs[present].long()
    numel = int(f.sum())
    if not numel:
        raise ValueError("window_sparsity needs at least one count")
    width = max(T, _needed_steps(x, scheme))
    spikes = _spikes_per_entry(x, scheme, width)
    total = int((spikes * f).sum())
    overflow = int(f[~_fits_each(x, scheme, T)].sum())
    return {
        "sparsity": max(0.0, 1.0 - total / (T * numel)),
        "mean_spikes_per_channel": total / numel,
        "silent_fraction": int(f[spikes == 0].sum()) / numel,
        "overflow_fraction": overflow / numel,
        "T": T,
    }


def energy_estimate(mean_spikes_per_channel: float) -> dict:
    """Energy per MAC-equivalent of spiking vs FP16 and INT8 MACs (report Sec. 5.5, 45 nm).

    A spiking layer replaces each multiply-accumulate by one add per spike:
    ``E = mean spikes x 0.03 pJ``. The report rounds 1.13 x 0.03 = 0.0339 to 0.034 pJ, then
    the reductions to 97.7% (FP16) and 85.2% (INT8); its ratios 43.48x and 6.76x are
    ``1 / (1 - reduction)`` of those rounded percentages. Nothing is rounded here: 1.13
    spikes give 0.0339 pJ, 97.74% / 85.26%, 44.2x / 6.78x.

    Returns:
        ``{"spike_pj", "fp16_mac_pj", "int8_mac_pj", "reduction_vs_fp16", "reduction_vs_int8",
        "ratio_vs_fp16", "ratio_vs_int8"}`` (reductions as fractions, ratios as factors).
    """
    if mean_spikes_per_channel < 0:
        raise ValueError(f"mean spikes per channel must be >= 0, got {mean_spikes_per_channel}")
    spike_pj = mean_spikes_per_channel * INT8_ADD_PJ
    inv = 1.0 / spike_pj if spike_pj else float("inf")
    return {
        "spike_pj": spike_pj,
        "fp16_mac_pj": FP16_MAC_PJ,
        "int8_mac_pj": INT8_MAC_PJ,
        "reduction_vs_fp16": 1.0 - spike_pj / FP16_MAC_PJ,
        "reduction_vs_int8": 1.0 - spike_pj / INT8_MAC_PJ,
        "ratio_vs_fp16": FP16_MAC_PJ * inv,
        "ratio_vs_int8": INT8_MAC_PJ * inv,
    }
