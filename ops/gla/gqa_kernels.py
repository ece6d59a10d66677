"""GQA-aware Triton kernels of chunked GLA: q has ``HQ = H * G`` heads, k, v and g have ``H``.

Ports of fla-core 0.6.0's ``fla/ops/gla/chunk.py`` and ``fla/ops/common/chunk_h.py`` kernels
(MIT, (c) Songlin Yang, Yu Zhang, Zhiyuan Li) with one change of substance: query-side tensors
(q, do, o, A, dA, dq) are addressed by query head ``i_hq``, key-side tensors (k, v, g, h, dh) by
its kv head ``i_hq // G``. Kernels that produce a key-side result (dh, dv, dk, dg) run one program
per kv head and loop over the G query heads of its group, so no 28-head copy of k, v or g and no
28-head gradient of them is ever written. The recurrent state itself (``fla``'s ``chunk_fwd_h``)
depends only on k, v, g and runs unchanged on the H kv heads. Decays are in log2 units
(``chunk_local_cumsum(g, scale=1/ln 2)``), as in fla.

This module holds the shared helpers and the forward kernels; ``gqa_kernels_bwd`` the backward.
Layouts as fla: ``[B, T, heads, D]``; states ``[B, NT, H, K, V]``; ``A``/``dA`` ``[B, T, HQ, BT]``.
With ``cu_seqlens`` (B = 1) chunks are listed by ``chunk_indices`` (sequence, chunk) pairs.
"""

from __future__ import annotations

import triton
import triton.language as tl
# fla's switch (FLA_CACHE_RESULTS) for Triton's autotune disk cache, so that scripts/tune_fla.py
# stores these kernels' results beside fla's (ops/gla/tuning.py seeds them)
from fla.utils import autotune_cache_kwargs

VARLEN = triton.heuristics({"IS_VARLEN": lambda args: args["cu_seqlens"] is not None})


def autotune_configs(blocks: dict[str, tuple[int, ...]], warps: tuple[int, ...], stages: tuple[int, ...]):
    """Every combination of block sizes, warps and stages as Triton autotune configs."""
    combos = [{}]
    for name, sizes in blocks.items():
        combos = [{**c, name: s} for c in combos for s in sizes]
    return [triton.Config(c, num_warps=w, num_stages=s) for c in combos for w in warps for s in stages]


@triton.jit
def exp2(x):
    return tl.math.exp2(x.to(tl.float32))


@triton.jit
def chunk_bounds(i_t, i_b, cu_seqlens, chunk_indices, T, IS_VARLEN: tl.constexpr):
    """(chunk index within its sequence, sequence start, sequence length)."""
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_t * 2).to(tl.int32)
        i_t = tl.load(chunk_indices + i_t * 2 + 1).to(tl.int64)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        T = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    else:
        bos = (i_b * T).to(tl.int64)
    return i_t, bos, T


@triton.jit
def global_chunk(i_t, i_b, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Index of a chunk among all chunks of the batch (the state tensors' chunk axis)."""
    if IS_VARLEN:
        i_tg = i_t
    else:
        i_tg = i_b * tl.cdiv(T, BT) + i_t
    return i_tg


# ---------------------------------------------------------------- forward: intra-chunk scores A


@VARLEN
@triton.autotune(configs=autotune_configs({"BK": (32, 64)}, (2, 4), (2, 3)),
                  key=["BC", "K", "G"], **autotune_cache_kwargs)
@triton.jit(do_not_specialize=["T"])
def gqa_fwd_A_inter(q, k, g, A, cu_seqlens, chunk_indices, scale, T, H: tl.constexpr, G: tl.constexpr,
                    K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, NC: tl.constexpr,
                    IS_VARLEN: tl.constexpr):
    """A between sub-chunks i > j of one chunk (fla's ``chunk_gla_fwd_A_kernel_intra_sub_inter``)."""
    HQ: tl.constexpr = H * G
    i_t, i_c, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    i_b, i_hq = i_bh // HQ, i_bh % HQ
    i_h = i_hq // G
    i_i, i_j = i_c // NC, i_c % NC
    i_t, bos, T = chunk_bounds(i_t, i_b, cu_seqlens, chunk_indices, T, IS_VARLEN)
    if i_t * BT + i_i * BC >= T:
        return
    if i_i <= i_j:
        return
    b_A = tl.zeros([BC, BC], dtype=tl.float32)
    o_i = i_t * BT + i_i * BC + tl.arange(0, BC)
    o_j = i_t * BT + i_j * BC + tl.arange(0, BC)
    m_i, m_j = o_i < T, o_j < T
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_qk = m_i[:, None] & m_k[None, :]
        m_kj = m_k[:, None] & m_j[None, :]
        p_q = q + (bos * HQ + i_hq) * K + o_i[:, None] * (HQ * K) + o_k[None, :]
        p_g = g + (bos * H + i_h) * K + o_i[:, None] * (H * K) + o_k[None, :]
        p_k = k + (bos * H + i_h) * K + o_k[:, None] + o_j[None, :] * (H * K)
        p_gk = g + (bos * H + i_h) * K + o_k[:, None] + o_j[None, :] * (H * K)
        p_gn = g + (bos + i_t * BT + i_i * BC) * H * K + i_h * K + o_k
        b_gn = tl.load(p_gn, mask=m_k, other=0)
        b_q = tl.load(p_q, mask=m_qk, other=0.0)
        b_g = tl.load(p_g, mask=m_qk, other=0.0)
        b_qg = b_q * exp2(b_g - b_gn[None, :]) * scale
        b_k = tl.load(p_k, mask=m_kj, other=0.0)
        b_gk = tl.load(p_gk, mask=m_kj, other=0.0)
        b_kg = b_k * exp2(b_gn[:, None] - b_gk)
        b_A = tl.dot(b_qg, b_kg, b_A)
    o_jA = i_j * BC + tl.arange(0, BC)
    p_A = A + (bos * HQ + i_hq) * BT + o_i[:, None] * (HQ * BT) + o_jA[None, :]
    tl.store(p_A, b_A.to(A.dtype.element_ty), mask=m_i[:, None] & (o_jA[None, :] < BT))


@VARLEN
@triton.autotune(configs=autotune_configs({}, (1, 2, 4), (2,)), key=["BK", "BT", "G"], **autotune_cache_kwargs)
@triton.jit(do_not_specialize=["T"])
def gqa_fwd_A_intra(q, k, g, A, cu_seqlens, chunk_indices, scale, T, H: tl.constexpr, G: tl.constexpr,
                    K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                    IS_VARLEN: tl.constexpr):
    """A within each diagonal sub-chunk (fla's ``chunk_gla_fwd_A_kernel_intra_sub_intra``, K <= 256)."""
    HQ: tl.constexpr = H * G
    i_t, i_i, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    i_b, i_hq = i_bh // HQ, i_bh % HQ
    i_h = i_hq // G
    i_t, bos, T = chunk_bounds(i_t, i_b, cu_seqlens, chunk_indices, T, IS_VARLEN)
    if i_t * BT + i_i * BC >= T:
        return
    o_i = tl.arange(0, BC)
    o_k = tl.arange(0, BK)
    o_c = i_t * BT + i_i * BC + tl.arange(0, BC)
    o_A = (bos * HQ + i_hq) * BT + o_c * (HQ * BT) + i_i * BC
    m_k = o_k < K
    m_A = o_c < T
    m_qk = m_A[:, None] & m_k[None, :]
    b_q = tl.load(q + (bos * HQ + i_hq) * K + o_c[:, None] * (HQ * K) + o_k[None, :], mask=m_qk, other=0.0)
    b_g = tl.load(g + (bos * H + i_h) * K + o_c[:, None] * (H * K) + o_k[None, :], mask=m_qk, other=0.0)
    p_k = k + (bos * H + i_h) * K + (i_t * BT + i_i * BC) * H * K + o_k
    p_gk = g + (bos * H + i_h) * K + (i_t * BT + i_i * BC) * H * K + o_k
    for j in range(0, min(BC, T - i_t * BT - i_i * BC)):
        b_k = tl.load(p_k, mask=m_k, other=0).to(tl.float32)
        b_gk = tl.load(p_gk, mask=m_k, other=0).to(tl.float32)
        b_A = tl.sum(b_q * b_k[None, :] * exp2(b_g - b_gk[None, :]), 1) * scale
        tl.store(A + o_A + j, b_A, mask=m_A)
        p_k += H * K
        p_gk += H * K
    tl.debug_barrier()
    b_A = tl.zeros([BC, BC], dtype=tl.float32)
    tl.store(A + o_A[:, None] + o_i, b_A, mask=m_A[:, None] & (o_i[:, None] < o_i))


# ---------------------------------------------------------------------------- forward: output


@VARLEN
@triton.autotune(configs=autotune_configs({"BK": (32, 64), "BV": (64, 128)}, (4, 8), (2, 3)), key=["BT", "K", "V", "G"],
                  **autotune_cache_kwargs)
@triton.jit(do_not_specialize=["T"])
def gqa_fwd_o(q, v, g, h, o, A, cu_seqlens, chunk_indices, scale, T, H: tl.constexpr, G: tl.constexpr,
              K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
              IS_VARLEN: tl.constexpr):
    """o = scale * (q * exp2(g)) h + A v per query head (fla's ``chunk_gla_fwd_kernel_o``)."""
    HQ: tl.constexpr = H * G
    NV = tl.cdiv(V, BV)
    pid = tl.program_id(0).to(tl.int64)
    i_v, i_t = pid % NV, pid // NV
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_hq = i_bh // HQ, i_bh % HQ
    i_h = i_hq // G
    i_tg = global_chunk(i_t, i_b, T, BT, IS_VARLEN)
    i_t, bos, T = chunk_bounds(i_t, i_b, cu_seqlens, chunk_indices, T, IS_VARLEN)
    m_s = tl.arange(0, BT)[:, None] >= tl.arange(0, BT)[None, :]
    q += (bos * HQ + i_hq) * K
    g += (bos * H + i_h) * K
    v += (bos * H + i_h) * V
    o += (bos * HQ + i_hq) * V
    h += (i_tg * H + i_h).to(tl.int64) * K * V
    A += (bos * HQ + i_hq) * BT
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    o_t = i_t * BT + tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    o_i = tl.arange(0, BT)
    m_t, m_v = o_t < T, o_v < V
    m_tv = m_t[:, None] & m_v[None, :]
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_qk = m_t[:, None] & m_k[None, :]
        b_q = tl.load(q + o_t[:, None] * (HQ * K) + o_k[None, :], mask=m_qk, other=0.0)
        b_g = tl.load(g + o_t[:, None] * (H * K) + o_k[None, :], mask=m_qk, other=0.0).to(tl.float32)
        b_qg = (b_q * exp2(b_g)).to(b_q.dtype)
        b_h = tl.load(h + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0)
        b_o = tl.dot(b_qg, b_h.to(b_qg.dtype), b_o)
    b_o *= scale
    b_v = tl.load(v + o_t[:, None] * (H * V) + o_v[None, :], mask=m_tv, other=0.0)
    b_A = tl.load(A + o_t[:, None] * (HQ * BT) + o_i[None, :], mask=m_t[:, None] & (o_i[None, :] < BT), other=0.0)
    b_A = tl.where(m_s, b_A, 0.).to(b_v.dtype)
    b_o = tl.dot(b_A, b_v, b_o)
    tl.store(o + o_t[:, None] * (HQ * V) + o_v[None, :], b_o.to(o.dtype.element_ty), mask=m_tv)
