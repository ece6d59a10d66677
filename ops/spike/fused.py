"""Fused Triton kernel of the adaptive-threshold spiking neuron: one launch for all rows.

Each program owns ``BLOCK_M`` rows. It accumulates ``|x|`` over column blocks into
``naive.lane_count(N)`` fp32 lanes, sums the lanes by the pairwise tree of
``naive.row_abs_sum``, derives the threshold, then walks the row again (from L2) to write
the counts and/or ``y``. Every floating step mirrors ``naive.py`` operation by operation,
which is what makes the results bit-identical to the reference (contract in ``ops.spike``).
FP fusion (FMA contraction) cannot change that: the only multiply feeding an add is the
parity test in ``_round_half_even``, which is exact either way.

Importing this module imports triton; ``ops.spike`` imports it only when the backend runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ops.spike.naive import lane_count

# Elements per program: enough bytes in flight per SM on wide rows, several rows per
# program on narrow ones (rows of 16 would otherwise leave most lanes of a warp idle).
TILE_ELEMENTS = 2048


@triton.jit
def _pairwise_lane_sum(b_acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LOG2_N: tl.constexpr):
    """Sum ``[BLOCK_M, BLOCK_N]`` over lanes by adjacent pairs (2j, 2j+1), as ``naive.row_abs_sum``."""
    for i in tl.static_range(LOG2_N):
        b_lo, b_hi = tl.split(tl.reshape(b_acc, (BLOCK_M, BLOCK_N >> (i + 1), 2)))
        b_acc = b_lo + b_hi
    return tl.reshape(b_acc, (BLOCK_M,))


@triton.jit
def _round_half_even(b_q):
    """``torch.round`` in fp32 from floor and compare only (no libdevice: portable to MACA).

    Works on ``|q|``: there ``|q| - floor(|q|)`` is exact (Sterbenz), so the tie test is exact.
    """
    b_a = tl.abs(b_q)
    b_f = tl.floor(b_a)
    b_d = b_a - b_f
    b_odd = (b_f - 2.0 * tl.floor(b_f * 0.5)) == 1.0
    b_r = tl.where((b_d > 0.5) | ((b_d == 0.5) & b_odd), b_f + 1.0, b_f)
    return tl.where(b_q < 0, -b_r, b_r)


@triton.jit
def spike_fwd_kernel(
    x, y, counts, vth, k, vth_min, vth_max, n_cols_f, n_rows, n_cols,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LOG2_N: tl.constexpr,
    WRITE_Y: tl.constexpr, WRITE_COUNTS: tl.constexpr,
):
    i_m = tl.program_id(0)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < n_rows
    o_n = tl.arange(0, BLOCK_N)
    o_row = o_m.to(tl.int64) * n_cols

    b_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for i_n in range(0, n_cols, BLOCK_N):
        o_c = i_n + o_n
        m_x = m_m[:, None] & (o_c < n_cols)[None, :]
        # keep the row in L2 for the second walk, which reads it for the last time
        b_x = tl.load(x + o_row[:, None] + o_c[None, :], mask=m_x, other=0.0, eviction_policy="evict_last")
        b_acc += tl.abs(b_x.to(tl.float32))
    b_sum = _pairwise_lane_sum(b_acc, BLOCK_M, BLOCK_N, LOG2_N)
    # div_rn: the plain `/` lowers to the approximate div.full.f32 on NVIDIA
    b_vth = tl.math.div_rn(tl.math.div_rn(b_sum, n_cols_f), k)
    b_vth = tl.minimum(tl.maximum(b_vth, vth_min), vth_max)
    tl.store(vth + o_m, b_vth, mask=m_m)

    for i_n in range(0, n_cols, BLOCK_N):
        o_c = i_n + o_n
        m_x = m_m[:, None] & (o_c < n_cols)[None, :]
        o_x = o_row[:, None] + o_c[None, :]
        b_x = tl.load(x + o_x, mask=m_x, other=0.0, eviction_policy="evict_first")
        b_r = _round_half_even(tl.math.div_rn(b_x.to(tl.float32), b_vth[:, None]))
        if WRITE_COUNTS:
            tl.store(counts + o_x, b_r.to(tl.int32), mask=m_x)
        if WRITE_Y:
            tl.store(y + o_x, (b_vth[:, None] * b_r).to(y.dtype.element_ty), mask=m_x)


def _launch(x: Tensor, k: float, vth_min: float, vth_max: float, *, write_y: bool, write_counts: bool):
    """Run the kernel on ``x`` viewed as ``[rows, N]``; returns ``(y, counts, vth)`` (None if not written)."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    n_rows, n_cols = x2.shape
    vth = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    y = torch.empty_like(x2) if write_y else None
    counts = torch.empty(x2.shape, dtype=torch.int32, device=x.device) if write_counts else None
    if n_rows > 0:
        block_n = lane_count(n_cols)
        block_m = min(max(1, TILE_ELEMENTS // block_n), triton.next_power_of_2(n_rows))
        grid = (triton.cdiv(n_rows, block_m),)
        spike_fwd_kernel[grid](
            x2, x2 if y is None else y, x2 if counts is None else counts, vth,
            float(k), float(vth_min), float(vth_max), float(n_cols), n_rows, n_cols,
            BLOCK_M=block_m, BLOCK_N=block_n, LOG2_N=block_n.bit_length() - 1,
            WRITE_Y=write_y, WRITE_COUNTS=write_counts,
            num_warps=max(1, min(8, block_m * block_n // 256)),
        )
    shape = (*x.shape[:-1], 1)
    return (None if y is None else y.view(x.shape), None if counts is None else counts.view(x.shape),
            vth.view(shape))


def fused_spike_counts(
    x: Tensor, k: float = 3.0, vth_min: float = 1e-5, vth_max: float = 1e4
) -> tuple[Tensor, Tensor]:
    """Triton twin of ``naive.naive_spike_counts``: ``(counts int32 [..., N], vth fp32 [..., 1])``."""
    _, counts, vth = _launch(x.detach(), k, vth_min, vth_max, write_y=False, write_counts=True)
    return counts, vth


def fused_spike_forward(x: Tensor, k: float = 3.0, vth_min: float = 1e-5, vth_max: float = 1e4) -> Tensor:
    """Triton twin of ``naive.naive_spike_forward``: ``vth * round(x / vth)`` in ``x.dtype``."""
    y, _, _ = _launch(x.detach(), k, vth_min, vth_max, write_y=True, write_counts=False)
    return y
