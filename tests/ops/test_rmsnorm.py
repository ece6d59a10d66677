"""fp32 per-head RMSNorm (ops.rmsnorm): reference vs an independent formula, dispatch, the
Triton kernels in the CPU interpreter and on the GPU (forward, dx and dw), and the check that
torch's own RMSNorm (the model's layer norms) is a fused kernel on the GPU."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ops.rmsnorm import head_rms_norm
from tests.ops.fusion_parity import ULP, assert_close_in_ulps, forward_and_grads, interpreter_errors

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = 1e-6


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch):
    for var in ("SB_DISABLE_BACKEND_DISPATCH", "SB_OP_BACKEND_HEAD_RMS_NORM"):
        monkeypatch.delenv(var, raising=False)


def _inputs(shape, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    x = 2 * torch.randn(shape, generator=gen, device=device)
    w = 1 + 0.3 * torch.randn(shape[-1], generator=gen, device=device)
    g = torch.randn(shape, generator=gen, device=device)
    return x.to(dtype), w.to(dtype), g.to(dtype)


def test_reference_matches_independent_formula():
    """The op computes in fp32 (whatever the input dtype): fp32 accuracy against fp64 math."""
    x, w, g = _inputs((4, 3, 2, 16))
    y, dx, dw = (t.double() for t in forward_and_grads(lambda a, b: head_rms_norm(a, b, EPS), [x, w], g))
    x, w, g = x.double(), w.double(), g.double()
    r = 1 / torch.sqrt((x * x).mean(-1, keepdim=True) + EPS)
    xh = x * r
    dxh = g * w
    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y, xh * w, **close)
    torch.testing.assert_close(dx, r * (dxh - xh * (dxh * xh).mean(-1, keepdim=True)), **close)
    torch.testing.assert_close(dw, (g * xh).sum((0, 1, 2)), **close)


def test_reference_computes_in_fp32_and_returns_input_dtype():
    x, w, _ = _inputs((3, 8), torch.bfloat16)
    want = torch.nn.functional.rms_norm(x.float(), (8,), w.float(), EPS).to(torch.bfloat16)
    got = head_rms_norm(x, w, EPS)
    assert got.dtype == torch.bfloat16
    assert_close_in_ulps(got, want, 1, "y")


def test_weight_shape_is_checked():
    with pytest.raises(ValueError, match="weight shape"):
        head_rms_norm(torch.zeros(2, 8), torch.ones(4), EPS)


def test_dispatch_uses_reference_off_gpu():
    registry = head_rms_norm.registry
    assert [b.name for b in registry.backends] == ["triton", "torch"]
    assert registry.select(torch.zeros(2, 4), torch.ones(4), EPS).name == "torch"


def test_triton_kernels_in_interpreter():
    for case in interpreter_errors()["head_rms_norm"]:
        bound = 2 * ULP[torch.bfloat16] if case["half"] else 2e-6
        assert max(case["errors"]) <= bound, case


GPU_SHAPES = [(5, 3, 24), (2, 512, 28, 128), (4096, 256)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_triton_matches_reference_on_gpu(shape, dtype, monkeypatch: pytest.MonkeyPatch):
    x, w, g = _inputs(shape, dtype, "cuda", seed=shape[-1])
    fn = lambda a, b: head_rms_norm(a, b, EPS)  # noqa: E731
    assert head_rms_norm.registry.select(x, w, EPS).name == "triton"
    fast = forward_and_grads(fn, [x, w], g)
    monkeypatch.setenv("SB_DISABLE_BACKEND_DISPATCH", "1")
    ref = forward_and_grads(fn, [x, w], g)
    # fp32: rsqrt and summation order differ; half types: a flip at a rounding boundary.
    # dw sums every row in fp32 in another order.
    ulps = {"y": 64, "dx": 64, "dw": 1024} if dtype == torch.float32 else {"y": 2, "dx": 2, "dw": 2}
    for name, a, b in zip(("y", "dx", "dw"), fast, ref):
        assert_close_in_ulps(a, b, ulps[name], name)


class _AtenLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.gpu
def test_torch_rms_norm_is_fused_on_gpu():
    """Why the layer norms need no kernel of ours: Megatron's local RMSNorm is
    ``torch.nn.RMSNorm`` (``WrappedTorchNorm``), whose CUDA forward and backward are the single
    ATen kernels ``_fused_rms_norm`` / ``_fused_rms_norm_backward``, not a chain of pointwise ops."""
    norm = torch.nn.RMSNorm(3584, eps=EPS, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(64, 3584, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with _AtenLog() as log:
        norm(x).sum().backward()
    assert "aten._fused_rms_norm.default" in log.ops, log.ops
    assert "aten._fused_rms_norm_backward.default" in log.ops, log.ops
    assert not any(op.startswith(("aten.pow", "aten.rsqrt")) for op in log.ops), log.ops
