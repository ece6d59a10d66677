"""The per-micro-batch context (``sbtrain.model.batch``): built once by the trainer's forward
step, carried to every mixer in ``packed_seq_params``, and the same numbers as segment ids in
``attention_mask`` (the direct-call path). One-process models (gloo world of 1, CPU, fp32)."""

from __future__ import annotations

import pytest
import torch

import ops.documents
from ops.documents import Documents, cu_seqlens_from_segments, segment_ids_from_tokens
from sbtrain.convert.session import one_process_model
from sbtrain.model.batch import BatchContext, batch_context, context_of
from sbtrain.trainer import _forward_step
from tests.model.test_hybrid_model import random_model
from tests.model.test_hybrid_model import tiny_cfg as hybrid_cfg
from tests.model.test_parallel_hybrid import tiny_cfg as parallel_hybrid_cfg

SEQ = 20


def _batch(seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 64, (2, SEQ), generator=gen)
    tokens[0, 6] = tokens[0, 13] = tokens[1, 9] = 0  # EOD: three documents, then two
    return {"tokens": tokens, "labels": torch.randint(0, 64, (2, SEQ), generator=gen),
            "position_ids": torch.arange(SEQ).expand(2, SEQ), "loss_mask": torch.ones(2, SEQ),
            "loss_tokens": torch.tensor(2.0 * SEQ),
            "segment_ids": segment_ids_from_tokens(tokens, eod=0)}


def _counting_cu_seqlens(monkeypatch) -> list:
    """Counts cu_seqlens derivations (each one a device sync on a GPU)."""
    calls = []
    original = ops.documents.cu_seqlens_from_segments

    def counted(ids):
        calls.append(ids)
        return original(ids)

    monkeypatch.setattr(ops.documents, "cu_seqlens_from_segments", counted)
    return calls


@pytest.mark.parametrize("cfg", [hybrid_cfg(), parallel_hybrid_cfg()], ids=["gla+swa", "parallel_hybrid+sinks"])
def test_forward_step_context_matches_segment_ids_and_derives_once(cfg, monkeypatch):
    batch = _batch()
    with one_process_model(cfg) as model:
        random_model(model, cfg)
        with torch.no_grad():
            direct = model(batch["tokens"], batch["position_ids"], batch["segment_ids"],
                           labels=batch["labels"])
            calls = _counting_cu_seqlens(monkeypatch)
            stepped, _ = _forward_step(iter([batch]), model, sink_tokens=cfg.model.sink_tokens)
            unmasked = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    torch.testing.assert_close(stepped, direct, rtol=0, atol=0)
    assert len(calls) == 1  # once per micro-batch, not once per GLA layer
    assert (unmasked - direct).abs().max() > 1e-4  # the documents did change the losses


def test_batch_context_carries_documents_and_megatron_reads_plain_layout():
    ids = segment_ids_from_tokens(_batch()["tokens"], eod=0)
    assert batch_context(SEQ, None, None, SEQ) is None  # nothing to carry: no packed_seq_params
    context = batch_context(SEQ, ids, None, SEQ + 3)
    assert context.documents.ids is ids
    torch.testing.assert_close(context.documents.cu_seqlens, cu_seqlens_from_segments(ids))
    assert context.sp is None and context.qkv_format == "sbhd" and context.cp_group is None
    assert context.max_seqlen_q == context.max_seqlen_kv == SEQ + 3
    assert context_of(None, context, None) == (context.documents, None)
    documents, sp = context_of(ids, None, None)  # a direct call: built from the ids
    assert documents.ids is ids and sp is None
    with pytest.raises(ValueError, match="attention_mask must be None"):
        context_of(ids, context, None)
    with pytest.raises(NotImplementedError, match="BatchContext"):
        context_of(None, object(), None)


def test_documents_module_keeps_no_batch_state():
    """The per-batch data lives in Documents objects; the module caches nothing."""
    ids = segment_ids_from_tokens(_batch()["tokens"], eod=0)
    assert not hasattr(ops.documents, "_LAST")
    first, second = Documents.from_ids(ids), Documents.from_ids(ids)
    assert first.block_masks is not second.block_masks
    assert isinstance(BatchContext(first).documents, Documents)
