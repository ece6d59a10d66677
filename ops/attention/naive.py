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


def naive_attention_lse(q: Tensor, k: Tensor, v: Tensor, *, window: int | None = None,
                        documents: Tensor | None = None, sinks: int = 0, positions: Positions | None = None,
                        scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Op ``attention_lse``: :func:`naive_attention` and each query's log-sum-exp.

    A query may see no key here (a part of the keys, merged later by
    ``lse_merge.merge_attention``): its output is 0 and its lse -inf, with finite gradients
    (flex_attention's convention).

    Returns:
        ``(out [B, H, Lq, D] in q's dtype, lse [B, H, Lq])``, lse natural-log, fp32 (fp64 for fp64).
    """
    check_inputs(q, k, v, window, documents, sinks, positions)
    group = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    layout = mask_layout(q.shape[2], k.shape[2], window=window, documents=documents, sinks=sinks,
                         positions=positions, device=q.device)
    mask = dense_mask(layout)[:, None]
    k = k.repeat_interleave(group, dim=1).to(dtype)
    v = v.repeat_interleave(group, dim=1).to(dtype)
    scores = (torch.matmul(q.to(dtype), k.transpose(-2, -1)) * scale).masked_fill(~mask, float("-inf"))
    # the row maximum only keeps exp in range: the result does not depend on it (detached);
    # rows that see nothing use 0, and every where() keeps log(0) and 0/0 off both passes
    peak = scores.amax(dim=-1, keepdim=True).detach()
    peak = torch.where(peak.isfinite(), peak, torch.zeros_like(peak))
    weights = (scores - peak).exp()
    total = weights.sum(dim=-1, keepdim=True)
    seen = total > 0
    safe_total = torch.where(seen, total, torch.ones_like(total))
    out = torch.matmul(weights, v) / safe_total
    lse = torch.where(seen, safe_total.log() + peak, torch.full_like(total, float("-inf")))
    return out.to(q.dtype), lse.squeeze(-1)


def _check_every_query_sees_a_key(mask: Tensor, q_pos: Tensor) -> None:
    blind = ~mask.any(dim=-1)
    if blind.any():
        b, i = (int(x) for x in blind.nonzero()[0])
        raise ValueError(f"query {i} (batch {b}, position {int(q_pos[i])}) sees no key; "
                         "attention needs at least one visible key per query")
