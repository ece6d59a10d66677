"""Parameter counts of a pattern-described model, split by layer type and by parallel role.

Notation (all from ``ModelConfig``): h = hidden_size, n_h = num_attention_heads,
n_g = num_query_groups (kv heads), d = kv_channels (head dim), F = ffn_hidden_size,
F_e = moe.expert_ffn_hidden_size or F, E = moe.num_experts, k = moe.top_k, V = vocab_size,
r = GLA_GATE_RANK = 16.

Per layer (b = 1 if qkv_bias else 0):

- shared q/k/v/o projections  A = h*n_h*d + 2*h*n_g*d + n_h*d*h  (+ b*(n_h*d + 2*n_g*d) biases)
- ``*``, ``W``: A
- ``L``:  A + gate (h*r + r*n_g*d + n_g*d) + g_norm d
- ``H``, ``F``: A + 2*d (one RMSNorm over d per branch; the 76B-style linear branch has no gate
  params); 2*A + 2*d with ``model.hybrid.shared_projections: false``
- ``-``: 3*h*F
- ``E``: router h*E + E*3*h*F_e + shared 3*h*F;   active: h*E + k*3*h*F_e + shared 3*h*F
- two RMSNorms: 2*h

Model: embedding V*h + final RMSNorm h + lm_head V*h (when ``untie_embeddings``) + sink tokens
S*h (``model.sink_tokens``, counted with the embedding: active for every token).
Checked against Qwen2.5-7B (7,615,616,512) in ``tests/profiler``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from sbtrain.config.schema import ModelConfig

GLA_GATE_RANK = 16
"""Low-rank width of the 7B GLA gate projection gk_proj (h -> 16 -> n_g*d)."""

# Parallel roles, decide how a parameter is split over ranks (see memory.py).
TP = "tp"                  # column/row-parallel weights: split over tp
REPLICATED = "replicated"  # norms, router, small gate factor: a full copy on every tp rank
EXPERT = "expert"          # routed experts: split over ep, each expert over tp (etp = tp)


@dataclass(frozen=True)
class Block:
    """One group of parameters with the same parallel role.

    ``total`` counts every parameter, ``active`` those used per token, ``matmul`` the active
    ones that are matmul weights (no biases, no norm weights): forward FLOPs = 2 * matmul.
    """

    role: str
    total: int
    active: int
    matmul: int


def _dense(role: str, weights: int, others: int = 0) -> Block:
    return Block(role, weights + others, weights + others, weights)


def attention_projections(model: ModelConfig) -> Block:
    """q/k/v/o of Qwen2 attention: A = h*n_h*d + 2*h*n_g*d + n_h*d*h, biases on q/k/v only."""
    h, q_width, kv_width = model.hidden_size, _q_width(model), _kv_width(model)
    weights = h * q_width + 2 * h * kv_width + q_width * h
    biases = (q_width + 2 * kv_width) if model.qkv_bias else 0
    return _dense(TP, weights, biases)


def mixer_blocks(model: ModelConfig, mixer: str) -> list[Block]:
    """Parameter blocks of one mixer (see the module docstring for the formulas)."""
    blocks = [attention_projections(model)]
    d, kv_width = model.kv_channels, _kv_width(model)
    if mixer == "L":
        # gk_proj: Linear(h -> r, no bias) kept whole on every rank, Linear(r -> n_g*d, bias)
        # column-parallel with the kv heads it gates; g_norm is one RMSNorm(d) shared by heads.
        blocks.append(_dense(REPLICATED, model.hidden_size * GLA_GATE_RANK))
        blocks.append(_dense(TP, GLA_GATE_RANK * kv_width, kv_width))
        blocks.append(_dense(REPLICATED, 0, d))
    elif mixer in ("H", "F"):
        blocks.append(_dense(REPLICATED, 0, 2 * d))
        if not model.hybrid.shared_projections:
            blocks.append(attention_projections(model))
    elif mixer not in ("*", "W"):
        raise ValueError(f"unknown mixer symbol {mixer!r}")
    return blocks


def swiglu_params(hidden: int, width: int) -> int:
    """gate, up (h -> width) and down (width -> h), no biases: 3*h*width."""
    return 3 * hidden * width


def expert_width(model: ModelConfig) -> int:
    return model.moe.expert_ffn_hidden_size or model.ffn_hidden_size


def ffn_blocks(model: ModelConfig, ffn: str) -> list[Block]:
    """Parameter blocks of one FFN: dense SwiGLU, or router + routed experts + shared expert."""
    h = model.hidden_size
    dense = swiglu_params(h, model.ffn_hidden_size)
    if ffn == "-":
        return [_dense(TP, dense)]
    if ffn != "E":
        raise ValueError(f"unknown FFN symbol {ffn!r}")
    moe = model.moe
    one_expert = swiglu_params(h, expert_width(model))
    blocks = [
        _dense(REPLICATED, h * moe.num_experts),
        Block(EXPERT, moe.num_experts * one_expert, moe.top_k * one_expert, moe.top_k * one_expert),
    ]
    if moe.shared_expert:
        blocks.append(_dense(TP, dense))
    return blocks


def layer_blocks(model: ModelConfig, mixer: str, ffn: str) -> dict[str, list[Block]]:
    """All parameter blocks of one layer, keyed by component (mixer, ffn, norms)."""
    return {
        "mixer": mixer_blocks(model, mixer),
        "ffn": ffn_blocks(model, ffn),
        "norms": [_dense(REPLICATED, 0, 2 * model.hidden_size)],
    }


def _sum(blocks: list[Block], attr: str) -> int:
    return sum(getattr(b, attr) for b in blocks)


def layer_summary(model: ModelConfig, mixer: str, ffn: str) -> dict[str, int]:
    """Per-layer totals: total/active/matmul and the mixer/ffn/norms split of ``total``."""
    parts = layer_blocks(model, mixer, ffn)
    every = [b for blocks in parts.values() for b in blocks]
    out = {name: _sum(blocks, "total") for name, blocks in parts.items()}
    out.update(total=_sum(every, "total"), active=_sum(every, "active"),
               matmul=_sum(every, "matmul"))
    out["ffn_active"] = _sum(parts["ffn"], "active")
    return out


def layer_type_counts(model: ModelConfig) -> dict[str, int]:
    """How many layers of each type, keyed by the two-symbol layer code, in pattern order."""
    return dict(Counter(mixer + ffn for mixer, ffn in model.layers))


def count_parameters(model: ModelConfig) -> dict:
    """Parameter counts of ``model``.

    Returns a dict with ``total``, ``active`` (per token: the routed experts outside top_k
    are left out; embedding and lm_head included, as in "76B-A12B"), ``embedding`` (V*h + S*h
    sink tokens),
    ``lm_head`` (V*h or 0 when tied), ``final_norm`` (h), ``non_embedding_total`` /
    ``non_embedding_active`` (layers + final norm), ``matmul_active`` (active matmul weights of
    the layers: forward layer matmul FLOPs = 2 * this) and ``layers``: per layer code
    (e.g. ``"L-"``) the ``count`` and the per-layer numbers of ``layer_summary`` plus
    ``total_all`` / ``active_all`` over all layers of that type.
    """
    h, vocab = model.hidden_size, model.vocab_size
    embedding = vocab * h + model.sink_tokens * h
    lm_head = vocab * h if model.untie_embeddings else 0
    layers: dict[str, dict[str, int]] = {}
    for code, count in layer_type_counts(model).items():
        info = {"count": count, **layer_summary(model, code[0], code[1])}
        info["total_all"] = count * info["total"]
        info["active_all"] = count * info["active"]
        layers[code] = info
    layer_total = sum(info["total_all"] for info in layers.values())
    layer_active = sum(info["active_all"] for info in layers.values())
    fixed = embedding + lm_head + h
    return {
        "total": layer_total + fixed,
        "active": layer_active + fixed,
        "embedding": embedding,
        "lm_head": lm_head,
        "final_norm": h,
        "non_embedding_total": layer_total + h,
        "non_embedding_active": layer_active + h,
        "matmul_active": sum(info["count"] * info["matmul"] for info in layers.values()),
        "layers": layers,
    }


def _q_width(model: ModelConfig) -> int:
    return model.num_attention_heads * model.kv_channels


def _kv_width(model: ModelConfig) -> int:
    return model.num_query_groups * model.kv_channels
