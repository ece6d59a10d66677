"""FlexAttention backend of op ``attention``: one block-sparse flex_attention per call.

``flex_attention`` skips the 128 × 128 tiles that the :class:`BlockMask` lists as empty and
applies the mask_mod only on the tiles it lists as partial, so a 4096-token window costs
O(T · window) instead of O(T²). Both come from ``masks.py`` (the rule's mask_mod and tile
structure). Sinks are keys of the same call ([sinks; tokens] in one sequence).

Masks are cached (:class:`BlockMaskCache`): without explicit positions per length, sinks and
window (and on the micro-batch's ``Documents``); with positions (sequence parallelism) in the
micro-batch's dict that the positions carry (``Positions.block_masks``), else rebuilt per call:
a handful of small kernels over the tiles, no host synchronisation.

Nothing here imports flex_attention, dynamo or triton at import time; the compiled kernel is
built on the first call.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ops.attention.masks import BLOCK_SIZE, MaskLayout, Positions, check_inputs, mask_layout, mask_mod, tile_structure
from ops.backends import Check, triton_available
from ops.documents import Documents, document_ids

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import AuxRequest, BlockMask

FLEX_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# tl.dot needs head dims >= 16; inductor ships tuned flex configs up to 256. Non-powers of two
# are padded by recent torch, but we have not measured them, so they go to another backend.
FLEX_HEAD_DIMS = (16, 32, 64, 128, 256)
# Force flex's main Triton kernel: for queries shorter than 128 "AUTO" picks the decode kernel,
# which has no valid configs for these GQA training shapes in torch 2.11 (NoValidChoicesError,
# seen on the H100); the main kernel serves every length.
GPU_KERNEL_OPTIONS = {"BACKEND": "TRITON"}
# Graphs the one compiled wrapper may hold (dynamo's recompile_limit for it; default 8). A run
# compiles one per call signature: measured (tests/ops/test_flex_recompiles.py) 4 for training
# and 4 for validation under SP with the auto exchanges (halo own + received keys, Ulysses whole
# sequence + sink rows), which fills the default: one more shape (a validation length) would
# stop the run with FailOnRecompileLimitHit. Twice the measured need leaves room for that.
FLEX_RECOMPILE_LIMIT = 16


def _ordered(dense: Tensor) -> tuple[Tensor, Tensor]:
    """Tile bitmap [..., n, n] -> (count per row, listed tiles first in ascending order), int32."""
    dense = dense.to(torch.int32)
    count = dense.sum(dim=-1, dtype=torch.int32)
    order = torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32)
    return count.contiguous(), order.contiguous()


def build_block_mask(layout: MaskLayout) -> BlockMask:
    """The :class:`BlockMask` (tile lists and mask_mod) of one layout."""
    from torch.nn.attention.flex_attention import BlockMask

    partial, full = tile_structure(layout)
    kv_num_blocks, kv_indices = _ordered(partial)
    full_kv_num_blocks, full_kv_indices = _ordered(full)
    return BlockMask.from_kv_blocks(
        kv_num_blocks=kv_num_blocks, kv_indices=kv_indices,
        full_kv_num_blocks=full_kv_num_blocks, full_kv_indices=full_kv_indices,
        BLOCK_SIZE=BLOCK_SIZE, mask_mod=mask_mod(layout),
        seq_lengths=(layout.q_pos.shape[0], layout.k_pos.shape[0]))


def effective_window(T: int, window: int | None) -> int | None:
    """``window``, or None when it does not restrict a length-T sequence (window >= T - 1)."""
    return None if window is None or window >= T - 1 else window


class BlockMaskCache:
    """Block masks reused across calls; ``builds`` counts the masks built.

    Without documents a mask depends only on (length, sinks, window, device): a few are kept
    here. With documents the mask is kept on the micro-batch's ``ops.documents.Documents``
    (every layer of one forward pass gets the same object; the next batch brings a new one);
    bare id tensors build a mask per call. With positions the mask is kept in the positions'
    ``block_masks`` dict (one per micro-batch and exchange: every layer's positions are equal),
    or built per call when they carry none.
    """

    def __init__(self, max_plain: int = 8) -> None:
        self.max_plain = max_plain
        self.builds = 0
        self._plain: dict[tuple, BlockMask] = {}

    def get(self, L: int, sinks: int, window: int | None, documents: Documents | Tensor | None,
            device: torch.device) -> BlockMask:
        """The block mask of a length-L call (sinks included), built on a miss."""
        window = effective_window(L - sinks, window)
        if documents is None:
            key = (L, sinks, window, device)
            if key not in self._plain:
                if len(self._plain) >= self.max_plain:
                    self._plain.pop(next(iter(self._plain)))
                self._plain[key] = self._build(L, sinks, window, None, device)
            return self._plain[key]
        if not isinstance(documents, Documents):
            return self._build(L, sinks, window, documents, device)
        key = (L, sinks, window, device)
        if key not in documents.block_masks:
            documents.block_masks[key] = self._build(L, sinks, window, documents.ids, device)
        return documents.block_masks[key]

    def get_positioned(self, Lq: int, Lk: int, sinks: int, window: int | None,
                       documents: Documents | Tensor | None, positions: Positions,
                       device: torch.device) -> BlockMask:
        """The block mask of a call with positions: from ``positions.block_masks`` when the
        caller keeps one for the micro-batch, built on a miss (or every call without one)."""
        held = positions.block_masks
        key = (Lq, Lk, sinks, window, documents is None, device)
        if held is not None and key in held:
            return held[key]
        self.builds += 1
        layout = mask_layout(Lq, Lk, window=window, documents=documents, sinks=sinks, positions=positions,
                             device=device)
        mask = build_block_mask(layout)
        if held is not None:
            held[key] = mask
        return mask

    def clear(self) -> None:
        """Drop every cached mask without documents."""
        self._plain.clear()

    def _build(self, L: int, sinks: int, window: int | None, documents: Tensor | None,
               device: torch.device) -> BlockMask:
        self.builds += 1
        layout = mask_layout(L, L, window=window, documents=documents, sinks=sinks, positions=None, device=device)
        return build_block_mask(layout)


BLOCK_MASKS = BlockMaskCache()


@functools.cache
def compiled_flex_attention() -> Callable[..., object]:
    """``flex_attention`` compiled once per process, shared by every layer and call.

    Dynamo compiles one graph per call signature: shapes, dtypes, requires_grad and grad mode,
    lse or not, and the mask_mod's code and closure (its tensors' shapes, ``layout.indexed``),
    never tensor values: a new micro-batch's documents or SP positions reuse the graphs the
    first micro-batch compiled (tests/ops/test_flex_recompiles.py; up to 4 graphs for training
    plus 4 for validation under SP; room for :data:`FLEX_RECOMPILE_LIMIT`).

    ``fullgraph=True``: a graph break would fall back to the unfused flex path, which
    materialises the Lq × Lk scores; failing loudly is better. For the same reason a wrapper
    that outgrows ``recompile_limit`` raises ``FailOnRecompileLimitHit`` (torch 2.13 here;
    older torch may run the function eagerly instead), and the function itself raises when it
    runs outside dynamo whatever the torch version: past the limit, under a ``force_eager``
    stance, or after a first call made while compile was disabled (dynamo then skips the code
    for good). Traced, ``is_compiling()`` is True and the check is not in the graph.
    """
    from torch.nn.attention.flex_attention import flex_attention

    def flex(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask | None = None, scale: float | None = None,
             enable_gqa: bool = False, return_aux: AuxRequest | None = None) -> object:
        if not torch.compiler.is_compiling():
            raise RuntimeError("the compiled flex_attention ran eagerly (dynamo's recompile_limit reached, or "
                               "compile was disabled at its first call): flex would materialise the Lq x Lk "
                               "scores; TORCH_LOGS=recompiles shows why it recompiled")
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa,
                              return_aux=return_aux, kernel_options=GPU_KERNEL_OPTIONS)

    # dynamic=False: one static kernel per shape, as in the runs we measured. By default the
    # first shape change (under SP: own slice vs received keys) turns every later call into a
    # dynamic-shape kernel whose speed nobody has measured; the shapes of a run are few.
    if "recompile_limit" in inspect.signature(torch.compile).parameters:  # newer torch: this wrapper's own
        return torch.compile(flex, fullgraph=True, dynamic=False, recompile_limit=FLEX_RECOMPILE_LIMIT)
    import torch._dynamo as dynamo  # deferred: dynamo is heavy and only the GPU path needs it

    # older torch: the limit is process-wide; raised here, never lowered
    dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, FLEX_RECOMPILE_LIMIT)
    return torch.compile(flex, fullgraph=True, dynamic=False)


def block_mask_of(q: Tensor, k: Tensor, window: int | None, documents: Tensor | None, sinks: int,
                  positions: Positions | None, cache: BlockMaskCache | None) -> BlockMask:
    """The call's block mask, from ``cache`` (default :data:`BLOCK_MASKS`) or built."""
    cache = BLOCK_MASKS if cache is None else cache
    if positions is None:
        return cache.get(q.shape[2], sinks, window, documents, q.device)
    return cache.get_positioned(q.shape[2], k.shape[2], sinks, window, documents, positions, q.device)


def flex_attention_backend(q: Tensor, k: Tensor, v: Tensor, *, window: int | None = None,
                           documents: Tensor | None = None, sinks: int = 0, positions: Positions | None = None,
                           scale: float | None = None, flex_fn: Callable[..., Tensor] | None = None,
                           cache: BlockMaskCache | None = None) -> Tensor:
    """Op ``attention`` through one flex_attention call (same contract).

    A query that sees no key gets zeros (flex_attention's convention for fully masked rows;
    checking would sync with the host).

    Args:
        flex_fn: the flex_attention callable; defaults to :func:`compiled_flex_attention`.
            Tests pass the eager one to run the same block mask and mask_mod on CPU.
        cache: the block-mask cache (it counts the masks built); defaults to :data:`BLOCK_MASKS`.
    """
    check_inputs(q, k, v, window, documents, sinks, positions)
    block_mask = block_mask_of(q, k, window, documents, sinks, positions, cache)
    flex = compiled_flex_attention() if flex_fn is None else flex_fn
    return flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def flex_attention_lse(q: Tensor, k: Tensor, v: Tensor, *, window: int | None = None,
                       documents: Tensor | None = None, sinks: int = 0, positions: Positions | None = None,
                       scale: float | None = None, flex_fn: Callable[..., tuple[Tensor, object]] | None = None,
                       cache: BlockMaskCache | None = None) -> tuple[Tensor, Tensor]:
    """Op ``attention_lse`` through one flex_attention call: :func:`flex_attention_backend` and
    flex's own log-sum-exp (natural log, fp32; -inf for a query that sees no key, whose output
    is 0). Arguments as :func:`flex_attention_backend`."""
    from torch.nn.attention.flex_attention import AuxRequest  # deferred: flex is imported on the GPU path only

    check_inputs(q, k, v, window, documents, sinks, positions)
    block_mask = block_mask_of(q, k, window, documents, sinks, positions, cache)
    flex = compiled_flex_attention() if flex_fn is None else flex_fn
    out, aux = flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1],
                    return_aux=AuxRequest(lse=True))
    return out, aux.lse


def flex_available() -> Check:
    """flex_attention exists in this torch and triton is installed (nothing is imported)."""
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        return False, f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
    return triton_available("cuda")


def verify_flex(q: Tensor, k: Tensor, v: Tensor, *, window: int | None = None, documents: Tensor | None = None,
                sinks: int = 0, positions: Positions | None = None, scale: float | None = None) -> Check:
    """Accept CUDA calls in fp16/bf16/fp32 with a head dim the flex kernels are tuned for, every
    index tensor on q's device."""
    index = (document_ids(documents),) if positions is None else (document_ids(documents), *positions.tensors())
    tensors = [q, k, v, *(t for t in index if t is not None)]
    if any(t.device.type != "cuda" for t in tensors):
        return False, "flex_attention kernels need CUDA tensors"
    if any(t.device != q.device for t in tensors):
        return False, "q, k, v, documents and positions must be on one device"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in FLEX_DTYPES:
        return False, f"dtypes {q.dtype}/{k.dtype}/{v.dtype}: need one of {FLEX_DTYPES}"
    if q.shape[-1] not in FLEX_HEAD_DIMS:
        return False, f"head dim {q.shape[-1]} not in {FLEX_HEAD_DIMS}"
    import torch._dynamo as dynamo  # deferred: dynamo is heavy and only the GPU path needs it

    if dynamo.config.disable:
        return False, "torch.compile is disabled (TORCH_COMPILE_DISABLE): flex would run unfused"
    return True, "accepted"
