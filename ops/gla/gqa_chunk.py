"""Chunked GLA with native GQA: fla's state kernels on the kv heads, our GQA kernels for the rest.

The composition (chunk size BT, decays in log2 units as fla):
  forward   gc = chunk_local_cumsum(g) [fla, kv heads]; h = chunk_fwd_h(k, v, gc) [fla, kv heads];
            A = intra-chunk scores [ours, query heads]; o = q h + A v [ours, query heads]
  backward  gc, h recomputed [fla, kv heads]; dh = sum over the group of the state-gradient
            recurrences [ours, kv heads]; dv [ours, kv heads]; dA [ours, query heads];
            intra dq (query heads) / dk (kv heads) [ours]; inter dq, dk, dg [ours]
No tensor with one copy of k, v or g per query head exists at any point. Imports triton and fla:
import this module only where a GPU is known to be present (``ops.gla.gqa`` does so lazily).
"""

from __future__ import annotations

import torch
import triton
from fla.ops.common.chunk_h import chunk_fwd_h
from fla.ops.utils import prepare_chunk_indices, prepare_chunk_offsets
from fla.ops.utils.constant import RCP_LN2
from fla.ops.utils.cumsum import chunk_local_cumsum
from fla.utils import input_guard
from torch import Tensor

from ops.gla.gqa_kernels import gqa_fwd_A_inter, gqa_fwd_A_intra, gqa_fwd_o
from ops.gla.gqa_kernels_bwd import gqa_bwd_dA, gqa_bwd_dh, gqa_bwd_dv, gqa_bwd_inter, gqa_bwd_intra

# the sub-chunk of the intra-chunk kernels (fla's BC) and the largest head dim the one-block
# diagonal kernel holds (fla splits the K axis beyond it; we decline such calls instead)
SUB_CHUNK = 16
MAX_HEAD_DIM = 256


def chunk_size_for(T: int) -> int:
    """fla's choice: 64, or the next power of two >= 16 for shorter inputs."""
    return min(64, max(16, triton.next_power_of_2(T)))


def _num_chunks(T: int, BT: int, chunk_indices: Tensor | None) -> int:
    return triton.cdiv(T, BT) if chunk_indices is None else len(chunk_indices)


def fwd_A(q: Tensor, k: Tensor, gc: Tensor, scale: float, cu_seqlens, chunk_indices, BT: int) -> Tensor:
    """Intra-chunk scores ``A [B, T, HQ, BT]`` (fp32; entries above the diagonal are unset)."""
    B, T, HQ, K = q.shape
    H = k.shape[2]
    BC = min(SUB_CHUNK, BT)
    NC, NT = triton.cdiv(BT, BC), _num_chunks(T, BT, chunk_indices)
    A = q.new_empty(B, T, HQ, BT, dtype=torch.float)
    common = dict(cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, scale=scale, T=T, H=H, G=HQ // H, K=K,
                  BT=BT, BC=BC)
    gqa_fwd_A_inter[(NT, NC * NC, B * HQ)](q=q, k=k, g=gc, A=A, NC=NC, **common)
    gqa_fwd_A_intra[(NT, NC, B * HQ)](q=q, k=k, g=gc, A=A, BK=max(triton.next_power_of_2(K), 16), **common)
    return A


def fwd_o(q: Tensor, v: Tensor, gc: Tensor, A: Tensor, h: Tensor, scale: float, cu_seqlens, chunk_indices,
          BT: int) -> Tensor:
    """``o [B, T, HQ, V]`` in q's dtype."""
    B, T, HQ, K = q.shape
    H, V = v.shape[2], v.shape[-1]
    NT = _num_chunks(T, BT, chunk_indices)
    o = q.new_empty(B, T, HQ, V)

    def grid(meta):
        return (triton.cdiv(V, meta["BV"]) * NT, B * HQ)

    gqa_fwd_o[grid](q=q, v=v, g=gc, h=h, o=o, A=A, cu_seqlens=cu_seqlens, chunk_indices=chunk_indices,
                    scale=scale, T=T, H=H, G=HQ // H, K=K, V=V, BT=BT)
    return o


def bwd_dh(q: Tensor, k: Tensor, gc: Tensor, do: Tensor, h0: Tensor | None, dht: Tensor | None, scale: float,
           cu_seqlens, BT: int) -> tuple[Tensor, Tensor | None]:
    """State gradients ``dh [B, NT, H, K, V]`` (fp32) per kv head and ``dh0`` (or None)."""
    B, T, HQ, K = q.shape
    H, V = k.shape[2], do.shape[-1]
    if cu_seqlens is None:
        N, NT, offsets = B, triton.cdiv(T, BT), None
    else:
        offsets = prepare_chunk_offsets(cu_seqlens, BT)
        N, NT = len(cu_seqlens) - 1, int(offsets[-1].item())
    dh = q.new_empty(B, NT, H, K, V, dtype=torch.float)
    dh0 = torch.empty_like(h0, dtype=torch.float) if h0 is not None else None

    def grid(meta):
        return (triton.cdiv(K, meta["BK"]) * triton.cdiv(V, meta["BV"]) * N * H,)

    gqa_bwd_dh[grid](q=q, gk=gc, do=do, dh=dh, dht=dht, dh0=dh0, cu_seqlens=cu_seqlens, chunk_offsets=offsets,
                     scale=scale, T=T, H=H, G=HQ // H, K=K, V=V, BT=BT)
    return dh, dh0


def bwd_dv_dA(k: Tensor, v: Tensor, gc: Tensor, A: Tensor, do: Tensor, dh: Tensor, scale: float, cu_seqlens,
              chunk_indices, BT: int) -> tuple[Tensor, Tensor]:
    """``dv [B, T, H, V]`` (v's dtype) per kv head and ``dA [B, T, HQ, BT]`` (fp32) per query head."""
    B, T, H, K = k.shape
    HQ, V = do.shape[2], v.shape[-1]
    NT = _num_chunks(T, BT, chunk_indices)
    dv = torch.empty_like(v)

    def grid(meta):
        return (triton.cdiv(V, meta["BV"]) * NT, B * H)

    common = dict(cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, T=T, H=H, G=HQ // H, V=V, BT=BT)
    gqa_bwd_dv[grid](k=k, g=gc, A=A, do=do, dh=dh, dv=dv, K=K, **common)
    dA = v.new_empty(B, T, HQ, BT, dtype=torch.float)
    gqa_bwd_dA[(NT, B * HQ)](v=v, do=do, dA=dA, scale=scale, BV=min(64, triton.next_power_of_2(V)), **common)
    return dv, dA


def bwd_dqkg(q: Tensor, k: Tensor, v: Tensor, gc: Tensor, h: Tensor, do: Tensor, dh: Tensor, dA: Tensor,
             scale: float, cu_seqlens, chunk_indices, BT: int) -> tuple[Tensor, Tensor, Tensor]:
    """``dq`` (query heads), ``dk`` and ``dg`` (kv heads), all fp32."""
    B, T, HQ, K = q.shape
    H, V = k.shape[2], v.shape[-1]
    BC = min(SUB_CHUNK, BT)
    BK = min(64, triton.next_power_of_2(K))
    NC, NT = triton.cdiv(BT, BC), _num_chunks(T, BT, chunk_indices)
    common = dict(cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, T=T, H=H, G=HQ // H, K=K, BT=BT)
    dq_intra = torch.empty_like(q, dtype=torch.float)
    dk_intra = torch.empty_like(k, dtype=torch.float)
    gqa_bwd_intra[(triton.cdiv(K, BK) * NC * NT, B * H)](q=q, k=k, g=gc, dA=dA, dq=dq_intra, dk=dk_intra, BC=BC,
                                                       BK=BK, NC=NC, **common)
    dq, dk, dg = torch.empty_like(dq_intra), torch.empty_like(dk_intra), torch.empty_like(dk_intra)

    def grid(meta):
        return (triton.cdiv(K, meta["BK"]) * NT, B * H)

    gqa_bwd_inter[grid](q=q, k=k, v=v, g=gc, h=h, do=do, dh=dh, dq=dq_intra, dk=dk_intra, dq2=dq, dk2=dk, dg=dg,
                        scale=scale, V=V, **common)
    return dq, dk, dg


def _states(k: Tensor, v: Tensor, gc: Tensor, h0: Tensor | None, output_final_state: bool, cu_seqlens,
            BT: int, fp32: bool) -> tuple[Tensor, Tensor | None]:
    """fla's chunk states on the kv heads (they depend on k, v, g only)."""
    return chunk_fwd_h(k=k, v=v, g=None, gk=gc, gv=None, h0=h0, output_final_state=output_final_state,
                       cu_seqlens=cu_seqlens, chunk_size=BT, states_in_fp32=fp32)


class ChunkGLAGQAFunction(torch.autograd.Function):
    """Autograd of the composition; saves q, k, v, g, h0 and A, recomputes the states (as fla)."""

    @staticmethod
    @input_guard  # contiguous inputs, launches on the inputs' device (as fla's ChunkGLAFunction)
    def forward(ctx, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens):
        BT = chunk_size_for(q.shape[1])
        chunk_indices = prepare_chunk_indices(cu_seqlens, BT) if cu_seqlens is not None else None
        gc = chunk_local_cumsum(g, BT, scale=RCP_LN2, cu_seqlens=cu_seqlens)
        h, ht = _states(k, v, gc, initial_state, output_final_state, cu_seqlens, BT, fp32=False)
        A = fwd_A(q, k, gc, scale, cu_seqlens, chunk_indices, BT)
        o = fwd_o(q, v, gc, A, h, scale, cu_seqlens, chunk_indices, BT)
        ctx.save_for_backward(q, k, v, g, initial_state, A, cu_seqlens, chunk_indices)
        ctx.scale, ctx.BT = scale, BT
        return o, ht

    @staticmethod
    @input_guard
    def backward(ctx, do, dht):
        q, k, v, g, h0, A, cu_seqlens, chunk_indices = ctx.saved_tensors
        scale, BT = ctx.scale, ctx.BT
        gc = chunk_local_cumsum(g, BT, scale=RCP_LN2, cu_seqlens=cu_seqlens)
        h, _ = _states(k, v, gc, h0, False, cu_seqlens, BT, fp32=True)
        dh, dh0 = bwd_dh(q, k, gc, do, h0, dht, scale, cu_seqlens, BT)
        dv, dA = bwd_dv_dA(k, v, gc, A, do, dh, scale, cu_seqlens, chunk_indices, BT)
        dq, dk, dg = bwd_dqkg(q, k, v, gc, h, do, dh, dA, scale, cu_seqlens, chunk_indices, BT)
        return dq.to(q.dtype), dk.to(k.dtype), dv, dg.to(g.dtype), None, dh0, None, None


@torch.compiler.disable  # Triton launches with autotuning, as fla's chunk_gla
def chunk_gla_gqa(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float | None = None,
                  initial_state: Tensor | None = None, output_final_state: bool = False,
                  cu_seqlens: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """GLA with q ``[B, T, HQ, K]`` and k, g ``[B, T, H, K]``, v ``[B, T, H, V]`` (``HQ % H == 0``);
    arguments and results as ``ops.gla.gla`` (final state ``[N, H, K, V]`` fp32)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v, g = (x.contiguous() for x in (q, k, v, g))
    # fla's state kernel asserts nothing but reads fp32; the cast is differentiable
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    return ChunkGLAGQAFunction.apply(q, k, v, g, scale, h0, output_final_state, cu_seqlens)
