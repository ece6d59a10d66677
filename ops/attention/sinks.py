"""Sink-token ("meta token") softmax attention of SpikingBrain-76B.

The model prepends S learnable sink tokens (S = 128 in the report) to every sequence. In the
softmax branch, with the keys ordered [sinks; regular]:

* a sink query sees every sink key (no causal order among sinks) and no regular key;
* regular query i sees every sink key, plus regular key j iff ``j <= i``,
  ``i - j <= window`` (when given) and ``segment_ids[b, i] == segment_ids[b, j]`` (when given).

The window counts regular tokens only, and documents split regular tokens only: the sinks
are visible from every document. Every row sees at least one sink, so no row is empty.

``sink_attention(q, k, v, q_sink, k_sink, v_sink, window=None, segment_ids=None, scale=None)``
returns ``(out, out_sink)`` and dispatches per call (``ops.backends``) to:

* ``flex`` (triton, priority 10): one ``flex_attention`` over the concatenation [sinks; regular]
  with a block-sparse mask of the rule above (the sinks add one key tile column per query tile
  at S = 128). CUDA only.
* ``lse_merge`` (triton, priority 5): the vLLM serving algorithm
  (``vllm_hymeta/attention/fa_kernel_metatoken.py``): regular attention (flex with the block
  masks of ``softmax_attention``) and attention of all queries to the S sinks (dense flex),
  each with its log-sum-exp, merged by :func:`merge_attention`. Gradients reach the pieces
  through both outputs and both log-sum-exps (flex differentiates its lse). It runs the same
  Triton flex kernels as ``flex`` plus an fp32 merge pass, so it ranks below it; it is the
  seam for a vendor kernel that returns lse (flash-attn's varlen kernel, as in vLLM). CUDA only.
* ``torch``: :func:`reference_sink_attention`, the explicit (S+T) x (S+T) mask in fp32.

Layout: q [B, H, T, D], k, v [B, Hkv, T, D]; q_sink [B, H, S, D], k_sink, v_sink [B, Hkv, S, D]
(GQA: query head h reads kv head ``h // (H // Hkv)``). The sink tensors come from projecting
learned embeddings and may be identical across the batch (pass ``expand``-ed views).

Importing this module registers the backends; nothing is compiled and neither triton nor
dynamo is imported until a fast backend runs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from ops.attention import flex_backend
from ops.attention.flex_backend import (
    BLOCK_SIZE,
    GPU_KERNEL_OPTIONS,
    BlockMaskCache,
    MaskMod,
    _tile_id_range,
    block_mask_from_tiles,
    effective_window,
    flex_available,
    verify_flex,
)
from ops.attention.reference import attention_mask, check_inputs
from ops.backends import Backend, Check, dispatch

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import AuxRequest, BlockMask

SINK_OP_NAME = "sink_attention"


def check_sink_inputs(
    q: Tensor, k: Tensor, v: Tensor, q_sink: Tensor, k_sink: Tensor, v_sink: Tensor,
    window: int | None, segment_ids: Tensor | None,
) -> None:
    """Raise ``ValueError`` when the arguments do not follow the op's layout contract."""
    check_inputs(q, k, v, window, segment_ids)
    if q_sink.dim() != 4 or k_sink.dim() != 4 or v_sink.dim() != 4:
        raise ValueError(f"q_sink, k_sink, v_sink must be [B, H, S, D]; got {tuple(q_sink.shape)}, "
                         f"{tuple(k_sink.shape)}, {tuple(v_sink.shape)}")
    B, H, _, D = q.shape
    Hkv, S = k.shape[1], q_sink.shape[2]
    if S < 1:
        raise ValueError("sink_attention needs at least one sink token (S >= 1), got S = 0; "
                         "without sinks call softmax_attention")
    if tuple(q_sink.shape) != (B, H, S, D):
        raise ValueError(f"q_sink must be [B, H, S, D] = [{B}, {H}, S, {D}]; got {tuple(q_sink.shape)}")
    if tuple(k_sink.shape) != (B, Hkv, S, D) or tuple(v_sink.shape) != (B, Hkv, S, D):
        raise ValueError(f"k_sink and v_sink must be [B, Hkv, S, D] = [{B}, {Hkv}, {S}, {D}]; "
                         f"got {tuple(k_sink.shape)} and {tuple(v_sink.shape)}")


def sink_attention_mask(
    T: int,
    S: int,
    window: int | None = None,
    segment_ids: Tensor | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Boolean mask over the concatenation [S sinks; T regular tokens].

    Args:
        T: number of regular tokens.
        S: number of sink tokens, >= 1.
        window, segment_ids: the regular-token rules of :func:`ops.attention.attention_mask`.
        device: where to build the mask; defaults to ``segment_ids``'s device, else CPU.

    Returns:
        [B, 1, S + T, S + T] bool (B = 1 without ``segment_ids``), True where attention is
        allowed: rows and columns 0..S-1 are the sinks.
    """
    if S < 1:
        raise ValueError(f"sink_attention needs at least one sink token (S >= 1), got S = {S}")
    regular = attention_mask(T, window, segment_ids, device)  # [Bm, 1, T, T]
    Bm, dev = regular.shape[0], regular.device
    sink_rows = torch.cat([torch.ones(S, S, dtype=torch.bool, device=dev),
                           torch.zeros(S, T, dtype=torch.bool, device=dev)], dim=1)
    regular_rows = torch.cat([torch.ones(Bm, 1, T, S, dtype=torch.bool, device=dev), regular], dim=-1)
    return torch.cat([sink_rows.expand(Bm, 1, S, S + T), regular_rows], dim=-2)


@dispatch(SINK_OP_NAME)
def sink_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_sink: Tensor,
    k_sink: Tensor,
    v_sink: Tensor,
    window: int | None = None,
    segment_ids: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Softmax attention with S sink tokens (torch reference; the entry point dispatches).

    Args:
        q: [B, H, T, D] queries of the regular tokens.
        k, v: [B, Hkv, T, D] keys and values of the regular tokens, H % Hkv == 0.
        q_sink: [B, H, S, D] queries of the sinks, S >= 1.
        k_sink, v_sink: [B, Hkv, S, D] keys and values of the sinks.
        window: previous regular tokens each regular query sees besides itself; None: unlimited.
        segment_ids: [B, T] integer document ids of the regular tokens; None: one document.
        scale: score multiplier; defaults to ``D ** -0.5``.

    Returns:
        ``(out, out_sink)``: [B, H, T, D] and [B, H, S, D] in ``q``'s dtype (views into one
        [B, H, S + T, D] buffer for the reference and ``flex``).
    """
    return reference_sink_attention(q, k, v, q_sink, k_sink, v_sink, window, segment_ids, scale)


def reference_sink_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_sink: Tensor,
    k_sink: Tensor,
    v_sink: Tensor,
    window: int | None = None,
    segment_ids: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`sink_attention` with the explicit mask of :func:`sink_attention_mask`, in fp32."""
    check_sink_inputs(q, k, v, q_sink, k_sink, v_sink, window, segment_ids)
    B, H, T, D = q.shape
    S = q_sink.shape[2]
    group = H // k.shape[1]
    scale = D**-0.5 if scale is None else scale
    q_all = torch.cat([q_sink, q], dim=2).float()
    k_all = torch.cat([k_sink, k], dim=2).float().repeat_interleave(group, dim=1)
    v_all = torch.cat([v_sink, v], dim=2).float().repeat_interleave(group, dim=1)
    scores = torch.matmul(q_all, k_all.transpose(-2, -1)) * scale
    mask = sink_attention_mask(T, S, window, segment_ids, device=q.device)
    # Every row sees the sinks, so no row is all -inf and softmax never yields NaN.
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    out = torch.matmul(probs, v_all).to(q.dtype)
    return out[:, :, S:], out[:, :, :S]


def merge_attention(out1: Tensor, lse1: Tensor, out2: Tensor, lse2: Tensor) -> tuple[Tensor, Tensor]:
    """Combine two attentions of the same queries over disjoint key sets by their log-sum-exps.

    ``out = (exp(lse1) out1 + exp(lse2) out2) / (exp(lse1) + exp(lse2))``, computed as vLLM's
    meta-token backend does, without exponentials that can overflow:
    ``out = out1 - sigmoid(lse2 - lse1) (out1 - out2)``, ``lse = lse1 - logsigmoid(lse1 - lse2)``.
    Differentiable in all four inputs. A row needs one finite lse (both -inf gives NaN).

    Args:
        out1, out2: [..., T, D] normalised attention outputs.
        lse1, lse2: [..., T] natural-log log-sum-exps of the scaled scores behind them.

    Returns:
        ``(out, lse)``: [..., T, D] in ``out1``'s dtype (merged in fp32) and [..., T] fp32.
    """
    lse1, lse2 = lse1.float(), lse2.float()
    weight2 = torch.sigmoid(lse2 - lse1).unsqueeze(-1)
    a, b = out1.float(), out2.float()
    out = a - weight2 * (a - b)
    return out.to(out1.dtype), lse1 - F.logsigmoid(lse1 - lse2)


def sink_mask_mod(sinks: Tensor, window: Tensor, segment_ids: Tensor | None = None) -> MaskMod:
    """mask_mod of the sink rule over [sinks; regular] (indices count the sinks).

    Args:
        sinks: 0-d integer tensor S (tensors, not ints, so new values reuse the compiled kernel).
        window: 0-d integer tensor; >= T - 1 means unlimited.
        segment_ids: [B, S + T] ids over the concatenation (the sink entries only keep the
            indices in range: the rule never depends on them); None: one document.
    """

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        # kv_idx >= sinks and kv_idx <= q_idx imply q_idx is a regular row too.
        regular = (kv_idx >= sinks) & (kv_idx <= q_idx) & (q_idx - kv_idx <= window)
        return (kv_idx < sinks) | regular

    def document_mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        same_doc = segment_ids[b, q_idx] == segment_ids[b, kv_idx]
        regular = (kv_idx >= sinks) & (kv_idx <= q_idx) & (q_idx - kv_idx <= window) & same_doc
        return (kv_idx < sinks) | regular

    return mask_mod if segment_ids is None else document_mask_mod


def _sink_padded_ids(segment_ids: Tensor, S: int) -> Tensor:
    """[B, T] ids -> [B, S + T]; sink slots repeat regular token 0's id, so that a tile spanning
    the sink/regular boundary keeps the id range of its regular tokens."""
    B = segment_ids.shape[0]
    return torch.cat([segment_ids[:, :1].expand(B, S), segment_ids], dim=1).contiguous()


def sink_block_structure(
    T: int, S: int, window: int | None, segment_ids: Tensor | None, device: torch.device | str,
    block: int = BLOCK_SIZE,
) -> tuple[Tensor, Tensor]:
    """Partial and full (query tile, key tile) pairs of the sink rule over [sinks; regular].

    Each tile of the concatenation splits into its sink part and its regular part; the causal
    and window tests run on the regular parts (differences of positions do not change with the
    offset S). Exact without documents, conservative with them, as
    :func:`ops.attention.flex_backend.block_structure`.

    Returns:
        ``(partial, full)``: two [Bm, 1, n, n] bool tensors, n = ceil((S + T) / block), Bm = B
        with ``segment_ids`` else 1. A tile in neither is skipped by the kernel.
    """
    L = S + T
    n = -(-L // block)
    first = torch.arange(n, device=device) * block
    last = (first + block - 1).clamp(max=L - 1)
    whole = (last - first) == block - 1
    has_sink, has_reg = first < S, last >= S
    reg_first = first.clamp(min=S)
    q_last, q_reg_first, q_has_sink, q_has_reg = last[:, None], reg_first[:, None], has_sink[:, None], has_reg[:, None]
    k_last, k_reg_first, k_has_sink, k_has_reg = last[None, :], reg_first[None, :], has_sink[None, :], has_reg[None, :]
    w = T if window is None else window
    some_reg = q_has_reg & k_has_reg & (k_reg_first <= q_last) & (q_reg_first - k_last <= w)
    # A key tile holding regular keys is fully visible only to query tiles without sink rows.
    every_reg = ~q_has_sink & (k_last <= q_reg_first) & (q_last - k_reg_first <= w)
    whole_pair = whole[:, None] & whole[None, :]
    if segment_ids is None:
        some = k_has_sink | some_reg
        every = whole_pair & (~k_has_reg | every_reg)
        return (some & ~every)[None, None], every[None, None]
    lo, hi = _tile_id_range(_sink_padded_ids(segment_ids.to(device), S), n, block)
    overlap = (lo[:, :, None] <= hi[:, None, :]) & (lo[:, None, :] <= hi[:, :, None])
    single = lo == hi
    one_doc = single[:, :, None] & single[:, None, :] & (lo[:, :, None] == lo[:, None, :])
    some = k_has_sink | (some_reg & overlap)
    every = whole_pair & (~k_has_reg | (every_reg & one_doc))
    return (some & ~every)[:, None], every[:, None]


def build_sink_block_mask(
    T: int, S: int, window: int | None, segment_ids: Tensor | None, device: torch.device
) -> BlockMask:
    """The :class:`BlockMask` of the sink rule for T regular tokens and S sinks."""
    window_t = torch.tensor(T if window is None else window, dtype=torch.int64, device=device)
    sinks_t = torch.tensor(S, dtype=torch.int64, device=device)
    ids = None if segment_ids is None else _sink_padded_ids(segment_ids.to(device), S)
    partial, full = sink_block_structure(T, S, window, segment_ids, device)
    return block_mask_from_tiles(partial, full, sink_mask_mod(sinks_t, window_t, ids), S + T)


class _SinkMasks(BlockMaskCache):
    """A :class:`BlockMaskCache` whose masks cover [S sinks; T regular tokens] for one S."""

    def __init__(self, sinks: int, max_plain: int) -> None:
        super().__init__(max_plain)
        self.sinks = sinks

    def _build(self, T: int, window: int | None, segment_ids: Tensor | None, device: torch.device) -> BlockMask:
        self.builds += 1
        return build_sink_block_mask(T, self.sinks, window, segment_ids, device)


class SinkBlockMaskCache:
    """Sink block masks reused across calls: one :class:`BlockMaskCache` policy per sink count."""

    def __init__(self, max_plain: int = 8) -> None:
        self.max_plain = max_plain
        self._by_sinks: dict[int, _SinkMasks] = {}

    @property
    def builds(self) -> int:
        """Masks built so far (misses)."""
        return sum(c.builds for c in self._by_sinks.values())

    def get(self, T: int, S: int, window: int | None, segment_ids: Tensor | None, device: torch.device) -> BlockMask:
        """The block mask for these arguments, built on a miss."""
        if S not in self._by_sinks:
            self._by_sinks[S] = _SinkMasks(S, self.max_plain)
        return self._by_sinks[S].get(T, window, segment_ids, device)

    def clear(self) -> None:
        """Drop every cached mask."""
        self._by_sinks.clear()


SINK_BLOCK_MASKS = SinkBlockMaskCache()


@functools.cache
def compiled_sink_flex() -> Callable[..., object]:
    """``flex_attention`` compiled once per process for the sink backends (same signature).

    A wrapper of our own, not ``torch.compile(flex_attention)``: dynamo keeps compiled
    variants and counts recompiles per code object, so the sink calls (other mask_mods,
    lse outputs, an unmasked call) do not use up ``softmax_attention``'s recompile budget.
    ``fullgraph=True`` as in :func:`ops.attention.flex_backend.compiled_flex_attention`.
    """
    from torch.nn.attention.flex_attention import flex_attention

    def sink_flex(
        q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask | None = None, scale: float | None = None,
        enable_gqa: bool = False, return_aux: AuxRequest | None = None,
    ) -> object:
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa,
                              return_aux=return_aux, kernel_options=GPU_KERNEL_OPTIONS)

    return torch.compile(sink_flex, fullgraph=True)


def flex_sink_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_sink: Tensor,
    k_sink: Tensor,
    v_sink: Tensor,
    window: int | None = None,
    segment_ids: Tensor | None = None,
    scale: float | None = None,
    *,
    flex_fn: Callable[..., Tensor] | None = None,
    cache: SinkBlockMaskCache | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`sink_attention` as one flex_attention over [sinks; regular] (same contract).

    The concatenated q, k, v are what flex saves for backward; the inputs themselves are not
    kept by this function.

    Args:
        flex_fn: the flex_attention callable; defaults to :func:`compiled_sink_flex`. Tests
            pass the eager one to run the same block mask and mask_mod on CPU.
        cache: block-mask cache; defaults to the module's :data:`SINK_BLOCK_MASKS`.
    """
    check_sink_inputs(q, k, v, q_sink, k_sink, v_sink, window, segment_ids)
    T, S = q.shape[2], q_sink.shape[2]
    cache = SINK_BLOCK_MASKS if cache is None else cache
    block_mask = cache.get(T, S, effective_window(T, window), segment_ids, q.device)
    flex = compiled_sink_flex() if flex_fn is None else flex_fn
    out = flex(torch.cat([q_sink, q], dim=2), torch.cat([k_sink, k], dim=2), torch.cat([v_sink, v], dim=2),
               block_mask=block_mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    return out[:, :, S:], out[:, :, :S]


def lse_merge_sink_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_sink: Tensor,
    k_sink: Tensor,
    v_sink: Tensor,
    window: int | None = None,
    segment_ids: Tensor | None = None,
    scale: float | None = None,
    *,
    flex_fn: Callable[..., tuple[Tensor, object]] | None = None,
    cache: BlockMaskCache | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`sink_attention` as regular attention + attention to the sinks, merged by lse.

    Two flex calls: the regular queries over the regular keys with ``softmax_attention``'s
    block mask (shared cache), and [q_sink; q] over the S sink keys without a mask. The sink
    rows are the second call's outputs; the regular rows are :func:`merge_attention` of both.

    Args:
        flex_fn: the flex_attention callable; defaults to :func:`compiled_sink_flex`.
        cache: block-mask cache of the regular part; defaults to ``flex_backend.BLOCK_MASKS``.
    """
    from torch.nn.attention.flex_attention import AuxRequest

    check_sink_inputs(q, k, v, q_sink, k_sink, v_sink, window, segment_ids)
    T, S = q.shape[2], q_sink.shape[2]
    gqa = k.shape[1] != q.shape[1]
    cache = flex_backend.BLOCK_MASKS if cache is None else cache
    block_mask = cache.get(T, effective_window(T, window), segment_ids, q.device)
    flex = compiled_sink_flex() if flex_fn is None else flex_fn
    lse_only = AuxRequest(lse=True)
    out_reg, aux_reg = flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa, return_aux=lse_only)
    out_snk, aux_snk = flex(torch.cat([q_sink, q], dim=2), k_sink, v_sink, scale=scale, enable_gqa=gqa,
                            return_aux=lse_only)
    out, _ = merge_attention(out_reg, aux_reg.lse, out_snk[:, :, S:], aux_snk.lse[:, :, S:])
    return out, out_snk[:, :, :S]


def verify_flex_sinks(
    q: Tensor, k: Tensor, v: Tensor, q_sink: Tensor, k_sink: Tensor, v_sink: Tensor,
    window: int | None = None, segment_ids: Tensor | None = None, scale: float | None = None,
) -> Check:
    """Accept what :func:`ops.attention.flex_backend.verify_flex` accepts, with sinks like q."""
    ok, reason = verify_flex(q, k, v, window, segment_ids, scale)
    if not ok:
        return ok, reason
    if any(t.device != q.device for t in (q_sink, k_sink, v_sink)):
        return False, "q_sink, k_sink and v_sink must be on q's device"
    if any(t.dtype != q.dtype for t in (q_sink, k_sink, v_sink)):
        return False, f"sink dtypes {q_sink.dtype}/{k_sink.dtype}/{v_sink.dtype} must equal q's {q.dtype}"
    return True, "accepted"


sink_attention.registry.register(  # type: ignore[attr-defined]
    Backend(name="flex", fn=flex_sink_attention, kind="triton", available=flex_available,
            verifier=verify_flex_sinks)
)
sink_attention.registry.register(  # type: ignore[attr-defined]
    Backend(name="lse_merge", fn=lse_merge_sink_attention, kind="triton", priority=5, available=flex_available,
            verifier=verify_flex_sinks)
)
