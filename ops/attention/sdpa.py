"""SDPA backend of op ``attention``: ``scaled_dot_product_attention(is_causal=True)``, the flash path.

It takes only calls whose mask is plain causal: no sinks, documents or positions, and a
window that does not cut the sequence (window None or >= L - 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ops.attention.masks import Positions, check_inputs
from ops.backends import Check

SDPA_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Dtypes with a flash kernel, which reads grouped K/V heads in place.
_FLASH_DTYPES = (torch.bfloat16, torch.float16)


def _why_not_plain_causal(L: int, window: int | None, documents: Tensor | None, sinks: int,
                          positions: Positions | None) -> str | None:
    if documents is not None:
        return "documents need flex"
    if sinks or positions is not None:
        return "sinks and positions need flex"
    if window is not None and window < L - 1:
        return f"window {window} < L - 1 = {L - 1} needs flex"
    return None


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, *, window: int | None = None, documents: Tensor | None = None,
                   sinks: int = 0, positions: Positions | None = None, scale: float | None = None) -> Tensor:
    """Full causal attention through torch SDPA (same contract as op ``attention``)."""
    check_inputs(q, k, v, window, documents, sinks, positions)
    why = _why_not_plain_causal(q.shape[2], window, documents, sinks, positions)
    if why:
        raise ValueError(f"sdpa computes plain causal attention only: {why}")
    group = q.shape[1] // k.shape[1]
    if group > 1 and q.dtype not in _FLASH_DTYPES:
        # fp32 has no flash kernel, and the memory-efficient kernel rejects enable_gqa, so SDPA
        # would fall back to the math path (L × L scores); expanded K/V keep it fused.
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        group = 1
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=group > 1)


def verify_sdpa(q: Tensor, k: Tensor, v: Tensor, *, window: int | None = None, documents: Tensor | None = None,
                sinks: int = 0, positions: Positions | None = None, scale: float | None = None) -> Check:
    """Accept CUDA calls whose mask is plain causal."""
    if any(t.device.type != "cuda" for t in (q, k, v)):
        return False, "sdpa is the CUDA flash path"
    why = _why_not_plain_causal(q.shape[-2], window, documents, sinks, positions)
    if why:
        return False, why
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SDPA_DTYPES:
        return False, f"dtypes {q.dtype}/{k.dtype}/{v.dtype}: need one of {SDPA_DTYPES}"
    return True, "accepted"
