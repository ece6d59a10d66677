"""``train.loss_chunk_tokens`` reaches GPTModel: the trainer's forward step hands it an
output processor that computes the loss with ``ops.loss`` (tied and untied output weights),
giving Megatron's per-token losses without materialising the logits."""

from __future__ import annotations

import pytest
import torch

import ops.loss
from sbtrain.convert.session import one_process_model
from sbtrain.trainer import _forward_step
from tests.model.test_hybrid_model import random_model, tiny_cfg


@pytest.mark.parametrize("untie", [True, False], ids=["untied", "tied"])
def test_chunked_loss_hook_replaces_the_output_layer(untie, monkeypatch):
    cfg = tiny_cfg()
    cfg.model.untie_embeddings = untie
    gen = torch.Generator().manual_seed(1)
    tokens, labels = (torch.randint(0, 64, (2, 12), generator=gen) for _ in range(2))
    batch = {"tokens": tokens, "labels": labels, "position_ids": torch.arange(12).expand(2, 12),
             "loss_mask": torch.ones(2, 12), "loss_tokens": torch.tensor(24.0)}
    calls = []
    real = ops.loss.linear_cross_entropy

    def spy(hidden, weight, labels, chunk_tokens):
        calls.append((tuple(hidden.shape), weight.data_ptr(), chunk_tokens))
        return real(hidden, weight, labels, chunk_tokens)

    monkeypatch.setattr(ops.loss, "linear_cross_entropy", spy)
    with one_process_model(cfg) as model:
        random_model(model, cfg)
        with torch.no_grad():
            megatron, _ = _forward_step(iter([batch]), model)
            chunked, _ = _forward_step(iter([batch]), model, loss_chunk_tokens=5)
        output_weight = (model.output_layer.weight if untie
                         else model.shared_embedding_or_output_weight())
    assert calls == [((12, 2, 32), output_weight.data_ptr(), 5)]
    assert megatron.shape == chunked.shape == (2, 12)
    torch.testing.assert_close(chunked, megatron, rtol=1e-5, atol=1e-5)
