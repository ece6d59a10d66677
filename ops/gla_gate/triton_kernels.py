"""Triton ``logsigmoid(±g) / normalizer`` (``ops.gla_gate.gate_log_decay``): forward and backward.

    logsigmoid(x) = min(x, 0) - log1p(exp(-|x|))
    d/dx          = sigmoid(-x) = (x >= 0 ? z : 1) / (1 + z),  z = exp(-|x|)

Flat elementwise kernels over the contiguous gate. Only ``tl`` arithmetic (no libdevice
``log1p``): MACA's Triton runs it. Importing this module imports triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024


@triton.jit
def _log1p(z):
    """log(1 + z) for z in [0, 1], accurate for tiny z (Goldberg: log(u) * z / (u - 1))."""
    u = 1.0 + z
    # the safe divisor keeps the unused branch finite where u rounds to 1
    return tl.where(u == 1.0, z, tl.log(u) * (z / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def log_decay_fwd_kernel(g, out, normalizer, n, NEGATE: tl.constexpr, BLOCK: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    b_x = tl.load(g + o, mask=m, other=0.0).to(tl.float32)
    if NEGATE:
        b_x = -b_x
    b_ls = tl.minimum(b_x, 0.0) - _log1p(tl.exp(-tl.abs(b_x)))
    tl.store(out + o, tl.math.div_rn(b_ls, normalizer), mask=m)


@triton.jit
def log_decay_bwd_kernel(g, d_out, d_g, normalizer, n, NEGATE: tl.constexpr, BLOCK: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    b_x = tl.load(g + o, mask=m, other=0.0).to(tl.float32)
    if NEGATE:
        b_x = -b_x
    b_z = tl.exp(-tl.abs(b_x))
    b_sig_neg = tl.where(b_x >= 0, b_z, 1.0) / (1.0 + b_z)
    b_d = tl.math.div_rn(tl.load(d_out + o, mask=m, other=0.0).to(tl.float32), normalizer) * b_sig_neg
    if NEGATE:
        b_d = -b_d
    tl.store(d_g + o, b_d.to(d_g.dtype.element_ty), mask=m)


class _GateLogDecayFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: Tensor, normalizer: float, negate: bool) -> Tensor:
        g = gate.contiguous()
        out = torch.empty(g.shape, dtype=torch.float32, device=g.device)
        n = g.numel()
        if n:
            log_decay_fwd_kernel[(triton.cdiv(n, BLOCK),)](
                g, out, float(normalizer), n, NEGATE=negate, BLOCK=BLOCK, num_warps=4)
        ctx.save_for_backward(g)
        ctx.normalizer, ctx.negate = float(normalizer), negate
        return out

    @staticmethod
    def backward(ctx, d_out: Tensor):
        (g,) = ctx.saved_tensors
        d_out = d_out.contiguous()
        d_g = torch.empty_like(g)
        n = g.numel()
        if n:
            log_decay_bwd_kernel[(triton.cdiv(n, BLOCK),)](
                g, d_out, d_g, ctx.normalizer, n, NEGATE=ctx.negate, BLOCK=BLOCK, num_warps=4)
        return d_g, None, None


def gate_log_decay_triton(gate: Tensor, normalizer: float = 1.0, negate: bool = False) -> Tensor:
    """Triton twin of the ``gate_log_decay`` reference (autograd for the gate)."""
    return _GateLogDecayFunction.apply(gate, normalizer, negate)
