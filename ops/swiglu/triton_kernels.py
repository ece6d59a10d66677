"""Triton SwiGLU: one elementwise kernel forward, one backward (recomputing the sigmoid).

Rows of ``x`` viewed as ``[rows, 2F]`` (gate half first); program ``(r, c)`` owns row ``r``,
columns ``[c * BLOCK, (c + 1) * BLOCK)`` of both halves. All math is fp32; each output is
rounded once to the tensor's dtype. Only ``x`` is saved for backward (``2F`` per token, the
same as Megatron's fused ``SwiGLUFunction``), the output is not.

Only ``tl`` arithmetic and ``tl.sigmoid`` are used (no libdevice): MACA's Triton runs it.
Importing this module imports triton; ``ops.swiglu`` imports it only when the backend runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_BLOCK = 1024


@triton.jit
def swiglu_fwd_kernel(x, y, n_half, BLOCK: tl.constexpr):
    i_r = tl.program_id(0).to(tl.int64)
    o_c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m_c = o_c < n_half
    p_x = x + i_r * 2 * n_half
    b_gate = tl.load(p_x + o_c, mask=m_c, other=0.0).to(tl.float32)
    b_lin = tl.load(p_x + n_half + o_c, mask=m_c, other=0.0).to(tl.float32)
    b_y = b_gate * tl.sigmoid(b_gate) * b_lin
    tl.store(y + i_r * n_half + o_c, b_y.to(y.dtype.element_ty), mask=m_c)


@triton.jit
def swiglu_bwd_kernel(x, dy, dx, n_half, BLOCK: tl.constexpr):
    i_r = tl.program_id(0).to(tl.int64)
    o_c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m_c = o_c < n_half
    p_x = x + i_r * 2 * n_half
    b_gate = tl.load(p_x + o_c, mask=m_c, other=0.0).to(tl.float32)
    b_lin = tl.load(p_x + n_half + o_c, mask=m_c, other=0.0).to(tl.float32)
    b_dy = tl.load(dy + i_r * n_half + o_c, mask=m_c, other=0.0).to(tl.float32)
    b_sig = tl.sigmoid(b_gate)
    b_silu = b_gate * b_sig
    # d silu(a) / da = sig(a) * (1 + a * (1 - sig(a)))
    b_dgate = b_dy * b_lin * b_sig * (1.0 + b_gate * (1.0 - b_sig))
    p_dx = dx + i_r * 2 * n_half
    tl.store(p_dx + o_c, b_dgate.to(dx.dtype.element_ty), mask=m_c)
    tl.store(p_dx + n_half + o_c, (b_dy * b_silu).to(dx.dtype.element_ty), mask=m_c)


def _grid(n_rows: int, n_half: int) -> tuple[tuple[int, int], int]:
    block = min(MAX_BLOCK, triton.next_power_of_2(n_half))
    return (n_rows, triton.cdiv(n_half, block)), block


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        n_rows, n_half = x2.shape[0], x2.shape[1] // 2
        y = torch.empty((n_rows, n_half), dtype=x.dtype, device=x.device)
        if n_rows:
            grid, block = _grid(n_rows, n_half)
            swiglu_fwd_kernel[grid](x2, y, n_half, BLOCK=block, num_warps=4)
        ctx.save_for_backward(x2)
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], n_half)

    @staticmethod
    def backward(ctx, dy: Tensor):
        (x2,) = ctx.saved_tensors
        n_rows, n_half = x2.shape[0], x2.shape[1] // 2
        dy2 = dy.reshape(n_rows, n_half).contiguous()
        dx = torch.empty_like(x2)
        if n_rows:
            grid, block = _grid(n_rows, n_half)
            swiglu_bwd_kernel[grid](x2, dy2, dx, n_half, BLOCK=block, num_warps=4)
        return dx.view(ctx.x_shape)


def swiglu_triton(x: Tensor) -> Tensor:
    """Triton twin of the ``swiglu`` reference (autograd included)."""
    return _SwiGLUFunction.apply(x)
