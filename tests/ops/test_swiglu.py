"""SwiGLU (ops.swiglu): reference vs an independent formula and Megatron's own swiglu, dispatch,
the Triton kernel in the CPU interpreter and on the GPU (forward and the input gradient)."""

from __future__ import annotations

import pytest
import torch

from ops.swiglu import SwiGLU, swiglu
from tests.ops.fusion_parity import ULP, assert_close_in_ulps, forward_and_grads, interpreter_errors

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch):
    for var in ("SB_DISABLE_BACKEND_DISPATCH", "SB_OP_BACKEND_SWIGLU"):
        monkeypatch.delenv(var, raising=False)


def _input(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    return (3 * torch.randn(shape, generator=gen, device=device)).to(dtype)


def test_reference_matches_independent_formula():
    x = _input((3, 5, 2 * 7)).double()
    g = _input((3, 5, 7), seed=1).double()
    y, dx = forward_and_grads(swiglu, [x], g)
    a, b = x[..., :7], x[..., 7:]
    s = 1 / (1 + torch.exp(-a))
    torch.testing.assert_close(y, a * s * b, rtol=1e-12, atol=0)
    torch.testing.assert_close(dx, torch.cat([g * b * (s + a * s * (1 - s)), g * a * s], -1),
                               rtol=1e-12, atol=1e-14)


def test_layout_matches_megatron_swiglu():
    """Gate half first, as Megatron's fused swiglu (and its backward) read the fc1 output."""
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl

    x, g = _input((4, 2, 2 * 9)), _input((4, 2, 9), seed=1)
    ours = forward_and_grads(swiglu, [x], g)
    theirs = forward_and_grads(lambda t: bias_swiglu_impl(t, None, False, False), [x], g)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_module_applies_the_op():
    x = _input((2, 6))
    assert torch.equal(SwiGLU(config=None)(x), swiglu(x))


def test_odd_last_dim_is_rejected():
    with pytest.raises(ValueError, match="even last dim"):
        swiglu(torch.zeros(2, 5))


def test_dispatch_uses_reference_off_gpu():
    registry = swiglu.registry
    assert [b.name for b in registry.backends] == ["triton", "torch"]
    assert registry.select(torch.zeros(2, 4)).name == "torch"
    triton_backend = registry.backends[0]
    ok, reason = triton_backend.verify(torch.zeros(2, 4))
    assert not ok and "device" in reason


def test_triton_kernel_in_interpreter():
    for case in interpreter_errors()["swiglu"]:
        # bf16: one rounding instead of two -> about one ulp of the largest value
        bound = 2 * ULP[torch.bfloat16] if case["half"] else 1e-6
        assert max(case["errors"]) <= bound, case


GPU_SHAPES = [(3, 2 * 17), (4, 64, 2 * 1000), (2, 2 * 18944)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_triton_matches_reference_on_gpu(shape, dtype, monkeypatch: pytest.MonkeyPatch):
    x = _input(shape, dtype, "cuda", seed=shape[-1])
    g = _input((*shape[:-1], shape[-1] // 2), dtype, "cuda", seed=1)
    assert swiglu.registry.select(x).name == "triton"
    fast = forward_and_grads(swiglu, [x], g)
    monkeypatch.setenv("SB_DISABLE_BACKEND_DISPATCH", "1")
    ref = forward_and_grads(swiglu, [x], g)
    # fp32: sigmoid implementations differ by a few ulp; half types: one rounding vs two
    ulps = 64 if dtype == torch.float32 else 2
    for name, a, b in zip(("y", "dx"), fast, ref):
        assert_close_in_ulps(a, b, ulps * (2 if name == "dx" else 1), name)
