"""Backend ``gqa_chunk`` of op ``gla``: chunked GLA that keeps k, v and g on their kv heads.

fla 0.6's ``chunk_gla`` needs as many k/v/g heads as query heads, so the ``fla_chunk`` backend
expands them (7x for 28 query / 4 kv heads) and sums their gradients back. Here the recurrent
state, which depends on k, v and g only, runs on the kv heads (fla's ``chunk_fwd_h``) and our
Triton kernels (``gqa_kernels``) read each query head's kv head by index; see ``gqa_chunk`` for
the composition. Serves only grouped calls (``H > Hkv``): with ``H == Hkv`` it would run the same
math as fla's kernel, whose tuned configs ``ops.gla.tuning`` already stores.

Triton kernels, so it runs on NVIDIA and MetaX; fla and triton are imported only when dispatch
first considers this backend on a machine with a GPU.
"""

from __future__ import annotations

from torch import Tensor

from ops.backends import Backend, Check, OpRegistry
from ops.gla.fla_backend import fla_available, fla_verifier

BACKEND_NAME = "gqa_chunk"
# below fla_chunk (vendor, 20) until it has run on a GPU: for grouped calls it does strictly less
# work, but its kernels were proven only in Triton's CPU interpreter and have no stored tuning yet
# (a first call would autotune ~100 configs). Opt in with SB_OP_BACKEND_GLA=gqa_chunk.
PRIORITY = 10
# the diagonal intra-chunk kernel holds a whole [16, K] block (fla splits K beyond 256)
MAX_HEAD_DIM = 256


def gla_gqa_chunk(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float | None = None,
                  initial_state: Tensor | None = None, output_final_state: bool = False,
                  cu_seqlens: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """GLA on GQA inputs without expanding them (same arguments and results as ``ops.gla.gla``)."""
    # deferred: imports triton and fla, which probe the devices (see module docstring)
    from ops.gla.gqa_chunk import chunk_gla_gqa

    return chunk_gla_gqa(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)


def gqa_available() -> Check:
    """fla importable on a GPU (its state and cumsum kernels are used) and our kernels compile-able."""
    ok, reason = fla_available()
    if not ok:
        return ok, reason
    try:
        import ops.gla.gqa_chunk  # noqa: F401
    # a broken triton/fla pairing can raise more than ImportError
    except Exception as exc:  # noqa: BLE001
        return False, f"ops.gla.gqa_chunk is not importable: {exc!r}"
    return True, "fla state kernels and the GQA kernels importable"


def gqa_verifier(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float | None = None,
                 initial_state: Tensor | None = None, output_final_state: bool = False,
                 cu_seqlens: Tensor | None = None) -> Check:
    """fla's limits (device, shapes, dtypes, head dims >= 16), head dims <= 256, and a real group."""
    ok, reason = fla_verifier(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
    if not ok:
        return ok, reason
    if q.shape[2] == k.shape[2]:
        return False, "no GQA (as many kv heads as query heads): fla_chunk serves it unchanged"
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return False, f"head dims K={q.shape[-1]}, V={v.shape[-1]} above {MAX_HEAD_DIM}"
    return True, "accepted"


def register(registry: OpRegistry) -> Backend:
    """Add the GQA backend to ``registry`` (the ``gla`` op); imports neither fla nor triton."""
    return registry.register(Backend(name=BACKEND_NAME, fn=gla_gqa_chunk, kind="triton", priority=PRIORITY,
                                     available=gqa_available, verifier=gqa_verifier))
