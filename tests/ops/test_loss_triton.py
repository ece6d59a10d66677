"""Triton backend of ``ops.loss.linear_cross_entropy`` (``ops.loss.fused`` + ``kernels``) against the reference.

On CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, a subprocess: the variable
must be set before the kernels are defined); on the GPU (``gpu`` marker) the backend is compared in
fp32 and bf16 with the whole-logits reference, and its transient memory is checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maca_compat.fused_optim import cuda_wgrad_route
from ops.loss import IGNORE_INDEX, linear_cross_entropy, reference_linear_cross_entropy
from tests.ops.test_loss import OpCounter, loss_and_grads, make_problem, rel_rms

REPO = Path(__file__).resolve().parents[2]


def with_ignored(labels: torch.Tensor, every: int = 7) -> torch.Tensor:
    """``labels`` with every ``every``-th token set to ``IGNORE_INDEX`` (masked tokens)."""
    labels = labels.clone()
    labels.view(-1)[::every] = IGNORE_INDEX
    return labels


def test_registry_and_cpu_dispatch():
    registry = linear_cross_entropy.registry
    assert [b.name for b in registry.backends] == ["triton", "torch_chunked"]
    hidden, weight, labels, _ = make_problem(5, 2, 8, 30, torch.float32)
    # a CPU call never goes to the Triton backend, whatever is installed
    assert registry.select(hidden, weight, labels, 4).name == "torch_chunked"


INTERPRETER_SCRIPT = r"""
import json
import torch
import ops.loss.kernels as kernels
from ops.loss import IGNORE_INDEX, linear_cross_entropy, reference_linear_cross_entropy, _run
from ops.loss.fused import FusedLinearCrossEntropy
from tests.ops.test_loss import loss_and_grads, make_problem, rel_rms
from tests.ops.test_loss_triton import with_ignored

def fused(hidden, weight, labels, chunk_tokens):
    return _run(FusedLinearCrossEntropy, hidden, weight, labels, chunk_tokens)

out = []
# 64-column blocks: V = 301 is 4 full blocks and a partial one, so the online logsumexp rescales
kernels.BLOCK_V = 64
for dtype in (torch.float32, torch.bfloat16):
    # every 7th token ignored: both kinds of rows in each chunk
    hidden, weight, labels, grad_out = make_problem(7, 3, 16, 301, dtype, seed=11)
    labels = with_ignored(labels)
    ref, (rdh, rdw) = loss_and_grads(reference_linear_cross_entropy, hidden, weight, labels, grad_out)
    loss, (dh, dw) = loss_and_grads(fused, hidden, weight, labels, grad_out, chunk_tokens=8)
    # the torch backend on CPU: the same logits GEMMs, so only the kernels' math differs
    tl, (tdh, tdw) = loss_and_grads(linear_cross_entropy, hidden, weight, labels, grad_out, chunk_tokens=8)
    out.append(dict(case=str(dtype), fp32=dtype == torch.float32,
                    loss=(loss - ref).abs().max().item(), torch_loss=(loss - tl).abs().max().item(),
                    dh=rel_rms(dh, rdh), dw=rel_rms(dw, rdw), torch_dh=rel_rms(dh, tdh), torch_dw=rel_rms(dw, tdw),
                    ignored_zero=bool((loss[labels == IGNORE_INDEX] == 0).all()),
                    dtypes_ok=(loss.dtype, dh.dtype, dw.dtype) == (torch.float32, dtype, dtype)))
# one chunk: forward keeps the logits and backward consumes them; a second backward recomputes
hidden, weight, labels, grad_out = make_problem(7, 3, 16, 301, torch.float32, seed=12)
ref, ref_grads = loss_and_grads(reference_linear_cross_entropy, hidden, weight, labels, grad_out)
loss = fused(hidden, weight, labels, chunk_tokens=64)
first = torch.autograd.grad(loss, (hidden, weight), grad_out, retain_graph=True)
second = torch.autograd.grad(loss, (hidden, weight), grad_out)
out.append(dict(case="one chunk", loss=(loss - ref).abs().max().item(),
                grads=max(rel_rms(a, b) for a, b in zip(first, ref_grads)),
                again=max(rel_rms(a, b) for a, b in zip(second, ref_grads))))
# the gradient kernel element by element, in bf16: within one bf16 rounding of the fp32 value
gen = torch.Generator().manual_seed(0)
z = (torch.randn(5, 301, generator=gen) * 3).bfloat16()
labels = torch.tensor([0, 300, IGNORE_INDEX, 17, 64])
lse = torch.logsumexp(z.float(), 1)
g = torch.rand(5, generator=gen) + 0.5
exact = (z.float() - lse[:, None]).exp()
exact[[0, 1, 3, 4], labels[[0, 1, 3, 4]]] -= 1
exact = exact * torch.where(labels == IGNORE_INDEX, 0.0, g)[:, None]
grad = kernels.grad_logits_(z.clone(), labels, lse, g).float()
err = ((grad - exact).abs() / exact.abs().clamp(min=1e-30)).max().item()
out.append(dict(case="grad kernel", bf16_rel_err=err, ignored_row_zero=bool((grad[2] == 0).all())))
print(json.dumps(out))
"""


def test_triton_kernels_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", INTERPRETER_SCRIPT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    *results, one_chunk, kernel = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 2
    assert one_chunk["loss"] < 1e-5 and one_chunk["grads"] < 1e-5 and one_chunk["again"] < 1e-5, one_chunk
    for r in results:
        assert r["ignored_zero"] and r["dtypes_ok"], r
        assert r["loss"] < 1e-5 and r["torch_loss"] < 1e-5, r
        if r["fp32"]:
            assert max(r["dh"], r["dw"], r["torch_dh"], r["torch_dw"]) < 1e-5, r
        else:
            # Triton's interpreter casts fp32 to bf16 by truncation (GPUs round to nearest even),
            # so here dL/dlogits is up to one bf16 ulp low in magnitude; the GPU tests are tighter
            assert max(r["dh"], r["dw"], r["torch_dh"], r["torch_dw"]) < 1e-2, r
    # one bf16 rounding (truncation or nearest) is at most 2**-7 relative; a wrong formula is O(1)
    assert kernel["bf16_rel_err"] < 2**-7 + 1e-5 and kernel["ignored_row_zero"], kernel


# s, b, h, V: 111 tokens (odd); V = 5003 is one full 4096-column block and a partial one
GPU_SHAPE = (37, 3, 64, 5003)
GPU_CHUNKS = [16, 50, 111, 4096]


def gpu_problem(dtype: torch.dtype, seed: int, ignore: bool):
    hidden, weight, labels, grad_out = (t.detach().cuda() for t in make_problem(*GPU_SHAPE, dtype, seed=seed))
    if ignore:
        labels = with_ignored(labels)
    return hidden.requires_grad_(), weight.requires_grad_(), labels, grad_out


@pytest.mark.gpu
@pytest.mark.parametrize("ignore", [False, True], ids=["all", "ignored"])
@pytest.mark.parametrize("chunk", GPU_CHUNKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_backend_matches_reference(dtype: torch.dtype, chunk: int, ignore: bool):
    hidden, weight, labels, grad_out = gpu_problem(dtype, seed=chunk, ignore=ignore)
    assert linear_cross_entropy.registry.select(hidden, weight, labels, chunk).name == "triton"
    ref, (rdh, rdw) = loss_and_grads(reference_linear_cross_entropy, hidden, weight, labels, grad_out)
    loss, (dh, dw) = loss_and_grads(linear_cross_entropy, hidden, weight, labels, grad_out, chunk_tokens=chunk)
    assert loss.shape == ref.shape and loss.dtype == torch.float32 and (dh.dtype, dw.dtype) == (dtype, dtype)
    if ignore:
        assert (loss[labels == IGNORE_INDEX] == 0).all()
    if dtype == torch.float32:
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dh, rdh, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(dw, rdw, rtol=1e-4, atol=1e-5)
    else:
        torch.testing.assert_close(loss, ref, rtol=1e-2, atol=1e-2)
        assert rel_rms(dh, rdh) < 1e-2
        assert rel_rms(dw, rdw) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("chunk, gemms", [(111, 3), (50, 4 * 3)], ids=["one-chunk", "three-chunks"])
def test_triton_backend_recomputes_only_with_several_chunks(chunk: int, gemms: int):
    # one chunk: forward's logits are kept (3 GEMMs, as Megatron); several: each is recomputed
    cuda_wgrad_route()  # probed (with its own GEMMs) once per process: not inside the count
    hidden, weight, labels, grad_out = gpu_problem(torch.bfloat16, seed=4, ignore=False)
    with OpCounter() as counter:
        loss, grads = loss_and_grads(linear_cross_entropy, hidden, weight, labels, grad_out, chunk_tokens=chunk)
    assert counter.gemms() == gemms
    ref, ref_grads = loss_and_grads(reference_linear_cross_entropy, hidden, weight, labels, grad_out)
    torch.testing.assert_close(loss, ref, rtol=1e-2, atol=1e-2)
    assert all(rel_rms(a, b) < 1e-2 for a, b in zip(grads, ref_grads))


@pytest.mark.gpu
def test_triton_backend_matches_torch_backend_bf16(monkeypatch: pytest.MonkeyPatch):
    # same bf16 GEMMs on both backends: only the softmax kernels and the fp32 sums differ
    hidden, weight, labels, grad_out = gpu_problem(torch.bfloat16, seed=3, ignore=True)
    loss, (dh, dw) = loss_and_grads(linear_cross_entropy, hidden, weight, labels, grad_out, chunk_tokens=50)
    monkeypatch.setenv("SB_OP_BACKEND_LINEAR_CROSS_ENTROPY", "torch_chunked")
    t_loss, (t_dh, t_dw) = loss_and_grads(linear_cross_entropy, hidden, weight, labels, grad_out, chunk_tokens=50)
    torch.testing.assert_close(loss, t_loss, rtol=1e-5, atol=1e-5)
    assert rel_rms(dh, t_dh) < 2e-3 and rel_rms(dw, t_dw) < 2e-3


@pytest.mark.gpu
def test_weight_grad_sum_is_fp32_on_cuda():
    if torch.version.cuda is None:
        pytest.skip("an fp32-output GEMM is only expected on CUDA builds; MetaX may upcast")
    assert cuda_wgrad_route() != "upcast"
    # 40 chunks of 4 tokens: a per-chunk bf16 rounding of dW would be ~1e-3 off the one-chunk result
    hidden, weight, labels, grad_out = (t.detach().cuda() for t in make_problem(40, 4, 32, 500, torch.bfloat16, seed=5))
    hidden.requires_grad_(), weight.requires_grad_()
    _, (_, dw_small) = loss_and_grads(linear_cross_entropy, hidden, weight, labels, grad_out, chunk_tokens=4)
    _, (_, dw_one) = loss_and_grads(linear_cross_entropy, hidden, weight, labels, grad_out, chunk_tokens=160)
    assert rel_rms(dw_small, dw_one) < 3e-4


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_backend_memory_is_one_chunk_of_logits(dtype: torch.dtype):
    # 8 chunks of 256 tokens over a 32000 vocabulary: the full fp32 logits would be 262 MB
    s, h, V, chunk = 2048, 64, 32000, 256
    hidden, weight, labels, grad_out = (t.detach().cuda() for t in make_problem(s, 1, h, V, dtype, seed=9))
    hidden.requires_grad_(), weight.requires_grad_()
    loss_and_grads(linear_cross_entropy, hidden, weight, labels, grad_out, chunk_tokens=chunk)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss, grads = loss_and_grads(linear_cross_entropy, hidden, weight, labels, grad_out, chunk_tokens=chunk)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    itemsize = hidden.element_size()
    # one chunk's logits in the input dtype; the fp32 dW sum plus one chunk's fp32 product;
    # the outputs (losses, lse, dH, dW); 1 MiB of slack for the allocator's rounding
    bound = chunk * V * itemsize + 2 * V * h * 4 + s * (8 + h * itemsize) + V * h * itemsize + 2**20
    assert extra <= bound < s * V * 4
