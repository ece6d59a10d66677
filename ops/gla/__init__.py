"""Gated linear attention (GLA): one op, ``gla``, for plain, packed, sink-prefixed and
sequence-parallel calls.

Layout ``[B, T, H, D]`` (fla's): q ``[B, T, H, K]``, k and g ``[B, T, Hkv, K]``, v ``[B, T, Hkv, V]``,
o ``[B, T, H, V]``; query head h reads kv head ``h // (H // Hkv)``.

The kernel form (``scale, initial_state, output_final_state, cu_seqlens``) dispatches
(``local.py``, registry ``gla``) between fla's ``chunk_gla`` and the chunked torch reference;
``gla_recurrent_reference`` is the ground truth the tests compare both against. The token form
(``documents``, ``sinks``, ``sp``) composes calls of it: documents restart the state at every new
id; the first ``sinks`` positions are sink tokens that run the recurrence first, in plain torch,
and whose final state starts every row and document; ``sp`` (``ops.comm.SPContext``) means the
regular rows are this rank's slice of sequences split over an SP group (``sequence_parallel.py``,
LASP-2 state exchange).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ops.comm import SPContext
from ops.documents import document_ids
from ops.gla.local import TORCH_CHUNK_SIZE, gla_documents, local_gla
from ops.gla.reference import (
    gla_chunked_reference,
    gla_input_problem,
    gla_recurrent_reference,
    initial_state_output,
)
from ops.gla.sequence_parallel import sp_gla


def gla(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float | None = None,
        initial_state: Tensor | None = None, output_final_state: bool = False,
        cu_seqlens: Tensor | None = None, *, documents: Tensor | None = None, sinks: int = 0,
        sp: SPContext | None = None) -> tuple[Tensor, Tensor | None]:
    """Gated linear attention with GQA, packed sequences, sinks and sequence parallelism.

    Per sequence and kv head: ``S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t`` (``S`` is ``K x V``,
    ``S_0`` = initial state or zeros) and ``o_t^h = scale * q_t^h S_t^{h // (H // Hkv)}``.

    Args:
        q: queries ``[B, T, H, K]``.
        k: keys ``[B, T, Hkv, K]``, ``H % Hkv == 0``.
        v: values ``[B, T, Hkv, V]``.
        g: per-channel log decay ``[B, T, Hkv, K]`` (<= 0).
        scale: output scale; default ``K ** -0.5``.
        initial_state: ``[N, Hkv, K, V]`` or None (zeros); N = B, or the number of packed sequences.
        output_final_state: also return the state after each sequence's last token.
        cu_seqlens: ``[N + 1]`` offsets of packed sequences (FlashAttention convention); needs B == 1.
        documents: ``[B, T - sinks]`` integer document ids of the regular tokens (token form),
            bare or as the micro-batch's ``ops.documents.Documents`` (which brings their
            cu_seqlens, computed once per micro-batch instead of per layer).
        sinks: the first ``sinks`` positions are sink tokens (token form).
        sp: the SP context when the regular rows are this rank's slice (token form).

    Returns:
        ``o [B, T, H, V]`` in q's dtype, and the final state ``[N, Hkv, K, V]`` (fp32) or None
        (always None in the token form).
    """
    if documents is None and not sinks and sp is None:
        return local_gla(q, k, v, g, scale=scale, initial_state=initial_state,
                         output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    if initial_state is not None or output_final_state or cu_seqlens is not None:
        raise ValueError("gla's token form (documents, sinks, sp) takes no initial_state, "
                         "output_final_state or cu_seqlens")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _token_gla(q, k, v, g, scale, documents, sinks, sp), None


gla.registry = local_gla.registry  # type: ignore[attr-defined]


def _token_gla(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float, documents: Tensor | None, sinks: int,
               sp: SPContext | None) -> Tensor:
    state = None
    if sinks:
        # The S sink positions run in plain torch (S = 128: cheap), and their state enters the
        # regular tokens as an additive term (``initial_state_output``), so the fused kernel runs
        # without initial or final states: fla 0.6 fails to compile some of its state-passing
        # autotune configs at head dim 128 (Triton PassManager error on an H100). Every SP rank
        # runs the (identical) sink prefix itself: no communication for the sinks.
        head = [t[:, :sinks] for t in (q, k, v, g)]
        out_sinks, state = gla_chunked_reference(*head, scale=scale, output_final_state=True)
        q, k, v, g = (t[:, sinks:] for t in (q, k, v, g))
    if sp is not None:
        out = sp_gla(q, k, v, g, scale, sp, documents, initial_state=state)
    else:
        out = gla_documents(q, k, v, g, scale, documents)
        if state is not None:
            out = out + initial_state_output(q, g, state, scale, document_ids(documents)).to(out.dtype)
    return out if not sinks else torch.cat([out_sinks.to(out.dtype), out], dim=1)


__all__ = ["TORCH_CHUNK_SIZE", "gla", "gla_chunked_reference", "gla_input_problem", "gla_recurrent_reference",
           "initial_state_output"]
