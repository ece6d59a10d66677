"""Packed documents: per-token segment ids, and the cu_seqlens form linear attention needs.

Batch metadata below the model (sbtrain.model, parallel and the trainer use it), so it
imports nothing of ours.

A training sample concatenates documents separated by EOD tokens. With
``data.document_mask`` on, every token carries the id of its document (the EOD token
closes its own document), attention never crosses ids and GLA restarts its state at
each new id. The ids are a [b, s] integer tensor (O(s) memory instead of an [s, s] boolean
mask); ``Documents`` bundles them with what the ops derive from them, built once per
micro-batch (``sbtrain.model.batch``) and read by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def segment_ids_from_tokens(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """[..., s] token ids -> [..., s] int32 ids: the count of EOD tokens strictly before."""
    is_eod = (tokens == eod).to(torch.int32)
    return (torch.cumsum(is_eod, dim=-1) - is_eod).to(torch.int32)


@dataclass(frozen=True, eq=False)
class Documents:
    """One micro-batch's packed documents, derived once (``from_ids``) and handed to every layer.

    Attributes:
        ids: [b, s] integer segment ids (``segment_ids_from_tokens``; under sequence parallelism
            this rank's slice of the global ids).
        cu_seqlens: ids' :func:`cu_seqlens_from_segments`, what the GLA kernels take: computed
            here once, because ``torch.nonzero`` synchronises with the device. None for ids that
            only attention reads (Ulysses' whole-sequence ids, ``ops.attention.ulysses``).
        block_masks: flex_attention block masks of these documents, filled by the first layer
            that needs one (``ops.attention.flex``, keyed by length, sinks and window) and
            reused by the others; it lives and dies with the micro-batch.
    """

    ids: torch.Tensor
    cu_seqlens: torch.Tensor | None
    block_masks: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_ids(cls, ids: torch.Tensor) -> "Documents":
        return cls(ids, cu_seqlens_from_segments(ids))


def document_ids(documents: "Documents | torch.Tensor | None") -> torch.Tensor | None:
    """The [b, s] ids of ``documents`` (ops take a ``Documents`` or the bare ids tensor)."""
    return documents.ids if isinstance(documents, Documents) else documents


def cu_seqlens_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] segment ids -> int64 cumulative lengths over the flattened b * s tokens.

    Every row boundary also starts a new sequence, so the result describes independent
    sequences in FlashAttention's varlen convention: ``[0, len_0, len_0 + len_1, ...]``.
    Synchronises with the device: compute it once per micro-batch (``Documents.from_ids``).
    """
    batch, seq = segment_ids.shape
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    begin = torch.nonzero(starts.reshape(-1), as_tuple=False).reshape(-1)
    end = torch.tensor([batch * seq], device=segment_ids.device, dtype=begin.dtype)
    return torch.cat([begin, end]).to(torch.int64)
