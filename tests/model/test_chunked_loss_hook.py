"""``train.loss_chunk_tokens`` reaches GPTModel: the trainer's forward step hands it an
output processor that computes the loss with ``ops.loss`` (tied and untied output weights),
giving Megatron's per-token losses and gradients without materialising the logits; ``auto``
(the default) picks it on GPUs with tp 1."""

from __future__ import annotations

import pytest
import torch
import yaml

import ops.loss
from sbtrain.config import ConfigError, load_config, validate
from sbtrain.config.schema import LOSS_CHUNK_AUTO_TOKENS, TrainConfig
from sbtrain.convert.session import one_process_model
import sbtrain.trainer as trainer
from sbtrain.trainer import _forward_step
from tests.model.test_hybrid_model import random_model, tiny_cfg
from tests.ops.test_loss import rel_rms


def make_batch(seed: int = 1, b: int = 2, s: int = 12, vocab: int = 64, device: str = "cpu") -> dict:
    gen = torch.Generator().manual_seed(seed)
    tokens, labels = (torch.randint(0, vocab, (b, s), generator=gen) for _ in range(2))
    batch = {"tokens": tokens, "labels": labels, "position_ids": torch.arange(s).expand(b, s),
             "loss_mask": torch.ones(b, s), "loss_tokens": torch.tensor(float(b * s))}
    return {k: v.to(device) for k, v in batch.items()}


def losses_and_grads(model, batch: dict, chunk_tokens: int, grad_out: torch.Tensor):
    """Per-token losses and every parameter's gradient under ``sum(grad_out * losses)``."""
    model.zero_grad(set_to_none=True)
    losses, _ = _forward_step(iter([batch]), model, loss_chunk_tokens=chunk_tokens)
    (losses * grad_out).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return losses.detach(), grads


def output_weight_name(model, untie: bool) -> str:
    weight = model.output_layer.weight if untie else model.shared_embedding_or_output_weight()
    return next(name for name, p in model.named_parameters() if p is weight)


def compare_with_megatron(untie: bool, dtype: torch.dtype, device: str, monkeypatch) -> None:
    cfg = tiny_cfg()
    cfg.model.untie_embeddings = untie
    batch = make_batch(device=device)
    grad_out = torch.rand(2, 12, generator=torch.Generator().manual_seed(2)).to(device)
    calls = []
    real = ops.loss.linear_cross_entropy

    def spy(hidden, weight, labels, chunk_tokens, **options):
        calls.append((tuple(hidden.shape), weight.data_ptr(), chunk_tokens, options))
        return real(hidden, weight, labels, chunk_tokens, **options)

    monkeypatch.setattr(trainer, "linear_cross_entropy", spy)  # the name the trainer calls
    with one_process_model(cfg, dtype=dtype, device=device) as model:
        random_model(model, cfg)
        megatron, megatron_grads = losses_and_grads(model, batch, 0, grad_out)
        chunked, chunked_grads = losses_and_grads(model, batch, 5, grad_out)
        weight_name = output_weight_name(model, untie)
        output_weight = dict(model.named_parameters())[weight_name]
    # the output layer's fusion flag (off: no DDP here, so no main_grad to fuse into either)
    assert calls == [((12, 2, 32), output_weight.data_ptr(), 5, {"grad_accum_fusion": False})]
    # tied: the output weight is the embedding's, and so is the gradient
    assert ("embedding" in weight_name) != untie
    assert megatron.shape == chunked.shape == (2, 12) and chunked.dtype == torch.float32
    assert chunked_grads.keys() == megatron_grads.keys() and weight_name in chunked_grads
    if dtype == torch.float32:
        torch.testing.assert_close(chunked, megatron, rtol=1e-5, atol=1e-5)
        for name, grad in megatron_grads.items():
            torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)
    else:
        # bf16 logits GEMMs of 5 rows vs all rows may round differently; fp32 softmax on both
        torch.testing.assert_close(chunked, megatron.float(), rtol=1e-2, atol=1e-2)
        for name, grad in megatron_grads.items():
            assert rel_rms(chunked_grads[name], grad) < 2e-2, name


@pytest.mark.parametrize("untie", [True, False], ids=["untied", "tied"])
def test_chunked_loss_hook_matches_megatron(untie, monkeypatch):
    compare_with_megatron(untie, torch.float32, "cpu", monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("untie", [True, False], ids=["untied", "tied"])
def test_chunked_loss_hook_matches_megatron_on_gpu(untie, dtype, monkeypatch, cuda_platform):
    # on the GPU the hook runs the Triton backend; cuda_platform keeps Megatron's
    # gradient-accumulation fusion off, so both paths leave every gradient in .grad
    compare_with_megatron(untie, dtype, "cuda", monkeypatch)


def test_auto_resolution():
    auto = TrainConfig()
    assert auto.loss_chunk_tokens == "auto"
    assert auto.resolved_loss_chunk_tokens(1, "cuda") == LOSS_CHUNK_AUTO_TOKENS
    # CPU and vocab-parallel logits keep Megatron's loss
    assert auto.resolved_loss_chunk_tokens(1, "cpu") == 0
    assert auto.resolved_loss_chunk_tokens(2, "cuda") == 0
    for explicit in (0, 5):
        assert TrainConfig(loss_chunk_tokens=explicit).resolved_loss_chunk_tokens(1, "cuda") == explicit


@pytest.mark.parametrize("value, message", [("big", "expected auto or an int >= 0, got 'big'"),
                                            (-1, "must be >= 0"), (True, "matches none of")])
def test_bad_values_name_the_key(tmp_path, value, message):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"train": {"loss_chunk_tokens": value}}))
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert info.value.key == "train.loss_chunk_tokens" and str(path) in str(info.value)


def test_explicit_chunk_needs_tp1_but_auto_does_not(tmp_path):
    path = tmp_path / "run.yaml"
    for value, ok in (("auto", True), (0, True), (4096, False)):
        path.write_text(yaml.safe_dump({"train": {"loss_chunk_tokens": value}, "parallel": {"tp": 2}}))
        cfg = load_config(path)
        if ok:
            validate(cfg, 2, str(path))
        else:
            with pytest.raises(ConfigError, match="needs tp = 1"):
                validate(cfg, 2, str(path))
