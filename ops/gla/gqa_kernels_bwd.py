"""Backward GQA kernels of chunked GLA (see ``ops.gla.gqa_kernels`` for the conventions).

Ports of fla-core 0.6.0's ``chunk_bwd_kernel_dh`` (``fla/ops/common/chunk_h.py``) and
``chunk_gla_bwd_kernel_{dA,dv,intra,inter}`` (``fla/ops/gla/chunk.py``), MIT, (c) Songlin Yang,
Yu Zhang, Zhiyuan Li. Programs that produce a kv-head result (dh, dv, dk, dg) loop over the G
query heads of their group: every such gradient is linear in the query-side inputs, so the sum
over the group is exactly the gradient of the shared k, v, g and state.
"""

from __future__ import annotations

import triton
import triton.language as tl
from fla.utils import autotune_cache_kwargs

from ops.gla.gqa_kernels import VARLEN, autotune_configs, chunk_bounds, exp2, global_chunk


def prune_tiles(configs, nargs, **kwargs):
    """fla's rule for its dv and inter kernels: keep a tile only if it is smaller than its head dim
    or the smallest option (a software-pipelined block load must not prefetch past the tensor)."""
    args = {**(nargs or {}), **kwargs}
    min_bk = min(c.kwargs["BK"] for c in configs)
    min_bv = min(c.kwargs["BV"] for c in configs)
    return [c for c in configs if (c.kwargs["BK"] < args["K"] or c.kwargs["BK"] == min_bk)
            and (c.kwargs["BV"] < args["V"] or c.kwargs["BV"] == min_bv)]


# ------------------------------------------------------------- backward: state gradient dh


@triton.heuristics({
    "STORE_DH0": lambda args: args["dh0"] is not None,
    "USE_DHT": lambda args: args["dht"] is not None,
    "IS_VARLEN": lambda args: args["cu_seqlens"] is not None,
})
# 16-wide blocks too: the loop over chunks is sequential and only B * H * blocks programs run it
@triton.autotune(configs=autotune_configs({"BK": (16, 32, 64), "BV": (32, 64)}, (2, 4), (2, 3)),
                  key=["BT", "K", "V", "G"],
                  **autotune_cache_kwargs)
@triton.jit(do_not_specialize=["T"])
def gqa_bwd_dh(q, gk, do, dh, dht, dh0, cu_seqlens, chunk_offsets, scale, T, H: tl.constexpr,
               G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
               BV: tl.constexpr, STORE_DH0: tl.constexpr, USE_DHT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Gradient of the state entering each chunk, per kv head: the sum over its G query heads
    of fla's ``chunk_bwd_kernel_dh`` recurrence (it is linear in q and do, the decay is shared)."""
    HQ: tl.constexpr = H * G
    NK, NV = tl.cdiv(K, BK), tl.cdiv(V, BV)
    pid = tl.program_id(0).to(tl.int64)
    i_k, i_v, i_nh = pid % NK, (pid // NK) % NV, pid // (NK * NV)
    i_n, i_h = i_nh // H, i_nh % H
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        T = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
        boh = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        bos = (i_n * T).to(tl.int64)
        boh = i_n * tl.cdiv(T, BT)
    NT = tl.cdiv(T, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        b_dh += tl.load(dht + i_nh * K * V + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.0).to(tl.float32)
    for i_t in range(NT - 1, -1, -1):
        p_dh = dh + ((boh + i_t) * H + i_h).to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
        tl.store(p_dh, b_dh.to(p_dh.dtype.element_ty), mask=m_kv)
        last_idx = min(i_t * BT + BT, T) - 1
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < T
        b_gk = tl.load(gk + (bos * H + i_h) * K + o_k[:, None] + o_t[None, :] * (H * K),
                       mask=m_k[:, None] & m_t[None, :], other=0.0)
        b_gk_last = tl.load(gk + (bos + last_idx) * H * K + i_h * K + o_k, mask=m_k, other=0.)
        b_dh *= exp2(b_gk_last)[:, None]
        for i_g in range(G):
            i_hq = i_h * G + i_g
            b_q = tl.load(q + (bos * HQ + i_hq) * K + o_k[:, None] + o_t[None, :] * (HQ * K),
                          mask=m_k[:, None] & m_t[None, :], other=0.0)
            b_q = (b_q * scale).to(b_q.dtype)
            b_q = (b_q * exp2(b_gk)).to(b_q.dtype)
            b_do = tl.load(do + (bos * HQ + i_hq) * V + o_t[:, None] * (HQ * V) + o_v[None, :],
                           mask=m_t[:, None] & m_v[None, :], other=0.0)
            b_dh = tl.dot(b_q, b_do.to(b_q.dtype), b_dh)
    if STORE_DH0:
        tl.store(dh0 + i_nh * K * V + o_k[:, None] * V + o_v[None, :], b_dh.to(dh0.dtype.element_ty), mask=m_kv)


# ------------------------------------------------------------- backward: dA, dv, dq/dk, dg


@VARLEN
@triton.autotune(configs=autotune_configs({}, (2, 4, 8), (2, 3)), key=["BV", "BT", "G"], **autotune_cache_kwargs)
@triton.jit(do_not_specialize=["T"])
def gqa_bwd_dA(v, do, dA, cu_seqlens, chunk_indices, scale, T, H: tl.constexpr, G: tl.constexpr,
               V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr):
    """dA = scale * do v^T (causal) per query head (fla's ``chunk_gla_bwd_kernel_dA``)."""
    HQ: tl.constexpr = H * G
    i_t, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_b, i_hq = i_bh // HQ, i_bh % HQ
    i_h = i_hq // G
    i_t, bos, T = chunk_bounds(i_t, i_b, cu_seqlens, chunk_indices, T, IS_VARLEN)
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    o_t = i_t * BT + tl.arange(0, BT)
    o_i = tl.arange(0, BT)
    m_t = o_t < T
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_do = tl.load(do + (bos * HQ + i_hq) * V + o_t[:, None] * (HQ * V) + o_v[None, :],
                       mask=m_t[:, None] & m_v[None, :], other=0.0)
        b_v = tl.load(v + (bos * H + i_h) * V + o_v[:, None] + o_t[None, :] * (H * V),
                      mask=m_v[:, None] & m_t[None, :], other=0.0)
        b_dA = tl.dot(b_do, b_v, b_dA)
    m_s = o_i[:, None] >= o_i[None, :]
    b_dA = tl.where(m_s, b_dA * scale, 0.)
    p_dA = dA + (bos * HQ + i_hq) * BT + o_t[:, None] * (HQ * BT) + o_i[None, :]
    tl.store(p_dA, b_dA.to(p_dA.dtype.element_ty), mask=m_t[:, None] & (o_i[None, :] < BT))


@VARLEN
@triton.autotune(configs=autotune_configs({"BK": (32, 64), "BV": (32, 64)}, (4, 8), (2, 3)), key=["BT", "K", "V", "G"],
                  prune_configs_by={"early_config_prune": prune_tiles}, **autotune_cache_kwargs)
@triton.jit(do_not_specialize=["T"])
def gqa_bwd_dv(k, g, A, do, dh, dv, cu_seqlens, chunk_indices, T, H: tl.constexpr, G: tl.constexpr,
               K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               IS_VARLEN: tl.constexpr):
    """dv per kv head = sum over its query heads of A^T do, plus (k * decay) dh (fla's
    ``chunk_gla_bwd_kernel_dv``; dh is already summed over the group)."""
    HQ: tl.constexpr = H * G
    NV = tl.cdiv(V, BV)
    pid = tl.program_id(0).to(tl.int64)
    i_v, i_t = pid % NV, pid // NV
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    i_tg = global_chunk(i_t, i_b, T, BT, IS_VARLEN)
    i_t, bos, T = chunk_bounds(i_t, i_b, cu_seqlens, chunk_indices, T, IS_VARLEN)
    o_t = i_t * BT + tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    o_i = tl.arange(0, BT)
    m_t, m_v = o_t < T, o_v < V
    m_A = (o_i[:, None] < BT) & m_t[None, :]
    m_tv = m_t[:, None] & m_v[None, :]
    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    for i_g in range(G):
        i_hq = i_h * G + i_g
        # A^T: element [i, t] = A[t, i], kept where i <= t
        b_A = tl.load(A + (bos * HQ + i_hq) * BT + o_i[:, None] + o_t[None, :] * (HQ * BT), mask=m_A, other=0.0)
        b_A = tl.where(o_i[:, None] <= o_i[None, :], b_A, 0.)
        b_do = tl.load(do + (bos * HQ + i_hq) * V + o_t[:, None] * (HQ * V) + o_v[None, :], mask=m_tv, other=0.0)
        # fp32 operands without tf32, as fla (its precision note)
        b_dv = tl.dot(b_A, b_do.to(b_A.dtype), b_dv, allow_tf32=False)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        b_k = tl.load(k + (bos * H + i_h) * K + o_t[:, None] * (H * K) + o_k[None, :], mask=m_tk, other=0.0)
        b_gk = tl.load(g + (bos * H + i_h) * K + o_t[:, None] * (H * K) + o_k[None, :], mask=m_tk, other=0.0)
        b_gn = tl.load(g + (bos + min(i_t * BT + BT, T) - 1) * H * K + i_h * K + o_k, mask=m_k, other=0)
        p_dh = dh + (i_tg * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :]
        b_dh = tl.load(p_dh, mask=m_k[:, None] & m_v[None, :], other=0.0)
        b_k = (b_k * exp2(b_gn[None, :] - b_gk)).to(b_k.dtype)
        b_dv = tl.dot(b_k, b_dh.to(b_k.dtype), b_dv)
    tl.store(dv + (bos * H + i_h) * V + o_t[:, None] * (H * V) + o_v[None, :], b_dv.to(dv.dtype.element_ty), mask=m_tv)


@VARLEN
@triton.autotune(configs=autotune_configs({}, (1, 2, 4, 8), (2, 3)),
                  key=["BK", "NC", "BT", "G"], **autotune_cache_kwargs)
@triton.jit(do_not_specialize=["T"])
def gqa_bwd_intra(q, k, g, dA, dq, dk, cu_seqlens, chunk_indices, T, H: tl.constexpr, G: tl.constexpr,
                  K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, NC: tl.constexpr,
                  IS_VARLEN: tl.constexpr):
    """Intra-chunk parts of dq (per query head) and dk (per kv head, summed over its group) from
    dA (fla's ``chunk_gla_bwd_kernel_intra``, one program per kv head and sub-chunk)."""
    HQ: tl.constexpr = H * G
    NKC = tl.cdiv(K, BK) * NC
    pid = tl.program_id(0).to(tl.int64)
    i_kc, i_t = pid % NKC, pid // NKC
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    i_k, i_i = i_kc // NC, i_kc % NC
    i_t, bos, T = chunk_bounds(i_t, i_b, cu_seqlens, chunk_indices, T, IS_VARLEN)
    if i_t * BT + i_i * BC >= T:
        return
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    o_i = tl.arange(0, BC)
    o_c = i_t * BT + i_i * BC + o_i
    m_c = o_c < T
    m_ck = m_c[:, None] & m_k[None, :]
    kv_rows = (bos * H + i_h) * K
    b_g = tl.load(g + kv_rows + o_c[:, None] * (H * K) + o_k[None, :], mask=m_ck, other=0.0)
    n_diag = min(BC, T - i_t * BT - i_i * BC)
    for i_g in range(G):
        i_hq = i_h * G + i_g
        q_rows = (bos * HQ + i_hq) * K
        dA_rows = (bos * HQ + i_hq) * BT
        b_dq = tl.zeros([BC, BK], dtype=tl.float32)
        if i_i > 0:
            b_gn = tl.load(g + (bos + i_t * BT + i_i * BC) * H * K + i_h * K + o_k, mask=m_k, other=0)
            for i_j in range(0, i_i):
                o_j = i_t * BT + i_j * BC + o_i
                o_jA = i_j * BC + o_i
                m_jk = (o_j[:, None] < T) & m_k[None, :]
                b_k = tl.load(k + kv_rows + o_j[:, None] * (H * K) + o_k[None, :], mask=m_jk, other=0.0)
                b_gk = tl.load(g + kv_rows + o_j[:, None] * (H * K) + o_k[None, :], mask=m_jk, other=0.0)
                b_kg = b_k * exp2(b_gn[None, :] - b_gk)
                b_dA = tl.load(dA + dA_rows + o_c[:, None] * (HQ * BT) + o_jA[None, :],
                               mask=m_c[:, None] & (o_jA[None, :] < BT), other=0.0)
                b_dq = tl.dot(b_dA, b_kg, b_dq)
            b_dq *= exp2(b_g - b_gn[None, :])
        p_kj = k + (bos + i_t * BT + i_i * BC) * H * K + i_h * K + o_k
        p_gkj = g + (bos + i_t * BT + i_i * BC) * H * K + i_h * K + o_k
        o_dA = dA_rows + o_c * (HQ * BT) + i_i * BC
        for j in range(0, n_diag):
            b_dAj = tl.load(dA + o_dA + j, mask=m_c, other=0)
            b_kj = tl.load(p_kj, mask=m_k, other=0).to(tl.float32)
            b_gkj = tl.load(p_gkj, mask=m_k, other=0).to(tl.float32)
            # fp32 here, as fla (precision)
            b_dq += tl.where(o_i[:, None] >= j, b_dAj[:, None] * b_kj[None, :] * exp2(b_g - b_gkj[None, :]), 0.)
            p_kj += H * K
            p_gkj += H * K
        tl.store(dq + q_rows + o_c[:, None] * (HQ * K) + o_k[None, :], b_dq.to(dq.dtype.element_ty), mask=m_ck)

    tl.debug_barrier()
    b_dk = tl.zeros([BC, BK], dtype=tl.float32)
    n_sub = min(NC, tl.cdiv(T - i_t * BT, BC))
    if i_i < n_sub - 1:
        b_gn = tl.load(g + (bos + min(i_t * BT + i_i * BC + BC, T) - 1) * H * K + i_h * K + o_k, mask=m_k, other=0)
        o_iA = i_i * BC + o_i
        for i_g in range(G):
            i_hq = i_h * G + i_g
            for i_j in range(i_i + 1, n_sub):
                o_j = i_t * BT + i_j * BC + o_i
                m_j = o_j < T
                m_jk = m_j[:, None] & m_k[None, :]
                b_q = tl.load(q + (bos * HQ + i_hq) * K + o_j[:, None] * (HQ * K) + o_k[None, :], mask=m_jk, other=0.0)
                b_gq = tl.load(g + kv_rows + o_j[:, None] * (H * K) + o_k[None, :], mask=m_jk, other=0.0)
                b_qg = b_q * tl.where(m_j[:, None], exp2(b_gq - b_gn[None, :]), 0)
                # dA^T: element [a, b] = dA[o_j[b], o_iA[a]]
                b_dA = tl.load(dA + (bos * HQ + i_hq) * BT + o_iA[:, None] + o_j[None, :] * (HQ * BT),
                               mask=(o_iA[:, None] < BT) & m_j[None, :], other=0.0)
                b_dk = tl.dot(b_dA, b_qg, b_dk)
        b_dk *= exp2(b_gn[None, :] - b_g)
    for i_g in range(G):
        i_hq = i_h * G + i_g
        o_dA = (bos * HQ + i_hq) * BT + (i_t * BT + i_i * BC) * HQ * BT + i_i * BC + o_i
        p_qj = q + (bos + i_t * BT + i_i * BC) * HQ * K + i_hq * K + o_k
        p_gqj = g + (bos + i_t * BT + i_i * BC) * H * K + i_h * K + o_k
        for j in range(0, n_diag):
            b_dAj = tl.load(dA + o_dA + j * HQ * BT)
            b_qj = tl.load(p_qj, mask=m_k, other=0).to(tl.float32)
            b_gqj = tl.load(p_gqj, mask=m_k, other=0).to(tl.float32)
            b_dk += tl.where(o_i[:, None] <= j, b_dAj[:, None] * b_qj[None, :] * exp2(b_gqj[None, :] - b_g), 0.)
            p_qj += HQ * K
            p_gqj += H * K
    tl.store(dk + kv_rows + o_c[:, None] * (H * K) + o_k[None, :], b_dk.to(dk.dtype.element_ty), mask=m_ck)


@VARLEN
@triton.autotune(configs=autotune_configs({"BK": (32, 64), "BV": (32, 64)}, (4, 8), (2, 3)), key=["BT", "K", "V", "G"],
                  prune_configs_by={"early_config_prune": prune_tiles}, **autotune_cache_kwargs)
@triton.jit(do_not_specialize=["T"])
def gqa_bwd_inter(q, k, v, g, h, do, dh, dq, dk, dq2, dk2, dg, cu_seqlens, chunk_indices, scale, T,
                  H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                  BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Inter-chunk parts of dq (per query head), dk and dg (per kv head) and the final dg
    (fla's ``chunk_gla_bwd_kernel_inter``, one program per kv head looping over its group).

    dq, dk: the intra-chunk parts (fp32; dq per query head, dk per kv head); dq2, dk2, dg: the
    totals. dg is the gradient of the raw log decay g (the in-chunk reverse cumsum is done here).
    """
    HQ: tl.constexpr = H * G
    NK = tl.cdiv(K, BK)
    pid = tl.program_id(0).to(tl.int64)
    i_k, i_t = pid % NK, pid // NK
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    i_tg = global_chunk(i_t, i_b, T, BT, IS_VARLEN)
    i_t, bos, T = chunk_bounds(i_t, i_b, cu_seqlens, chunk_indices, T, IS_VARLEN)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    m_tk = m_t[:, None] & m_k[None, :]
    kv_k = (bos * H + i_h) * K + o_t[:, None] * (H * K) + o_k[None, :]
    h += (i_tg * H + i_h) * K * V
    dh += (i_tg * H + i_h) * K * V
    b_gk = tl.load(g + kv_k, mask=m_tk, other=0.0)
    b_gn = tl.load(g + (bos + min(T, i_t * BT + BT) - 1) * H * K + i_h * K + o_k, mask=m_k, other=0)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_dgk = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_vk = m_v[:, None] & m_k[None, :]
        b_v = tl.load(v + (bos * H + i_h) * V + o_t[:, None] * (H * V) + o_v[None, :],
                      mask=m_t[:, None] & m_v[None, :], other=0.0)
        # [BV, BK] views of the [K, V] states
        b_h = tl.load(h + o_v[:, None] + o_k[None, :] * V, mask=m_vk, other=0.0)
        b_dh = tl.load(dh + o_v[:, None] + o_k[None, :] * V, mask=m_vk, other=0.0)
        b_dgk += tl.sum(b_h * b_dh, axis=0)
        b_dk = tl.dot(b_v, b_dh.to(b_v.dtype), b_dk)
    b_dgk *= exp2(b_gn)
    b_dk = b_dk * exp2(b_gn[None, :] - b_gk)
    b_k = tl.load(k + kv_k, mask=m_tk, other=0.0)
    b_dgk += tl.sum(b_dk * b_k, axis=0)
    b_dk += tl.load(dk + kv_k, mask=m_tk, other=0.0)
    b_dg = -(b_k * b_dk)
    for i_g in range(G):
        i_hq = i_h * G + i_g
        q_k = (bos * HQ + i_hq) * K + o_t[:, None] * (HQ * K) + o_k[None, :]
        b_dq = tl.zeros([BT, BK], dtype=tl.float32)
        for i_v in range(tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            m_v = o_v < V
            b_do = tl.load(do + (bos * HQ + i_hq) * V + o_t[:, None] * (HQ * V) + o_v[None, :],
                           mask=m_t[:, None] & m_v[None, :], other=0.0)
            b_h = tl.load(h + o_v[:, None] + o_k[None, :] * V, mask=m_v[:, None] & m_k[None, :], other=0.0)
            b_dq = tl.dot(b_do, b_h.to(b_do.dtype), b_dq)
        b_dq *= scale
        b_dq = b_dq * exp2(b_gk)
        b_dq += tl.load(dq + q_k, mask=m_tk, other=0.0)
        b_q = tl.load(q + q_k, mask=m_tk, other=0.0)
        b_dg += b_q * b_dq
        tl.store(dq2 + q_k, b_dq.to(dq2.dtype.element_ty), mask=m_tk)
    b_dg = b_dg - tl.cumsum(b_dg, axis=0) + tl.sum(b_dg, axis=0)[None, :] + b_dgk[None, :]
    tl.store(dk2 + kv_k, b_dk.to(dk2.dtype.element_ty), mask=m_tk)
    tl.store(dg + kv_k, b_dg.to(dg.dtype.element_ty), mask=m_tk)
