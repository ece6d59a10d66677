"""SDPA backend: ``scaled_dot_product_attention(is_causal=True)``, the flash path for full causal attention.

It takes only calls whose mask is plain causal: no documents and a window that does not
cut a length-T sequence (window None or >= T - 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ops.attention.reference import check_inputs
from ops.backends import Check

SDPA_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Dtypes with a flash kernel, which reads grouped K/V heads in place.
_FLASH_DTYPES = (torch.bfloat16, torch.float16)


def _plain_causal(T: int, window: int | None, segment_ids: Tensor | None) -> bool:
    return segment_ids is None and (window is None or window >= T - 1)


def sdpa_causal_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int | None = None,
    segment_ids: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Full causal attention through torch SDPA (same contract as ``softmax_attention``)."""
    check_inputs(q, k, v, window, segment_ids)
    if not _plain_causal(q.shape[2], window, segment_ids):
        raise ValueError("sdpa_causal computes plain causal attention only: "
                         "no segment_ids, window None or >= T - 1")
    group = q.shape[1] // k.shape[1]
    if group > 1 and q.dtype not in _FLASH_DTYPES:
        # fp32 has no flash kernel, and the memory-efficient kernel rejects enable_gqa, so SDPA
        # would fall back to the math path (T × T scores); expanded K/V keep it fused.
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        group = 1
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=group > 1)


def verify_sdpa_causal(
    q: Tensor, k: Tensor, v: Tensor, window: int | None = None, segment_ids: Tensor | None = None,
    scale: float | None = None,
) -> Check:
    """Accept CUDA calls whose mask is plain causal."""
    if any(t.device.type != "cuda" for t in (q, k, v)):
        return False, "sdpa_causal is the CUDA flash path"
    if segment_ids is not None:
        return False, "segment_ids (document masking) need flex"
    if not _plain_causal(q.shape[-2], window, None):
        return False, f"window {window} < T - 1 = {q.shape[-2] - 1} needs flex"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SDPA_DTYPES:
        return False, f"dtypes {q.dtype}/{k.dtype}/{v.dtype}: need one of {SDPA_DTYPES}"
    return True, "accepted"
