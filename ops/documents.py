"""Packed documents: per-token segment ids, and the cu_seqlens form linear attention needs.

Batch metadata below the model (sbtrain.model, parallel and the trainer use it), so it
imports nothing of ours.

A training sample concatenates documents separated by EOD tokens. With
``data.document_mask`` on, every token carries the id of its document (the EOD token
closes its own document), attention never crosses ids and GLA restarts its state at
each new id. The ids travel through Megatron's ``attention_mask`` argument as a [b, s]
integer tensor: O(s) memory instead of an [s, s] boolean mask.
"""

from __future__ import annotations

import torch


def segment_ids_from_tokens(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """[..., s] token ids -> [..., s] int32 ids: the count of EOD tokens strictly before."""
    is_eod = (tokens == eod).to(torch.int32)
    return (torch.cumsum(is_eod, dim=-1) - is_eod).to(torch.int32)


# Every GLA layer of a forward (and its recompute) asks for the same micro-batch's offsets;
# torch.nonzero synchronises with the device, so the last answer is kept. The entry holds the
# ids tensor itself, so a freed tensor's reused address cannot match a stale entry.
_LAST: tuple[torch.Tensor, int, torch.Tensor] | None = None


def cu_seqlens_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] segment ids -> int64 cumulative lengths over the flattened b * s tokens.

    Every row boundary also starts a new sequence, so the result describes independent
    sequences in FlashAttention's varlen convention: ``[0, len_0, len_0 + len_1, ...]``.
    """
    global _LAST
    if _LAST is not None and _LAST[0] is segment_ids and _LAST[1] == segment_ids._version:
        return _LAST[2]
    cu_seqlens = _cu_seqlens(segment_ids)
    _LAST = (segment_ids, segment_ids._version, cu_seqlens)
    return cu_seqlens


def _cu_seqlens(segment_ids: torch.Tensor) -> torch.Tensor:
    batch, seq = segment_ids.shape
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    begin = torch.nonzero(starts.reshape(-1), as_tuple=False).reshape(-1)
    end = torch.tensor([batch * seq], device=segment_ids.device, dtype=begin.dtype)
    return torch.cat([begin, end]).to(torch.int64)
