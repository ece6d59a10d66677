"""Chunked output layer + cross-entropy (ops.loss): parity with the reference, layout, errors, memory bound."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from ops.loss import IGNORE_INDEX, linear_cross_entropy, reference_linear_cross_entropy

# s, b, h, V: 111 tokens, chosen so that s != b and the chunk sizes below are awkward
SHAPE = (37, 3, 24, 301)
# 1: a chunk per token; 7 and 50 do not divide 111; 111 exactly one chunk; 1000 > tokens
CHUNKS = [1, 7, 50, 111, 1000]


def make_problem(s: int, b: int, h: int, V: int, dtype: torch.dtype, seed: int = 0):
    """Leaves ``hidden [s, b, h]``, ``weight [V, h]`` (grads on), labels ``[b, s]``, upstream grad ``[b, s]``."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(s, b, h, generator=gen).to(dtype).requires_grad_()
    # logits of O(3): softmaxes neither flat nor one-hot
    weight = (torch.randn(V, h, generator=gen) * 0.6).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (b, s), generator=gen)
    grad_out = torch.rand(b, s, generator=gen) * 2 - 0.5
    return hidden, weight, labels, grad_out


def loss_and_grads(fn, hidden, weight, labels, grad_out, **kwargs):
    loss = fn(hidden, weight, labels, **kwargs)
    inputs = [t for t in (hidden, weight) if t.requires_grad]
    return loss, torch.autograd.grad(loss, inputs, grad_out)


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """RMS of the error over the RMS of the expected value, in fp64."""
    a, e = actual.double(), expected.double()
    return ((a - e).pow(2).mean().sqrt() / e.pow(2).mean().sqrt()).item()


@pytest.mark.parametrize("chunk", CHUNKS)
def test_matches_reference_fp32(chunk: int):
    hidden, weight, labels, grad_out = make_problem(*SHAPE, torch.float32)
    ref, (ref_dh, ref_dw) = loss_and_grads(reference_linear_cross_entropy, hidden, weight, labels, grad_out)
    out, (dh, dw) = loss_and_grads(linear_cross_entropy, hidden, weight, labels, grad_out, chunk_tokens=chunk)
    assert out.shape == (3, 37) and out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dh, ref_dh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw, ref_dw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [3, 50, 1000])
def test_matches_reference_bf16(chunk: int):
    hidden, weight, labels, grad_out = make_problem(*SHAPE, torch.bfloat16)
    ref, (ref_dh, ref_dw) = loss_and_grads(reference_linear_cross_entropy, hidden, weight, labels, grad_out)
    out, (dh, dw) = loss_and_grads(linear_cross_entropy, hidden, weight, labels, grad_out, chunk_tokens=chunk)
    assert out.dtype == torch.float32 and (dh.dtype, dw.dtype) == (torch.bfloat16, torch.bfloat16)
    # the losses see the same bf16 logits up to GEMM blocking: fp32 softmax on top
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
    # bf16 gradients: a few bf16 roundings apart (2**-8 = 0.4%)
    assert rel_rms(dh, ref_dh) < 1e-2
    assert rel_rms(dw, ref_dw) < 1e-2


def test_bf16_weight_grad_is_summed_in_fp32():
    # 100 chunks of 16 tokens. Each chunk's dW product has an fp32 result and the sum is fp32: the
    # chunked dW is the unfused one (a single GEMM over all tokens) up to fp32 summation order.
    # Rounding each chunk's product to bf16 (before this was fixed) put it 2.5e-3 away.
    s, b, h, V = 400, 4, 32, 500
    hidden, weight, labels, grad_out = make_problem(s, b, h, V, torch.bfloat16, seed=5)
    _, (_, ref_dw) = loss_and_grads(reference_linear_cross_entropy, hidden, weight, labels, grad_out)
    _, (_, dw) = loss_and_grads(linear_cross_entropy, hidden, weight, labels, grad_out, chunk_tokens=16)
    _, (_, dw_one_chunk) = loss_and_grads(linear_cross_entropy, hidden, weight, labels, grad_out, chunk_tokens=s * b)
    assert rel_rms(dw, ref_dw) < 3e-4
    assert rel_rms(dw, dw_one_chunk) < 3e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ignore_index(dtype: torch.dtype):
    # masked tokens labelled IGNORE_INDEX: loss 0 and no gradient, as F.cross_entropy
    hidden, weight, labels, grad_out = make_problem(*SHAPE, dtype, seed=6)
    labels.view(-1)[::5] = IGNORE_INDEX
    ref, (ref_dh, ref_dw) = loss_and_grads(reference_linear_cross_entropy, hidden, weight, labels, grad_out)
    out, (dh, dw) = loss_and_grads(linear_cross_entropy, hidden, weight, labels, grad_out, chunk_tokens=16)
    assert (out[labels == IGNORE_INDEX] == 0).all() and (out[labels != IGNORE_INDEX] > 0).all()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    assert rel_rms(dh, ref_dh) < tol and rel_rms(dw, ref_dw) < tol
    # the ignored tokens' hidden states get exactly no gradient
    assert (dh.transpose(0, 1)[labels == IGNORE_INDEX] == 0).all()


def test_per_token_formula_and_layout():
    # independent of the reference: loss[b, s] = -log_softmax(hidden[s, b] @ W.T)[labels[b, s]] in fp64
    hidden, weight, labels, grad_out = make_problem(5, 4, 8, 50, torch.float32, seed=1)
    out = linear_cross_entropy(hidden, weight, labels, chunk_tokens=3)
    h64, w64 = hidden.detach().double(), weight.detach().double()
    expected = torch.empty(4, 5, dtype=torch.float64)
    for bi in range(4):
        for si in range(5):
            expected[bi, si] = -F.log_softmax(h64[si, bi] @ w64.t(), dim=0)[labels[bi, si]]
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_non_contiguous_hidden():
    # a [b, s, h] activation transposed to [s, b, h], as a batch-first producer would hand it over
    hidden, weight, labels, grad_out = make_problem(*SHAPE, torch.float32, seed=2)
    batch_first = hidden.detach().transpose(0, 1).contiguous().requires_grad_()
    seq_first = batch_first.transpose(0, 1)
    ref, (ref_dh, _) = loss_and_grads(reference_linear_cross_entropy, seq_first, weight, labels, grad_out)
    out = linear_cross_entropy(seq_first, weight, labels, chunk_tokens=16)
    (dh,) = torch.autograd.grad(out, [batch_first], grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dh, ref_dh.transpose(0, 1), rtol=1e-5, atol=1e-5)


class OpCounter(TorchDispatchMode):
    """Counts the calls of each aten overload packet (``mm``, ``addmm``, ...)."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    def gemms(self) -> int:
        return sum(self.counts.get(name, 0) for name in ("mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_"))


@pytest.mark.parametrize("frozen", ["weight", "hidden"])
def test_needs_input_grad(frozen: str):
    hidden, weight, labels, grad_out = make_problem(*SHAPE, torch.float32, seed=3)
    (weight if frozen == "weight" else hidden).requires_grad_(False)
    ref, ref_grads = loss_and_grads(reference_linear_cross_entropy, hidden, weight, labels, grad_out)
    chunks = 4
    with OpCounter() as counter:
        out, grads = loss_and_grads(linear_cross_entropy, hidden, weight, labels, grad_out, chunk_tokens=28)
    assert len(grads) == 1
    torch.testing.assert_close(grads[0], ref_grads[0], rtol=1e-5, atol=1e-5)
    # per chunk: the forward GEMM, its recomputation and the one gradient asked for; not the other one
    assert counter.gemms() == 3 * chunks


def test_both_grads_gemm_count():
    hidden, weight, labels, grad_out = make_problem(*SHAPE, torch.float32, seed=3)
    with OpCounter() as counter:
        loss_and_grads(linear_cross_entropy, hidden, weight, labels, grad_out, chunk_tokens=28)
    assert counter.gemms() == 4 * 4


def test_errors():
    hidden, weight, labels, _ = make_problem(*SHAPE, torch.float32)
    for fn in (linear_cross_entropy, reference_linear_cross_entropy):
        with pytest.raises(ValueError, match=r"labels must be \[b, s\] = \[3, 37\]"):
            fn(hidden, weight, labels.t())
        with pytest.raises(ValueError, match=r"hidden must be \[s, b, h\]"):
            fn(hidden.flatten(0, 1), weight, labels)
        with pytest.raises(ValueError, match=r"weight must be \[V, h\] with h = 24"):
            fn(hidden, weight[:, :20], labels)
        with pytest.raises(TypeError, match="int64"):
            fn(hidden, weight, labels.int())
        with pytest.raises(TypeError, match="one floating dtype"):
            fn(hidden, weight.detach().bfloat16(), labels)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="chunk_tokens"):
            linear_cross_entropy(hidden, weight, labels, chunk_tokens=bad)


class AllocationTracker(TorchDispatchMode):
    """Peak of the bytes of live storages allocated by ops run under the mode, and the largest one.

    An op output whose storage is not one of its inputs' is a new allocation; a finalizer on that
    storage takes its bytes off when the last tensor using it (Python or autograd) is gone.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.largest = 0

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        seen = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            if storage.nbytes() == 0 or storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            self.largest = max(self.largest, storage.nbytes())
            weakref.finalize(storage, self._freed, storage.nbytes())
        return out


def tracked_fwd_bwd(fn, hidden, weight, labels, grad_out, **kwargs) -> AllocationTracker:
    with AllocationTracker() as tracker:
        loss, grads = loss_and_grads(fn, hidden, weight, labels, grad_out, **kwargs)
        del loss, grads
    return tracker


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_memory_is_bounded_by_the_chunk(dtype: torch.dtype):
    # 20 chunks of 50 tokens; V * h and N * h are small next to one chunk's logits
    s, b, h, V, chunk = 250, 4, 16, 2000, 50
    hidden, weight, labels, grad_out = make_problem(s, b, h, V, dtype, seed=4)
    full_bytes = s * b * V * 4
    chunk_bytes = chunk * V * 4
    small_bytes = 4 * (V * h + s * b * h) * 4 + 64 * s * b

    ref = tracked_fwd_bwd(reference_linear_cross_entropy, hidden, weight, labels, grad_out)
    assert ref.largest >= full_bytes and ref.peak >= full_bytes

    fused = tracked_fwd_bwd(linear_cross_entropy, hidden, weight, labels, grad_out, chunk_tokens=chunk)
    # the biggest buffer is one chunk's fp32 logits; at most two chunks' worth live at once
    assert fused.largest <= chunk_bytes < full_bytes
    assert fused.peak <= 2 * chunk_bytes + small_bytes < full_bytes / 4
    # everything was released (the tracker itself is sound)
    assert fused.live == 0 and ref.live == 0
