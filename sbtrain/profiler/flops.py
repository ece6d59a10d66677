"""Model FLOPs per token, per layer type: what MFU is measured against.

A multiply-add counts as 2 FLOPs. Only matmul-like work is counted (the convention of
``torch.utils.flop_counter`` and of MFU tables): norms, activations, RoPE, softmax, the GLA
decay multiply and bias adds are left out. Notation as in ``counting.py``; S = seq_length.

Forward, per token:

- projections and FFN: ``2 * matmul_active`` per layer (active weights only, so an MoE layer
  counts the router, top_k routed experts and the shared expert);
- logits: ``2 * h * V`` (the input embedding is a lookup, no FLOPs);
- softmax attention: ``QK^T`` and ``AV`` each cost ``2 * n_h * d`` per visible key, so
  ``4 * n_h * d * avg_keys``; full causal ``avg_keys = (S + 1) / 2``; sliding window see
  ``window_avg_keys``;
- GLA (``L`` and the linear branch of ``H``/``F``): ``4 * n_h * d_k * d_v`` (see ``gla_flops``);
- ``H`` = GLA + window, ``F`` = GLA + full causal (the branches share q/k/v/o, counted once).

Training = 3 x forward: the backward of every matmul computes the gradient of both operands,
each as costly as the forward product (no recomputation counted: *model* FLOPs).
"""

from __future__ import annotations

from sbtrain.config.schema import ModelConfig
from sbtrain.profiler.counting import count_parameters

TRAINING_MULTIPLIER = 3
"""Forward + backward = 3 x forward (backward computes input and weight gradients)."""


def causal_avg_keys(seq_length: int) -> float:
    """Average keys seen by a query under a causal mask: (1/S) * sum_{i=1..S} i = (S + 1) / 2."""
    return (seq_length + 1) / 2


def window_avg_keys(seq_length: int, window: int) -> float:
    """Average keys seen per query when each query sees itself + ``window`` previous tokens.

    Query i (0-based) sees ``min(i + 1, w + 1)`` keys. With S <= w + 1 this is the causal
    (S + 1) / 2; otherwise the first w + 1 queries see 1..w+1 keys and the remaining
    S - w - 1 see w + 1 each:

        avg = [ (w + 1)(w + 2) / 2 + (S - w - 1)(w + 1) ] / S
    """
    if seq_length <= window + 1:
        return causal_avg_keys(seq_length)
    w1 = window + 1
    return (w1 * (w1 + 1) / 2 + (seq_length - w1) * w1) / seq_length


def softmax_attention_flops(model: ModelConfig, avg_keys: float) -> float:
    """Score and value products per token: 2 (QK^T, AV) * 2 * n_h * d * avg_keys.

    Counted per query head: with GQA a kv head serves n_h / n_g query heads, but every query
    head still does its own dot products against the (shared) keys and values.
    """
    return 4 * model.num_attention_heads * model.kv_channels * avg_keys


def gla_flops(model: ModelConfig) -> float:
    """Linear-attention FLOPs per token: 2 * n_h * d_k * d_v (state) + 2 * n_h * d_k * d_v (output).

    Recurrence per query head: ``S_t = diag(a_t) S_{t-1} + k_t^T v_t`` (outer product: d_k*d_v
    multiply-adds = 2*d_k*d_v FLOPs) and ``o_t = q_t S_t`` (d_k*d_v multiply-adds), with
    d_k = d_v = d. The chunked kernel (fla ``chunk_gla``) does the same state work per chunk
    (``K_c^T V_c`` and ``Q_c S``); its intra-chunk ``(Q K^T) V`` block (about 2*C*(d_k + d_v)
    per token for chunk C = 64) is an algorithmic overhead of that kernel, left out like the
    recomputation inside flash attention, so model FLOPs are independent of the kernel.

    GQA: k, v and the gate are shared by the n_h / n_g query heads of a group, so the states
    of a group are identical and a GQA-aware kernel would need only ``2 * n_g * d_k * d_v`` for
    the state update. The kernels in use repeat k/v/gate to n_h heads and update n_h states,
    so we count per query head, as the kernel does. The decay ``diag(a_t) S`` (d_k*d_v
    elementwise multiplies) is not a matmul and is not counted.
    """
    d = model.kv_channels
    return 2 * 2 * model.num_attention_heads * d * d


def mixer_core_flops(model: ModelConfig, mixer: str, seq_length: int) -> float:
    """Forward score/state FLOPs per token of one mixer (the part outside its projections)."""
    full = softmax_attention_flops(model, causal_avg_keys(seq_length))
    window = softmax_attention_flops(model, window_avg_keys(seq_length, model.sliding_window))
    table = {
        "*": full,
        "W": window,
        "L": gla_flops(model),
        "H": gla_flops(model) + window,
        "F": gla_flops(model) + full,
    }
    if mixer not in table:
        raise ValueError(f"unknown mixer symbol {mixer!r}")
    return table[mixer]


def flops_per_token(model: ModelConfig, seq_length: int, training: bool = True) -> dict:
    """Model FLOPs per token for sequences of ``seq_length`` tokens.

    Returns ``total`` (per token, x3 when ``training``), ``forward`` (per token, forward only),
    ``multiplier``, ``logits``, ``matmul`` (projections + FFN of all layers + logits),
    ``attention`` (score/state terms of all layers), ``dense_6n`` (= multiplier * 2 *
    non-embedding active matmul weights, the usual "6N" without attention and logits) and
    ``layers``: per layer code the ``count``, per-layer ``matmul``, ``attention`` and ``per_layer``
    FLOPs and their sum ``total`` over that type. All numbers except ``forward`` include the
    multiplier.
    """
    mult = TRAINING_MULTIPLIER if training else 1
    params = count_parameters(model)
    layers: dict[str, dict[str, float]] = {}
    for code, info in params["layers"].items():
        matmul = mult * 2 * info["matmul"]
        core = mult * mixer_core_flops(model, code[0], seq_length)
        layers[code] = {
            "count": info["count"],
            "matmul": matmul,
            "attention": core,
            "per_layer": matmul + core,
            "total": info["count"] * (matmul + core),
        }
    logits = mult * 2 * model.hidden_size * model.vocab_size
    total = logits + sum(entry["total"] for entry in layers.values())
    return {
        "seq_length": seq_length,
        "training": training,
        "multiplier": mult,
        "total": total,
        "forward": total / mult,
        "logits": logits,
        "matmul": logits + sum(e["count"] * e["matmul"] for e in layers.values()),
        "attention": sum(e["count"] * e["attention"] for e in layers.values()),
        "dense_6n": mult * 2 * params["matmul_active"],
        "layers": layers,
    }
