"""Torch references for gated linear attention (GLA): the plain recurrence and its chunked form.

``gla_recurrent_reference`` is the literal step-by-step recurrence, the ground truth of the tests.
``gla_chunked_reference`` is the chunked algorithm in plain torch: the CPU training path and the
fallback of the dispatching ``ops.gla.gla``. Both keep one state per kv head, so GQA inputs are
never expanded to the query heads, and both compute in fp32 (fp64 when given fp64) whatever the
input dtype, so gradients flow through ordinary torch ops.

Math, per sequence and kv head (layout ``[B, T, H, D]`` as fla's ``chunk_gla``):
``S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t`` and ``o_t^h = scale * q_t^h S_t^{h // (H // Hkv)}``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# (q, k, v, g, scale, s0) -> (o [B, T, H, V], final state [B, Hkv, K, V]) for equal-length rows.
Core = Callable[[Tensor, Tensor, Tensor, Tensor, float, Tensor], tuple[Tensor, Tensor]]


def gla_input_problem(q: Tensor, k: Tensor, v: Tensor, g: Tensor, initial_state: Tensor | None = None,
                      cu_seqlens: Tensor | None = None) -> str | None:
    """Describe what is wrong with the shapes of a ``gla`` call, or None if they are consistent.

    Only metadata is read (no device sync), so backend verifiers can call it on every step.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"q, k, v must be [B, T, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    B, T, H, K = q.shape
    Hkv = k.shape[2]
    if k.shape != (B, T, Hkv, K):
        return f"k must be [B, T, Hkv, K] = [{B}, {T}, Hkv, {K}]; got {tuple(k.shape)}"
    if g.shape != k.shape:
        return f"g must have k's shape {tuple(k.shape)}; got {tuple(g.shape)}"
    if v.shape[:3] != k.shape[:3]:
        return f"v must be [B, T, Hkv, V] with k's first dims {tuple(k.shape[:3])}; got {tuple(v.shape)}"
    if Hkv == 0 or H % Hkv:
        return f"query heads ({H}) must be a multiple of kv heads ({Hkv})"
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
            return f"cu_seqlens must be an integer tensor [N + 1] with N >= 1; got {tuple(cu_seqlens.shape)}"
        if B != 1:
            return f"with cu_seqlens the batch size must be 1 (packed sequences); got {B}"
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None and initial_state.shape != (N, Hkv, K, v.shape[-1]):
        return (f"initial_state must be [N, Hkv, K, V] = {(N, Hkv, K, v.shape[-1])}; "
                f"got {tuple(initial_state.shape)}")
    return None


def gla_recurrent_reference(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float | None = None,
                            initial_state: Tensor | None = None, output_final_state: bool = False,
                            cu_seqlens: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """GLA as the literal token-by-token recurrence, in fp32 (ground truth; slow, for tests).

    Args:
        q: queries ``[B, T, H, K]``.
        k: keys ``[B, T, Hkv, K]``; query head ``h`` reads kv head ``h // (H // Hkv)``.
        v: values ``[B, T, Hkv, V]``.
        g: per-channel log decay ``[B, T, Hkv, K]`` (<= 0).
        scale: output scale; default ``K ** -0.5``.
        initial_state: ``[N, Hkv, K, V]`` or None (zeros).
        output_final_state: also return the state after the last token.
        cu_seqlens: ``[N + 1]`` packed-sequence offsets (FlashAttention convention), B must be 1.

    Returns:
        ``o [B, T, H, V]`` in q's dtype and the final state ``[N, Hkv, K, V]`` (fp32) or None.
    """
    return _run(_recurrent_core, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)


def gla_chunked_reference(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float | None = None,
                          initial_state: Tensor | None = None, output_final_state: bool = False,
                          cu_seqlens: Tensor | None = None, *, chunk_size: int = 64
                          ) -> tuple[Tensor, Tensor | None]:
    """GLA in chunked form, plain torch and vectorised over chunks (the CPU training path).

    Arguments and results as :func:`gla_recurrent_reference`; ``chunk_size`` is the number of
    tokens whose interactions are computed as one masked attention block. Memory of the
    intra-chunk block grows as ``T * chunk_size * K`` per kv head; lower it for long sequences.
    """
    if chunk_size < 1:
        raise ValueError(f"gla: chunk_size must be >= 1; got {chunk_size}")

    def core(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float, s0: Tensor) -> tuple[Tensor, Tensor]:
        return _chunked_core(q, k, v, g, scale, s0, chunk_size)

    return _run(core, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)


def _run(core: Core, q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float | None,
         initial_state: Tensor | None, output_final_state: bool, cu_seqlens: Tensor | None
         ) -> tuple[Tensor, Tensor | None]:
    """Validate, upcast, then run ``core`` on the batch or on each packed sequence."""
    problem = gla_input_problem(q, k, v, g, initial_state, cu_seqlens)
    if problem is not None:
        raise ValueError(f"gla: {problem}")
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qc, kc, vc, gc = (x.to(dtype) for x in (q, k, v, g))
    B, T, Hkv, K = k.shape
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    s0 = (q.new_zeros(N, Hkv, K, v.shape[-1], dtype=dtype) if initial_state is None
          else initial_state.to(dtype))
    if cu_seqlens is None:
        o, state = core(qc, kc, vc, gc, scale, s0)
    else:
        o, state = _run_packed(core, qc, kc, vc, gc, scale, s0, cu_seqlens)
    return o.to(q.dtype), (state if output_final_state else None)


def _run_packed(core: Core, q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float, s0: Tensor,
                cu_seqlens: Tensor) -> tuple[Tensor, Tensor]:
    """Run each packed sequence independently (its own initial and final state)."""
    bounds = cu_seqlens.tolist()
    T = q.shape[1]
    if bounds[0] != 0 or bounds[-1] != T or any(a > b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"gla: cu_seqlens must rise from 0 to T={T}; got {bounds}")
    outs, states = [], []
    for n, (start, end) in enumerate(zip(bounds, bounds[1:])):
        span = slice(start, end)
        o, state = core(q[:, span], k[:, span], v[:, span], g[:, span], scale, s0[n:n + 1])
        outs.append(o)
        states.append(state)
    return torch.cat(outs, dim=1), torch.cat(states, dim=0)


def _recurrent_core(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float, s0: Tensor
                    ) -> tuple[Tensor, Tensor]:
    """One token at a time; states ``[B, Hkv, K, V]``, queries grouped as ``[B, Hkv, G, K]``."""
    B, T, H, K = q.shape
    Hkv, V = k.shape[2], v.shape[-1]
    # repeat_interleave order: query head h = kv * G + j reads kv head `kv`
    qg = q.reshape(B, T, Hkv, H // Hkv, K)
    state = s0
    outs = []
    for t in range(T):
        state = g[:, t].exp().unsqueeze(-1) * state + k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2)
        outs.append(torch.einsum("bhgk,bhkv->bhgv", qg[:, t], state))
    if not outs:
        return q.new_zeros(B, 0, H, V), state
    return scale * torch.stack(outs, dim=1).reshape(B, T, H, V), state


def _chunked_core(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float, s0: Tensor, chunk: int
                  ) -> tuple[Tensor, Tensor]:
    """Chunked GLA on equal-length rows: intra-chunk attention plus inter-chunk state passing.

    Every exponent is a decay between two positions of the same chunk, taken from the earlier to
    the later one, so it is <= 0: nothing overflows however strong the decay (terms underflow to
    0, which is their true value to fp32 precision).
    """
    B, T, H, K = q.shape
    Hkv, V = k.shape[2], v.shape[-1]
    G = H // Hkv
    if T == 0:
        return q.new_zeros(B, 0, H, V), s0
    NC = -(-T // chunk)
    pad = NC * chunk - T
    # zero padding is exact: k = v = 0 adds nothing to the state and g = 0 does not decay it
    q, k, v, g = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v, g))
    # [B, Hkv, NC, G, C, K]
    q = q.reshape(B, NC, chunk, Hkv, G, K).permute(0, 3, 1, 4, 2, 5)
    # [B, Hkv, NC, C, D]
    k, v, g = (x.reshape(B, NC, chunk, Hkv, x.shape[-1]).permute(0, 3, 1, 2, 4) for x in (k, v, g))
    # log decay from the chunk start through position i (inclusive), <= 0 and non-increasing
    b = g.cumsum(dim=-2)
    entering, final = _chunk_states(k, v, b, s0)
    o = _intra_chunk(q, k, v, b) + _inter_chunk(q, b, entering)
    o = (scale * o).permute(0, 2, 4, 1, 3, 5).reshape(B, NC * chunk, H, V)[:, :T]
    return o, final


def _intra_chunk(q: Tensor, k: Tensor, v: Tensor, b: Tensor) -> Tensor:
    """Contribution of earlier tokens of the same chunk: ``[B, Hkv, NC, G, C, V]`` (unscaled).

    ``q [B, Hkv, NC, G, C, K]``, ``k, b [B, Hkv, NC, C, K]``, ``v [B, Hkv, NC, C, V]``.
    """
    C = b.shape[-2]
    causal = torch.ones(C, C, dtype=torch.bool, device=b.device).tril()
    # decay[..., i, j, :] = exp(b_i - b_j) for j <= i (<= 1); masked before exp so that the
    # positive exponents above the diagonal never reach exp
    log_decay = (b.unsqueeze(-2) - b.unsqueeze(-3)).masked_fill(~causal.unsqueeze(-1), float("-inf"))
    k_decayed = log_decay.exp() * k.unsqueeze(-3)
    # one decay tensor per kv head serves all G query heads of the group
    attn = torch.einsum("bhngik,bhnijk->bhngij", q, k_decayed)
    return attn @ v.unsqueeze(3)


def _chunk_states(k: Tensor, v: Tensor, b: Tensor, s0: Tensor) -> tuple[Tensor, Tensor]:
    """States entering each chunk ``[B, Hkv, NC, K, V]`` and the state after the last one."""
    b_last = b[..., -1:, :]
    # each token's contribution decayed to the chunk end (exponent <= 0)
    chunk_kv = (k * (b_last - b).exp()).transpose(-1, -2) @ v
    chunk_decay = b_last.squeeze(-2).exp().unsqueeze(-1)
    state, entering = s0, []
    # a short loop of elementwise ops; all matmuls above and below are batched over chunks
    for n in range(b.shape[2]):
        entering.append(state)
        state = chunk_decay[:, :, n] * state + chunk_kv[:, :, n]
    return torch.stack(entering, dim=2), state


def _inter_chunk(q: Tensor, b: Tensor, entering: Tensor) -> Tensor:
    """Contribution of the state entering each chunk: ``[B, Hkv, NC, G, C, V]`` (unscaled)."""
    q_decayed = q * b.exp().unsqueeze(3)
    return q_decayed @ entering.unsqueeze(3)


def initial_state_output(q: Tensor, log_decay: Tensor, state: Tensor, scale: float,
                         segment_ids: Tensor | None = None) -> Tensor:
    """What an initial state adds to GLA's outputs, in plain torch (differentiable).

    ``gla(q, k, v, g, initial_state=S0)`` equals ``gla(q, k, v, g)`` plus this term,
    ``scale * (q_t * exp(sum of g since the start)) @ S0`` per kv group: q ``[b, s, H, K]``,
    log_decay ``[b, s, Hkv, K]``, state ``[b, Hkv, K, V]`` -> ``[b, s, H, V]`` in fp32 (fp64 for
    fp64 q). With
    ``segment_ids`` ([b, s]) the sum restarts at each document start and every document gets
    ``state`` (the row's). Exponents are <= 0: terms underflow to their true value 0.
    """
    batch, seq, heads, dim = q.shape
    groups = state.shape[1]
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    log_decay = log_decay.to(dtype)
    # scan along the innermost dimension: CUDA's outer-dimension scan over [b, s, Hkv, K] is
    # ~20x slower (1.2 ms per call at 8K tokens on an H200, 10% of a 76B-slice step)
    decay = log_decay.transpose(1, -1).contiguous().cumsum(-1).transpose(1, -1)
    if segment_ids is not None:
        # subtract the cumulative decay before each token's document start
        positions = torch.arange(seq, device=q.device).expand(batch, seq)
        starts = torch.ones_like(segment_ids, dtype=torch.bool)
        starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
        first = torch.cummax(torch.where(starts, positions, 0), dim=1).values
        index = first[:, :, None, None].expand_as(decay)
        decay = decay - (decay.gather(1, index) - log_decay.gather(1, index))
    decayed = q.to(dtype).view(batch, seq, groups, heads // groups, dim) * decay.exp()[:, :, :, None]
    # low-precision q: the product runs on tensor cores in q's dtype (fp32 accumulation); the
    # caller adds the term to a q-dtype output, so only that output's rounding is kept
    mm_dtype = q.dtype if q.dtype in (torch.bfloat16, torch.float16) else dtype
    out = torch.einsum("bsgjk,bgkv->bsgjv", decayed.to(mm_dtype), state.to(mm_dtype))
    return (out.to(dtype) * scale).reshape(batch, seq, heads, -1)
