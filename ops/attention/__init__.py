"""Softmax attention: one op, ``attention``, for every mask sbtrain trains with.

Shapes (the layout of SDPA and flex_attention; GQA: query head h reads kv head h // (H // Hkv))::

    B  batch                      H, Hkv  query heads, key/value heads (H % Hkv == 0)
    D  head dim                   S       sink tokens (the first S rows of q and of k, v)
    Tq, Tk  regular (non-sink) queries / keys; Lq = S + Tq, Lk = S + Tk (Tq == Tk without positions)
    q [B, H, Lq, D]   k, v [B, Hkv, Lk, D]   out [B, H, Lq, D]   documents [B, Tq]

``attention(q, k, v, *, window=None, documents=None, sinks=0, positions=None, sp=None, scale=None)``:
query i sees key j iff j is a sink, or j is at or before i, at most ``window`` positions back
(a window of 4096 keeps the token itself and the 4096 before it, as flash-attn's
``window_size=(4096, 0)``) and in the same document (``documents``: integer ids of the regular
tokens). Sinks ("meta tokens", SpikingBrain-76B) see each other only, all of them. The window
counts regular tokens; documents split regular tokens only.

``positions`` (``masks.Positions``) places the regular queries and keys at explicit global
positions, with padding slots and the keys' own document ids: a sequence-parallel rank's
slice against keys gathered from earlier ranks. ``sp`` (``ops.comm.SPContext``): the
sequences are split over an SP group and the regular rows are this rank's slice
(``sequence_parallel.py`` exchanges the keys and calls the same op with positions).

On one process the call dispatches (``local.py``, registry ``attention``) to SDPA flash,
flex_attention or the explicit-mask reference (``naive.py``); ``masks.py`` holds the rule.
Importing this package registers the backends; nothing is compiled and triton is not
imported until a fast backend runs.
"""

from __future__ import annotations

from torch import Tensor

from ops.attention.local import OP_NAME, local_attention
from ops.attention.lse_merge import merge_attention
from ops.attention.masks import Positions, dense_mask, mask_layout
from ops.attention.naive import naive_attention
from ops.attention.sequence_parallel import sp_attention
from ops.comm import SPContext


def attention(q: Tensor, k: Tensor, v: Tensor, *, window: int | None = None, documents: Tensor | None = None,
              sinks: int = 0, positions: Positions | None = None, sp: SPContext | None = None,
              scale: float | None = None) -> Tensor:
    """Causal softmax attention (see the module docstring for the rule and the shapes).

    Args:
        q: [B, H, Lq, D] queries; the first ``sinks`` rows are sink tokens.
        k, v: [B, Hkv, Lk, D] keys and values; the first ``sinks`` rows are sink tokens.
        window: previous positions each query sees besides its own; None: unlimited.
        documents: [B, Tq] integer document ids of the regular tokens, bare or as the
            micro-batch's ``ops.documents.Documents`` (which keeps the block masks built from
            them for the next layers); None: one document.
        sinks: number of sink tokens S.
        positions: explicit global positions of the regular queries and keys; None: the indices.
        sp: the SP context when the regular rows are this rank's slice of split sequences.
        scale: score multiplier; defaults to ``D ** -0.5``.

    Returns:
        [B, H, Lq, D] in ``q``'s dtype.
    """
    if sp is not None:
        if positions is not None:
            raise ValueError("attention takes sp or positions, not both (sp builds the positions)")
        return sp_attention(q, k, v, window=window, documents=documents, sinks=sinks, scale=scale, sp=sp)
    return local_attention(q, k, v, window=window, documents=documents, sinks=sinks, positions=positions,
                           scale=scale)


attention.registry = local_attention.registry  # type: ignore[attr-defined]


def attention_mask(L: int, *, window: int | None = None, documents: Tensor | None = None, sinks: int = 0,
                   device=None) -> Tensor:
    """[Bm, L, L] bool mask of a call without positions (True = seen): the reference's mask."""
    if device is None and documents is not None:
        device = documents.device
    return dense_mask(mask_layout(L, L, window=window, documents=documents, sinks=sinks, positions=None,
                                  device=device or "cpu"))


__all__ = ["OP_NAME", "Positions", "SPContext", "attention", "attention_mask", "merge_attention",
           "naive_attention"]
