"""Causal softmax attention with an optional sliding window and document masking.

``softmax_attention(q, k, v, window=None, segment_ids=None, scale=None)`` dispatches, per
call, to the fastest backend that accepts it (``ops.backends``):

* ``sdpa_causal`` (vendor): torch SDPA with ``is_causal=True``, the flash kernel. CUDA only;
  plain causal calls only (no ``segment_ids``, window None or >= T - 1).
* ``flex`` (triton): ``flex_attention`` compiled on first use, with a block-sparse mask for
  the window and the documents. CUDA only.
* ``torch``: :func:`reference_attention`, an explicit masked softmax in fp32.

``sink_attention(q, k, v, q_sink, k_sink, v_sink, ...)`` (``ops.attention.sinks``) is the same
attention with S sink tokens ("meta tokens", SpikingBrain-76B) that every token sees; it
returns ``(out, out_sink)`` and has its own backends (``flex``, ``lse_merge``, ``torch``).

``positioned_attention(q, k, v, q_pos, k_pos, *, window, q_segments, k_segments, k_valid,
k_always, scale)`` (``ops.attention.positioned``) is the same attention between queries and keys
at explicit global positions, as a sequence-parallel rank holds them (keys gathered from earlier
ranks, padding slots, sinks); backends ``flex`` and ``torch``.

Layout [B, H, T, D] for q and [B, Hkv, T, D] for k, v (GQA: query head h reads kv head
``h // (H // Hkv)``). Query i attends key j iff ``j <= i``, ``i - j <= window`` (when given)
and ``segment_ids[b, i] == segment_ids[b, j]`` (when given): a window of 4096 keeps the
token itself and the 4096 before it, as flash-attn's ``window_size=(4096, 0)``.

Importing this package registers the backends; nothing is compiled and triton is not
imported until a fast backend runs.
"""

from __future__ import annotations

from torch import Tensor

from ops.attention.flex_backend import flex_available, flex_softmax_attention, verify_flex
from ops.attention.positioned import POSITIONED_OP_NAME, positioned_attention, reference_positioned_attention
from ops.attention.reference import attention_mask, reference_attention
from ops.attention.sdpa_backend import sdpa_causal_attention, verify_sdpa_causal
from ops.attention.sinks import (
    SINK_OP_NAME,
    merge_attention,
    reference_sink_attention,
    sink_attention,
    sink_attention_mask,
)
from ops.backends import Backend, dispatch

OP_NAME = "softmax_attention"


@dispatch(OP_NAME)
def softmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int | None = None,
    segment_ids: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Causal softmax attention (torch reference; the entry point dispatches).

    Args:
        q: [B, H, T, D] queries.
        k, v: [B, Hkv, T, D] keys and values, H % Hkv == 0.
        window: number of previous tokens each query sees besides itself; None: unlimited.
        segment_ids: [B, T] integer document ids of packed sequences; None: one document.
        scale: score multiplier; defaults to ``D ** -0.5``.

    Returns:
        [B, H, T, D] in ``q``'s dtype.
    """
    return reference_attention(q, k, v, window, segment_ids, scale)


# torch's flash SDPA kernel is a CUDA library kernel (not verified on MetaX's mcPyTorch): on
# platform maca the Triton flex backend serves these calls.
softmax_attention.registry.register(  # type: ignore[attr-defined]
    Backend(name="sdpa_causal", fn=sdpa_causal_attention, kind="vendor", verifier=verify_sdpa_causal,
            platforms=("cuda",))
)
softmax_attention.registry.register(  # type: ignore[attr-defined]
    Backend(name="flex", fn=flex_softmax_attention, kind="triton", available=flex_available, verifier=verify_flex)
)

__all__ = [
    "OP_NAME",
    "POSITIONED_OP_NAME",
    "SINK_OP_NAME",
    "attention_mask",
    "merge_attention",
    "positioned_attention",
    "reference_attention",
    "reference_positioned_attention",
    "reference_sink_attention",
    "sink_attention",
    "sink_attention_mask",
    "softmax_attention",
]
