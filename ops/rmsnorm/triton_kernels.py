"""Triton fp32 RMSNorm over the last dim (``ops.rmsnorm.head_rms_norm``): forward and backward.

Rows of ``x`` viewed as ``[rows, d]``. Forward: each program normalises ``BLOCK_M`` rows.
Backward: a fixed number of programs stride over the row blocks, each writing ``dx`` for its
rows and one fp32 partial ``dw`` row; torch sums the partials (``[programs, d]``, small).

    r = rsqrt(mean(x^2) + eps), xh = x r, y = xh w
    dx = r (dy w - xh mean(dy w xh)),  dw = sum_rows dy xh

Only ``tl`` arithmetic is used (no libdevice): MACA's Triton runs it. Importing this module
imports triton; ``ops.rmsnorm`` imports it only when the backend runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# Elements per program tile (rows x padded d).
TILE_ELEMENTS = 4096
# Programs of the backward (each owns one partial dw row).
MAX_BWD_PROGRAMS = 1024


@triton.jit
def rms_norm_fwd_kernel(x, w, y, eps, n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    o_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < n_cols
    m_x = (o_m < n_rows)[:, None] & m_d[None, :]
    o_x = o_m.to(tl.int64)[:, None] * n_cols + o_d[None, :]
    b_x = tl.load(x + o_x, mask=m_x, other=0.0).to(tl.float32)
    b_w = tl.load(w + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_r = tl.rsqrt(tl.sum(b_x * b_x, axis=1) / n_cols + eps)
    b_y = b_x * b_r[:, None] * b_w[None, :]
    tl.store(y + o_x, b_y.to(y.dtype.element_ty), mask=m_x)


@triton.jit
def rms_norm_bwd_kernel(x, w, dy, dx, dw_partial, eps, n_rows, n_cols,
                        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    i_p, n_p = tl.program_id(0), tl.num_programs(0)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < n_cols
    b_w = tl.load(w + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i_b in range(i_p, tl.cdiv(n_rows, BLOCK_M), n_p):
        o_m = i_b * BLOCK_M + tl.arange(0, BLOCK_M)
        m_x = (o_m < n_rows)[:, None] & m_d[None, :]
        o_x = o_m.to(tl.int64)[:, None] * n_cols + o_d[None, :]
        b_x = tl.load(x + o_x, mask=m_x, other=0.0).to(tl.float32)
        b_dy = tl.load(dy + o_x, mask=m_x, other=0.0).to(tl.float32)
        b_r = tl.rsqrt(tl.sum(b_x * b_x, axis=1) / n_cols + eps)
        b_xh = b_x * b_r[:, None]
        b_dxh = b_dy * b_w[None, :]
        b_c = tl.sum(b_dxh * b_xh, axis=1) / n_cols
        b_dx = (b_dxh - b_xh * b_c[:, None]) * b_r[:, None]
        tl.store(dx + o_x, b_dx.to(dx.dtype.element_ty), mask=m_x)
        b_dw += tl.sum(b_dy * b_xh, axis=0)
    tl.store(dw_partial + i_p * n_cols + o_d, b_dw, mask=m_d)


def _blocks(n_rows: int, n_cols: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(n_cols)
    block_m = min(max(1, TILE_ELEMENTS // block_d), triton.next_power_of_2(max(n_rows, 1)))
    return block_m, block_d


def _num_warps(block_m: int, block_d: int) -> int:
    return max(1, min(8, block_m * block_d // 512))


class _HeadRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        w = weight.contiguous()
        n_rows, n_cols = x2.shape
        y = torch.empty_like(x2)
        if n_rows:
            block_m, block_d = _blocks(n_rows, n_cols)
            rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
                x2, w, y, float(eps), n_rows, n_cols, BLOCK_M=block_m, BLOCK_D=block_d,
                num_warps=_num_warps(block_m, block_d))
        ctx.save_for_backward(x2, w)
        ctx.eps, ctx.x_shape = float(eps), x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x2, w = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = dy.reshape(n_rows, n_cols).contiguous()
        dx = torch.empty_like(x2)
        block_m, block_d = _blocks(n_rows, n_cols)
        programs = max(1, min(MAX_BWD_PROGRAMS, triton.cdiv(n_rows, block_m)))
        dw_partial = torch.zeros((programs, n_cols), dtype=torch.float32, device=x2.device)
        if n_rows:
            rms_norm_bwd_kernel[(programs,)](
                x2, w, dy2, dx, dw_partial, ctx.eps, n_rows, n_cols, BLOCK_M=block_m,
                BLOCK_D=block_d, num_warps=_num_warps(block_m, block_d))
        dw = dw_partial.sum(0).to(w.dtype)
        return dx.view(ctx.x_shape), dw, None


def head_rms_norm_triton(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Triton twin of the ``head_rms_norm`` reference (autograd for x and weight)."""
    return _HeadRMSNormFunction.apply(x, weight, eps)
