"""Adaptive-threshold spiking neuron (ops.spike): reference numbers, contract, dispatch, Triton parity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ops.spike import spike_activation, spike_counts
from ops.spike.naive import SUM_LANES, lane_count, round_counts, row_abs_sum, spike_threshold

REPO = Path(__file__).resolve().parents[2]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch):
    for var in ("SB_DISABLE_BACKEND_DISPATCH", "SB_OP_BACKEND_SPIKE_COUNTS", "SB_OP_BACKEND_SPIKE_ACTIVATION"):
        monkeypatch.delenv(var, raising=False)


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a float tensor (NaN payloads included), with -0.0 read as +0.0: the
    kernel's floor-based rounding gives +0.0 where torch.round gives -0.0 (x in (-vth/2, 0)),
    which no matmul can tell apart."""
    return (t.detach() + 0.0).contiguous().view(INT_VIEW[t.dtype])


def test_hand_computed_example():
    # mean|x| = 1.25, vth = 1.25 / 3; x / vth = [7.2, -2.4, 0, 2.4]
    x = torch.tensor([3.0, -1.0, 0.0, 1.0])
    counts, vth = spike_counts(x)
    expected_vth = torch.tensor([1.25], dtype=torch.float32) / torch.tensor([3.0])
    assert torch.equal(vth, expected_vth)
    assert counts.dtype == torch.int32 and counts.tolist() == [7, -2, 0, 2]
    assert torch.equal(spike_activation(x), expected_vth * torch.tensor([7.0, -2.0, 0.0, 2.0]))


def test_ties_round_half_to_even():
    # mean|x| = 2, k = 2 -> vth = 1 exactly, so x / vth are exact halves
    x = torch.tensor([2.5, -3.5, 0.5, 1.5, -0.5, 0.5, 4.5, -2.5])
    counts, vth = spike_counts(x, k=2.0)
    assert vth.item() == 1.0
    assert counts.tolist() == [2, -4, 0, 2, 0, 0, 4, -2]


def test_clamps():
    zero = torch.zeros(2, 8)
    counts, vth = spike_counts(zero)
    assert torch.equal(vth, torch.full((2, 1), 1e-5, dtype=torch.float32)) and not counts.any()
    assert not spike_activation(zero).any()
    tiny, _ = spike_counts(torch.full((1, 4), 1e-8))
    assert not tiny.any()
    # mean|x| = 6e4 > k * vth_max: vth = 1e4, counts = round(x / 1e4)
    counts, vth = spike_counts(torch.tensor([[6e4, -6e4, 6e4, -6e4]]))
    assert vth.item() == 1e4 and counts.tolist() == [[6, -6, 6, -6]]
    counts, vth = spike_counts(torch.tensor([4.0, 0.0]), k=1.0, vth_min=3.0, vth_max=5.0)
    assert vth.item() == 3.0 and counts.tolist() == [1, 0]


def test_outlier_is_not_clipped():
    # one spike of 1000 in 16 entries: vth = 62.5 / 3, count = N * k = 48 (the bound)
    x = torch.zeros(16)
    x[3] = 1000.0
    counts, _ = spike_counts(x)
    assert counts[3].item() == 48 and counts.abs().sum().item() == 48


def test_row_abs_sum_is_the_documented_order():
    x = torch.randn(2500, generator=torch.Generator().manual_seed(1)) * 3
    a = x.abs().numpy().astype(np.float32)
    lanes = [np.float32(0.0)] * SUM_LANES
    for c, v in enumerate(a):
        lanes[c % SUM_LANES] = np.float32(lanes[c % SUM_LANES] + v)
    while len(lanes) > 1:
        lanes = [np.float32(lanes[j] + lanes[j + 1]) for j in range(0, len(lanes), 2)]
    assert row_abs_sum(x).item() == lanes[0]


def test_short_rows_equal_the_full_lane_width():
    # the contract lets short rows use next_pow2(N) lanes: zero lanes add nothing
    x = torch.randn(64, 100, generator=torch.Generator().manual_seed(2))
    assert lane_count(100) == 128 and lane_count(16) == 16 and lane_count(5000) == SUM_LANES
    padded = torch.nn.functional.pad(x, (0, SUM_LANES - 100))
    assert torch.equal(row_abs_sum(x), row_abs_sum(padded))


def test_threshold_is_close_to_torch_mean():
    x = torch.randn(64, 3584, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(spike_threshold(x), x.abs().mean(-1, keepdim=True) / 3, rtol=1e-6, atol=0)


def test_counts_are_round_of_x_over_vth():
    x = torch.randn(8, 300, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(4))
    counts, vth = spike_counts(x, k=2.5)
    assert torch.equal(counts, round_counts(x, vth).to(torch.int32))
    assert vth.shape == (8, 1) and vth.dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes_and_shapes(dtype: torch.dtype):
    x = torch.randn(2, 3, 17, generator=torch.Generator().manual_seed(5)).to(dtype)
    counts, vth = spike_counts(x)
    y = spike_activation(x)
    assert counts.shape == x.shape and counts.dtype == torch.int32
    assert vth.shape == (2, 3, 1) and vth.dtype == torch.float32
    # values, not bits: round(-0.3) = -0.0 in y but the int count has no sign
    assert y.dtype == dtype and torch.equal(y, (vth * counts.float()).to(dtype))


def test_non_contiguous_input():
    x = torch.randn(40, 24, generator=torch.Generator().manual_seed(6))
    xt = x.t()
    assert not xt.is_contiguous()
    assert torch.equal(spike_activation(xt), spike_activation(xt.contiguous()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_straight_through_gradient(dtype: torch.dtype):
    x = torch.randn(4, 33, generator=torch.Generator().manual_seed(7)).to(dtype).requires_grad_()
    g = torch.randn(4, 33, generator=torch.Generator().manual_seed(8)).to(dtype)
    spike_activation(x).backward(g)
    assert x.grad.dtype == dtype and torch.equal(x.grad, g)


def test_counts_carry_no_autograd():
    x = torch.randn(3, 8, requires_grad=True)
    counts, vth = spike_counts(x)
    assert not counts.requires_grad and not vth.requires_grad


def test_errors():
    with pytest.raises(TypeError, match="floating"):
        spike_counts(torch.arange(4))
    with pytest.raises(ValueError, match="non-empty last dim"):
        spike_activation(torch.zeros(3, 0))
    with pytest.raises(ValueError, match="k must be"):
        spike_counts(torch.ones(4), k=0.0)
    with pytest.raises(ValueError, match="vth_min"):
        spike_counts(torch.ones(4), vth_min=2.0, vth_max=1.0)


def test_cpu_dispatch_uses_reference(monkeypatch: pytest.MonkeyPatch):
    x = torch.randn(2, 16)
    for op in (spike_counts, spike_activation):
        assert [b.name for b in op.registry.backends] == ["triton", "torch"]
        assert op.registry.select(x).name == "torch"
    monkeypatch.setenv("SB_OP_BACKEND_SPIKE_COUNTS", "triton")
    with pytest.raises(RuntimeError, match="device 'cpu'"):
        spike_counts(x)


def test_import_does_not_load_triton():
    code = "import sys, ops.spike; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# Runs the Triton kernel in the interpreter on CPU tensors (the device verifier is
# bypassed by calling the fused functions). The interpreter truncates fp32 -> bf16 where
# the GPU rounds to nearest even, so bf16 `y` is checked to 1 ulp here and exactly on GPU.
INTERPRETER_SCRIPT = r"""
import json, torch
from ops.spike import fused, naive
out = []
g = torch.Generator().manual_seed(0)
ties = (torch.randint(-6, 6, (1, 40), generator=g) + 0.5)
cases = [((3, 17), 3.0), ((33, 16), 3.0), ((2, 2500), 2.5), ((1, 1), 3.0), ((5, 1024), 3.0)]
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for shape, k in cases:
        x = (torch.randn(shape, generator=g) * 2).to(dtype)
        x.view(-1)[0] = 40.0
        counts, vth = fused.fused_spike_counts(x, k)
        rc, rv = naive.naive_spike_counts(x, k)
        y, ry = fused.fused_spike_forward(x, k), naive.naive_spike_forward(x, k)
        ulp = ((y.float() - ry.float()).abs() <= ry.float().abs() * 2**-7).all().item()
        out.append(dict(case=f"{shape}/{dtype}", vth=torch.equal(vth, rv), counts=torch.equal(counts, rc),
                        y_exact=torch.equal(y, ry), y_ulp=ulp, bf16=dtype == torch.bfloat16))
    # k = the row's mean makes vth exactly 1: every x / vth is a tie
    xt = ties.to(dtype)
    k = (naive.row_abs_sum(xt) / torch.tensor([[40.0]])).item()
    counts, vth = fused.fused_spike_counts(xt, k)
    tie_counts = torch.equal(counts, torch.round(xt.float()).int())
    out.append(dict(case=f"ties/{dtype}", vth=vth.item() == 1.0, counts=tie_counts,
                    y_exact=True, y_ulp=True, bf16=False))
print(json.dumps(out))
"""


def test_triton_kernel_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", INTERPRETER_SCRIPT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in json.loads(proc.stdout.strip().splitlines()[-1]):
        assert r["vth"] and r["counts"], r
        assert r["y_ulp"] if r["bf16"] else r["y_exact"], r


GPU_SHAPES = [(3, 17), (4, 128, 3584), (2, 18944)]


def _gpu_input(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(shape, device="cuda", generator=g) * 1.7
    # outliers make bursts of large counts, as in real activations
    x.view(-1)[:: 97] *= 30
    return x.to(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_triton_counts_match_reference(shape: tuple[int, ...], dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch):
    x = _gpu_input(shape, dtype, seed=len(shape) * 100 + shape[-1])
    assert spike_counts.registry.select(x).name == "triton"
    counts, vth = spike_counts(x)
    monkeypatch.setenv("SB_DISABLE_BACKEND_DISPATCH", "1")
    ref_counts, ref_vth = spike_counts(x)
    assert torch.equal(vth, ref_vth)
    assert torch.equal(counts, ref_counts)
    # the count rule on its own, independent of how vth was summed
    assert torch.equal(counts, round_counts(x, vth).to(torch.int32))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_triton_activation_and_grad_match_reference(shape: tuple[int, ...], dtype: torch.dtype,
                                                    monkeypatch: pytest.MonkeyPatch):
    x = _gpu_input(shape, dtype, seed=7 + shape[-1])
    g = torch.randn_like(x)
    xt = x.clone().requires_grad_()
    y = spike_activation(xt)
    y.backward(g)
    monkeypatch.setenv("SB_DISABLE_BACKEND_DISPATCH", "1")
    xr = x.clone().requires_grad_()
    ry = spike_activation(xr)
    ry.backward(g)
    assert y.dtype == dtype and torch.equal(bits(y), bits(ry))
    assert torch.equal(xt.grad, xr.grad) and torch.equal(xt.grad, g)


@pytest.mark.gpu
def test_triton_non_contiguous_and_ties():
    x = _gpu_input((64, 3584), torch.bfloat16, seed=3).t()
    counts, vth = spike_counts(x)
    ref_counts, ref_vth = spike_counts(x.cpu())
    assert torch.equal(counts.cpu(), ref_counts) and torch.equal(vth.cpu(), ref_vth)
    ties = (torch.randint(-6, 6, (1, 4096), device="cuda") + 0.5).float()
    k = (row_abs_sum(ties) / 4096).item()
    counts, vth = spike_counts(ties, k)
    assert vth.item() == 1.0 and torch.equal(counts, torch.round(ties).int())


@pytest.mark.gpu
def test_reference_is_device_independent(monkeypatch: pytest.MonkeyPatch):
    # the reference divides by tensors: a CUDA division by a Python scalar would multiply by its reciprocal
    monkeypatch.setenv("SB_DISABLE_BACKEND_DISPATCH", "1")
    x = _gpu_input((256, 3584), torch.float32, seed=11)
    counts, vth = spike_counts(x, k=2.7)
    ref_counts, ref_vth = spike_counts(x.cpu(), k=2.7)
    assert torch.equal(vth.cpu(), ref_vth) and torch.equal(counts.cpu(), ref_counts)
