"""Linear-attention gate log-decay (ops.gla_gate): reference vs an independent formula,
dispatch, the Triton kernels in the CPU interpreter and on the GPU (forward and the gate's
gradient), for GLA's ``logsigmoid(g) / 16`` and the hybrid's key gate ``logsigmoid(-k)``."""

from __future__ import annotations

import pytest
import torch

from ops.gla_gate import gate_log_decay
from tests.ops.fusion_parity import ULP, assert_close_in_ulps, forward_and_grads, interpreter_errors

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch):
    for var in ("SB_DISABLE_BACKEND_DISPATCH", "SB_OP_BACKEND_GATE_LOG_DECAY"):
        monkeypatch.delenv(var, raising=False)


def _gate(shape, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    x = 6 * torch.randn(shape, generator=gen, device=device)
    x.view(-1)[:4] = torch.tensor([40.0, -40.0, 100.0, -100.0])   # saturated gates
    return x.to(dtype), torch.randn(shape, generator=gen, device=device)


@pytest.mark.parametrize("negate", [False, True])
def test_reference_matches_independent_formula(negate: bool):
    """The op computes in fp32: fp32 accuracy (relative, saturated gates included) vs fp64 math."""
    x, g = _gate((3, 50))
    y, dx = (t.double() for t in forward_and_grads(lambda t: gate_log_decay(t, 16.0, negate), [x], g))
    x, g = x.double(), g.double()
    s = -x if negate else x
    # log sigmoid(s) = -log(1 + exp(-s)), written per sign so neither branch overflows
    want = torch.where(s >= 0, -torch.log1p(torch.exp(-s)), s - torch.log1p(torch.exp(s))) / 16
    sig_neg = torch.where(s >= 0, torch.exp(-s) / (1 + torch.exp(-s)), 1 / (1 + torch.exp(s)))
    # atol: at a gate of 100 both the value and the slope are fp32 subnormals (~1e-45)
    close = dict(rtol=2e-6, atol=1e-40)
    torch.testing.assert_close(y, want, **close)
    torch.testing.assert_close(dx, (-1 if negate else 1) * g * sig_neg / 16, **close)


def test_output_is_fp32_and_gradient_keeps_the_gate_dtype():
    x, g = _gate((4, 8), torch.bfloat16)
    y, dx = forward_and_grads(lambda t: gate_log_decay(t, 16.0), [x], g)
    assert y.dtype == torch.float32 and dx.dtype == torch.bfloat16


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="normalizer"):
        gate_log_decay(torch.zeros(2), 0.0)
    with pytest.raises(TypeError, match="floating-point"):
        gate_log_decay(torch.zeros(2, dtype=torch.int32))


def test_dispatch_uses_reference_off_gpu():
    registry = gate_log_decay.registry
    assert [b.name for b in registry.backends] == ["triton", "torch"]
    assert registry.select(torch.zeros(2, 4), 16.0).name == "torch"


def test_triton_kernels_in_interpreter():
    for case in interpreter_errors()["gate_log_decay"]:
        # the output is fp32 in every case; the gradient is in the gate's dtype
        y_err, dx_err = case["errors"]
        assert y_err <= 1e-6, case
        assert dx_err <= (2 * ULP[torch.bfloat16] if case["half"] else 1e-6), case


GPU_SHAPES = [(7, 33), (2, 1024, 512), (8192, 4, 128)]


@pytest.mark.gpu
@pytest.mark.parametrize("negate", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_triton_matches_reference_on_gpu(shape, dtype, negate, monkeypatch: pytest.MonkeyPatch):
    x, g = _gate(shape, dtype, "cuda", seed=shape[-1])
    normalizer = 1.0 if negate else 16.0
    fn = lambda t: gate_log_decay(t, normalizer, negate)  # noqa: E731
    assert gate_log_decay.registry.select(x, normalizer, negate).name == "triton"
    fast = forward_and_grads(fn, [x], g)
    monkeypatch.setenv("SB_DISABLE_BACKEND_DISPATCH", "1")
    ref = forward_and_grads(fn, [x], g)
    # y is fp32 (exp/log implementations differ by a few ulp); dx rounds once to the gate dtype
    assert_close_in_ulps(fast[0], ref[0], 64, "y")
    assert_close_in_ulps(fast[1], ref[1], 64 if dtype == torch.float32 else 2, "dx")
