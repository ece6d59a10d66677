"""Softmax attention over keys with explicit global positions (sequence parallelism).

Under sequence parallelism a rank holds a slice of the queries (global positions ``q_pos``)
and attends to keys gathered from earlier ranks plus its own (global positions ``k_pos``),
some of them padding slots, and possibly sink keys that every query sees. Query i sees key j
iff ``k_valid[j]`` and (``k_always[j]`` or (``k_pos[j] <= q_pos[i]`` and (window None or
``q_pos[i] - k_pos[j] <= window``) and (no segments or ``q_segments[b, i] == k_segments[b, j]``))).

``positioned_attention(q, k, v, q_pos, k_pos, *, window, q_segments, k_segments, k_valid,
k_always, scale)`` dispatches per call (``ops.backends``) to:

* ``flex`` (triton): ``flex_attention`` compiled on first use, with a mask_mod that reads the
  positions, flags and segments, and a block-sparse mask built from per-tile position ranges.
  CUDA only. Memory O(Sq · D + tiles), no [Sq, Sk] tensor.
* ``torch``: :func:`reference_positioned_attention`, an explicit [B, Sq, Sk] mask and fp32
  (fp64 for fp64 inputs) softmax: for tests and CPU runs.

The block mask is built from tile bounds rather than with ``create_block_mask``: the eager
``create_block_mask`` evaluates the mask_mod on the whole Sq × Sk grid (a bool mask plus int64
temporaries, several GiB at 16K queries × 32K keys), the very memory this op exists to avoid,
and compiling it adds a second compiled function. The tile test is conservative for a partial
tile (the mask_mod decides every element of it) and exact-safe for a full one (see
:func:`positioned_block_structure`). As with ``create_block_mask``, the block mask has a batch
dimension only when segments are given.

Layout: q [B, H, Sq, D], k, v [B, Hkv, Sk, D]; GQA: query head h reads kv head
``h // (H // Hkv)``. Positions must lie in (-2**62, 2**62) (padding is encoded with a sentinel).

Importing this module registers the backends; nothing is compiled and neither triton nor
dynamo is imported until the flex backend runs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ops.attention.flex_backend import (
    BLOCK_SIZE,
    GPU_KERNEL_OPTIONS,
    MaskMod,
    _ordered,
    flex_available,
    verify_flex,
)
from ops.backends import Backend, Check, dispatch

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

POSITIONED_OP_NAME = "positioned_attention"
# Sentinel position of a key that only k_always can make visible (padding, sinks): greater than
# every real position, and real - _FAR or real + _FAR does not overflow int64.
_FAR = 2**62


def _is_int(t: Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _check_keys_1d(name: str, t: Tensor | None, Sk: int, bool_: bool) -> None:
    if t is None:
        return
    if tuple(t.shape) != (Sk,):
        raise ValueError(f"{name} must be [Sk] = [{Sk}]; got {tuple(t.shape)}")
    if bool_ and t.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor; got {t.dtype}")
    if not bool_ and not _is_int(t):
        raise ValueError(f"{name} must be an integer tensor; got {t.dtype}")


def check_positioned_inputs(
    q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, window: int | None,
    q_segments: Tensor | None, k_segments: Tensor | None, k_valid: Tensor | None, k_always: Tensor | None,
) -> None:
    """Raise ``ValueError`` when the arguments do not follow the op's layout contract."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k and v must be [B, Hkv, Sk, D] = [{B}, Hkv, Sk, {D}]; "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    if H % k.shape[1] != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of kv heads ({k.shape[1]})")
    if tuple(q_pos.shape) != (Sq,) or not _is_int(q_pos):
        raise ValueError(f"q_pos must be an integer [Sq] = [{Sq}] tensor; got {q_pos.dtype} {tuple(q_pos.shape)}")
    _check_keys_1d("k_pos", k_pos, Sk, bool_=False)
    _check_keys_1d("k_valid", k_valid, Sk, bool_=True)
    _check_keys_1d("k_always", k_always, Sk, bool_=True)
    if window is not None and window < 0:
        raise ValueError(f"window must be None or >= 0 (0 means the same position only); got {window}")
    if (q_segments is None) != (k_segments is None):
        raise ValueError("q_segments and k_segments must be given together (or both None)")
    if q_segments is not None and k_segments is not None:
        if tuple(q_segments.shape) != (B, Sq) or tuple(k_segments.shape) != (B, Sk):
            raise ValueError(f"q_segments must be [B, Sq] = [{B}, {Sq}] and k_segments [B, Sk] = [{B}, {Sk}]; "
                             f"got {tuple(q_segments.shape)} and {tuple(k_segments.shape)}")
        if not (_is_int(q_segments) and _is_int(k_segments)):
            raise ValueError(f"segments must be integer tensors; got {q_segments.dtype}, {k_segments.dtype}")


def positioned_mask(
    q_pos: Tensor,
    k_pos: Tensor,
    window: int | None = None,
    q_segments: Tensor | None = None,
    k_segments: Tensor | None = None,
    k_valid: Tensor | None = None,
    k_always: Tensor | None = None,
) -> Tensor:
    """Boolean mask of the keys each query sees (the rule of the module docstring).

    Returns:
        [Bm, Sq, Sk] bool on ``q_pos``'s device, Bm = B with segments else 1; True = seen.
    """
    dev = q_pos.device
    dist = q_pos[:, None].long() - k_pos[None, :].to(dev).long()
    seen = dist >= 0
    if window is not None:
        seen = seen & (dist <= window)
    seen = seen[None]
    if q_segments is not None and k_segments is not None:
        seen = seen & (q_segments[:, :, None].to(dev) == k_segments[:, None, :].to(dev))
    if k_always is not None:
        seen = seen | k_always.to(dev)
    if k_valid is not None:
        seen = seen & k_valid.to(dev)
    return seen


@dispatch(POSITIONED_OP_NAME)
def positioned_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_pos: Tensor,
    k_pos: Tensor,
    *,
    window: int | None = None,
    q_segments: Tensor | None = None,
    k_segments: Tensor | None = None,
    k_valid: Tensor | None = None,
    k_always: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Softmax attention of queries and keys at explicit positions (torch reference; the entry
    point dispatches).

    Args:
        q: [B, H, Sq, D] queries.
        k, v: [B, Hkv, Sk, D] keys and values, H % Hkv == 0.
        q_pos: [Sq] integer global positions of the queries.
        k_pos: [Sk] integer global positions of the keys (any value in padding slots).
        window: previous positions a query sees besides its own; None: unlimited.
        q_segments, k_segments: [B, Sq] and [B, Sk] integer document ids, both or neither.
        k_valid: [Sk] bool; False marks a padding slot that no query sees. None: all valid.
        k_always: [Sk] bool; True marks a key every query sees (sinks), whatever its position
            and segment. None: none.
        scale: score multiplier; defaults to ``D ** -0.5``.

    Every query must see at least one key. The reference raises ``ValueError`` otherwise;
    ``flex`` does not check (that would sync with the host) and returns zeros for such a query
    (flex_attention's convention for fully masked rows). Padding slots must hold finite values:
    a masked key still enters the products with weight 0 in the reference and in flex's partial
    tiles, and 0 · inf is NaN.

    Returns:
        [B, H, Sq, D] in ``q``'s dtype.
    """
    return reference_positioned_attention(q, k, v, q_pos, k_pos, window=window, q_segments=q_segments,
                                          k_segments=k_segments, k_valid=k_valid, k_always=k_always, scale=scale)


def reference_positioned_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_pos: Tensor,
    k_pos: Tensor,
    *,
    window: int | None = None,
    q_segments: Tensor | None = None,
    k_segments: Tensor | None = None,
    k_valid: Tensor | None = None,
    k_always: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """:func:`positioned_attention` with the explicit mask of :func:`positioned_mask`.

    Same operations as :func:`ops.attention.reference_attention` (fp32; fp64 for fp64 inputs),
    so with ``q_pos = k_pos = arange(T)`` and no padding or sinks both give identical bits.

    Raises:
        ValueError: on a layout error, or when some query sees no key (its softmax row would
            be all -inf, i.e. NaN).
    """
    check_positioned_inputs(q, k, v, q_pos, k_pos, window, q_segments, k_segments, k_valid, k_always)
    B, H, Sq, D = q.shape
    group = H // k.shape[1]
    scale = D**-0.5 if scale is None else scale
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    mask = positioned_mask(q_pos.to(q.device), k_pos, window, q_segments, k_segments, k_valid, k_always)
    blind = ~mask.any(dim=-1)
    if blind.any():
        b, i = (int(x) for x in blind.nonzero()[0])
        raise ValueError(f"query {i} (batch {b}, position {int(q_pos[i])}) sees no key; "
                         "positioned_attention needs at least one visible key per query")
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q.to(dtype), k.to(dtype).transpose(-2, -1)) * scale
    probs = torch.softmax(scores.masked_fill(~mask[:, None], float("-inf")), dim=-1)
    return torch.matmul(probs, v.to(dtype)).to(q.dtype)


def positioned_mask_mod(
    q_pos: Tensor, k_regular_pos: Tensor, k_sees_all: Tensor, window: Tensor,
    q_segments: Tensor | None = None, k_segments: Tensor | None = None,
) -> MaskMod:
    """mask_mod of the rule, over tensors prepared by :func:`_flex_tensors`.

    Args:
        q_pos: [Sq] int64 positions.
        k_regular_pos: [Sk] int64; ``_FAR`` for keys that are not regular (padding, sinks), so
            that the position test alone rejects them.
        k_sees_all: [Sk] bool, ``k_valid & k_always``.
        window: 0-d int64 tensor (``_FAR`` for None): tensors, not ints, so that new values
            reuse the compiled kernel.
        q_segments, k_segments: [B, Sq], [B, Sk] int64, or None.
    """

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        qp, kp = q_pos[q_idx], k_regular_pos[kv_idx]
        return k_sees_all[kv_idx] | ((kp <= qp) & (qp - kp <= window))

    def document_mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        qp, kp = q_pos[q_idx], k_regular_pos[kv_idx]
        same_doc = q_segments[b, q_idx] == k_segments[b, kv_idx]
        return k_sees_all[kv_idx] | ((kp <= qp) & (qp - kp <= window) & same_doc)

    return mask_mod if q_segments is None else document_mask_mod


def _flex_tensors(
    q_pos: Tensor, k_pos: Tensor, k_valid: Tensor | None, k_always: Tensor | None, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """(q_pos int64, regular-key positions with ``_FAR`` elsewhere, ``k_valid & k_always``)."""
    Sk = k_pos.shape[0]
    valid = torch.ones(Sk, dtype=torch.bool, device=device) if k_valid is None else k_valid.to(device)
    always = torch.zeros(Sk, dtype=torch.bool, device=device) if k_always is None else k_always.to(device)
    regular = valid & ~always
    far = torch.tensor(_FAR, dtype=torch.int64, device=device)
    k_regular_pos = torch.where(regular, k_pos.to(device=device, dtype=torch.int64), far)
    return q_pos.to(device=device, dtype=torch.int64).contiguous(), k_regular_pos, valid & always


def _tiles(x: Tensor, n: int, block: int, fill: int | bool) -> Tensor:
    """[..., L] -> [..., n, block], padded with ``fill`` up to n · block."""
    pad = n * block - x.shape[-1]
    padded = torch.cat([x, x.new_full((*x.shape[:-1], pad), fill)], dim=-1)
    return padded.view(*x.shape[:-1], n, block)


def _ranges(x: Tensor, keep: Tensor | None, n: int, block: int) -> tuple[Tensor, Tensor]:
    """Min and max of ``x`` [..., L] over the kept entries of every tile ((_FAR, -_FAR) if none)."""
    if keep is not None:
        lo_src, hi_src = torch.where(keep, x, _FAR), torch.where(keep, x, -_FAR)
    else:
        lo_src, hi_src = x, x
    return _tiles(lo_src, n, block, _FAR).amin(-1), _tiles(hi_src, n, block, -_FAR).amax(-1)


def positioned_block_structure(
    q_pos: Tensor, k_regular_pos: Tensor, k_sees_all: Tensor, window: int | None,
    q_segments: Tensor | None = None, k_segments: Tensor | None = None, block: int = BLOCK_SIZE,
) -> tuple[Tensor, Tensor]:
    """Which (query tile, key tile) pairs need the mask_mod and which are fully visible.

    From each tile's range of positions (regular keys only) and of segment ids:

    * partial-or-full ("some pair may be seen"): the key tile holds a sink, or its regular
      keys' position range reaches the query range (causally, within the window) and the id
      ranges overlap. Necessary for any seen pair, so no tile holding one is skipped.
    * full ("every pair is seen"): both tiles are whole (the ragged last tile is never full, as
      in ``create_block_mask``), every key slot is valid, and either all keys are sinks or every
      regular key precedes every query within the window and all ids are one document.
      Sufficient, so the kernel never skips the mask_mod where it would mask something.

    Args:
        q_pos, k_regular_pos, k_sees_all: from :func:`_flex_tensors` (a key is valid iff it is
            regular or sees all).
        q_segments, k_segments: [B, Sq], [B, Sk] integer ids, or None.

    Returns:
        ``(partial, full)``: two [Bm, 1, nq, nk] bool tensors, nq = ceil(Sq / block),
        nk = ceil(Sk / block), Bm = B with segments else 1.
    """
    Sq, Sk = q_pos.shape[0], k_regular_pos.shape[0]
    nq, nk = -(-Sq // block), -(-Sk // block)
    regular = k_regular_pos != _FAR
    q_lo, q_hi = (r[:, None] for r in _ranges(q_pos, None, nq, block))
    k_lo, k_hi = (r[None, :] for r in _ranges(k_regular_pos, regular, nk, block))
    has_sink = _tiles(k_sees_all, nk, block, False).any(-1)[None, :]
    all_sink = _tiles(k_sees_all, nk, block, False).all(-1)[None, :]
    all_valid = _tiles(regular | k_sees_all, nk, block, False).all(-1)[None, :]
    q_whole = (torch.arange(nq, device=q_pos.device) < Sq // block)[:, None]
    w = _FAR if window is None else window
    some = (k_lo <= q_hi) & (q_lo - k_hi <= w)
    every = (k_hi <= q_lo) & (q_hi - k_lo <= w)
    some, every = some[None], every[None]
    if q_segments is not None and k_segments is not None:
        sq_lo, sq_hi = _ranges(q_segments.to(q_pos.device).long(), None, nq, block)
        sk_lo, sk_hi = _ranges(k_segments.to(q_pos.device).long(), regular, nk, block)
        sq_lo, sq_hi, sk_lo, sk_hi = sq_lo[:, :, None], sq_hi[:, :, None], sk_lo[:, None, :], sk_hi[:, None, :]
        some = some & (sk_lo <= sq_hi) & (sq_lo <= sk_hi)
        every = every & (sq_lo == sq_hi) & (sk_lo == sk_hi) & (sq_lo == sk_lo)
    some = some | has_sink
    every = q_whole & all_valid & (all_sink | every)
    return (some & ~every)[:, None], every[:, None]


def build_positioned_block_mask(
    q_pos: Tensor, k_pos: Tensor, window: int | None, q_segments: Tensor | None, k_segments: Tensor | None,
    k_valid: Tensor | None, k_always: Tensor | None, device: torch.device,
) -> BlockMask:
    """The :class:`BlockMask` (tile lists and mask_mod) of one call's arguments, on ``device``."""
    from torch.nn.attention.flex_attention import BlockMask

    qp, k_regular_pos, sees_all = _flex_tensors(q_pos, k_pos, k_valid, k_always, device)
    q_seg = None if q_segments is None else q_segments.to(device=device, dtype=torch.int64).contiguous()
    k_seg = None if k_segments is None else k_segments.to(device=device, dtype=torch.int64).contiguous()
    window_t = torch.tensor(_FAR if window is None else window, dtype=torch.int64, device=device)
    partial, full = positioned_block_structure(qp, k_regular_pos, sees_all, window, q_seg, k_seg)
    kv_num_blocks, kv_indices = _ordered(partial)
    full_kv_num_blocks, full_kv_indices = _ordered(full)
    return BlockMask.from_kv_blocks(
        kv_num_blocks=kv_num_blocks,
        kv_indices=kv_indices,
        full_kv_num_blocks=full_kv_num_blocks,
        full_kv_indices=full_kv_indices,
        BLOCK_SIZE=BLOCK_SIZE,
        mask_mod=positioned_mask_mod(qp, k_regular_pos, sees_all, window_t, q_seg, k_seg),
        seq_lengths=(q_pos.shape[0], k_pos.shape[0]),
    )


@functools.cache
def compiled_positioned_flex() -> Callable[..., Tensor]:
    """``flex_attention`` compiled once per process for this op (with ``GPU_KERNEL_OPTIONS``).

    A wrapper of our own rather than ``flex_backend.compiled_flex_attention``, for the reason
    ``ops.attention.sinks.compiled_sink_flex`` gives: dynamo counts recompiles per code object,
    and this op's mask_mods and (Sq, Sk) shapes must not use up ``softmax_attention``'s budget.
    ``fullgraph=True``: a graph break would fall back to the unfused path, which materialises
    the Sq × Sk scores.
    """
    from torch.nn.attention.flex_attention import flex_attention

    def positioned_flex(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask | None = None,
                        scale: float | None = None, enable_gqa: bool = False) -> Tensor:
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa,
                              kernel_options=GPU_KERNEL_OPTIONS)

    return torch.compile(positioned_flex, fullgraph=True)


def flex_positioned_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_pos: Tensor,
    k_pos: Tensor,
    *,
    window: int | None = None,
    q_segments: Tensor | None = None,
    k_segments: Tensor | None = None,
    k_valid: Tensor | None = None,
    k_always: Tensor | None = None,
    scale: float | None = None,
    flex_fn: Callable[..., Tensor] | None = None,
) -> Tensor:
    """:func:`positioned_attention` through flex_attention (same contract).

    The block mask is rebuilt on every call: a handful of small kernels over the tiles, no
    host synchronisation.

    Args:
        flex_fn: the flex_attention callable; defaults to :func:`compiled_positioned_flex`.
            Tests pass the eager one to run the same block mask and mask_mod on CPU.
    """
    check_positioned_inputs(q, k, v, q_pos, k_pos, window, q_segments, k_segments, k_valid, k_always)
    block_mask = build_positioned_block_mask(q_pos, k_pos, window, q_segments, k_segments, k_valid, k_always,
                                             q.device)
    flex = compiled_positioned_flex() if flex_fn is None else flex_fn
    return flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def verify_flex_positioned(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_pos: Tensor,
    k_pos: Tensor,
    *,
    window: int | None = None,
    q_segments: Tensor | None = None,
    k_segments: Tensor | None = None,
    k_valid: Tensor | None = None,
    k_always: Tensor | None = None,
    scale: float | None = None,
) -> Check:
    """Accept what ``flex_backend.verify_flex`` accepts, with every index tensor on q's device."""
    ok, reason = verify_flex(q, k, v, window, None, scale)
    if not ok:
        return ok, reason
    index = (q_pos, k_pos, q_segments, k_segments, k_valid, k_always)
    if any(t is not None and t.device != q.device for t in index):
        return False, "positions, segments and flags must be on q's device"
    return True, "accepted"


positioned_attention.registry.register(  # type: ignore[attr-defined]
    Backend(name="flex", fn=flex_positioned_attention, kind="triton", available=flex_available,
            verifier=verify_flex_positioned)
)
