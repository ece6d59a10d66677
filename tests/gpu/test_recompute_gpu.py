"""``train.recompute`` on the GPU fast paths (fla chunk_gla, SDPA flash, Triton SwiGLU / norm /
gate): every policy gives the gradients of ``none``, and the activations a forward leaves for
backward match the plan's ``activation_bytes_per_token`` (``sbtrain/profiler/memory.py``).

In-process, one GPU, a 4-layer model at head dim 64; the window is longer than the sequence, so
the softmax layers run SDPA flash (the flex path needs torch.compile, off in the test process).
"""

from __future__ import annotations

import pytest
import torch

from sbtrain.config.schema import GLAConfig, ModelConfig, RunConfig, TrainConfig
from sbtrain.convert.session import one_process_model
from sbtrain.profiler.memory import activation_bytes_per_token
from tests.model.test_hybrid_model import random_model

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("cuda_platform")]
SEQ = 2048
POLICIES = ("none", "selective", "full")


def config(pattern: str, policy: str) -> RunConfig:
    model = ModelConfig(pattern=pattern, hidden_size=512, num_attention_heads=8,
                        num_query_groups=2, ffn_hidden_size=1024, vocab_size=256,
                        max_position_embeddings=SEQ, sliding_window=SEQ, gla=GLAConfig())
    return RunConfig(model=model, train=TrainConfig(seq_length=SEQ, micro_batch_size=1,
                                                    global_batch_size=1, recompute=policy))


def step(pattern: str, policy: str, dtype: torch.dtype):
    """(grads, bytes a forward leaves for backward beyond the logits' loss terms)."""
    cfg = config(pattern, policy)
    tokens = torch.randint(0, 256, (1, SEQ), generator=torch.Generator().manual_seed(0)).cuda()
    positions = torch.arange(SEQ, device="cuda")[None]
    with one_process_model(cfg, dtype, "cuda") as model:
        random_model(model, cfg)
        model.train()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        loss = model(tokens, positions, None, labels=tokens.roll(-1, dims=1)).float().mean()
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - before
        loss.backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters()
                 if p.grad is not None}
    return grads, held


def planned(pattern: str, policy: str, act_bytes: int) -> float:
    cfg = config(pattern, policy)
    layers = [activation_bytes_per_token(cfg.model, m, f, "none" if policy == "full" else policy,
                                         act_bytes) for m, f in cfg.model.layers]
    if policy == "full":  # layer inputs; the recomputed layer is live only during backward
        per_token = len(layers) * cfg.model.hidden_size * act_bytes
    else:
        per_token = sum(p["common"] + p["tp_split"] for p in layers)
    # the final norm's input and output; Megatron's cross-entropy: the logits and an fp32 copy
    final = 2 * cfg.model.hidden_size * act_bytes + cfg.model.vocab_size * (act_bytes + 4)
    return SEQ * (per_token + final)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_policies_agree_on_gpu(dtype):
    pattern = "L-W-H-FE"
    results = {p: step(pattern, p, dtype) for p in POLICIES}
    ref, held = results["none"]
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    for policy in ("selective", "full"):
        grads, _ = results[policy]
        for key, grad in ref.items():
            torch.testing.assert_close(grads[key], grad, **tol, msg=f"{policy} {key}")
    assert held > results["selective"][1] > results["full"][1]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("pattern", ["L-L-", "W-W-", "H-H-", "F-F-"])
def test_held_activations_match_the_plan(pattern, policy):
    _, held = step(pattern, policy, torch.bfloat16)
    plan = planned(pattern, policy, 2)
    print(f"{pattern} {policy}: measured {held / 2**20:.1f} MiB, planned {plan / 2**20:.1f} MiB")
    assert held == pytest.approx(plan, rel=0.15)

