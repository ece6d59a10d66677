"""Op ``gla`` on one process: the registry (fla's kernel, the torch reference) and the
packed-documents form of a call.

Backends of op ``gla`` (see ``ops.backends``): ``fla_chunk`` (vendor, fla-core's ``chunk_gla`` on
a GPU; registered here but fla is imported only when it is first considered) and ``torch`` (the
chunked reference, which also serves the CPU); ``gqa_chunk`` (triton, grouped calls: k, v and g
stay on their kv heads, ``gqa.py``) outranks ``fla_chunk``.
"""

from __future__ import annotations

from torch import Tensor

from ops.backends import dispatch
from ops.documents import Documents, cu_seqlens_from_segments
from ops.gla import fla_backend, gqa
from ops.gla.reference import gla_chunked_reference

# Chunk size of the torch path. Its intra-chunk block costs T * chunk * K per kv head, its state
# loop T / chunk steps; on CPU, fwd+bwd of [1, 1024, 28/4 heads, 128] takes 0.36 s at 16, 0.37 s
# at 32, 0.80 s at 64 and 2.2 s at 8.
TORCH_CHUNK_SIZE = 16


@dispatch("gla")
def local_gla(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float | None = None,
              initial_state: Tensor | None = None, output_final_state: bool = False,
              cu_seqlens: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """:func:`ops.gla.gla`'s kernel form (torch reference; the entry point dispatches)."""
    return gla_chunked_reference(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens,
                                 chunk_size=TORCH_CHUNK_SIZE)


fla_backend.register(local_gla.registry)  # type: ignore[attr-defined]
gqa.register(local_gla.registry)  # type: ignore[attr-defined]


def gla_documents(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float,
                  documents: Documents | Tensor | None) -> Tensor:
    """``[B, T, ...]`` -> ``o [B, T, H, V]`` from a zero state per row, restarted at every new id of
    ``documents [B, T]`` (the rows are flattened into one packed sequence for the kernel; a
    ``Documents`` brings the offsets, bare ids have them computed here, a device sync)."""
    if documents is None:
        return local_gla(q, k, v, g, scale=scale)[0]
    batch, seq = q.shape[:2]
    if isinstance(documents, Documents):
        cu_seqlens = documents.cu_seqlens
    else:
        cu_seqlens = cu_seqlens_from_segments(documents)
    flat = [t.reshape(1, batch * seq, *t.shape[2:]) for t in (q, k, v, g)]
    out, _ = local_gla(*flat, scale=scale, cu_seqlens=cu_seqlens)
    return out.reshape(batch, seq, *out.shape[2:])
