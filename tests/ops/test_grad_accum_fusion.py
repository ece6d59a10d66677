"""Gradient-accumulation fusion in our ops (``ops.main_grad``): the weight gradients that the
chunked loss and the grouped experts write straight into Megatron DDP's ``main_grad`` equal
those DDP accumulates itself from the ops' ordinary gradients, over two micro-batches.

DDP's side is megatron-core's own backward hook (``tests/ops/ddp_hooks.py``) with
``overlap_grad_reduce``, so each test also checks the protocol: the hook still runs once per
micro-batch per weight (the placeholder gradient; with ``None`` it would not, or would assert),
``grad_added_to_main_grad`` is set only by the fused path, and ``param.grad`` is left empty.
CPU: the torch loss backend; the grouped experts' autograd function over plain per-expert
GEMMs and over torch's grouped matmul (where it runs on CPU); the Triton kernels of both ops in
triton's CPU interpreter (fp32). GPU (``-m gpu``): the dispatched backends in bf16 and fp32.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ops.grouped_mlp import GROUPED_MM_GEMMS, GroupedGemms, _GroupedLinearFn, _device_offsets, grouped_linear
from ops.loss import _run, linear_cross_entropy
from ops.loss.chunked import WeightGradSum
from ops.main_grad import ExpertMainGrads
from tests.ops.ddp_hooks import DDPGrads, interleaved_megatron_order
from tests.ops.test_grouped_mlp import _grouped_mm_runs_on_cpu
from tests.ops.test_loss import make_problem, rel_rms

REPO = Path(__file__).resolve().parents[2]
MICRO_BATCHES = 2

# ------------------------------------------------------------------------------- chunked loss


def loss_main_grads(loss_fn, fusion: bool, tied: bool = False, dtype=torch.float32, device="cpu",
                    shape=(9, 2, 16, 301), chunk_tokens: int = 5) -> dict:
    """Two micro-batches of ``sum(g * loss)`` through ``loss_fn(hidden, weight, labels, chunk,
    fusion)`` under DDP's hook; ``tied``: the weight is also an embedding of the same graph
    (Megatron's one-stage tied embedding, which it marks ``zero_out_wgrad``)."""
    s, b, h, vocab = shape
    _, weight, _, _ = make_problem(s, b, h, vocab, dtype, seed=0)
    weight = torch.nn.Parameter(weight.detach().to(device))
    if tied:
        weight.zero_out_wgrad = True
    ddp = DDPGrads([weight])
    hidden_grads = []
    for micro_batch in range(MICRO_BATCHES):
        hidden, _, labels, grad_out = (t.detach().to(device) for t in make_problem(*shape, dtype, seed=1 + micro_batch))
        hidden.requires_grad_()
        x = hidden
        if tied:  # the embedding of the micro-batch's labels feeds the hidden states
            x = hidden + F.embedding(labels.t(), weight)
        loss = loss_fn(x, weight, labels, chunk_tokens, fusion)
        (loss * grad_out.to(device)).sum().backward()
        hidden_grads.append(hidden.grad)
    assert weight.grad is None, "DDP's hook empties param.grad"
    return {"main_grad": weight.main_grad.clone(), "ready": ddp.ready_counts()[0],
            "added": ddp.added_flags()[0], "hidden_grads": hidden_grads}


def torch_loss(hidden, weight, labels, chunk_tokens, fusion):
    return linear_cross_entropy(hidden, weight, labels, chunk_tokens, grad_accum_fusion=fusion)


def assert_loss_fusion_matches(loss_fn, dtype=torch.float32, device="cpu", tol=1e-6, plain_fn=None,
                               tied_cases=(False, True), **problem) -> None:
    """``loss_fn`` fused == ``plain_fn`` (default: ``loss_fn``) unfused, untied and tied."""
    for tied in tied_cases:
        plain = loss_main_grads(plain_fn or loss_fn, False, tied, dtype, device, **problem)
        fused = loss_main_grads(loss_fn, True, tied, dtype, device, **problem)
        assert plain["ready"] == fused["ready"] == MICRO_BATCHES, tied
        assert (plain["added"], fused["added"]) == (False, True), tied
        assert rel_rms(fused["main_grad"], plain["main_grad"]) < tol, (tied, dtype)
        for got, want in zip(fused["hidden_grads"], plain["hidden_grads"]):  # nor does dH
            torch.testing.assert_close(got, want, **_input_grad_tol(plain_fn is None, device, dtype))


def _input_grad_tol(same_fn: bool, device: str, dtype: torch.dtype) -> dict:
    """Bit for bit when the same function runs on the CPU; GPU libraries may pick other
    algorithms from one call to the next, and the interpreter runs other kernels than torch."""
    if same_fn and device == "cpu":
        return {"rtol": 0, "atol": 0}
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}


def test_loss_accumulates_into_main_grad_fp32():
    """Untied and tied (main_grad = output-layer + embedding gradients), 2 micro-batches."""
    assert_loss_fusion_matches(torch_loss, torch.float32, tol=1e-6)


def test_loss_accumulates_into_main_grad_bf16():
    # unfused rounds each micro-batch's summed dW to bf16 before DDP adds it; fused does not
    assert_loss_fusion_matches(torch_loss, torch.bfloat16, tol=1e-2)


def test_loss_fused_sum_is_main_grad_itself():
    """No [V, h] fp32 temporary: the chunks' sum is the main grad."""
    weight = torch.nn.Parameter(torch.zeros(7, 3))
    main_grad = torch.zeros(7, 3)
    assert WeightGradSum(weight, main_grad).total is main_grad


def test_loss_without_ddp_or_without_fusion_returns_the_gradient():
    hidden, weight, labels, grad_out = make_problem(5, 2, 8, 30, torch.float32)
    want = torch.autograd.grad((torch_loss(hidden, weight, labels, 3, False) * grad_out).sum(), weight)[0]
    # fusion on, but the weight is not under DDP (no main_grad): the ordinary gradient
    got = torch.autograd.grad((torch_loss(hidden, weight, labels, 3, True) * grad_out).sum(), weight)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # a main_grad that Megatron's DDP does not track (no grad_added_to_main_grad): filled, no grad
    weight.main_grad = torch.zeros(weight.shape)
    (torch_loss(hidden, weight, labels, 3, True) * grad_out).sum().backward()
    assert weight.grad is None
    torch.testing.assert_close(weight.main_grad, want, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- grouped experts

COUNTS = [5, 0, 70, 3, 0, 17]
H, F_ = 24, 40


def _loop_rows_mm(a, counts, b_t):
    chunks = torch.split(a, [int(c) for c in counts.tolist()])
    return torch.cat([chunk @ b_t[e] for e, chunk in enumerate(chunks)])


def _loop_k_mm(p, counts, q, experts):
    sizes = [int(c) for c in counts.tolist()]
    return torch.stack([pe.t() @ qe for pe, qe in zip(torch.split(p, sizes), torch.split(q, sizes))])


LOOP_GEMMS = GroupedGemms(_loop_rows_mm, _loop_k_mm)
"""Per-expert GEMMs on the host: the same fused dW route as grouped_mm (its result added at once)."""

# name -> (buffer order of [fc1_0..fc1_E-1, fc2_0..fc2_E-1], gaps): DDP's interleaved reversed
# layout (a negative constant step), fc1s then fc2s in declaration order (positive step), and
# uneven gaps (no constant step: the foreach route)
E_ = len(COUNTS)
LAYOUTS = {
    "megatron": (interleaved_megatron_order(E_), None),
    "forward": (list(range(2 * E_)), None),
    "uneven": (interleaved_megatron_order(E_), [0, 3, 0, 1, 0, 0, 7, 0, 0, 2, 0, 0]),
}


def _experts(dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w1 = [torch.nn.Parameter((torch.randn(2 * F_, H, generator=gen) * H ** -0.5).to(device, dtype)) for _ in COUNTS]
    w2 = [torch.nn.Parameter((torch.randn(H, F_, generator=gen) * F_ ** -0.5).to(device, dtype)) for _ in COUNTS]
    return w1, w2


def _mlp(linear, x, counts, w1, w2):
    gate, up = linear(x, counts, w1).chunk(2, dim=-1)
    return linear(F.silu(gate) * up, counts, w2)


def experts_main_grads(linear, fusion: bool, layout: str, dtype=torch.float32, device="cpu") -> dict:
    """Two micro-batches of the grouped SwiGLU experts under DDP's hook with ``layout``;
    ``linear(x, counts, weights, fusion)``."""
    w1, w2 = _experts(dtype, device)
    order, gaps = LAYOUTS[layout]
    ddp = DDPGrads([*w1, *w2], order, gaps)
    region = ExpertMainGrads.of(w1, True).region
    x_grads = []
    for micro_batch in range(MICRO_BATCHES):
        gen = torch.Generator().manual_seed(10 + micro_batch)
        x = torch.randn(sum(COUNTS), H, generator=gen).to(device, dtype).requires_grad_()
        grad = torch.randn(sum(COUNTS), H, generator=gen).to(device, dtype)
        counts = torch.tensor(COUNTS, device=device)
        out = _mlp(lambda a, c, w: linear(a, c, w, fusion), x, counts, w1, w2)
        out.backward(grad)
        x_grads.append(x.grad)
    assert all(p.grad is None for p in (*w1, *w2))
    return {"main_grads": ddp.main_grads(), "ready": ddp.ready_counts(), "added": ddp.added_flags(),
            "x_grads": x_grads, "step": None if region is None else region.step}


def assert_experts_fusion_matches(linear, dtype=torch.float32, device="cpu", tol=1e-6, plain_linear=None,
                                  layouts=tuple(LAYOUTS)) -> None:
    """``linear`` fused == ``plain_linear`` (default: ``linear``) unfused, in each of ``layouts``."""
    steps = []
    for layout in layouts:
        plain = experts_main_grads(plain_linear or linear, False, layout, dtype, device)
        fused = experts_main_grads(linear, True, layout, dtype, device)
        assert plain["ready"] == fused["ready"] == [MICRO_BATCHES] * 2 * E_, layout
        assert not any(plain["added"]) and all(fused["added"]), layout
        flat = [torch.cat([g.flatten() for g in r["main_grads"]]) for r in (fused, plain)]
        assert rel_rms(*flat) < tol, (layout, rel_rms(*flat))
        for e, got in enumerate(fused["main_grads"]):  # empty experts: exactly zero
            assert (got.abs().sum() == 0) == (COUNTS[e % E_] == 0), (layout, e)
        for got, want in zip(fused["x_grads"], plain["x_grads"]):  # dX does not depend on the fusion
            torch.testing.assert_close(got, want, **_input_grad_tol(plain_linear is None, device, dtype))
        steps.append(fused["step"])
    # the fc1 region of each layout: in DDP's, expert e + 1's fc1 is one fc1 + one fc2 back
    want_steps = {"megatron": -(2 * F_ * H + H * F_), "forward": 2 * F_ * H, "uneven": None}
    assert steps == [want_steps[layout] for layout in layouts]


def _fn_linear(gemms: GroupedGemms, groups_of):
    def linear(x, counts, w, fusion):
        return _GroupedLinearFn.apply(x, groups_of(counts), gemms, fusion, *w)
    return linear


def test_experts_accumulate_into_main_grads_per_expert_gemms():
    assert_experts_fusion_matches(_fn_linear(LOOP_GEMMS, lambda c: c))


@pytest.mark.skipif(not _grouped_mm_runs_on_cpu(), reason="torch._grouped_mm has no CPU kernel here")
def test_experts_accumulate_into_main_grads_grouped_mm_on_cpu():
    assert_experts_fusion_matches(_fn_linear(GROUPED_MM_GEMMS, lambda c: _device_offsets(c, torch.device("cpu"))))


def test_stacked_expert_weight_and_reference_backend():
    """One stacked [E, N, K] parameter: its main grad is one region; the reference backend
    ignores the flag (autograd + DDP's add), with the same result."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(sum(COUNTS), H, generator=gen)
    counts = torch.tensor(COUNTS)
    results = []
    for fusion, linear in ((False, grouped_linear), (True, grouped_linear),
                           (True, _fn_linear(LOOP_GEMMS, lambda c: c))):
        w = torch.nn.Parameter(torch.randn(E_, F_, H, generator=torch.Generator().manual_seed(4)))
        ddp = DDPGrads([w])
        for _ in range(MICRO_BATCHES):
            out = linear(x, counts, w, grad_accum_fusion=fusion) if linear is grouped_linear \
                else linear(x, counts, [w], fusion)
            out.sum().backward()
        results.append((w.main_grad.clone(), ddp.added_flags()[0], ddp.ready_counts()[0]))
    (plain, *_), (reference, ref_added, _), (fused, fused_added, ready) = results
    assert not ref_added and fused_added and ready == MICRO_BATCHES
    torch.testing.assert_close(reference, plain, rtol=0, atol=0)
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------- Triton, in the interpreter

INTERPRETER_SCRIPT = r"""
import json
import torch
import ops.grouped_mlp as grouped_mlp
import ops.loss.kernels as kernels
from ops.grouped_mlp import GROUPED_MM_GEMMS, _device_offsets, triton_kernels
from ops.main_grad import ExpertMainGrads
from tests.ops.ddp_hooks import DDPGrads
from tests.ops.test_grouped_mlp import _grouped_mm_runs_on_cpu
from ops.loss import _run
from ops.loss.fused import FusedLinearCrossEntropy
from tests.ops.test_grad_accum_fusion import (LAYOUTS, LOOP_GEMMS, _experts, _fn_linear,
                                              assert_experts_fusion_matches, assert_loss_fusion_matches,
                                              torch_loss)

# the interpreter is slow: only the fused runs use the kernels, the unfused ones the torch paths
kernels.BLOCK_V = 64   # several vocabulary blocks at V = 301
def triton_loss(hidden, weight, labels, chunk_tokens, fusion):
    return _run(FusedLinearCrossEntropy, hidden, weight, labels, chunk_tokens, fusion)
# several chunks (recomputed logits), untied and tied; one chunk (saved logits)
assert_loss_fusion_matches(triton_loss, plain_fn=torch_loss, chunk_tokens=5)
assert_loss_fusion_matches(triton_loss, plain_fn=torch_loss, chunk_tokens=1000, tied_cases=(False,))
# the accumulating dW kernel on DDP's region (negative step) and a forward one; the foreach
# route (uneven layout) is the same for every backend and runs in the CPU tests
assert_experts_fusion_matches(_fn_linear(triton_kernels.GEMMS, lambda c: c.to("cpu").int()),
                              plain_linear=_fn_linear(LOOP_GEMMS, lambda c: c), layouts=("megatron", "forward"))
# grouped_mm's route on GPUs: its dW added into DDP's region by the Triton add kernel
# (torch's grouped matmul runs on this CPU; the backend checks Triton for the tensors' device)
if _grouped_mm_runs_on_cpu():
    grouped_mlp.triton_available = lambda device: (True, "interpreter")
    assert_experts_fusion_matches(_fn_linear(GROUPED_MM_GEMMS, lambda c: _device_offsets(c, torch.device("cpu"))),
                                  plain_linear=_fn_linear(LOOP_GEMMS, lambda c: c), layouts=("megatron",))
# the add kernel alone: bf16 into fp32, both step signs, equal to torch's adds bit for bit
for layout in ("megatron", "forward"):
    w1, w2 = _experts(torch.float32, "cpu")
    DDPGrads([*w1, *w2], *LAYOUTS[layout])
    main_grads = ExpertMainGrads.of(w1, True)
    for g in main_grads.experts:
        g.copy_(torch.randn(g.shape))
    want = [g.clone() for g in main_grads.experts]
    stacked = torch.randn(len(w1), *w1[0].shape).bfloat16()
    triton_kernels.add_into_region(main_grads.region, stacked)
    for e, (got, before) in enumerate(zip(main_grads.experts, want)):
        assert torch.equal(got, before + stacked[e]), (layout, e)
print(json.dumps("ok"))
"""


def test_triton_kernels_accumulate_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", INTERPRETER_SCRIPT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == "ok"


# ---------------------------------------------------------------------------------------- GPU

GPU_DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("chunk", [5, 4096])
def test_gpu_loss_triton_backend(dtype, chunk):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    # CUDA tensors: the dispatcher picks the Triton backend (its verifier accepts both dtypes)
    assert_loss_fusion_matches(torch_loss, dtype, "cuda", tol=1e-5 if dtype == torch.float32 else 1e-2,
                               chunk_tokens=chunk)


@pytest.mark.gpu
@pytest.mark.parametrize("backend,dtype", [("grouped_mm", torch.bfloat16), ("triton", torch.bfloat16),
                                           ("triton", torch.float32)])
def test_gpu_grouped_backends(monkeypatch, backend, dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    monkeypatch.setenv("SB_OP_BACKEND_GROUPED_LINEAR", backend)

    def linear(x, counts, w, fusion):
        return grouped_linear(x, counts, w, grad_accum_fusion=fusion)

    # bf16: grouped_mm's fused dW is its bf16 result added (as unfused, same numbers); Triton's
    # accumulates the fp32 product (unfused rounds it to bf16 first)
    assert_experts_fusion_matches(linear, dtype, "cuda", tol=1e-5 if dtype == torch.float32 else 1e-2)

