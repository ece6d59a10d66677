"""The per-micro-batch context the mixers read: packed documents and the SP slice metadata.

Built once per micro-batch (``batch_context``, called by the trainer's forward step, like
torchtitan's ``post_dataloading_process``) and handed to every layer, so no layer re-derives
document offsets or all-gathers slice metadata:

* ``documents``: ``ops.documents.Documents``: the [b, s] segment ids of this rank's tokens,
  their cu_seqlens (GLA's varlen offsets; one device sync per micro-batch) and the flex block
  masks the first softmax layer builds for them;
* ``sp``: ``ops.comm.SPContext`` with every rank's slice length and every rank's segment ids
  (one all-gather per micro-batch, none per layer), or None when sequences are whole.

The channel is Megatron's ``packed_seq_params`` argument, Megatron's typed per-batch carrier
(``PackedSeqParams``): GPTModel forwards it untouched through every TransformerLayer to each
``self_attention`` and core attention, and under ``train.recompute: full`` it is captured by
the checkpointed function rather than saved as a tensor (the ``attention_mask`` slot is saved
with ``save_for_backward`` and must hold a tensor). The attributes Megatron reads from it
(``qkv_format``, ``cp_group``, ``max_seqlen_q/kv``, ``tokens_per_sample``) are set so that
Megatron takes its ordinary non-THD path: ``qkv_format`` "sbhd", no CP group of its own, the
RoPE length Megatron would compute itself, no per-sample MoE reshaping.

A model called directly with segment ids in ``attention_mask`` (tests, ``spikestats``) gets a
context built per layer from them (:func:`context_of`): the same numbers, without the reuse.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ops.comm import SPContext
from ops.documents import Documents


@dataclass(frozen=True, eq=False)
class BatchContext:
    """One micro-batch's metadata for the mixers (see the module docstring).

    Attributes:
        documents: the packed documents of this rank's tokens, or None (one document per row).
        sp: the SP context with this micro-batch's slice metadata, or None (sp 1).
        max_seqlen_q, max_seqlen_kv: the RoPE table length Megatron asks for (sinks and every
            rank's slice included: what it computes without a ``packed_seq_params``).
    """

    documents: Documents | None = None
    sp: SPContext | None = None
    max_seqlen_q: int = 0
    max_seqlen_kv: int = 0
    # Read by Megatron from whatever rides in packed_seq_params: not the THD layout, no CP
    # group of its own, no per-sample MoE reshaping.
    qkv_format: str = "sbhd"
    cp_group: None = None
    tokens_per_sample: None = None


def batch_context(seq: int, segment_ids: torch.Tensor | None, sp: SPContext | None,
                  rope_length: int) -> BatchContext | None:
    """The context of one micro-batch of ``seq`` tokens per row on this rank: ``segment_ids``
    [b, seq] (None: no document mask), ``sp`` the structural SP context
    (``parallel.sequence.sp_context``), ``rope_length`` the length GPTModel asks its RoPE for.
    None when there is nothing to carry, so that Megatron sees no ``packed_seq_params``."""
    if segment_ids is None and sp is None:
        return None
    documents = None if segment_ids is None else Documents.from_ids(segment_ids)
    sp = None if sp is None else sp.for_batch(seq, segment_ids)
    return BatchContext(documents, sp, rope_length, rope_length)


def context_of(attention_mask: torch.Tensor | None, packed_seq_params,
               sp: SPContext | None) -> tuple[Documents | None, SPContext | None]:
    """(documents, sp) for a mixer's op calls: from the micro-batch's ``BatchContext`` in
    ``packed_seq_params``, or, for a direct model call, from segment ids in ``attention_mask``
    (per layer) and the mixer's own SP context."""
    if isinstance(packed_seq_params, BatchContext):
        if attention_mask is not None:
            raise ValueError("segment ids travel in the BatchContext; attention_mask must be None")
        return packed_seq_params.documents, packed_seq_params.sp
    if packed_seq_params is not None:
        raise NotImplementedError("sbtrain's mixers take a BatchContext as packed_seq_params, not "
                                  f"{type(packed_seq_params).__name__}; packed documents use segment ids")
    return (None if attention_mask is None else Documents.from_ids(attention_mask)), sp
