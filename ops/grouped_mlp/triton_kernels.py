"""Triton grouped GEMMs over expert-permuted rows (CUDA and MetaX; no host sync).

Two kernels cover the forward and both gradients of ``y = x @ w[e].T`` per expert:

* ``rows_grouped_mm``: ``out[rows of e] = a[rows of e] @ b[e]`` (forward and dX). The grid
  has ``cdiv(T, BM) + E`` row tiles, an upper bound on the sum of every expert's tiles
  known on the host; each program finds its expert by scanning the counts on the device,
  and surplus programs exit.
* ``k_grouped_mm``: ``out[e] = p[rows of e].T @ q[rows of e]`` (dW). One program per
  (expert, N tile, K tile) loops over that expert's rows; an expert with no rows stores
  zeros. ``k_grouped_mm_accum`` is the same kernel adding into existing (fp32) outputs at a
  constant, possibly negative, distance per expert: the experts' ``main_grad`` in Megatron
  DDP's buffer (gradient-accumulation fusion, ``ops.main_grad.StridedRegion``).
* ``add_into_region``: ``main_grad[e] += dw[e]`` over such a region in one elementwise launch
  (the ``grouped_mm`` backend's fused dW: its GEMM has no accumulating form).

Both accumulate in fp32 and store in the output's dtype (the inputs', or fp32 main grads). fp32 inputs use IEEE dots (no
TF32), so the fp32 tests compare against the reference tightly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ops.grouped_mlp import GroupedGemms  # the package is loaded first (it imports this lazily)
from ops.main_grad import StridedRegion

BLOCK_M, BLOCK_N, BLOCK_K = 64, 128, 64
NUM_WARPS, NUM_STAGES = 4, 3
ADD_BLOCK, ADD_WARPS = 4096, 8


@triton.jit
def _rows_grouped_kernel(a_ptr, b_ptr, c_ptr, counts_ptr, N, K,
                         stride_am, stride_ak, stride_be, stride_bk, stride_bn,
                         stride_cm, stride_cn,
                         E: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                         PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # Which expert owns row tile pid_m: walk the experts' tile counts (E is small, unrolled).
    tile_start = 0
    row_start = 0
    expert = -1
    local_tile = 0
    rows_in_group = 0
    group_row_start = 0
    for e in tl.static_range(E):
        count = tl.load(counts_ptr + e)
        tiles = tl.cdiv(count, BM)
        hit = (pid_m >= tile_start) & (pid_m < tile_start + tiles)
        expert = tl.where(hit, e, expert)
        local_tile = tl.where(hit, pid_m - tile_start, local_tile)
        rows_in_group = tl.where(hit, count, rows_in_group)
        group_row_start = tl.where(hit, row_start, group_row_start)
        tile_start += tiles
        row_start += count
    if expert >= 0:
        offs_m = local_tile * BM + tl.arange(0, BM)
        row_ok = offs_m < rows_in_group
        rows = (group_row_start + offs_m).to(tl.int64)
        offs_n = pid_n * BN + tl.arange(0, BN)
        b_base = b_ptr + expert.to(tl.int64) * stride_be
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            offs_k = k0 + tl.arange(0, BK)
            a = tl.load(a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak,
                        mask=row_ok[:, None] & (offs_k[None, :] < K), other=0.0)
            b = tl.load(b_base + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                        mask=(offs_k[:, None] < K) & (offs_n[None, :] < N), other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        c = c_ptr + rows[:, None] * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n[None, :] < N))


@triton.jit
def _k_grouped_kernel(p_ptr, q_ptr, c_ptr, counts_ptr, N, K,
                      stride_pm, stride_pn, stride_qm, stride_qk,
                      stride_ce, stride_cn, stride_ck,
                      E: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                      PRECISION: tl.constexpr, ACCUMULATE: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    expert = tl.program_id(2)
    row_start = 0
    for e in tl.static_range(E):
        row_start += tl.where(e < expert, tl.load(counts_ptr + e), 0)
    count = tl.load(counts_ptr + expert)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = pid_k * BK + tl.arange(0, BK)
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for m0 in range(0, count, BM):
        offs_m = m0 + tl.arange(0, BM)
        row_ok = offs_m < count
        rows = (row_start + offs_m).to(tl.int64)
        p = tl.load(p_ptr + rows[:, None] * stride_pm + offs_n[None, :] * stride_pn,
                    mask=row_ok[:, None] & (offs_n[None, :] < N), other=0.0)
        q = tl.load(q_ptr + rows[:, None] * stride_qm + offs_k[None, :] * stride_qk,
                    mask=row_ok[:, None] & (offs_k[None, :] < K), other=0.0)
        acc = tl.dot(tl.trans(p), q, acc, input_precision=PRECISION)
    # stride_ce may be negative (DDP lays the experts' main grads out in reverse)
    c = c_ptr + expert.to(tl.int64) * stride_ce + offs_n[:, None] * stride_cn + offs_k[None, :] * stride_ck
    in_tile = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    if ACCUMULATE:
        acc += tl.load(c, mask=in_tile, other=0.0).to(tl.float32)
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=in_tile)


@triton.jit
def _add_into_region_kernel(src_ptr, dst_ptr, numel, dst_step, BLOCK: tl.constexpr):
    expert = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < numel
    src = tl.load(src_ptr + expert * numel + offs, mask=in_range, other=0.0).to(tl.float32)
    dst = dst_ptr + expert * dst_step + offs   # dst_step may be negative (DDP's reversed layout)
    total = tl.load(dst, mask=in_range, other=0.0).to(tl.float32) + src
    tl.store(dst, total.to(dst_ptr.dtype.element_ty), mask=in_range)


def _precision(t: Tensor) -> str:
    return "ieee" if t.dtype == torch.float32 else "tf32"


def rows_grouped_mm(a: Tensor, counts: Tensor, b: Tensor) -> Tensor:
    """``out[rows of e] = a[rows of e] @ b[e]``; ``a`` [T, K], ``b`` [E, K, N] (any strides)."""
    rows, k = a.shape
    num_experts, _, n = b.shape
    out = a.new_empty(rows, n)
    grid = (triton.cdiv(rows, BLOCK_M) + num_experts, triton.cdiv(n, BLOCK_N))
    _rows_grouped_kernel[grid](
        a, b, out, counts, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2),
        out.stride(0), out.stride(1), E=num_experts, BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K,
        PRECISION=_precision(a), num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return out


def k_grouped_mm(p: Tensor, counts: Tensor, q: Tensor, num_experts: int) -> Tensor:
    """``out[e] = p[rows of e].T @ q[rows of e]``; ``p`` [T, N], ``q`` [T, K] -> [E, N, K]."""
    n, k = p.shape[1], q.shape[1]
    out = p.new_empty(num_experts, n, k)
    _launch_k_grouped(p, counts, q, out, out.stride(0), num_experts, accumulate=False)
    return out


def k_grouped_mm_accum(p: Tensor, counts: Tensor, q: Tensor, region: StridedRegion) -> None:
    """``main_grad[e] += p[rows of e].T @ q[rows of e]`` for the experts' ``[N, K]`` main grads
    of ``region`` (beta = 1 in the kernel: the product is never rounded to ``p``'s dtype)."""
    if region.first.shape != (p.shape[1], q.shape[1]):
        raise ValueError(f"main grads {tuple(region.first.shape)} != dW [{p.shape[1]}, {q.shape[1]}]")
    _launch_k_grouped(p, counts, q, region.first, region.step, region.experts, accumulate=True)


def add_into_region(region: StridedRegion, stacked: Tensor) -> None:
    """``main_grad[e] += stacked[e]`` for ``stacked`` ``[E, N, K]`` and the experts' main grads of
    ``region``: the sum torch's ``add_`` gives, in one launch whatever the sign of the step."""
    if stacked.shape != (region.experts, *region.first.shape):
        raise ValueError(f"stacked {tuple(stacked.shape)} != {region.experts} x {tuple(region.first.shape)}")
    stacked = stacked.contiguous()
    numel = region.first.numel()
    grid = (triton.cdiv(numel, ADD_BLOCK), region.experts)
    _add_into_region_kernel[grid](stacked, region.first, numel, region.step, BLOCK=ADD_BLOCK,
                                  num_warps=ADD_WARPS)


def _launch_k_grouped(p: Tensor, counts: Tensor, q: Tensor, out: Tensor, expert_stride: int,
                      num_experts: int, accumulate: bool) -> None:
    """``out`` is expert 0's output (``[E, N, K]`` or ``[N, K]``); expert ``e``'s starts
    ``e * expert_stride`` elements after it."""
    n, k = p.shape[1], q.shape[1]
    grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(k, BLOCK_K), num_experts)
    _k_grouped_kernel[grid](
        p, q, out, counts, n, k, p.stride(0), p.stride(1), q.stride(0), q.stride(1),
        expert_stride, out.stride(-2), out.stride(-1), E=num_experts, BM=BLOCK_M, BN=BLOCK_N,
        BK=BLOCK_K, PRECISION=_precision(p), ACCUMULATE=accumulate, num_warps=NUM_WARPS,
        num_stages=NUM_STAGES)


GEMMS = GroupedGemms(rows_grouped_mm, k_grouped_mm, k_grouped_mm_accum)
"""The Triton backend's primitives for ``ops.grouped_mlp._GroupedLinearFn``."""
