"""GLA's ``gqa_chunk`` backend (k, v, g kept on their kv heads): the math it relies on, its
kernels in Triton's CPU interpreter, dispatch, and (GPU-marked) the compiled kernels against the
fp32 recurrence and against fla's ``chunk_gla`` on expanded inputs, forward and every gradient.

Tolerances: relative RMS as ``test_gla.py`` (GPU: fp32 5e-3 as fla's TF32 dots, bf16 2e-2, dg
looser); the interpreter runs the kernels in fp32 without TF32, so 1e-4 of the largest value.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ops.gla import gla, gla_chunked_reference, gla_recurrent_reference
from ops.gla import gqa as gqa_backend
from ops.gla.fla_backend import BACKEND_NAME as FLA_NAME
from tests.ops.test_gla import GPU_TOLS, assert_all_close, fwd_bwd, make_inputs

REPO = Path(__file__).resolve().parents[2]
GQA_NAME = gqa_backend.BACKEND_NAME


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch):
    for var in ("SB_DISABLE_BACKEND_DISPATCH", "SB_OP_BACKEND_GLA"):
        monkeypatch.delenv(var, raising=False)


def expanded(inputs: dict, group: int) -> dict:
    """k, v, g (and the initial state and its upstream gradient) repeated to every query head."""
    out = dict(inputs)
    for name in ("k", "v", "g"):
        out[name] = inputs[name].repeat_interleave(group, dim=2)
    for name in ("initial_state", "dht"):
        if inputs[name] is not None:
            out[name] = inputs[name].repeat_interleave(group, dim=1)
    return out


def grouped(result: dict, group: int) -> dict:
    """Results on expanded inputs, reduced to the kv heads: kv-side gradients summed over each
    group (the chain rule of the expansion), the final state of the group's first head."""
    out = dict(result)
    for name in ("dk", "dv", "dg"):
        B, T, H, D = result[name].shape
        out[name] = result[name].reshape(B, T, H // group, group, D).sum(3)
    N, H, K, V = result["ht"].shape
    out["ht"] = result["ht"][:, ::group]
    if result.get("dh0") is not None:
        out["dh0"] = result["dh0"].reshape(N, H // group, group, K, V).sum(2)
    return out


@pytest.mark.parametrize("bounds", [None, [0, 5, 29, 40]], ids=["rows", "documents"])
def test_gqa_equals_expanded_heads_with_group_summed_grads(bounds):
    """What the backend computes without expanding: GLA on GQA inputs == GLA on inputs expanded to
    every query head, with k/v/g/h0 gradients summed over each group and the state shared by it."""
    group, n_states = 3, (None if bounds is None else len(bounds) - 1)
    B = 2 if bounds is None else 1
    inputs = make_inputs(B, 40, 6, 2, 8, 12, n_states=n_states, gate_div=4.0)
    cu = None if bounds is None else torch.tensor(bounds)
    ref = fwd_bwd(gla_chunked_reference, inputs, cu_seqlens=cu, chunk_size=16)
    wide = expanded(inputs, group)
    # the expanded final state's gradient is split over the group's identical heads
    wide["dht"] = wide["dht"] / group
    got = grouped(fwd_bwd(gla_chunked_reference, wide, cu_seqlens=cu, chunk_size=16), group)
    assert_all_close(got, ref, 1e-5)


def test_backend_registered_opt_in_below_fla_and_cpu_keeps_torch():
    backends = {b.name: b for b in gla.registry.backends}
    assert GQA_NAME in backends and FLA_NAME in backends
    # opt-in (SB_OP_BACKEND_GLA=gqa_chunk) until measured on a GPU: see ops/gla/gqa.py
    assert backends[GQA_NAME].priority < backends[FLA_NAME].priority
    assert backends[GQA_NAME].platforms is None  # Triton: every GPU platform, like the other Triton ops
    inputs = make_inputs(1, 16, 4, 2, 16, 16)
    args = (inputs["q"], inputs["k"], inputs["v"], inputs["g"])
    ok, reason = gqa_backend.gqa_verifier(*args)
    assert not ok and reason
    assert gla.registry.select(*args).name == "torch"


def _interpreter_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("triton", "fla"))


@pytest.mark.skipif(not _interpreter_available(), reason="needs triton and fla-core importable")
def test_kernels_in_triton_interpreter_match_recurrence():
    """The kernels themselves (fla's state kernels + ours), executed by Triton's CPU interpreter:
    rows and documents, initial state, final state, every gradient."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-m", "tests.ops.gla_gqa_interpret"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for case, errs in results.items():
        assert set(errs) >= {"o", "ht", "dq", "dk", "dv", "dg"}, case
        worst = max(errs, key=errs.get)
        assert errs[worst] < 1e-4, f"{case}: {worst} error {errs[worst]:.2e}"


GPU_CASES = {
    # B, T, H, Hkv, K, V, cu_seqlens, h0, gate_div
    "T100-gqa4-K64-V128-h0": (2, 100, 8, 2, 64, 128, None, True, 1.0),
    "T1000-gqa7-K128-slow-decay": (1, 1000, 7, 1, 128, 128, None, False, 16.0),
    "T63-gqa4-K100-V60-h0": (1, 63, 4, 1, 100, 60, None, True, 1.0),
    "varlen-T1000-gqa4-h0": (1, 1000, 8, 2, 64, 64, [0, 1, 100, 357, 1000], True, 16.0),
    "varlen-T300-gqa2-K128-h0": (1, 300, 4, 2, 128, 128, [0, 15, 16, 300], True, 1.0),
}


def _gpu_inputs(case, dtype):
    B, T, H, Hkv, K, V, bounds, h0, gate_div = case
    cu = None if bounds is None else torch.tensor(bounds, dtype=torch.long, device="cuda")
    n_states = None if bounds is None else len(bounds) - 1
    inputs = make_inputs(B, T, H, Hkv, K, V, dtype=dtype, device="cuda", n_states=n_states, h0=h0,
                         gate_div=gate_div)
    return inputs, cu


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", GPU_CASES.values(), ids=GPU_CASES.keys())
def test_gqa_matches_recurrent(case, dtype, monkeypatch):
    monkeypatch.setenv("SB_OP_BACKEND_GLA", GQA_NAME)
    inputs, cu = _gpu_inputs(case, dtype)
    args = (inputs["q"], inputs["k"], inputs["v"], inputs["g"])
    assert gla.registry.select(*args, initial_state=inputs["initial_state"], cu_seqlens=cu).name == GQA_NAME
    ref = fwd_bwd(gla_recurrent_reference, inputs, upcast=True, cu_seqlens=cu)
    got = fwd_bwd(gla, inputs, cu_seqlens=cu)
    assert got["o"].dtype == dtype and got["ht"].dtype == torch.float32
    assert got["dk"].shape == inputs["k"].shape and got["dg"].dtype == inputs["g"].dtype
    tol, tols = GPU_TOLS[dtype]
    assert_all_close(got, ref, tol, tols)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gqa_agrees_with_fla_on_expanded_inputs(dtype, monkeypatch):
    """Same kernel math as fla's chunk_gla: the two agree far more closely than either with fp32."""
    inputs, cu = _gpu_inputs(GPU_CASES["varlen-T1000-gqa4-h0"], dtype)
    monkeypatch.setenv("SB_OP_BACKEND_GLA", GQA_NAME)
    got = fwd_bwd(gla, inputs, cu_seqlens=cu)
    monkeypatch.setenv("SB_OP_BACKEND_GLA", FLA_NAME)
    fla = fwd_bwd(gla, inputs, cu_seqlens=cu)
    assert_all_close(got, fla, 1e-3 if dtype == torch.float32 else 1e-2)


@pytest.mark.gpu
def test_gqa_bf16_inputs_with_fp32_gate_and_no_state(monkeypatch):
    monkeypatch.setenv("SB_OP_BACKEND_GLA", GQA_NAME)
    # the model layer computes the log decay in fp32 and q, k, v in bf16, without states
    inputs = make_inputs(1, 300, 28, 4, 128, 128, dtype=torch.bfloat16, device="cuda", h0=False, gate_div=16.0)
    inputs["g"] = inputs["g"].float()
    cu = torch.tensor([0, 17, 128, 300], device="cuda")
    q, k, v, g = (inputs[n] for n in ("q", "k", "v", "g"))
    assert gla.registry.select(q, k, v, g, cu_seqlens=cu).name == GQA_NAME
    o, ht = gla(q, k, v, g, cu_seqlens=cu)
    assert ht is None
    ref = fwd_bwd(gla_recurrent_reference, inputs, upcast=True, cu_seqlens=cu)
    got = fwd_bwd(gla, inputs, cu_seqlens=cu)
    assert got["dg"].dtype == torch.float32
    tol, tols = GPU_TOLS[torch.bfloat16]
    assert_all_close(got, ref, tol, tols)


@pytest.mark.gpu
@pytest.mark.parametrize(("shape", "reason", "expected"), [
    ({"H": 4, "Hkv": 4}, "no GQA", FLA_NAME),
    ({"K": 320, "V": 64}, "above 256", FLA_NAME),
    ({"K": 8}, "below fla's minimum", "torch"),
], ids=["mha", "big-head", "small-head"])
def test_gqa_verifier_declines(shape, reason, expected):
    dims = {"B": 1, "T": 40, "H": 4, "Hkv": 2, "K": 32, "V": 32}
    dims.update(shape)
    inputs = make_inputs(*dims.values(), dtype=torch.bfloat16, device="cuda")
    args = (inputs["q"], inputs["k"], inputs["v"], inputs["g"])
    ok, why = gqa_backend.gqa_verifier(*args)
    assert not ok and reason in why
    assert gla.registry.select(*args).name == expected
