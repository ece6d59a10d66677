"""Grouped expert GEMMs: every backend equals the per-expert loop, forward and every gradient.

CPU: the reference against an independent per-expert computation; the shared autograd
function over the grouped-GEMM primitives (torch's grouped_mm where torch runs it on CPU,
the Triton kernels under ``TRITON_INTERPRET=1`` where the installed triton supports it).
GPU (``-m gpu``): the dispatched backends in bf16 and fp32.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ops.backends import get_registry
from ops.grouped_mlp import GROUPED_MM_GEMMS, GroupedGemms, _GroupedLinearFn, _device_offsets, \
    grouped_linear, grouped_swiglu_mlp
from ops.grouped_mlp.reference import loop_grouped_linear

# Uneven counts with empty experts (first, middle, last), rows not multiples of any tile.
COUNTS = [5, 0, 70, 3, 0, 17, 0]
H, F_ = 24, 40


def _inputs(counts, dtype=torch.float32, device="cpu", seed=0, as_list=False):
    gen = torch.Generator().manual_seed(seed)
    experts, rows = len(counts), sum(counts)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype).requires_grad_()

    x = rnd(rows, H)
    w1 = [rnd(2 * F_, H, scale=H ** -0.5) for _ in range(experts)]
    w2 = [rnd(H, F_, scale=F_ ** -0.5) for _ in range(experts)]
    probs = torch.rand(rows, generator=gen).to(device).requires_grad_()
    if not as_list:
        w1 = torch.stack(w1).detach().requires_grad_()
        w2 = torch.stack(w2).detach().requires_grad_()
    return x, torch.tensor(counts, device=device), w1, w2, probs


def _leaves(x, w1, w2, probs):
    ws = [*w1, *w2] if isinstance(w1, list) else [w1, w2]
    return [x, *ws, probs]


def _run(fn, x, counts, w1, w2, probs, seed=1):
    out = fn(x, counts, w1, w2, probs)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    leaves = _leaves(x, w1, w2, probs)
    grads = torch.autograd.grad(out, leaves, grad)
    return [out.detach(), *grads]


def _independent_mlp(x, counts, w1, w2, probs):
    """Expert by expert with boolean row masks (no split), SwiGLU and probs as Megatron's MLP."""
    owner = torch.repeat_interleave(torch.arange(len(counts)), counts.cpu())
    out = x.new_zeros(x.shape[0], w2[0].shape[0])
    for e in range(len(counts)):
        rows = owner == e
        gate, up = (x[rows] @ w1[e].t()).chunk(2, dim=-1)
        hidden = (F.silu(gate) * up * probs[rows, None]).to(x.dtype)
        out = out.index_put((rows.nonzero()[:, 0],), hidden @ w2[e].t())
    return out


def _assert_all_close(got, want, **tol):
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, msg=lambda m, i=i: f"output/grad #{i}: {m}", **tol)


@pytest.mark.parametrize("as_list", [False, True])
def test_reference_equals_independent_per_expert_mlp(monkeypatch, as_list):
    monkeypatch.setenv("SB_DISABLE_BACKEND_DISPATCH", "1")
    args = _inputs(COUNTS, as_list=as_list)
    got = _run(grouped_swiglu_mlp, *args)
    want = _run(_independent_mlp, *args)
    _assert_all_close(got, want, rtol=1e-5, atol=1e-5)
    w1_grads = got[2:2 + len(COUNTS)] if as_list else list(got[2])  # got: out, dx, dw1...
    for e, count in enumerate(COUNTS):      # an expert without tokens gets no gradient
        assert (w1_grads[e].abs().sum() == 0) == (count == 0)


def _fn_mlp(gemms: GroupedGemms, groups_of, grad_accum_fusion: bool = False):
    """grouped_swiglu_mlp whose GEMMs go through the shared autograd function."""

    def linear(x, counts, w):
        ws = (w,) if isinstance(w, torch.Tensor) else tuple(w)
        return _GroupedLinearFn.apply(x, groups_of(counts), gemms, grad_accum_fusion, *ws)

    def mlp(x, counts, w1, w2, probs):
        gate, up = linear(x, counts, w1).chunk(2, dim=-1)
        return linear((F.silu(gate) * up * probs[:, None]).to(x.dtype), counts, w2)

    return mlp


def _grouped_mm_runs_on_cpu() -> bool:
    try:
        torch._grouped_mm(torch.ones(2, 8, dtype=torch.bfloat16), torch.ones(1, 8, 8, dtype=torch.bfloat16),
                          offs=torch.tensor([2], dtype=torch.int32))
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


@pytest.mark.skipif(not _grouped_mm_runs_on_cpu(), reason="torch._grouped_mm has no CPU kernel here")
@pytest.mark.parametrize("as_list", [False, True])
def test_grouped_mm_autograd_equals_reference_on_cpu(as_list):
    """The grouped_mm backend's GEMM plumbing (offsets, transposes, dW grouping) in bf16."""
    args = _inputs(COUNTS, dtype=torch.bfloat16, as_list=as_list)
    fn = _fn_mlp(GROUPED_MM_GEMMS, lambda c: _device_offsets(c, torch.device("cpu")))
    ref = [t.float() for t in _run(_independent_mlp, *args)]
    got = [t.float() for t in _run(fn, *args)]
    _assert_all_close(got, ref, rtol=2e-2, atol=2e-2)


_TRITON_CHECK = """
import torch, sys
try:
    from ops.grouped_mlp import triton_kernels
except Exception as exc:   # no triton, or a triton without the CPU interpreter
    print("unavailable:", exc)
    sys.exit(0)
sys.path.insert(0, "tests/ops")
from test_grouped_mlp import COUNTS, _inputs, _run, _independent_mlp, _fn_mlp, _assert_all_close
# Default tiles (64 rows): expert 2's 70 rows span two row tiles, N=40/80 a partial tile.
for as_list in (False,):   # the list form is the same kernels after a stack
    args = _inputs(COUNTS, as_list=as_list)
    fn = _fn_mlp(triton_kernels.GEMMS, lambda c: c.to(torch.int32))
    _assert_all_close(_run(fn, *args), _run(_independent_mlp, *args), rtol=1e-5, atol=1e-5)
print("ok")
"""


def test_triton_kernels_equal_reference_in_interpreter():
    """The Triton kernels run by triton's CPU interpreter (fp32; a subprocess, since the
    interpreter is chosen when triton is imported)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": root}
    result = subprocess.run([sys.executable, "-c", _TRITON_CHECK], env=env, capture_output=True,
                            text=True, cwd=root)
    if result.stdout.startswith("unavailable"):
        pytest.skip(f"triton's CPU interpreter: {result.stdout.strip()}")
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_shape_errors_and_registry():
    x, counts, w1, _, _ = _inputs([2, 1])
    with pytest.raises(ValueError, match="tokens_per_expert shape"):
        grouped_linear(x, counts[:1], w1)
    with pytest.raises(ValueError, match=r"must be \[T, K\]"):
        grouped_linear(x[:, :5], counts, w1)
    names = {b.name for b in get_registry("grouped_linear").backends}
    assert names == {"torch", "grouped_mm", "triton"}
    # CPU tensors go to the reference whatever is installed
    assert get_registry("grouped_linear").select(x, counts, w1).name == "torch"


@pytest.mark.gpu
@pytest.mark.parametrize("backend,dtype", [("grouped_mm", torch.bfloat16), ("triton", torch.bfloat16),
                                           ("triton", torch.float32)])
@pytest.mark.parametrize("as_list", [False, True])
def test_gpu_backend_equals_reference(monkeypatch, backend, dtype, as_list):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    counts = [37, 0, 300, 8, 0, 129, 1, 0]
    args = _inputs(counts, dtype=dtype, device="cuda", as_list=as_list)
    monkeypatch.setenv("SB_OP_BACKEND_GROUPED_LINEAR", backend)
    got = [t.float() for t in _run(grouped_swiglu_mlp, *args)]
    monkeypatch.setenv("SB_OP_BACKEND_GROUPED_LINEAR", "torch")
    want = [t.float() for t in _run(grouped_swiglu_mlp, *args)]
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    _assert_all_close(got, want, **tol)
    w1_grads = got[2:2 + len(counts)] if as_list else list(got[2])
    for e, count in enumerate(counts):      # empty experts: exactly zero weight gradient
        if count == 0:
            assert torch.count_nonzero(w1_grads[e]) == 0
