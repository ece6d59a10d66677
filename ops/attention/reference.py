"""Naive causal softmax attention: the explicit boolean mask and the torch reference backend.

Every fast path in ``ops.attention`` is tested against :func:`reference_attention`. It
materialises the full [B, H, T, T] score matrix in fp32, so it is for tests, CPU runs and
short sequences only.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_inputs(q: Tensor, k: Tensor, v: Tensor, window: int | None, segment_ids: Tensor | None) -> None:
    """Raise ``ValueError`` when the arguments do not follow the op's layout contract."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, T, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, T, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(f"k and v must be [B, Hkv, T, D] = [{B}, Hkv, {T}, {D}]; "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    if H % k.shape[1] != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of kv heads ({k.shape[1]})")
    if window is not None and window < 0:
        raise ValueError(f"window must be None or >= 0 (0 means the diagonal only); got {window}")
    if segment_ids is not None:
        if segment_ids.shape != (B, T):
            raise ValueError(f"segment_ids must be [B, T] = [{B}, {T}]; got {tuple(segment_ids.shape)}")
        if segment_ids.is_floating_point() or segment_ids.is_complex():
            raise ValueError(f"segment_ids must be an integer tensor; got {segment_ids.dtype}")


def attention_mask(
    T: int,
    window: int | None = None,
    segment_ids: Tensor | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Boolean mask of the keys each query may attend to.

    Query i sees key j iff ``j <= i`` and (``window`` is None or ``i - j <= window``) and
    (``segment_ids`` is None or ``segment_ids[b, i] == segment_ids[b, j]``). A window of w
    therefore keeps the query itself plus the w previous tokens, as flash-attn's
    ``window_size=(w, 0)``.

    Args:
        T: sequence length.
        window: number of previous tokens each query sees besides itself; None: unlimited.
        segment_ids: [B, T] integer document ids of packed sequences; attention never crosses
            a change of id. None: one document per row.
        device: where to build the mask; defaults to ``segment_ids``'s device, else CPU.

    Returns:
        [B, 1, T, T] bool (or [1, 1, T, T] without ``segment_ids``), True where attention is allowed.
    """
    if device is None and segment_ids is not None:
        device = segment_ids.device
    pos = torch.arange(T, device=device)
    dist = pos[:, None] - pos[None, :]
    mask = dist >= 0
    if window is not None:
        mask = mask & (dist <= window)
    mask = mask[None, None]
    if segment_ids is not None:
        same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
        mask = mask & same_doc[:, None].to(mask.device)
    return mask


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int | None = None,
    segment_ids: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Causal softmax attention with an explicit mask, accumulated in fp32.

    Args:
        q: [B, H, T, D] queries.
        k, v: [B, Hkv, T, D] keys and values; query head h uses kv head ``h // (H // Hkv)``.
        window: see :func:`attention_mask`.
        segment_ids: [B, T] document ids; see :func:`attention_mask`.
        scale: score multiplier; defaults to ``D ** -0.5``.

    Returns:
        [B, H, T, D] in ``q``'s dtype.
    """
    check_inputs(q, k, v, window, segment_ids)
    B, H, T, D = q.shape
    group = H // k.shape[1]
    scale = D**-0.5 if scale is None else scale
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale
    mask = attention_mask(T, window, segment_ids, device=q.device)
    # Every row keeps its diagonal, so no row is all -inf and softmax never yields NaN.
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.matmul(probs, v.float()).to(q.dtype)
