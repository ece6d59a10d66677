"""GLA op: the chunked reference against the plain recurrence (outputs, final states and every
gradient), packed sequences, decay extremes, dispatch, and (GPU-marked) fla's kernel.

Errors are relative RMS, ``rms(got - ref) / rms(ref)``, with per-tensor tolerances:
    1e-5  fp32 chunked vs fp32 recurrence (same math, different summation order);
    1e-2  bf16/fp16 inputs vs the fp32 recurrence on the same (upcast) values: the references
          compute in fp32, so only the final rounding to 8 (bf16) or 11 (fp16) mantissa bits shows;
    GPU, fla vs fp32 recurrence: fp32 5e-3 (fla's fp32 tl.dot runs in TF32, ~fp16 mantissa),
          bf16 2e-2 (dg 3e-2: it is a reverse cumulative sum of differences, which cancels).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ops.gla import TORCH_CHUNK_SIZE, gla, gla_chunked_reference, gla_recurrent_reference
from ops.gla.fla_backend import BACKEND_NAME, fla_verifier

REPO = Path(__file__).resolve().parents[2]
TOL_FP32 = 1e-5
TOL_HALF = 1e-2
GRAD_NAMES = ("dq", "dk", "dv", "dg", "dh0")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch):
    for var in ("SB_DISABLE_BACKEND_DISPATCH", "SB_OP_BACKEND_GLA"):
        monkeypatch.delenv(var, raising=False)


def rel_rms(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    err = (got - ref).pow(2).mean().sqrt()
    base = ref.pow(2).mean().sqrt()
    return (err / base).item() if base > 0 else err.item()


def assert_close(name: str, got: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = rel_rms(got, ref)
    assert err <= tol, f"{name}: relative RMS error {err:.2e} > {tol:.0e}"


def make_inputs(B: int, T: int, H: int, Hkv: int, K: int, V: int, *, dtype=torch.float32, device="cpu",
                n_states: int | None = None, h0: bool = True, gate_div: float = 1.0, seed: int = 0) -> dict:
    """Random GLA inputs; gates are logsigmoid(randn) / gate_div (SpikingBrain uses /16)."""
    gen = torch.Generator().manual_seed(seed)
    N = B if n_states is None else n_states

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    g = (F.logsigmoid(torch.randn(B, T, Hkv, K, generator=gen)) / gate_div).to(device=device, dtype=dtype)
    return {
        "q": randn(B, T, H, K), "k": randn(B, T, Hkv, K), "v": randn(B, T, Hkv, V), "g": g,
        "initial_state": torch.randn(N, Hkv, K, V, generator=gen).to(device) if h0 else None,
        "do": torch.randn(B, T, H, V, generator=gen).to(device),
        "dht": torch.randn(N, Hkv, K, V, generator=gen).to(device),
    }


def fwd_bwd(fn, inputs: dict, *, upcast: bool = False, **kwargs) -> dict:
    """Run ``fn`` on fresh leaves (fp32 copies if ``upcast``), backprop a random loss, return all."""
    names = ("q", "k", "v", "g", "initial_state")
    leaves = {}
    for name in names:
        x = inputs[name]
        if x is not None:
            leaves[name] = (x.float() if upcast else x).detach().clone().requires_grad_()
    o, ht = fn(leaves["q"], leaves["k"], leaves["v"], leaves["g"], initial_state=leaves.get("initial_state"),
               output_final_state=True, **kwargs)
    ((o.float() * inputs["do"]).sum() + (ht * inputs["dht"]).sum()).backward()
    out = {"o": o, "ht": ht}
    out.update({"d" + ("h0" if n == "initial_state" else n): x.grad for n, x in leaves.items()})
    return out


def assert_all_close(got: dict, ref: dict, tol: float, tols: dict | None = None, skip: tuple = ()) -> None:
    for name in ("o", "ht", *GRAD_NAMES):
        if name in ref and name not in skip:
            assert_close(name, got[name], ref[name], (tols or {}).get(name, tol))


CPU_CASES = {
    # B, T, H, Hkv, K, V, chunk, h0
    "T37-C16-gqa3-h0": (2, 37, 6, 2, 8, 12, 16, True),
    "T37-C16-gqa3-zero-h0": (2, 37, 6, 2, 8, 12, 16, False),
    "T32-C16-exact-chunks": (1, 32, 4, 2, 8, 12, 16, True),
    "T1-C16": (2, 1, 6, 2, 8, 12, 16, True),
    "T37-C64-mha": (1, 37, 3, 3, 12, 8, 64, True),
    "T23-C1-mqa": (1, 23, 4, 1, 8, 12, 1, True),
}


@pytest.mark.parametrize("case", CPU_CASES.values(), ids=CPU_CASES.keys())
def test_chunked_matches_recurrent_fp32(case):
    B, T, H, Hkv, K, V, chunk, h0 = case
    inputs = make_inputs(B, T, H, Hkv, K, V, h0=h0)
    ref = fwd_bwd(gla_recurrent_reference, inputs)
    got = fwd_bwd(gla_chunked_reference, inputs, chunk_size=chunk)
    assert got["o"].dtype == torch.float32 and got["ht"].dtype == torch.float32
    assert_all_close(got, ref, TOL_FP32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_chunked_half_inputs_match_fp32_truth(dtype):
    inputs = make_inputs(2, 37, 6, 2, 8, 12, dtype=dtype)
    ref = fwd_bwd(gla_recurrent_reference, inputs, upcast=True)
    got = fwd_bwd(gla_chunked_reference, inputs, chunk_size=16)
    assert got["o"].dtype == dtype and got["ht"].dtype == torch.float32
    assert got["dq"].dtype == dtype and got["dh0"].dtype == torch.float32
    assert_all_close(got, ref, TOL_HALF)


@pytest.mark.parametrize("reference", [gla_recurrent_reference, gla_chunked_reference],
                         ids=["recurrent", "chunked"])
def test_packed_sequences_match_separate_runs(reference):
    bounds = [0, 5, 29, 40]
    inputs = make_inputs(1, bounds[-1], 6, 2, 8, 12, n_states=3)
    cu = torch.tensor(bounds, dtype=torch.long)
    h0 = inputs["initial_state"]
    o, ht = reference(inputs["q"], inputs["k"], inputs["v"], inputs["g"], initial_state=h0,
                      output_final_state=True, cu_seqlens=cu)
    for n, (start, end) in enumerate(zip(bounds, bounds[1:])):
        span = slice(start, end)
        o_n, ht_n = reference(inputs["q"][:, span], inputs["k"][:, span], inputs["v"][:, span],
                              inputs["g"][:, span], initial_state=h0[n:n + 1], output_final_state=True)
        assert_close(f"o[{n}]", o[:, span], o_n, TOL_FP32)
        assert_close(f"ht[{n}]", ht[n:n + 1], ht_n, TOL_FP32)


def test_packed_chunked_matches_packed_recurrent_with_grads():
    inputs = make_inputs(1, 40, 6, 2, 8, 12, n_states=3)
    cu = torch.tensor([0, 5, 29, 40], dtype=torch.long)
    ref = fwd_bwd(gla_recurrent_reference, inputs, cu_seqlens=cu)
    got = fwd_bwd(gla_chunked_reference, inputs, cu_seqlens=cu, chunk_size=16)
    assert_all_close(got, ref, TOL_FP32)


@pytest.mark.parametrize("reference", [gla_recurrent_reference, gla_chunked_reference],
                         ids=["recurrent", "chunked"])
def test_empty_packed_sequence_keeps_its_initial_state(reference):
    inputs = make_inputs(1, 10, 4, 2, 8, 8, n_states=3)
    cu = torch.tensor([0, 4, 4, 10])
    o, ht = reference(inputs["q"], inputs["k"], inputs["v"], inputs["g"],
                      initial_state=inputs["initial_state"], output_final_state=True, cu_seqlens=cu)
    assert o.shape == (1, 10, 4, 8)
    torch.testing.assert_close(ht[1], inputs["initial_state"][1], rtol=0, atol=0)


def _expected_without_memory(inputs: dict) -> torch.Tensor:
    """Output when the decay wipes the state every step: o_t = scale * q_t k_t^T v_t."""
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    G = q.shape[2] // k.shape[2]
    kv = k.repeat_interleave(G, dim=2).unsqueeze(-1) * v.repeat_interleave(G, dim=2).unsqueeze(-2)
    return q.shape[-1] ** -0.5 * torch.einsum("bthk,bthkv->bthv", q, kv)


def _expected_without_decay(inputs: dict) -> torch.Tensor:
    """Output with g = 0: o_t = scale * q_t (S_0 + sum_{j <= t} k_j^T v_j)."""
    q, k, v, h0 = inputs["q"], inputs["k"], inputs["v"], inputs["initial_state"]
    G = q.shape[2] // k.shape[2]
    states = h0.unsqueeze(1) + (k.unsqueeze(-1) * v.unsqueeze(-2)).cumsum(dim=1)
    return q.shape[-1] ** -0.5 * torch.einsum("bthk,bthkv->bthv", q, states.repeat_interleave(G, dim=2))


@pytest.mark.parametrize(("gate", "expected", "tol"), [
    # exp(-20) ~ 2e-9: earlier tokens leave a trace far below fp32 resolution of the result
    (-20.0, _expected_without_memory, 1e-6),
    # exp(-1e4) underflows to exactly 0 in every form (chunk cumsums reach -1.6e5)
    (-1e4, _expected_without_memory, 1e-6),
    (0.0, _expected_without_decay, TOL_FP32),
], ids=["g=-20", "g=-1e4", "g=0"])
def test_decay_extremes_stay_finite_and_exact(gate, expected, tol):
    inputs = make_inputs(2, 50, 4, 2, 8, 12)
    inputs["g"] = torch.full_like(inputs["g"], gate)
    if gate != 0.0:
        inputs["initial_state"] = None
    ref = fwd_bwd(gla_recurrent_reference, inputs)
    got = fwd_bwd(gla_chunked_reference, inputs, chunk_size=16)
    for name, value in got.items():
        assert torch.isfinite(value).all(), f"{name} not finite for g={gate}"
    assert_close("o vs closed form", got["o"], expected(inputs), tol)
    assert_all_close(got, ref, TOL_FP32, skip=("dg",))
    # the chunked dg is a reverse cumulative sum of O(1) terms; with g = -20 the true dg is ~1e-9,
    # so fp32 leaves only an absolute error at the gradient scale (rms of dk), not a relative one
    dg_err = (got["dg"] - ref["dg"]).pow(2).mean().sqrt() / ref["dk"].pow(2).mean().sqrt()
    assert dg_err <= 1e-6, f"dg: error {dg_err:.2e} of the gradient scale"


def test_strong_decay_dg_is_exact_in_fp64():
    inputs = {n: None if x is None else x.double() for n, x in make_inputs(1, 50, 4, 2, 8, 12).items()}
    inputs["g"] = torch.full_like(inputs["g"], -20.0)
    ref = fwd_bwd(gla_recurrent_reference, inputs)
    got = fwd_bwd(gla_chunked_reference, inputs, chunk_size=16)
    assert got["o"].dtype == torch.float64
    assert_close("dg", got["dg"], ref["dg"], 1e-6)


def test_mixed_strong_and_no_decay_channels():
    inputs = make_inputs(1, 50, 4, 2, 8, 12)
    g = torch.zeros_like(inputs["g"])
    g[..., ::2] = -20.0
    inputs["g"] = g
    ref = fwd_bwd(gla_recurrent_reference, inputs)
    got = fwd_bwd(gla_chunked_reference, inputs, chunk_size=16)
    assert_all_close(got, ref, TOL_FP32)


def test_dispatch_on_cpu_selects_torch_reference():
    inputs = make_inputs(1, 20, 4, 2, 16, 16)
    args = (inputs["q"], inputs["k"], inputs["v"], inputs["g"])
    assert gla.registry.select(*args).name == "torch"
    assert gla.registry.select(*args, initial_state=inputs["initial_state"]).name == "torch"
    assert [(b.name, b.kind) for b in gla.registry.backends] == [(BACKEND_NAME, "vendor"), ("gqa_chunk", "triton"),
                                                                   ("torch", "torch")]
    ok, reason = fla_verifier(*args)
    assert not ok and "GPU" in reason
    o, _ = gla(*args)
    torch.testing.assert_close(o, gla_chunked_reference(*args, chunk_size=TORCH_CHUNK_SIZE)[0], rtol=0, atol=0)


@pytest.mark.parametrize(("change", "match"), [
    ({"k": torch.zeros(1, 8, 4, 8), "v": torch.zeros(1, 8, 4, 8), "g": torch.zeros(1, 8, 4, 8)},
     "multiple of kv heads"),
    ({"g": torch.zeros(1, 8, 2, 4)}, "g must have"),
    ({"v": torch.zeros(1, 7, 2, 8)}, "v must be"),
    ({"initial_state": torch.zeros(2, 2, 8, 8)}, "initial_state"),
    ({"cu_seqlens": torch.tensor([0, 3, 9])}, "cu_seqlens must rise"),
    ({"cu_seqlens": torch.tensor([0, 3, 8]), "q": torch.zeros(2, 8, 6, 8), "k": torch.zeros(2, 8, 2, 8),
      "v": torch.zeros(2, 8, 2, 8), "g": torch.zeros(2, 8, 2, 8)}, "batch size must be 1"),
], ids=["heads", "g-shape", "v-shape", "h0-shape", "cu-end", "cu-batch"])
def test_invalid_inputs_raise(change, match):
    args = {"q": torch.zeros(1, 8, 6, 8), "k": torch.zeros(1, 8, 2, 8), "v": torch.zeros(1, 8, 2, 8),
            "g": torch.zeros(1, 8, 2, 8), "initial_state": None, "cu_seqlens": None}
    args.update(change)
    with pytest.raises(ValueError, match=match):
        gla(**args)


def test_import_loads_neither_fla_nor_triton():
    code = ("import sys, ops.gla; bad = sorted(m for m in sys.modules if m.split('.')[0] in ('fla', 'triton'));"
            "assert not bad, bad")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, timeout=120)


GPU_CASES = {
    # B, T, H, Hkv, K, V, cu_seqlens, h0, gate_div
    "T100-gqa4-K64-V128-h0": (2, 100, 8, 2, 64, 128, None, True, 1.0),
    "T1000-gqa3-K64-zero-h0-slow-decay": (2, 1000, 6, 2, 64, 64, None, False, 16.0),
    "T63-mqa-K100-V60": (1, 63, 4, 1, 100, 60, None, True, 1.0),
    "varlen-T1000-gqa4-h0": (1, 1000, 8, 2, 64, 64, [0, 1, 100, 357, 1000], True, 16.0),
    "varlen-T300-mha-h0": (1, 300, 4, 4, 128, 128, [0, 15, 16, 300], True, 1.0),
}
GPU_TOLS = {torch.float32: (5e-3, {"dg": 1e-2}), torch.bfloat16: (2e-2, {"dg": 3e-2})}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", GPU_CASES.values(), ids=GPU_CASES.keys())
def test_fla_matches_recurrent(case, dtype, monkeypatch):
    # gqa_chunk (test_gla_gqa.py) serves grouped calls when forced: pin fla's kernel here
    monkeypatch.setenv("SB_OP_BACKEND_GLA", BACKEND_NAME)
    B, T, H, Hkv, K, V, bounds, h0, gate_div = case
    cu = None if bounds is None else torch.tensor(bounds, dtype=torch.long, device="cuda")
    n_states = None if bounds is None else len(bounds) - 1
    inputs = make_inputs(B, T, H, Hkv, K, V, dtype=dtype, device="cuda", n_states=n_states, h0=h0,
                         gate_div=gate_div)
    args = (inputs["q"], inputs["k"], inputs["v"], inputs["g"])
    assert gla.registry.select(*args, initial_state=inputs["initial_state"], cu_seqlens=cu).name == BACKEND_NAME
    ref = fwd_bwd(gla_recurrent_reference, inputs, upcast=True, cu_seqlens=cu)
    got = fwd_bwd(gla, inputs, cu_seqlens=cu)
    assert got["o"].dtype == dtype and got["ht"].dtype == torch.float32
    assert got["ht"].shape == (n_states or B, Hkv, K, V)
    tol, tols = GPU_TOLS[dtype]
    assert_all_close(got, ref, tol, tols)


@pytest.mark.gpu
def test_fla_bf16_inputs_with_fp32_gate(monkeypatch):
    # the model layer computes the log decay in fp32 and q, k, v in bf16
    monkeypatch.setenv("SB_OP_BACKEND_GLA", BACKEND_NAME)
    inputs = make_inputs(1, 300, 8, 2, 64, 64, dtype=torch.bfloat16, device="cuda", n_states=3, gate_div=16.0)
    inputs["g"] = inputs["g"].float()
    cu = torch.tensor([0, 17, 128, 300], device="cuda")
    assert gla.registry.select(inputs["q"], inputs["k"], inputs["v"], inputs["g"], cu_seqlens=cu).name == BACKEND_NAME
    ref = fwd_bwd(gla_recurrent_reference, inputs, upcast=True, cu_seqlens=cu)
    got = fwd_bwd(gla, inputs, cu_seqlens=cu)
    assert got["dg"].dtype == torch.float32
    tol, tols = GPU_TOLS[torch.bfloat16]
    assert_all_close(got, ref, tol, tols)


@pytest.mark.gpu
def test_fla_without_final_state_returns_none():
    inputs = make_inputs(2, 70, 4, 2, 32, 32, dtype=torch.bfloat16, device="cuda", h0=False)
    o, ht = gla(inputs["q"], inputs["k"], inputs["v"], inputs["g"])
    ref, _ = gla_recurrent_reference(*(inputs[n].float() for n in ("q", "k", "v", "g")))
    assert ht is None
    assert_close("o", o, ref, GPU_TOLS[torch.bfloat16][0])


@pytest.mark.gpu
@pytest.mark.parametrize(("change", "reason"), [
    ({"K": 8}, "below fla's minimum"),
    ({"dtype": torch.float64}, "dtype"),
], ids=["small-head", "fp64"])
def test_fla_verifier_falls_back_to_reference(change, reason):
    shape = {"B": 1, "T": 40, "H": 4, "Hkv": 2, "K": 32, "V": 32}
    change = dict(change)
    dtype = change.pop("dtype", torch.bfloat16)
    shape.update(change)
    inputs = make_inputs(*shape.values(), dtype=dtype, device="cuda")
    args = (inputs["q"], inputs["k"], inputs["v"], inputs["g"])
    ok, why = fla_verifier(*args)
    assert not ok and reason in why
    assert gla.registry.select(*args).name == "torch"


@pytest.mark.gpu
def test_chunked_reference_on_gpu_matches_recurrent():
    inputs = make_inputs(1, 100, 6, 2, 32, 48, device="cuda")
    ref = fwd_bwd(gla_recurrent_reference, inputs)
    got = fwd_bwd(gla_chunked_reference, inputs)
    # cuBLAS may use TF32 for fp32 matmuls if enabled globally; 1e-5 holds with the default (off)
    assert_all_close(got, ref, 1e-4)


def test_initial_state_output_is_what_an_initial_state_adds():
    """gla(S0) == gla(0) + initial_state_output(S0), per row and, with segment ids, per document."""
    from ops.gla import initial_state_output

    gen = torch.Generator().manual_seed(7)
    B, T, H, Hkv, K, V = 2, 21, 4, 2, 8, 6
    q, k, v = (torch.randn(B, T, h, d, generator=gen, dtype=torch.float64)
               for h, d in ((H, K), (Hkv, K), (Hkv, V)))
    g = F.logsigmoid(torch.randn(B, T, Hkv, K, generator=gen, dtype=torch.float64))
    s0 = torch.randn(B, Hkv, K, V, generator=gen, dtype=torch.float64)
    with_state, _ = gla_recurrent_reference(q, k, v, g, 0.5, initial_state=s0)
    without, _ = gla_recurrent_reference(q, k, v, g, 0.5)
    term = initial_state_output(q, g, s0, 0.5)
    torch.testing.assert_close(without + term, with_state, rtol=1e-10, atol=1e-10)
    # documents [0, 7), [7, 15), [15, 21) in row 0 and [0, 4), [4, 21) in row 1, each from s0
    segments = torch.zeros(B, T, dtype=torch.long)
    segments[0, 7:], segments[0, 15:], segments[1, 4:] = 1, 2, 1
    cu = torch.tensor([0, 7, 15, 21, 25, 42])
    flat = [t.reshape(1, B * T, *t.shape[2:]) for t in (q, k, v, g)]
    per_doc = s0[torch.tensor([0, 0, 0, 1, 1])]
    docs, _ = gla_recurrent_reference(*flat, 0.5, initial_state=per_doc, cu_seqlens=cu)
    docs0, _ = gla_recurrent_reference(*flat, 0.5, cu_seqlens=cu)
    term = initial_state_output(q, g, s0, 0.5, segments).reshape(1, B * T, H, V)
    torch.testing.assert_close(docs0 + term, docs, rtol=1e-10, atol=1e-10)
