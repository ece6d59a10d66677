"""Attention cores of ``modeling_spikingbrain`` (self-contained: torch, optionally fla): the
chunked gated linear recurrence with a carried state, and masked softmax attention over
cached sink / window keys. Copied verbatim into exported directories."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:  # optional fused GLA kernel (CUDA only); the plain-torch chunked form is used otherwise
    from fla.ops.gla import chunk_gla as _fla_chunk_gla
except ImportError:  # pragma: no cover - depends on the environment
    _fla_chunk_gla = None

CHUNK = 32
_FLA_FAILED: list[str] = []   # set once fla's kernel failed here; the torch form is used after


@dataclass
class Positions:
    """Where the rows of one forward sit: absolute RoPE positions and which rows are sinks."""

    pos: torch.Tensor       # [T] long
    is_sink: torch.Tensor   # [T] bool


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """NeoX (rotate-half) rotary embedding of [B, T, H, d] at positions ``pos`` (fp32 angles)."""
    dim = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=x.device) / dim)
    angles = torch.outer(pos.float(), inv)
    cos = torch.cat([angles.cos(), angles.cos()], -1)[None, :, None, :]
    sin = torch.cat([angles.sin(), angles.sin()], -1)[None, :, None, :]
    half = dim // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def linear_attention(q, k, v, log_decay, scale: float, state):
    """S_t = diag(exp(log_decay_t)) S_{t-1} + k_t^T v_t, o_t = scale * q_t S_t, from ``state``.

    q [B, T, H, d]; k, v, log_decay [B, T, G, d] (GQA: shared by the H/G heads of a group);
    state [B, G, d, d] or None. Returns (o [B, T, H, d], final state fp32). Chunked: within a
    chunk every decay factor is exp(b_i - b_j) with b_i <= b_j (never overflows)."""
    batch, seq, heads, dim = q.shape
    groups = k.shape[2]
    if _fla_chunk_gla is not None and q.is_cuda and not _FLA_FAILED:
        try:
            return _fla_linear_attention(q, k, v, log_decay, scale, state)
        except Exception as exc:  # noqa: BLE001 - any kernel failure: use the torch form
            # fla 0.6 fails to compile some state-passing autotune configs at head dim 128
            # (Triton PassManager error seen on an H100); the torch form gives the same result.
            _FLA_FAILED.append(repr(exc))
    dtype = q.dtype
    q = q.float().view(batch, seq, groups, heads // groups, dim).permute(0, 2, 3, 1, 4)
    k, v, g = (t.float().permute(0, 2, 1, 3) for t in (k, v, log_decay))   # [B, G, T, d]
    if state is None:
        state = q.new_zeros(batch, groups, dim, v.shape[-1])
    outs = []
    for start in range(0, seq, CHUNK):
        qc, kc, vc = q[:, :, :, start:start + CHUNK], k[:, :, start:start + CHUNK], v[:, :, start:start + CHUNK]
        b = g[:, :, start:start + CHUNK].cumsum(2)                     # [B, G, C, d]
        size = b.shape[2]
        causal = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
        diff = (b[:, :, :, None] - b[:, :, None, :]).masked_fill(~causal[..., None], float("-inf"))
        scores = torch.einsum("bghid,bgjd,bgijd->bghij", qc, kc, diff.exp())
        out = torch.einsum("bghij,bgje->bghie", scores, vc)
        out = out + torch.einsum("bghid,bgde->bghie", qc * b[:, :, None].exp(), state)
        outs.append(out * scale)
        last = b[:, :, -1:]                                            # [B, G, 1, d]
        state = state * last.transpose(2, 3).exp() + torch.einsum(
            "bgjd,bgje->bgde", kc * (last - b).exp(), vc)
    out = torch.cat(outs, dim=3).permute(0, 3, 1, 2, 4).reshape(batch, seq, heads, -1)
    return out.to(dtype), state


def _fla_linear_attention(q, k, v, log_decay, scale, state):
    per_group = q.shape[2] // k.shape[2]
    k, v, g = (t.repeat_interleave(per_group, dim=2) for t in (k, v, log_decay))
    if state is not None:
        state = state.repeat_interleave(per_group, dim=1)
    out, final = _fla_chunk_gla(q, k, v, g, scale=scale, initial_state=state,
                                output_final_state=True)
    return out, final[:, ::per_group].float()


def softmax_attention(q, k, v, where: Positions, layer: dict, prefix: str, window, scale):
    """q [B, T, H, d], k/v [B, T, G, d] (RoPE applied) of the rows at ``where``; keys of earlier
    calls come from ``layer`` (``<prefix>sink_k`` ...), which is updated in place. Sinks see only
    sinks; regular rows see every sink plus causal (windowed) regular rows."""
    sink, regular = where.is_sink, ~where.is_sink
    if sink.any():
        layer[prefix + "sink_k"], layer[prefix + "sink_v"] = k[:, sink], v[:, sink]
    past = [layer.get(prefix + name) for name in ("k", "v", "pos")]
    new = (k[:, regular], v[:, regular], where.pos[regular])
    reg_k, reg_v, reg_pos = (n if p is None else torch.cat([p, n], dim=-3 if n.dim() > 1 else 0)
                             for p, n in zip(past, new))
    sink_k = layer.get(prefix + "sink_k", k[:, :0])
    sink_v = layer.get(prefix + "sink_v", v[:, :0])
    keys, values = torch.cat([sink_k, reg_k], 1), torch.cat([sink_v, reg_v], 1)
    key_sink = torch.arange(keys.shape[1], device=q.device) < sink_k.shape[1]
    key_pos = torch.cat([torch.zeros_like(key_sink[:sink_k.shape[1]], dtype=torch.long), reg_pos])
    visible = (key_pos[None] <= where.pos[:, None])
    if window is not None:
        visible &= where.pos[:, None] - key_pos[None] <= window
    mask = torch.where(where.is_sink[:, None], key_sink[None], key_sink[None] | visible)
    per_group = q.shape[2] // k.shape[2]
    keys, values = (t.repeat_interleave(per_group, dim=2).transpose(1, 2) for t in (keys, values))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask,
                                         scale=scale)
    if window is not None:   # later queries never see further back than `window` positions
        reg_k, reg_v, reg_pos = reg_k[:, -window:], reg_v[:, -window:], reg_pos[-window:]
    layer[prefix + "k"], layer[prefix + "v"], layer[prefix + "pos"] = reg_k, reg_v, reg_pos
    return out.transpose(1, 2)


