"""Naive attention: the explicit mask of ``masks.dense_mask`` and a softmax in fp32.

The torch reference of op ``attention`` (every fast path is tested against it). It
materialises the full [B, H, Lq, Lk] score matrix in fp32 (fp64 for fp64 inputs), so it is
for tests, CPU runs and short sequences only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ops.attention.masks import Positions, check_inputs, dense_mask, mask_layout


def naive_attention(q: Tensor, k: Tensor, v: Tensor, *, window: int | None = None,
                    documents: Tensor | None = None, sinks: int = 0, positions: Positions | None = None,
                    scale: float | None = None) -> Tensor:
    """:func:`ops.attention.attention` on one process with an explicit mask.

    Raises:
        ValueError: on a layout error, or when some query sees no key (its softmax row would
            be all -inf, i.e. NaN).
    """
    check_inputs(q, k, v, window, documents, sinks, positions)
    B, H, Lq, D = q.shape
    group = H // k.shape[1]
    scale = D**-0.5 if scale is None else scale
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    layout = mask_layout(Lq, k.shape[2], window=window, documents=documents, sinks=sinks, positions=positions,
                         device=q.device)
    mask = dense_mask(layout)
    if positions is not None:  # without positions every query sees itself (or a sink)
        _check_every_query_sees_a_key(mask, layout.q_pos)
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q.to(dtype), k.to(dtype).transpose(-2, -1)) * scale
    probs = torch.softmax(scores.masked_fill(~mask[:, None], float("-inf")), dim=-1)
    return torch.matmul(probs, v.to(dtype)).to(q.dtype)


def _check_every_query_sees_a_key(mask: Tensor, q_pos: Tensor) -> None:
    blind = ~mask.any(dim=-1)
    if blind.any():
        b, i = (int(x) for x in blind.nonzero()[0])
        raise ValueError(f"query {i} (batch {b}, position {int(q_pos[i])}) sees no key; "
                         "attention needs at least one visible key per query")
