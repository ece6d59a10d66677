"""An independent plain-torch forward of the official SpikingBrain-7B layout (GLAswa).

Written from spikingbrain.md §1 (not from sbtrain's modules) and driven by tensors named as in
the official checkpoint, so comparing it with sbtrain checks the model, the export mapping and
the numerics at once. Slow loops, fp64-friendly, for tiny models only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """NeoX (rotate-half) rotary embedding of [T, H, D] at positions 0..T-1."""
    seq, _, dim = x.shape
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.outer(torch.arange(seq, dtype=torch.float64), inv)
    cos = torch.cat([angles.cos(), angles.cos()], -1)[:, None, :].to(x.dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1)[:, None, :].to(x.dtype)
    half = dim // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def swa(x, w, cfg, prefix):
    heads, groups = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    dim = cfg["hidden_size"] // heads
    seq = x.shape[0]
    q = (x @ w[prefix + "q_proj.weight"].T + w[prefix + "q_proj.bias"]).view(seq, heads, dim)
    k = (x @ w[prefix + "k_proj.weight"].T + w[prefix + "k_proj.bias"]).view(seq, groups, dim)
    v = (x @ w[prefix + "v_proj.weight"].T + w[prefix + "v_proj.bias"]).view(seq, groups, dim)
    q, k = rope(q, cfg["rope_theta"]), rope(k, cfg["rope_theta"])
    k, v = (t.repeat_interleave(heads // groups, dim=1) for t in (k, v))
    i = torch.arange(seq)[:, None]
    j = torch.arange(seq)[None, :]
    allowed = (j <= i) & (i - j <= cfg["sliding_window"])
    scores = torch.einsum("ihd,jhd->hij", q, k) * dim ** -0.5
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    out = torch.einsum("hij,jhd->ihd", probs, v).reshape(seq, -1)
    return out @ w[prefix + "o_proj.weight"].T


def gla(x, w, cfg, prefix):
    heads, groups = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    dim = cfg["hidden_size"] // heads
    seq = x.shape[0]
    q = F.relu(x @ w[prefix + "q_proj.weight"].T + w[prefix + "q_proj.bias"]).view(seq, heads, dim)
    k = F.relu(x @ w[prefix + "k_proj.weight"].T + w[prefix + "k_proj.bias"]).view(seq, groups, dim)
    v = (x @ w[prefix + "v_proj.weight"].T + w[prefix + "v_proj.bias"]).view(seq, groups, dim)
    gate = x @ w[prefix + "gk_proj.0.weight"].T @ w[prefix + "gk_proj.1.weight"].T
    decay = torch.exp(F.logsigmoid(gate + w[prefix + "gk_proj.1.bias"]) / 16).view(seq, groups, dim)
    state = x.new_zeros(heads, dim, dim)
    outs = []
    for t in range(seq):
        g = torch.arange(heads) // (heads // groups)
        state = decay[t, g][:, :, None] * state + k[t, g][:, :, None] * v[t, g][:, None, :]
        outs.append(torch.einsum("hd,hde->he", q[t], state) * dim ** -0.5)
    out = rms_norm(torch.stack(outs), w[prefix + "g_norm.weight"], cfg["norm_eps"])
    return out.reshape(seq, -1) @ w[prefix + "o_proj.weight"].T


def official_logits(tokens: torch.Tensor, w: dict, cfg: dict) -> torch.Tensor:
    """[T] tokens -> [T, vocab] logits of the official GLAswa model (one sequence)."""
    x = w["model.embeddings.weight"][tokens]
    eps = cfg["norm_eps"]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        mixer = swa if i in cfg["attn_layers"] else gla
        x = x + mixer(rms_norm(x, w[p + "attn_norm.weight"], eps), w, cfg, p + "attn.")
        h = rms_norm(x, w[p + "mlp_norm.weight"], eps)
        gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    return rms_norm(x, w["model.norm.weight"], eps) @ w["lm_head.weight"].T
