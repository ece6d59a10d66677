"""Chunked output layer + cross-entropy: one chunk of tokens' logits alive at a time.

``ChunkedLinearCrossEntropy`` works on token-major 2-D tensors (``hidden [N, h]``, ``labels [N]``);
``ops.loss.linear_cross_entropy`` maps Megatron's ``[s, b, h]`` / ``[b, s]`` layout onto it. The
math of the backward is in the ``ops.loss`` docstring.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable


def chunk_logits(hidden_chunk: Tensor, weight: Tensor) -> Tensor:
    """``hidden_chunk @ weight.T`` as fp32 ``[c, V]``, the product taken in the inputs' dtype.

    Autocast is switched off so the product has the same dtype in forward and in the backward's
    recomputation (autocast is not active during backward): the saved logsumexp must belong to
    the very logits that backward rebuilds.
    """
    with torch.autocast(hidden_chunk.device.type, enabled=False):
        return torch.mm(hidden_chunk, weight.t()).float()


def chunk_bounds(n_tokens: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each chunk of at most ``chunk_tokens`` tokens, in order."""
    return [(i, min(i + chunk_tokens, n_tokens)) for i in range(0, n_tokens, chunk_tokens)]


def forward_chunks(hidden: Tensor, weight: Tensor, labels: Tensor, chunk_tokens: int) -> tuple[Tensor, Tensor]:
    """Per-token losses and logsumexps, both fp32 ``[N]``, one chunk of logits at a time."""
    n = hidden.shape[0]
    loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    for start, end in chunk_bounds(n, chunk_tokens):
        logits = chunk_logits(hidden[start:end], weight)
        lse[start:end] = torch.logsumexp(logits, dim=1)
        loss[start:end] = lse[start:end] - logits.gather(1, labels[start:end, None]).squeeze(1)
    return loss, lse


def chunk_grad_logits(hidden_chunk: Tensor, weight: Tensor, labels_chunk: Tensor, lse_chunk: Tensor,
                      grad_chunk: Tensor) -> Tensor:
    """``dL/dlogits = grad * (softmax - onehot(label))`` for one chunk, in the inputs' dtype ``[c, V]``."""
    # in place on the fp32 logits: the chunk's only fp32 [c, V] buffer
    probs = chunk_logits(hidden_chunk, weight).sub_(lse_chunk[:, None]).exp_()
    rows = torch.arange(probs.shape[0], device=probs.device)
    probs[rows, labels_chunk] -= 1.0
    probs.mul_(grad_chunk[:, None])
    return probs.to(hidden_chunk.dtype)


def backward_chunks(hidden: Tensor, weight: Tensor, labels: Tensor, lse: Tensor, grad_loss: Tensor,
                    chunk_tokens: int, need_hidden: bool, need_weight: bool) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of ``sum(grad_loss * loss)`` w.r.t. hidden ``[N, h]`` and weight ``[V, h]`` (None if not needed).

    The weight gradient is summed over chunks in fp32 and cast to the weight's dtype once at the end.
    """
    grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
    for start, end in chunk_bounds(hidden.shape[0], chunk_tokens):
        h_chunk = hidden[start:end]
        g = chunk_grad_logits(h_chunk, weight, labels[start:end], lse[start:end], grad_loss[start:end])
        if grad_hidden is not None:
            torch.mm(g, weight, out=grad_hidden[start:end])
        if grad_weight is not None:
            if g.dtype == torch.float32:
                grad_weight.addmm_(g.t(), h_chunk)
            else:
                # the product is in the inputs' dtype (a portable GEMM); only the sum over chunks is fp32
                grad_weight.add_(torch.mm(g.t(), h_chunk))
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    return grad_hidden, grad_weight


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``loss[i] = logsumexp(hidden[i] @ weight.T) - (hidden[i] @ weight.T)[labels[i]]``, chunked.

    Saves only the inputs and the fp32 per-token logsumexp; backward recomputes each chunk's logits.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk_tokens: int) -> Tensor:
        loss, lse = forward_chunks(hidden, weight, labels, chunk_tokens)
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk_tokens = chunk_tokens
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_loss: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        hidden, weight, labels, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_hidden or need_weight):
            return None, None, None, None
        grad_hidden, grad_weight = backward_chunks(hidden, weight, labels, lse, grad_loss, ctx.chunk_tokens,
                                                   need_hidden, need_weight)
        return grad_hidden, grad_weight, None, None
