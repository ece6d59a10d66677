"""A plain-torch reference of every layer type, written for counting, not for speed.

Softmax attention is computed query by query over exactly the visible keys, and GLA token by
token with per-query-head states, so ``FlopCounterMode`` sees the FLOPs the formulas in
``sbtrain.profiler.flops`` claim (no masked-out work), and ``numel`` sees every parameter.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from sbtrain.config.schema import ModelConfig

GATE_RANK = 16


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x_SHD: torch.Tensor, theta: float) -> torch.Tensor:
    """NeoX-style rotary embedding (elementwise: no matmul FLOPs)."""
    seq, _, dim = x_SHD.shape
    inv = theta ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angles = torch.arange(seq, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = torch.cat([angles, angles], -1).cos()[:, None], torch.cat([angles, angles], -1).sin()[:, None]
    x1, x2 = x_SHD[..., : dim // 2], x_SHD[..., dim // 2:]
    return x_SHD * cos + torch.cat([-x2, x1], -1) * sin


def softmax_attention(q_SHD, k_SGD, v_SGD, window: int | None) -> torch.Tensor:
    """Causal (window=None) or sliding-window attention, one query position and kv group at a time."""
    seq, heads, dim = q_SHD.shape
    groups = k_SGD.shape[1]
    rep = heads // groups
    rows = []
    for i in range(seq):
        lo = 0 if window is None else max(0, i - window)
        per_group = []
        for g in range(groups):
            q = q_SHD[i, g * rep:(g + 1) * rep]                      # [rep, D]
            scores = q @ k_SGD[lo:i + 1, g].T * dim ** -0.5          # [rep, keys]
            per_group.append(scores.softmax(-1) @ v_SGD[lo:i + 1, g])
        rows.append(torch.cat(per_group, 0))
    return torch.stack(rows, 0)


def gla(q_SHD, k_SHD, v_SHD, decay_SHD) -> torch.Tensor:
    """Recurrent GLA per query head: S_t = diag(a_t) S_{t-1} + k_t^T v_t, o_t = q_t S_t / sqrt(d)."""
    seq, heads, dim = q_SHD.shape
    state = torch.zeros(heads, dim, dim)
    outs = []
    for t in range(seq):
        update = k_SHD[t][:, :, None] @ v_SHD[t][:, None, :]        # [H, D, D]
        state = decay_SHD[t][:, :, None] * state + update
        outs.append((q_SHD[t][:, None, :] @ state)[:, 0] * dim ** -0.5)
    return torch.stack(outs, 0)


class Mixer(nn.Module):
    def __init__(self, cfg: ModelConfig, symbol: str) -> None:
        super().__init__()
        h, d = cfg.hidden_size, cfg.kv_channels
        self.cfg, self.symbol = cfg, symbol
        self.q_proj = nn.Linear(h, cfg.num_attention_heads * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, cfg.num_query_groups * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, cfg.num_query_groups * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_attention_heads * d, h, bias=False)
        if symbol == "L":
            self.gk_proj = nn.Sequential(nn.Linear(h, GATE_RANK, bias=False),
                                         nn.Linear(GATE_RANK, cfg.num_query_groups * d, bias=True))
            self.g_norm = RMSNorm(d)
        if symbol in "HF":
            self.la_norm, self.sm_norm = RMSNorm(d), RMSNorm(d)

    def forward(self, x_SH: torch.Tensor) -> torch.Tensor:
        cfg, seq = self.cfg, x_SH.shape[0]
        q = self.q_proj(x_SH).view(seq, cfg.num_attention_heads, cfg.kv_channels)
        k = self.k_proj(x_SH).view(seq, cfg.num_query_groups, cfg.kv_channels)
        v = self.v_proj(x_SH).view(seq, cfg.num_query_groups, cfg.kv_channels)
        if self.symbol == "L":
            log_a = F.logsigmoid(self.gk_proj(x_SH)).view_as(k) / 16
            out = self.g_norm(gla(F.relu(q), *self._rep(F.relu(k), v, log_a.exp())))
        elif self.symbol in "*W":
            out = self._softmax(q, k, v)
        else:
            ks = torch.sigmoid(k)
            linear = gla(torch.sigmoid(q), *self._rep(ks, v, 1 - ks))
            out = self.la_norm(linear) + self.sm_norm(self._softmax(q, k, v))
        return self.o_proj(out.reshape(seq, -1))

    def _softmax(self, q, k, v) -> torch.Tensor:
        window = None if self.symbol in "*F" else self.cfg.sliding_window
        theta = self.cfg.rope_theta
        return softmax_attention(rope(q, theta), rope(k, theta), v, window)

    def _rep(self, *tensors):
        """Repeat kv-group tensors to query heads, as the GLA kernels do."""
        rep = self.cfg.num_attention_heads // self.cfg.num_query_groups
        return [t.repeat_interleave(rep, dim=1) for t in tensors]


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden, width, bias=False)
        self.up = nn.Linear(hidden, width, bias=False)
        self.down = nn.Linear(width, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class MoE(nn.Module):
    """Top-k routing that runs each expert only on its own tokens (so only active FLOPs)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        moe, h = cfg.moe, cfg.hidden_size
        self.top_k = moe.top_k
        self.router = nn.Linear(h, moe.num_experts, bias=False)
        width = moe.expert_ffn_hidden_size or cfg.ffn_hidden_size
        self.experts = nn.ModuleList(SwiGLU(h, width) for _ in range(moe.num_experts))
        self.shared = SwiGLU(h, cfg.ffn_hidden_size) if moe.shared_expert else None

    def forward(self, x_SH: torch.Tensor) -> torch.Tensor:
        probs = self.router(x_SH).softmax(-1)
        top_p, top_i = probs.topk(self.top_k, -1)
        out = self.shared(x_SH) if self.shared is not None else torch.zeros_like(x_SH)
        for e, expert in enumerate(self.experts):
            token, slot = (top_i == e).nonzero(as_tuple=True)
            if token.numel():
                out = out.index_add(0, token, expert(x_SH[token]) * top_p[token, slot, None])
        return out


class Layer(nn.Module):
    def __init__(self, cfg: ModelConfig, mixer: str, ffn: str) -> None:
        super().__init__()
        self.input_norm, self.ffn_norm = RMSNorm(cfg.hidden_size), RMSNorm(cfg.hidden_size)
        self.mixer = Mixer(cfg, mixer)
        self.ffn = SwiGLU(cfg.hidden_size, cfg.ffn_hidden_size) if ffn == "-" else MoE(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.input_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class ReferenceLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Layer(cfg, m, f) for m, f in cfg.layers)
        self.norm = RMSNorm(cfg.hidden_size)
        self.lm_head = (nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
                        if cfg.untie_embeddings else None)

    def forward(self, tokens_S: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens_S)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        weight = self.lm_head.weight if self.lm_head is not None else self.embed.weight
        return x @ weight.T
