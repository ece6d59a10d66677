"""Chunked output layer + cross-entropy in plain torch: one chunk of tokens' logits alive at a time.

``ChunkedLinearCrossEntropy`` works on token-major 2-D tensors (``hidden [N, h]``, ``labels [N]``);
``ops.loss.linear_cross_entropy`` maps Megatron's ``[s, b, h]`` / ``[b, s]`` layout onto it and
registers this as the op's torch backend. The math of the backward is in the ``ops.loss``
docstring. :func:`chunk_bounds`, :func:`chunk_logits` and :class:`WeightGradSum` are shared with the
Triton backend (``ops.loss.fused``).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from maca_compat.fused_optim import wgrad_gemm_accum
from ops.main_grad import fused_main_grad, grad_for_autograd

IGNORE_INDEX = -100
"""A label with this value adds 0 to the loss and nothing to the gradients (``F.cross_entropy``'s default)."""


def chunk_logits(hidden_chunk: Tensor, weight: Tensor, out: Tensor | None = None) -> Tensor:
    """``hidden_chunk @ weight.T`` ``[c, V]`` in the inputs' dtype (into ``out`` when given).

    Autocast is switched off so the product has the same dtype in forward and in the backward's
    recomputation (autocast is not active during backward): the saved logsumexp must belong to
    the very logits that backward rebuilds.
    """
    with torch.autocast(hidden_chunk.device.type, enabled=False):
        return torch.mm(hidden_chunk, weight.t(), out=out)


def chunk_bounds(n_tokens: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each chunk of at most ``chunk_tokens`` tokens, in order."""
    return [(i, min(i + chunk_tokens, n_tokens)) for i in range(0, n_tokens, chunk_tokens)]


class WeightGradSum:
    """``sum over chunks of grad_logits.T @ hidden_chunk`` in fp32: cast to the weight's dtype
    once, or accumulated straight into the weight's ``main_grad``.

    Each chunk's product goes into the fp32 sum by ``maca_compat.fused_optim.wgrad_gemm_accum``
    (the GEMM Megatron's gradient-accumulation fusion uses here): on CUDA one cuBLAS GEMM with an
    fp32 output and beta = 1, never rounded to bf16; elsewhere an fp32 GEMM of upcast operands.
    So the only roundings of the weight gradient to a 16-bit dtype are that of ``grad_logits``
    (as in Megatron's unfused autograd) and the final cast: the chunk count does not change the
    numerics (before, each chunk's product was rounded to bf16: ~1e-3 relative error at 100 chunks).

    ``main_grad`` (``ops.main_grad.fused_main_grad``: the run fuses gradient accumulation and the
    weight is under Megatron DDP): the sum *is* ``main_grad``, so there is no ``[V, h]`` fp32
    temporary, no cast and no DDP add, and :meth:`result` is the placeholder of Megatron's
    protocol (``ops.main_grad.grad_for_autograd``).
    """

    def __init__(self, weight: Tensor, main_grad: Tensor | None = None) -> None:
        self.weight, self.main_grad = weight, main_grad
        self.total = main_grad if main_grad is not None else \
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)

    def add(self, grad_logits: Tensor, hidden_chunk: Tensor) -> None:
        """Add ``grad_logits.T @ hidden_chunk`` (``[c, V]``, ``[c, h]``, one dtype) to the sum."""
        wgrad_gemm_accum(hidden_chunk, grad_logits, self.total)

    def result(self) -> Tensor | None:
        """The weight's gradient for autograd: the sum in the weight's dtype, or (accumulated
        into ``main_grad``) the protocol's placeholder."""
        if self.main_grad is not None:
            return grad_for_autograd(self.weight)
        return self.total.to(self.weight.dtype)


def forward_chunks(hidden: Tensor, weight: Tensor, labels: Tensor, chunk_tokens: int) -> tuple[Tensor, Tensor]:
    """Per-token losses and logsumexps, both fp32 ``[N]``, one chunk of logits at a time."""
    n = hidden.shape[0]
    loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    for start, end in chunk_bounds(n, chunk_tokens):
        logits = chunk_logits(hidden[start:end], weight).float()
        y = labels[start:end]
        lse[start:end] = torch.logsumexp(logits, dim=1)
        target = logits.gather(1, y.clamp(min=0)[:, None]).squeeze(1)
        loss[start:end] = torch.where(y != IGNORE_INDEX, lse[start:end] - target, 0.0)
    return loss, lse


def chunk_grad_logits(hidden_chunk: Tensor, weight: Tensor, labels_chunk: Tensor, lse_chunk: Tensor,
                      grad_chunk: Tensor) -> Tensor:
    """``dL/dlogits = grad * (softmax - onehot(label))`` for one chunk, in the inputs' dtype ``[c, V]``."""
    # in place on the fp32 logits: the chunk's only fp32 [c, V] buffer
    probs = chunk_logits(hidden_chunk, weight).float().sub_(lse_chunk[:, None]).exp_()
    valid = labels_chunk != IGNORE_INDEX
    rows = torch.arange(probs.shape[0], device=probs.device)
    probs[rows, labels_chunk.clamp(min=0)] -= valid.float()
    probs.mul_(torch.where(valid, grad_chunk, 0.0)[:, None])
    return probs.to(hidden_chunk.dtype)


def backward_chunks(hidden: Tensor, weight: Tensor, labels: Tensor, lse: Tensor, grad_loss: Tensor,
                    chunk_tokens: int, need_hidden: bool, need_weight: bool,
                    main_grad: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of ``sum(grad_loss * loss)`` w.r.t. hidden ``[N, h]`` and weight ``[V, h]`` (None if not
    needed); with ``main_grad`` the weight's goes into it (:class:`WeightGradSum`)."""
    grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
    grad_weight = WeightGradSum(weight, main_grad) if need_weight else None
    for start, end in chunk_bounds(hidden.shape[0], chunk_tokens):
        h_chunk = hidden[start:end]
        g = chunk_grad_logits(h_chunk, weight, labels[start:end], lse[start:end], grad_loss[start:end])
        if grad_hidden is not None:
            torch.mm(g, weight, out=grad_hidden[start:end])
        if grad_weight is not None:
            grad_weight.add(g, h_chunk)
    return grad_hidden, None if grad_weight is None else grad_weight.result()


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``loss[i] = logsumexp(hidden[i] @ weight.T) - (hidden[i] @ weight.T)[labels[i]]``, chunked.

    Saves only the inputs and the fp32 per-token logsumexp; backward recomputes each chunk's logits.
    ``grad_accum_fusion``: accumulate the weight gradient into ``weight.main_grad`` when it has one
    (``ops.main_grad``).
    """

    @staticmethod
    def forward(ctx: FunctionCtx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk_tokens: int,
                grad_accum_fusion: bool = False) -> Tensor:
        loss, lse = forward_chunks(hidden, weight, labels, chunk_tokens)
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk_tokens = chunk_tokens
        # on ctx, not saved: saving would version-check a buffer that every backward writes (as Megatron)
        ctx.main_grad = fused_main_grad(weight, grad_accum_fusion)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_loss: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        hidden, weight, labels, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_hidden or need_weight):
            return None, None, None, None, None
        grad_hidden, grad_weight = backward_chunks(hidden, weight, labels, lse, grad_loss, ctx.chunk_tokens,
                                                   need_hidden, need_weight, ctx.main_grad)
        return grad_hidden, grad_weight, None, None, None
