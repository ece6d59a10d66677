"""Torch reference of the adaptive-threshold spiking neuron (the spec the Triton kernel matches).

Every step is an elementwise IEEE-754 fp32 operation in a fixed order, so any backend that
performs the same operations gets bit-identical thresholds and counts (see ``ops.spike``
for the contract). Only ``row_abs_sum`` differs from the obvious ``x.abs().mean(-1)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Width of the lane vector that accumulates mean|x| (see ``row_abs_sum``). A backend must
# use exactly this many lanes for rows longer than it; shorter rows may use any power of two
# >= the row length (the extra lanes hold zeros and add nothing).
SUM_LANES = 1024


def lane_count(n_cols: int) -> int:
    """Lanes used for a row of ``n_cols`` elements: the next power of two, at most ``SUM_LANES``."""
    return min(SUM_LANES, 1 << max(n_cols - 1, 0).bit_length())


def row_abs_sum(x: Tensor) -> Tensor:
    """Sum of ``|x|`` over the last dim in fp32, in the fixed order of the contract.

    Column ``c`` goes to lane ``c % L`` (``L = lane_count(n)``); each lane adds its columns
    in increasing column order, then the lanes are summed by a pairwise tree over adjacent
    pairs ``(2j, 2j+1)``. Error bound: about ``(n / L + log2 L)`` ulps, like a pairwise sum.

    Args:
        x: ``[..., N]`` floating tensor.

    Returns:
        ``[..., 1]`` fp32 tensor.
    """
    n = x.shape[-1]
    lanes = lane_count(n)
    a = F.pad(x.abs().float(), (0, (-n) % lanes))
    blocks = a.unflatten(-1, (-1, lanes))
    acc = blocks[..., 0, :]
    for b in range(1, blocks.shape[-2]):
        acc = acc + blocks[..., b, :]
    while acc.shape[-1] > 1:
        acc = acc[..., 0::2] + acc[..., 1::2]
    return acc


def spike_threshold(x: Tensor, k: float = 3.0, vth_min: float = 1e-5, vth_max: float = 1e4) -> Tensor:
    """Per-row threshold ``clamp(mean|x| / k, vth_min, vth_max)`` in fp32, shape ``[..., 1]``."""
    total = row_abs_sum(x)
    # true divisions by device tensors: CUDA turns division by a CPU scalar into a
    # multiplication by its reciprocal, which rounds differently from the kernel's div.rn
    mean = total / torch.full_like(total, x.shape[-1])
    vth = mean / torch.full_like(total, k)
    return vth.clamp(min=vth_min, max=vth_max)


def round_counts(x: Tensor, vth: Tensor) -> Tensor:
    """``round(x / vth)`` in fp32 (half to even), as float: exact integers, unbounded."""
    return torch.round(x.float() / vth)


def naive_spike_counts(
    x: Tensor, k: float = 3.0, vth_min: float = 1e-5, vth_max: float = 1e4
) -> tuple[Tensor, Tensor]:
    """Integer spike counts ``[..., N]`` int32 and threshold ``[..., 1]`` fp32 (no autograd)."""
    with torch.no_grad():
        vth = spike_threshold(x, k, vth_min, vth_max)
        return round_counts(x, vth).to(torch.int32), vth


def naive_spike_forward(x: Tensor, k: float = 3.0, vth_min: float = 1e-5, vth_max: float = 1e4) -> Tensor:
    """``vth * round(x / vth)`` computed in fp32 and cast to ``x.dtype`` (forward values only)."""
    with torch.no_grad():
        vth = spike_threshold(x, k, vth_min, vth_max)
        return (vth * round_counts(x, vth)).to(x.dtype)
