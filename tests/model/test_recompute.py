"""``train.recompute`` none / selective / full give the same numbers, and selective really
recomputes what it claims (the GLA / parallel-hybrid mixer cores, the FFNs' SwiGLU product).

In-process (gloo world of 1, CPU, fp32): one forward + backward of the tiny 7B (``L``/``W``,
documents) and tiny 76B (``H``/``F``, MoE, sinks) models per policy, every gradient compared.
One forked rank per model (tests/parallel/rank_server.py) then trains 3 steps per policy (config stages) and compares the
logged losses and grad norms.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from ops.swiglu import SwiGLU
from sbtrain.config import load_config
from sbtrain.convert.session import one_process_model
from sbtrain.model.gla import GatedLinearAttention
from sbtrain.model.parallel_hybrid import ParallelHybridAttention
from ops.documents import segment_ids_from_tokens
from sbtrain.model.batch import batch_context
from tests.model.test_hybrid_model import random_model
from tests.parallel.harness import REPO, launch, metrics

CONFIGS = {"7b": REPO / "examples/configs/spikingbrain_7b_tiny.yaml",
           "76b": REPO / "examples/configs/spikingbrain_76b_tiny.yaml"}
# in-process: one layer of each mixer kind is enough (and quicker to build)
SHORT_PATTERNS = {"7b": "L-W-", "76b": "H-FE"}
POLICIES = ("none", "selective", "full")
SEQ = 32


def tiny(name: str, policy: str):
    cfg = load_config(CONFIGS[name], [f"train.recompute={policy}", "train.precision=fp32",
                                      f"train.seq_length={SEQ}",
                                      f"model.pattern={SHORT_PATTERNS[name]}"])
    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, dp=1, ep=1))


def grads_and_core_calls(name: str, policy: str):
    """Loss, every parameter gradient and how often the mixer cores ran, for one step."""
    cfg = tiny(name, policy)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, cfg.model.vocab_size, (2, SEQ), generator=gen)
    tokens[0, SEQ // 2] = 0  # a document boundary (token 0 is the synthetic EOD)
    segments = segment_ids_from_tokens(tokens, eod=0)
    calls = {"core": 0, "swiglu": 0}
    hooked = {GatedLinearAttention: ("core", "core"),
              ParallelHybridAttention: ("_linear_branch", "core"), SwiGLU: ("forward", "swiglu")}
    originals = {cls: getattr(cls, attr) for cls, (attr, _) in hooked.items()}

    def counting(fn, key):
        def wrapper(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return wrapper

    try:
        for cls, (attr, key) in hooked.items():
            setattr(cls, attr, counting(originals[cls], key))
        with one_process_model(cfg) as model:
            random_model(model, cfg)
            model.train()
            positions = torch.arange(SEQ).expand_as(tokens)
            # the trainer's channel: the batch context in packed_seq_params, which Megatron's
            # full recompute must hand to the rerun layer as well
            context = batch_context(SEQ, segments, None, SEQ + cfg.model.sink_tokens)
            loss = model(tokens, positions, None, labels=tokens.roll(-1, dims=1),
                         packed_seq_params=context).mean()
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    finally:
        for cls, (attr, _) in hooked.items():
            setattr(cls, attr, originals[cls])
    mixers = sum(mixer in "LHF" for mixer, _ in cfg.model.layers)
    return loss.item(), grads, calls["core"] / mixers, calls["swiglu"]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_policies_give_identical_gradients(name):
    results = {policy: grads_and_core_calls(name, policy) for policy in POLICIES}
    loss, grads, _, swiglus = results["none"]
    # none: the cores run once per layer; selective: again in backward; full: Megatron
    # reruns the whole layer (the cores inside it run un-checkpointed, twice)
    assert [results[p][2] for p in POLICIES] == [1, 2, 2]
    # the SwiGLU of every dense FFN and shared expert: selective refills the dropped product
    # before fc2's backward and reruns it for its own gradient; full reruns the layer
    wrapped = sum(ffn in "-E" for _, ffn in tiny(name, "none").model.layers)
    assert [results[p][3] for p in POLICIES] == [swiglus, swiglus + 2 * wrapped, 2 * swiglus]
    assert len(grads) > 20
    for policy in ("selective", "full"):
        other_loss, other_grads, _, _ = results[policy]
        assert other_loss == loss, (policy, other_loss, loss)
        assert other_grads.keys() == grads.keys()
        for key, grad in grads.items():
            torch.testing.assert_close(other_grads[key], grad, rtol=0, atol=0, msg=f"{policy} {key}")


# One process trains the config once per policy, as ``sbtrain train`` runs stages (a fresh
# model, optimizer and data per run; the default process group is kept between runs).
DRIVER = """
import sys
from parallel.groups import destroy_parallel_groups
from ops.swiglu import SwiGLU
from sbtrain.config import load_config
from sbtrain.train import _train

config, out = sys.argv[1:3]
for policy in sys.argv[3:]:
    cfg = load_config(config, [f"train.recompute={policy}", f"train.run_dir={out}/{policy}"])
    assert _train(cfg, config) == 0, policy
    destroy_parallel_groups(keep_default_group=True)
destroy_parallel_groups()
"""


def three_step_config(tmp: Path, name: str) -> Path:
    """The tiny config: 3 steps in fp32 in one process, nothing saved."""
    raw = yaml.safe_load(CONFIGS[name].read_text())
    raw["parallel"].update(dp=1, ep=1)
    raw["train"].update(train_iters=3, log_interval=1, precision="fp32")
    raw.pop("checkpoint", None)
    raw.pop("stages", None)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("name", list(CONFIGS))
def test_policies_train_identically(tmp_path, name):
    # auto, resolved at train start against the host's memory, picks none for a tiny model
    policies = (*POLICIES, "auto") if name == "7b" else POLICIES
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    # one forked rank of the harness (its own one-rank group on a fresh port)
    proc = launch(three_step_config(tmp_path, name), 1, [str(tmp_path), *policies],
                  timeout=600, entry=[str(driver)])
    assert proc.stdout.count("train.recompute auto -> none: cheapest policy that fits") == (
        name == "7b")
    curves = {p: metrics(tmp_path / p) for p in policies}
    assert all(len(c) == 3 for c in curves.values())
    assert len({r["loss"] for r in curves["none"]}) == 3  # it trains
    for policy in policies[1:]:
        for ref, other in zip(curves["none"], curves[policy]):
            assert other["loss"] == pytest.approx(ref["loss"], rel=1e-6, abs=1e-6), policy
            assert other["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-6), policy
