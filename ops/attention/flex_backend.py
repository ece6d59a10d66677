"""FlexAttention backend: causal + sliding-window + document masking, block-sparse.

``flex_attention`` skips the 128 × 128 tiles that a :class:`BlockMask` lists as empty and
applies the mask_mod only on the tiles it lists as partial, so a 4096-token window costs
O(T · window) instead of O(T²).

The block mask is built here from tile bounds instead of with ``create_block_mask``: the
eager ``create_block_mask`` evaluates the mask_mod on the whole T × T grid (int64
temporaries: 32 GiB at T = 65,536), and compiling it adds a second compiled function with
its own recompiles. The tile test is exact for the causal and window rules and
conservative for documents (a tile whose query and key id ranges overlap is kept as
partial), so the mask_mod still decides every element the kernel computes.

Nothing here imports flex_attention, dynamo or triton at import time; the compiled kernel
is built on the first call.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ops.attention.reference import check_inputs
from ops.backends import Check, triton_available

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

BLOCK_SIZE = 128
FLEX_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# tl.dot needs head dims >= 16; inductor ships tuned flex configs up to 256. Non-powers of two
# are padded by recent torch, but we have not measured them, so they go to another backend.
FLEX_HEAD_DIMS = (16, 32, 64, 128, 256)

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def effective_window(T: int, window: int | None) -> int | None:
    """``window``, or None when it does not restrict a length-T sequence (window >= T - 1)."""
    return None if window is None or window >= T - 1 else window


def causal_mask_mod(window: Tensor) -> MaskMod:
    """mask_mod for causal attention limited to ``window`` previous keys.

    ``window`` is a 0-d integer tensor rather than a Python int so that a new window value
    reuses the compiled kernel (dynamo guards on int constants, not on tensor values).
    """

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (kv_idx <= q_idx) & (q_idx - kv_idx <= window)

    return mask_mod


def document_mask_mod(window: Tensor, segment_ids: Tensor) -> MaskMod:
    """mask_mod of :func:`causal_mask_mod` that also never crosses a change of ``segment_ids[b]``."""

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        same_doc = segment_ids[b, q_idx] == segment_ids[b, kv_idx]
        return (kv_idx <= q_idx) & (q_idx - kv_idx <= window) & same_doc

    return mask_mod


def _tile_id_range(segment_ids: Tensor, n_tiles: int, block: int) -> tuple[Tensor, Tensor]:
    """Smallest and largest document id of every tile: two [B, n_tiles] tensors."""
    B, T = segment_ids.shape
    pad = n_tiles * block - T
    # Repeating the last id keeps each padded tile's range equal to its real tokens' range.
    padded = torch.cat([segment_ids, segment_ids[:, -1:].expand(B, pad)], dim=1)
    tiles = padded.view(B, n_tiles, block)
    return tiles.amin(dim=-1), tiles.amax(dim=-1)


def block_structure(
    T: int, window: int | None, segment_ids: Tensor | None, device: torch.device | str, block: int = BLOCK_SIZE
) -> tuple[Tensor, Tensor]:
    """Which (query tile, key tile) pairs need the mask_mod and which are fully visible.

    Returns:
        ``(partial, full)``: two [Bm, 1, n, n] bool tensors, n = ceil(T / block), Bm = B with
        ``segment_ids`` else 1. A tile in neither is skipped by the kernel.
    """
    n = -(-T // block)
    first = torch.arange(n, device=device) * block
    last = (first + block - 1).clamp(max=T - 1)
    # create_block_mask counts the padding of the ragged last tile as masked, so that tile is
    # never full; we keep the same convention.
    whole = (last - first) == block - 1
    q_first, q_last, k_first, k_last = first[:, None], last[:, None], first[None, :], last[None, :]
    w = T if window is None else window
    some = (k_first <= q_last) & (q_first - k_last <= w)
    every = (k_last <= q_first) & (q_last - k_first <= w) & whole[:, None] & whole[None, :]
    some, every = some[None, None], every[None, None]
    if segment_ids is not None:
        lo, hi = _tile_id_range(segment_ids.to(device), n, block)
        overlap = (lo[:, :, None] <= hi[:, None, :]) & (lo[:, None, :] <= hi[:, :, None])
        single = lo == hi
        one_doc = single[:, :, None] & single[:, None, :] & (lo[:, :, None] == lo[:, None, :])
        some = some & overlap[:, None]
        every = every & one_doc[:, None]
    return some & ~every, every


def _ordered(dense: Tensor) -> tuple[Tensor, Tensor]:
    """Tile bitmap [..., n, n] -> (count per row, listed tiles first in ascending order), int32."""
    dense = dense.to(torch.int32)
    count = dense.sum(dim=-1, dtype=torch.int32)
    order = torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32)
    return count.contiguous(), order.contiguous()


def build_block_mask(T: int, window: int | None, segment_ids: Tensor | None, device: torch.device) -> BlockMask:
    """The :class:`BlockMask` of the op's masking rules for one sequence length."""
    window_t = torch.tensor(T if window is None else window, dtype=torch.int64, device=device)
    if segment_ids is None:
        mask_mod = causal_mask_mod(window_t)
    else:
        mask_mod = document_mask_mod(window_t, segment_ids.to(device).contiguous())
    partial, full = block_structure(T, window, segment_ids, device)
    return block_mask_from_tiles(partial, full, mask_mod, T)


def block_mask_from_tiles(partial: Tensor, full: Tensor, mask_mod: MaskMod, length: int) -> BlockMask:
    """A square :class:`BlockMask` of ``length`` from boolean tile maps (partial, full)."""
    from torch.nn.attention.flex_attention import BlockMask

    kv_num_blocks, kv_indices = _ordered(partial)
    full_kv_num_blocks, full_kv_indices = _ordered(full)
    return BlockMask.from_kv_blocks(
        kv_num_blocks=kv_num_blocks,
        kv_indices=kv_indices,
        full_kv_num_blocks=full_kv_num_blocks,
        full_kv_indices=full_kv_indices,
        BLOCK_SIZE=BLOCK_SIZE,
        mask_mod=mask_mod,
        seq_lengths=(length, length),
    )


def _document_key(segment_ids: Tensor, window: int | None) -> tuple | None:
    """Cache key of a document mask, or None when the tensor cannot be versioned."""
    try:
        version = segment_ids._version
    except RuntimeError:  # inference-mode tensors have no version counter
        return None
    return (segment_ids.data_ptr(), version, tuple(segment_ids.shape), segment_ids.stride(),
            segment_ids.dtype, segment_ids.device, window)


class BlockMaskCache:
    """Block masks reused across calls.

    Without documents a mask depends only on (T, window, device): a few are kept. With
    documents only the latest mask is kept, because every layer of one forward pass sees
    the same ``segment_ids`` and the next batch brings new ones. That entry holds a
    reference to its ``segment_ids`` so the storage cannot be freed and its address handed
    to a new batch's ids while the key (address, version counter, shape) still matches.
    """

    def __init__(self, max_plain: int = 8) -> None:
        self.max_plain = max_plain
        self.builds = 0
        self._plain: dict[tuple, BlockMask] = {}
        self._document: tuple[tuple, Tensor, BlockMask] | None = None

    def get(self, T: int, window: int | None, segment_ids: Tensor | None, device: torch.device) -> BlockMask:
        """The block mask for these arguments, built on a miss."""
        if segment_ids is None:
            key = (T, window, device)
            if key not in self._plain:
                if len(self._plain) >= self.max_plain:
                    self._plain.pop(next(iter(self._plain)))
                self._plain[key] = self._build(T, window, None, device)
            return self._plain[key]
        key = _document_key(segment_ids, window)
        if key is not None and self._document is not None and self._document[0] == key:
            return self._document[2]
        mask = self._build(T, window, segment_ids, device)
        self._document = None if key is None else (key, segment_ids, mask)
        return mask

    def clear(self) -> None:
        """Drop every cached mask."""
        self._plain.clear()
        self._document = None

    def _build(self, T: int, window: int | None, segment_ids: Tensor | None, device: torch.device) -> BlockMask:
        self.builds += 1
        return build_block_mask(T, window, segment_ids, device)


BLOCK_MASKS = BlockMaskCache()


# Force flex's main Triton kernel: for queries shorter than 128 "AUTO" picks the decode kernel,
# which has no valid configs for these GQA training shapes in torch 2.11 (NoValidChoicesError,
# seen on the H100); the main kernel serves every length.
GPU_KERNEL_OPTIONS = {"BACKEND": "TRITON"}


@functools.cache
def compiled_flex_attention() -> Callable[..., Tensor]:
    """``flex_attention`` compiled once per process (recompiled by dynamo per new shape/dtype).

    ``fullgraph=True``: a graph break would fall back to the unfused flex path, which
    materialises the T × T scores; failing loudly is better.
    """
    from torch.nn.attention.flex_attention import flex_attention

    def flex(q: Tensor, k: Tensor, v: Tensor, block_mask=None, scale: float | None = None,
             enable_gqa: bool = False) -> Tensor:
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa,
                              kernel_options=GPU_KERNEL_OPTIONS)

    return torch.compile(flex, fullgraph=True)


def flex_softmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int | None = None,
    segment_ids: Tensor | None = None,
    scale: float | None = None,
    *,
    flex_fn: Callable[..., Tensor] | None = None,
    cache: BlockMaskCache | None = None,
) -> Tensor:
    """Causal softmax attention through flex_attention (same contract as ``softmax_attention``).

    Args:
        flex_fn: the flex_attention callable; defaults to :func:`compiled_flex_attention`.
            Tests pass the eager one to run the same block mask and mask_mod on CPU.
        cache: block-mask cache; defaults to the module's :data:`BLOCK_MASKS`.
    """
    check_inputs(q, k, v, window, segment_ids)
    T = q.shape[2]
    cache = BLOCK_MASKS if cache is None else cache
    block_mask = cache.get(T, effective_window(T, window), segment_ids, q.device)
    flex = compiled_flex_attention() if flex_fn is None else flex_fn
    return flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def flex_available() -> Check:
    """flex_attention exists in this torch and triton is installed (nothing is imported)."""
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        return False, f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
    return triton_available("cuda")


def verify_flex(
    q: Tensor, k: Tensor, v: Tensor, window: int | None = None, segment_ids: Tensor | None = None,
    scale: float | None = None,
) -> Check:
    """Accept CUDA calls in fp16/bf16/fp32 with a head dim the flex kernels are tuned for."""
    tensors = (q, k, v) if segment_ids is None else (q, k, v, segment_ids)
    if any(t.device.type != "cuda" for t in tensors):
        return False, "flex_attention kernels need CUDA tensors"
    if any(t.device != q.device for t in tensors):
        return False, "q, k, v and segment_ids must be on one device"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in FLEX_DTYPES:
        return False, f"dtypes {q.dtype}/{k.dtype}/{v.dtype}: need one of {FLEX_DTYPES}"
    if q.shape[-1] not in FLEX_HEAD_DIMS:
        return False, f"head dim {q.shape[-1]} not in {FLEX_HEAD_DIMS}"
    import torch._dynamo as dynamo

    if dynamo.config.disable:
        return False, "torch.compile is disabled (TORCH_COMPILE_DISABLE): flex would run unfused"
    return True, "accepted"
