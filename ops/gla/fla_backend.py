"""fla-core's chunked GLA kernel (``fla.ops.gla.chunk_gla``) as the ``vendor`` backend of op ``gla``.

fla 0.6 needs as many k/v/g heads as query heads, so GQA inputs are expanded here (in
repeat_interleave order, matching the references) and the final state is reduced back to one
state per kv head. fla (and with it triton) is imported only when dispatch first considers this
backend on a machine with a GPU, never when ``ops.gla`` is imported (fla warns and probes
devices on import).
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from ops.backends import Backend, Check, OpRegistry, triton_available
from ops.gla.reference import gla_input_problem
from ops.gla.tuning import seed_autotune_cache

BACKEND_NAME = "fla_chunk"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# fla sizes some tl.dot blocks by next_power_of_2(head dim) (e.g. BV in chunk_gla_bwd_dA), and
# tl.dot needs every block dimension >= 16 on NVIDIA GPUs.
MIN_HEAD_DIM = 16


def gla_fla_chunk(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float | None = None,
                  initial_state: Tensor | None = None, output_final_state: bool = False,
                  cu_seqlens: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Run ``fla.ops.gla.chunk_gla`` on GQA inputs (same arguments and results as ``ops.gla.gla``)."""
    # deferred: fla (and Triton) load only when the fast path is called on a GPU
    from fla.ops.gla import chunk_gla

    group = q.shape[2] // k.shape[2]
    if group > 1:
        k, v, g = (x.repeat_interleave(group, dim=2) for x in (k, v, g))
    h0 = None
    if initial_state is not None:
        # fla asserts an fp32 initial state; the cast is differentiable
        h0 = initial_state.float()
        h0 = h0.repeat_interleave(group, dim=1) if group > 1 else h0
    o, final = chunk_gla(q, k, v, g, scale=scale, initial_state=h0, output_final_state=output_final_state,
                         cu_seqlens=cu_seqlens)
    if final is not None and group > 1:
        # the heads of a group share k, v, g and h0, so their states are identical: keep the first
        # (its gradient then reaches k, v, g and h0 through that head, which is exact)
        final = final[:, ::group].contiguous()
    return o, final


def fla_available() -> Check:
    """Whether fla's chunked GLA can run in this process (imports fla only when a GPU is visible)."""
    if not torch.cuda.is_available():
        return False, "no CUDA/MACA GPU visible"
    # the stored autotune results must be in Triton's cache before fla's kernels first run
    seed_autotune_cache()
    try:
        from fla.ops.gla import chunk_gla
    # a broken install can raise more than ImportError (e.g. triton/driver mismatches)
    except Exception as exc:  # noqa: BLE001
        return False, f"fla.ops.gla is not importable: {exc!r}"
    params = inspect.signature(chunk_gla).parameters
    head_first = params.get("head_first")
    # old fla (0.1) defaulted to the [B, H, T, D] layout and had no varlen support
    if "cu_seqlens" not in params or (head_first is not None and head_first.default is not False):
        return False, "this fla's chunk_gla lacks the [B, T, H, D] layout with cu_seqlens"
    return True, "fla.ops.gla.chunk_gla importable"


def fla_verifier(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float | None = None,
                 initial_state: Tensor | None = None, output_final_state: bool = False,
                 cu_seqlens: Tensor | None = None) -> Check:
    """Accept only calls fla's chunk_gla serves; anything else falls back to the torch reference."""
    ok, reason = triton_available(q)
    if not ok:
        return ok, reason
    named = {"k": k, "v": v, "g": g, "initial_state": initial_state, "cu_seqlens": cu_seqlens}
    for name, t in named.items():
        if t is not None and t.device != q.device:
            return False, f"{name} is on {t.device}, q on {q.device}"
    problem = gla_input_problem(q, k, v, g, initial_state, cu_seqlens)
    if problem is not None:
        return False, problem
    return _dtype_and_size_check(q, k, v, g, initial_state, cu_seqlens)


def _dtype_and_size_check(q: Tensor, k: Tensor, v: Tensor, g: Tensor, initial_state: Tensor | None,
                          cu_seqlens: Tensor | None) -> Check:
    """The dtype and head-size limits of fla's kernels."""
    floats = {"q": q, "g": g, "initial_state": initial_state}
    for name, t in floats.items():
        if t is not None and t.dtype not in SUPPORTED_DTYPES:
            return False, f"{name} dtype {t.dtype} not in {tuple(str(d) for d in SUPPORTED_DTYPES)}"
    # q, k and v meet in the same tl.dot calls, which need one operand dtype
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return False, f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}"
    if min(q.shape[-1], v.shape[-1]) < MIN_HEAD_DIM:
        return False, f"head dims K={q.shape[-1]}, V={v.shape[-1]} below fla's minimum {MIN_HEAD_DIM}"
    if cu_seqlens is not None and cu_seqlens.dtype not in (torch.int32, torch.int64):
        return False, f"cu_seqlens dtype {cu_seqlens.dtype} is not int32/int64"
    return True, "accepted"


def register(registry: OpRegistry) -> Backend:
    """Add the fla backend to ``registry`` (the ``gla`` op); imports nothing from fla."""
    return registry.register(Backend(name=BACKEND_NAME, fn=gla_fla_chunk, kind="vendor",
                                     available=fla_available, verifier=fla_verifier))
