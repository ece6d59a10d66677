"""An independent plain-torch forward of the SpikingBrain-76B dense layout (H/F mixers, sinks).

Written from spikingbrain.md §2 (not from sbtrain's modules): every layer sums a key-gated
linear-attention branch (sigmoid q, k; decay 1 - k; literal token loop) and a softmax branch
(RoPE, window or full, explicit mask), each RMS-normed per head; learnable sink tokens are
prepended, seen by every token, see only each other, and seed the linear branch's state at
every document start. Reads sbtrain's own one-process tensor names; fp64, tiny models only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.model.official_reference import rms_norm, rope


def _qkv(x, w, prefix, heads, groups, dim):
    qkv = x @ w[prefix + "linear_qkv.weight"].T
    if prefix + "linear_qkv.bias" in w:
        qkv = qkv + w[prefix + "linear_qkv.bias"]
    per_group = heads // groups
    qkv = qkv.view(x.shape[0], groups, per_group + 2, dim)
    q = qkv[:, :, :per_group].reshape(x.shape[0], heads, dim)
    return q, qkv[:, :, per_group], qkv[:, :, per_group + 1]


def _linear_branch(q, k, v, starts, sinks, groups):
    """Literal recurrence S_t = diag(1 - k_t) S_{t-1} + k_t^T v_t per kv head."""
    heads, dim = q.shape[1], q.shape[2]
    q, k = torch.sigmoid(q), torch.sigmoid(k)
    owner = torch.arange(heads) // (heads // groups)
    state = q.new_zeros(groups, dim, dim)
    after_sinks = state
    outs = []
    for t in range(q.shape[0]):
        if t == sinks:
            after_sinks = state
        if t >= sinks and starts[t - sinks]:
            state = after_sinks
        state = (1 - k[t])[:, :, None] * state + k[t][:, :, None] * v[t][:, None, :]
        outs.append(torch.einsum("hd,hde->he", q[t], state[owner]) * dim ** -0.5)
    return torch.stack(outs)


def _softmax_branch(q, k, v, segments, sinks, window, theta, groups):
    heads, dim = q.shape[1], q.shape[2]
    q, k = rope(q, theta), rope(k, theta)
    k, v = (t.repeat_interleave(heads // groups, dim=1) for t in (k, v))
    n = q.shape[0]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    seg = torch.cat([torch.full((sinks,), -1), segments])
    regular = (i >= sinks) & (j >= sinks) & (j <= i) & (seg[i] == seg[j])
    if window is not None:
        regular &= i - j <= window
    allowed = (j < sinks) | regular
    scores = torch.einsum("ihd,jhd->hij", q, k) * dim ** -0.5
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hij,jhd->ihd", probs, v)


def hybrid_mixer(x, w, prefix, model, window, segments):
    heads, groups, dim = model.num_attention_heads, model.num_query_groups, model.kv_channels
    sinks = model.sink_tokens
    starts = torch.ones(len(segments), dtype=torch.bool)
    starts[1:] = segments[1:] != segments[:-1]
    q, k, v = _qkv(x, w, prefix, heads, groups, dim)
    o1 = _linear_branch(q, k, v, starts, sinks, groups)
    if not model.hybrid.shared_projections:
        q, k, v = _qkv(x, w, prefix + "softmax_branch.", heads, groups, dim)
    o2 = _softmax_branch(q, k, v, segments, sinks, window, model.rope_theta, groups)
    eps = model.norm_eps
    o1 = rms_norm(o1, w[prefix + "linear_norm_weight"], eps).reshape(x.shape[0], -1)
    o2 = rms_norm(o2, w[prefix + "softmax_norm_weight"], eps).reshape(x.shape[0], -1)
    if model.hybrid.shared_projections:
        return (o1 + o2) @ w[prefix + "linear_proj.weight"].T
    return (o1 @ w[prefix + "linear_proj.weight"].T
            + o2 @ w[prefix + "softmax_branch.linear_proj.weight"].T)


def reference_logits(tokens, w, model, segments=None):
    """[T] tokens -> [T, vocab] logits of a dense H/F model (sbtrain tensor names)."""
    segments = torch.zeros(len(tokens), dtype=torch.long) if segments is None else segments
    x = w["embedding.word_embeddings.weight"][tokens]
    if model.sink_tokens:
        x = torch.cat([w["sink_tokens"], x])
    eps = model.norm_eps
    for i, (mixer, ffn) in enumerate(model.layers):
        assert mixer in "HF" and ffn == "-", "the reference covers dense H/F layers only"
        p = f"decoder.layers.{i}."
        window = model.sliding_window if mixer == "H" else None
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        x = x + hybrid_mixer(h, w, p + "self_attention.", model, window, segments)
        h = rms_norm(x, w[p + "pre_mlp_layernorm.weight"], eps)
        gate, up = (h @ w[p + "mlp.linear_fc1.weight"].T).chunk(2, dim=-1)
        x = x + (F.silu(gate) * up) @ w[p + "mlp.linear_fc2.weight"].T
    x = rms_norm(x, w["decoder.final_layernorm.weight"], eps)[model.sink_tokens:]
    return x @ w["output_layer.weight"].T
