"""The attention mask rule, written once, and its three forms: dense mask, mask_mod, tiles.

The rule (:func:`visible`): a query at position ``qp`` sees a key at position ``kp`` iff the
key is a sink (always seen), or ``kp <= qp`` and ``qp - kp <= window`` (when a window is
given) and both belong to one document (when documents are given). Padding slots are seen by
nobody.

Every call is first normalised to a :class:`MaskLayout`: positions of every query and key,
sinks included. Without explicit ``positions`` the positions are the indices (a sink query
then precedes every regular key; sinks are the first ``sinks`` keys); with them (sequence
parallelism: keys gathered from earlier ranks) the regular tokens sit at the given global
positions and the sink queries at -1. The layout is then expressed as

* :func:`dense_mask`: the explicit [Bm, Lq, Lk] bool mask of the reference (``naive.py``);
* :func:`mask_mod`: flex_attention's per-element form (``flex.py``), reading the indices
  themselves when the positions are the indices;
* :func:`tile_structure`: which 128 × 128 (query tile, key tile) pairs hold some seen pair
  (partial) and which hold only seen pairs (full), from per-tile position and document ranges:
  conservative for partial tiles (the mask_mod decides every element of them), exact-safe for
  full ones. The ragged last tile is never full, as in ``create_block_mask``.

Built from tile bounds rather than with ``create_block_mask``: the eager ``create_block_mask``
evaluates the mask_mod on the whole Lq × Lk grid (int64 temporaries: 32 GiB at 65,536 tokens),
and compiling it adds a second compiled function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ops.documents import Documents, document_ids

BLOCK_SIZE = 128
# Position of a key that only ``k_always`` can make visible (sinks, padding): greater than every
# real position, and real - FAR or real + FAR does not overflow int64.
FAR = 2**62

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Positions:
    """Global positions of a call's regular (non-sink) queries and keys, when the keys are not
    the queries' own sequence (a sequence-parallel rank's slice against gathered keys).

    Attributes:
        query: [Tq] integer positions (>= 0) of the regular queries.
        key: [Tk] integer positions of the regular keys (any value in padding slots).
        key_valid: [Tk] bool; False marks a padding slot nobody sees. None: all valid.
        key_documents: [B, Tk] integer document ids of the keys; required with ``documents``.
        block_masks: where flex keeps the block masks of these positions for the next layers:
            one dict per micro-batch and kind of positions (``SPContext.block_masks_for``),
            shared by every call whose positions are equal (the same exchange of the same
            micro-batch; keyed inside by lengths, sinks and window). None: built per call.
    """

    query: Tensor
    key: Tensor
    key_valid: Tensor | None = None
    key_documents: Tensor | None = None
    block_masks: dict | None = field(default=None, compare=False, repr=False)

    def tensors(self) -> tuple[Tensor, ...]:
        """The index tensors that are given (for device checks)."""
        return tuple(t for t in (self.query, self.key, self.key_valid, self.key_documents) if t is not None)


@dataclass(frozen=True)
class MaskLayout:
    """One call's mask, normalised: every query and key (sinks included) with its position.

    Attributes:
        q_pos: [Lq] int64 query positions.
        k_pos: [Lk] int64 positions of the regular keys; ``FAR`` for sinks and padding.
        k_always: [Lk] bool, the sink keys every query sees.
        q_docs, k_docs: [B, Lq], [B, Lk] int64 document ids, or None (one document).
        window: previous positions a query sees besides its own; None: unlimited.
        sinks: number of sink tokens (the first rows of q and k).
        indexed: the positions are the indices (no explicit ``positions``).
    """

    q_pos: Tensor
    k_pos: Tensor
    k_always: Tensor
    q_docs: Tensor | None
    k_docs: Tensor | None
    window: int | None
    sinks: int
    indexed: bool


def visible(q_pos: Tensor, k_pos: Tensor, k_always: Tensor, window: Tensor | int,
            same_doc: Tensor | None) -> Tensor:
    """The rule: sink keys always; else causal, within the window, in the same document."""
    seen = (k_pos <= q_pos) & (q_pos - k_pos <= window)
    if same_doc is not None:
        seen = seen & same_doc
    return k_always | seen


def _is_int(t: Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _check_ids(name: str, t: Tensor | None, shape: tuple[int, ...], bool_: bool = False) -> None:
    if t is None:
        return
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must be {list(shape)}; got {list(t.shape)}")
    if bool_ != (t.dtype == torch.bool) or not (bool_ or _is_int(t)):
        raise ValueError(f"{name} must be a{' bool' if bool_ else'n integer'} tensor; got {t.dtype}")


def check_inputs(q: Tensor, k: Tensor, v: Tensor, window: int | None, documents: Documents | Tensor | None,
                 sinks: int, positions: Positions | None) -> None:
    """Raise ``ValueError`` when the arguments do not follow the op's layout contract."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, L, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k and v must be [B, Hkv, Lk, D] = [{B}, Hkv, Lk, {D}]; "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    if H % k.shape[1] != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of kv heads ({k.shape[1]})")
    if window is not None and window < 0:
        raise ValueError(f"window must be None or >= 0 (0 means the diagonal only); got {window}")
    if sinks < 0 or sinks > min(Lq, Lk):
        raise ValueError(f"sinks must be in [0, min(Lq, Lk)] = [0, {min(Lq, Lk)}]; got {sinks}")
    _check_ids("documents", document_ids(documents), (B, Lq - sinks))
    if positions is None:
        if Lq != Lk:
            raise ValueError(f"q and k must have one length without positions; got {Lq} and {Lk}")
        return
    _check_ids("positions.query", positions.query, (Lq - sinks,))
    _check_ids("positions.key", positions.key, (Lk - sinks,))
    _check_ids("positions.key_valid", positions.key_valid, (Lk - sinks,), bool_=True)
    _check_ids("positions.key_documents", positions.key_documents, (B, Lk - sinks))
    if (documents is None) != (positions.key_documents is None):
        raise ValueError("documents and positions.key_documents must be given together (or neither)")


def _sink_docs(docs: Tensor, sinks: int, fill: Tensor | int) -> Tensor:
    """[B, T] ids -> [B, sinks + T] int64: sink slots hold ``fill`` (token 0's id for queries,
    so a tile straddling sinks and tokens keeps its tokens' id range)."""
    docs = docs.long()
    head = docs[:, :1].expand(-1, sinks) if isinstance(fill, Tensor) else docs.new_full((docs.shape[0], sinks), fill)
    return torch.cat([head, docs], dim=1).contiguous()


def mask_layout(Lq: int, Lk: int, *, window: int | None, documents: Documents | Tensor | None, sinks: int,
                positions: Positions | None, device: torch.device) -> MaskLayout:
    """The :class:`MaskLayout` of one call (arguments as :func:`ops.attention.attention`)."""
    is_sink = torch.arange(Lk, device=device) < sinks
    docs = None if documents is None else document_ids(documents).to(device)
    if positions is None:
        q_pos = torch.arange(Lq, device=device)
        k_pos = torch.where(is_sink, FAR, torch.arange(Lk, device=device))
        q_docs = None if docs is None else _sink_docs(docs, sinks, docs)
        return MaskLayout(q_pos, k_pos, is_sink, q_docs, q_docs, window, sinks, indexed=True)
    minus_one = torch.full((sinks,), -1, dtype=torch.int64, device=device)
    q_pos = torch.cat([minus_one, positions.query.to(device=device, dtype=torch.int64)]).contiguous()
    regular = torch.cat([~is_sink[:sinks], torch.ones(Lk - sinks, dtype=torch.bool, device=device)])
    if positions.key_valid is not None:
        regular[sinks:] = positions.key_valid.to(device)
    k_pos = torch.cat([minus_one, positions.key.to(device=device, dtype=torch.int64)])
    k_pos = torch.where(regular, k_pos, FAR).contiguous()
    q_docs = k_docs = None
    if docs is not None and positions.key_documents is not None:
        q_docs = _sink_docs(docs, sinks, docs)
        k_docs = _sink_docs(positions.key_documents.to(device), sinks, -1)
    return MaskLayout(q_pos, k_pos, is_sink, q_docs, k_docs, window, sinks, indexed=False)


def dense_mask(layout: MaskLayout) -> Tensor:
    """[Bm, Lq, Lk] bool, True where a query sees a key; Bm = B with documents, else 1."""
    same_doc = None
    if layout.q_docs is not None and layout.k_docs is not None:
        same_doc = layout.q_docs[:, :, None] == layout.k_docs[:, None, :]
    window = FAR if layout.window is None else layout.window
    seen = visible(layout.q_pos[:, None], layout.k_pos[None, :], layout.k_always[None, :], window, same_doc)
    return seen if seen.dim() == 3 else seen[None]


def mask_mod(layout: MaskLayout) -> MaskMod:
    """flex_attention's mask_mod of the layout.

    Window and sink count are 0-d tensors rather than ints so that new values reuse the
    compiled kernel (dynamo guards on int constants, not on tensor values).
    """
    device = layout.q_pos.device
    window = torch.tensor(FAR if layout.window is None else layout.window, dtype=torch.int64, device=device)
    sinks = torch.tensor(layout.sinks, dtype=torch.int64, device=device)
    q_pos, k_pos, k_always, q_docs, k_docs = (layout.q_pos, layout.k_pos, layout.k_always,
                                              layout.q_docs, layout.k_docs)

    def where(q_idx: Tensor, kv_idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if layout.indexed:  # the positions are the indices: no loads in the kernel
            return q_idx, kv_idx, kv_idx < sinks
        return q_pos[q_idx], k_pos[kv_idx], k_always[kv_idx]

    def plain(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return visible(*where(q_idx, kv_idx), window, None)

    def documents(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        same_doc = q_docs[b, q_idx] == k_docs[b, kv_idx]
        return visible(*where(q_idx, kv_idx), window, same_doc)

    return plain if q_docs is None else documents


def _tiles(x: Tensor, n: int, block: int, fill: int | bool) -> Tensor:
    """[..., L] -> [..., n, block], padded with ``fill`` up to n · block."""
    pad = n * block - x.shape[-1]
    padded = torch.cat([x, x.new_full((*x.shape[:-1], pad), fill)], dim=-1)
    return padded.view(*x.shape[:-1], n, block)


def _ranges(x: Tensor, keep: Tensor | None, n: int, block: int) -> tuple[Tensor, Tensor]:
    """Min and max of ``x`` [..., L] over the kept entries of every tile ((FAR, -FAR) if none)."""
    if keep is not None:
        lo_src, hi_src = torch.where(keep, x, FAR), torch.where(keep, x, -FAR)
    else:
        lo_src, hi_src = x, x
    return _tiles(lo_src, n, block, FAR).amin(-1), _tiles(hi_src, n, block, -FAR).amax(-1)


def tile_structure(layout: MaskLayout, block: int = BLOCK_SIZE) -> tuple[Tensor, Tensor]:
    """Which (query tile, key tile) pairs need the mask_mod and which are fully seen.

    * some pair may be seen: the key tile holds a sink, or its regular keys' position range
      reaches its regular queries' range (causally, within the window) and the document
      ranges overlap.
    * every pair is seen: both tiles are whole, every key slot is valid, and either all keys
      are sinks or the query tile holds no sink and every regular key precedes every query
      within the window, all in one document.

    Returns:
        ``(partial, full)``: two [Bm, 1, nq, nk] bool tensors, nq = ceil(Lq / block),
        nk = ceil(Lk / block), Bm = B with documents else 1. A tile in neither is skipped.
    """
    q_pos, k_pos, k_always = layout.q_pos, layout.k_pos, layout.k_always
    Lq, Lk = q_pos.shape[0], k_pos.shape[0]
    nq, nk = -(-Lq // block), -(-Lk // block)
    regular = k_pos != FAR
    # Sink queries see sinks only: the position and document ranges are the regular queries'.
    q_regular = torch.arange(Lq, device=q_pos.device) >= layout.sinks
    q_has_sink = _tiles(~q_regular, nq, block, False).any(-1)[:, None]
    q_lo, q_hi = (r[:, None] for r in _ranges(q_pos, q_regular, nq, block))
    k_lo, k_hi = (r[None, :] for r in _ranges(k_pos, regular, nk, block))
    sink_tiles = _tiles(k_always, nk, block, False)
    has_sink, all_sink = sink_tiles.any(-1)[None, :], sink_tiles.all(-1)[None, :]
    all_valid = _tiles(regular | k_always, nk, block, False).all(-1)[None, :]
    q_whole = (torch.arange(nq, device=q_pos.device) < Lq // block)[:, None]
    w = FAR if layout.window is None else layout.window
    some = ((k_lo <= q_hi) & (q_lo - k_hi <= w))[None]
    every = ((k_hi <= q_lo) & (q_hi - k_lo <= w) & ~q_has_sink)[None]
    if layout.q_docs is not None and layout.k_docs is not None:
        dq_lo, dq_hi = (r[:, :, None] for r in _ranges(layout.q_docs, q_regular, nq, block))
        dk_lo, dk_hi = (r[:, None, :] for r in _ranges(layout.k_docs, regular, nk, block))
        some = some & (dk_lo <= dq_hi) & (dq_lo <= dk_hi)
        every = every & (dq_lo == dq_hi) & (dk_lo == dk_hi) & (dq_lo == dk_lo)
    some = some | has_sink
    every = q_whole & all_valid & (all_sink | every)
    return (some & ~every)[:, None], every[:, None]
