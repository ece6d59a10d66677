"""Gated linear attention (GLA) op: ``gla`` dispatches between fla's kernel and a torch reference.

Backends of op ``gla`` (see ``ops.backends``): ``fla_chunk`` (vendor, fla-core's ``chunk_gla`` on
a GPU; registered here but fla is imported only when it is first considered) and ``torch`` (the
chunked reference, which also serves the CPU). ``gla_recurrent_reference`` is the ground truth the
tests compare both against.
"""

from __future__ import annotations

from torch import Tensor

from ops.backends import dispatch
from ops.gla import fla_backend
from ops.gla.reference import (
    gla_chunked_reference,
    gla_input_problem,
    gla_recurrent_reference,
    initial_state_output,
)

# Chunk size of the torch path. Its intra-chunk block costs T * chunk * K per kv head, its state
# loop T / chunk steps; on CPU, fwd+bwd of [1, 1024, 28/4 heads, 128] takes 0.36 s at 16, 0.37 s
# at 32, 0.80 s at 64 and 2.2 s at 8.
TORCH_CHUNK_SIZE = 16


@dispatch("gla")
def gla(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float | None = None,
        initial_state: Tensor | None = None, output_final_state: bool = False,
        cu_seqlens: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Gated linear attention with GQA and packed sequences, layout ``[B, T, H, D]``.

    Per sequence and kv head: ``S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t`` (``S`` is ``K x V``,
    ``S_0`` = initial state or zeros) and ``o_t^h = scale * q_t^h S_t^{h // (H // Hkv)}``.

    Args:
        q: queries ``[B, T, H, K]``.
        k: keys ``[B, T, Hkv, K]``, ``H % Hkv == 0``; query head ``h`` reads kv head ``h // (H // Hkv)``.
        v: values ``[B, T, Hkv, V]``.
        g: per-channel log decay ``[B, T, Hkv, K]`` (<= 0).
        scale: output scale; default ``K ** -0.5``.
        initial_state: ``[N, Hkv, K, V]`` or None (zeros); N = B, or the number of packed sequences.
        output_final_state: also return the state after each sequence's last token.
        cu_seqlens: ``[N + 1]`` offsets of packed sequences (FlashAttention convention); needs B == 1.

    Returns:
        ``o [B, T, H, V]`` in q's dtype, and the final state ``[N, Hkv, K, V]`` (fp32) or None.
    """
    return gla_chunked_reference(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens,
                                 chunk_size=TORCH_CHUNK_SIZE)


fla_backend.register(gla.registry)

__all__ = ["TORCH_CHUNK_SIZE", "gla", "gla_chunked_reference", "gla_input_problem", "gla_recurrent_reference",
           "initial_state_output"]
