"""Triton kernels of the fused loss (``ops.loss.fused``): row logsumexp + loss, and the in-place gradient.

Both read the logits in the dtype the GEMM wrote them (bf16 in training) and do the math in fp32;
neither allocates a ``[tokens, V]`` tensor. Importing this module imports triton; ``ops.loss``
imports it only when the Triton backend runs.

``lse_and_loss``: one program per row walks the vocabulary in blocks of ``BLOCK_V`` with an online
logsumexp (running max ``m`` and ``s = sum exp(z - m)``, rescaled when the max grows), then reads
the target logit: ``loss = lse - z[label]`` (0 for ``IGNORE_INDEX``).

``grad_logits_``: one program per (row, block of the vocabulary) overwrites the logits with
``g * (exp(z - lse) - onehot(label))`` in their own dtype: the rounding Megatron's autograd applies
when it casts the fp32 gradient of ``logits.float()`` back to the logits' dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from ops.loss.chunked import IGNORE_INDEX

BLOCK_V = 4096
"""Vocabulary columns per block: 4096 fp32 values per program step (8 warps, 16 per thread)."""
NUM_WARPS = 8


@triton.jit
def _lse_loss_kernel(logits_ptr, stride_row, labels_ptr, lse_ptr, loss_ptr, V, ignore_index,
                     BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    # scalars: the running max and the sum of exp(z - max) so far (every block holds >= 1 column)
    m = float("-inf")
    s = 0.0
    for start in range(0, V, BLOCK_V):
        z = tl.load(row_ptr + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    target = tl.load(row_ptr + label, mask=valid, other=0.0).to(tl.float32)
    tl.store(lse_ptr + row, lse)
    tl.store(loss_ptr + row, tl.where(valid, lse - target, 0.0))


@triton.jit
def _grad_logits_kernel(logits_ptr, stride_row, labels_ptr, lse_ptr, grad_ptr, V, ignore_index,
                        BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_row = cols < V
    ptrs = logits_ptr + row * stride_row + cols
    z = tl.load(ptrs, mask=in_row, other=0.0).to(tl.float32)
    label = tl.load(labels_ptr + row)
    lse = tl.load(lse_ptr + row)
    g = tl.load(grad_ptr + row)
    g = tl.where(label == ignore_index, 0.0, g)
    p = tl.exp(z - lse)
    p = tl.where(cols == label, p - 1.0, p)
    tl.store(ptrs, (p * g).to(logits_ptr.dtype.element_ty), mask=in_row)


def _check(logits: Tensor, *rows: Tensor) -> None:
    assert logits.dim() == 2 and logits.stride(1) == 1, "logits must be [c, V] with unit column stride"
    for t in rows:
        assert t.shape == (logits.shape[0],) and t.is_contiguous(), "per-row tensors must be [c], contiguous"


def lse_and_loss(logits: Tensor, labels: Tensor, lse_out: Tensor, loss_out: Tensor) -> None:
    """Write the fp32 logsumexp and loss of each row of ``logits [c, V]`` into ``lse_out``/``loss_out [c]``."""
    _check(logits, labels, lse_out, loss_out)
    c, V = logits.shape
    if c == 0:
        return
    _lse_loss_kernel[(c,)](logits, logits.stride(0), labels, lse_out, loss_out, V, IGNORE_INDEX,
                           BLOCK_V=BLOCK_V, num_warps=NUM_WARPS)


def grad_logits_(logits: Tensor, labels: Tensor, lse: Tensor, grad: Tensor) -> Tensor:
    """Overwrite ``logits [c, V]`` with ``grad[:, None] * (softmax - onehot(labels))``; returns ``logits``.

    ``lse`` and ``grad`` are fp32 ``[c]``.
    """
    _check(logits, labels, lse, grad)
    c, V = logits.shape
    if c:
        _grad_logits_kernel[(c, triton.cdiv(V, BLOCK_V))](logits, logits.stride(0), labels, lse, grad, V,
                                                          IGNORE_INDEX, BLOCK_V=BLOCK_V, num_warps=NUM_WARPS)
    return logits

