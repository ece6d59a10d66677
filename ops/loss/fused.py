"""Triton backend of ``ops.loss.linear_cross_entropy``: bf16 logits, fp32 math in two kernels, in-place gradient.

Per chunk of tokens the logits ``h @ W.T`` come from one GEMM in the inputs' dtype into a buffer
reused by every chunk; ``ops.loss.kernels`` turns them into fp32 logsumexp + loss (forward) and,
in backward, overwrites them in place with ``g * (softmax - onehot)``, which the two gradient
GEMMs read directly. So the transient memory is one chunk's logits in the inputs'
dtype (``chunk * V * 2`` bytes in bf16; the torch backend also holds an fp32 copy and its fp32
gradient) plus the fp32 weight-gradient sum (``ops.loss.chunked.WeightGradSum``; none with
gradient-accumulation fusion under DDP, where the chunks accumulate into ``weight.main_grad``).

Saved logits or recomputation: when all tokens fit in one chunk (``N <= chunk_tokens``, e.g. an
8K-token micro-batch under ``train.loss_chunk_tokens: auto``) forward keeps that chunk's logits
for backward, which overwrites them with the gradient: 3 GEMMs, as Megatron, while holding
``N * V * 2`` bytes between forward and backward where Megatron holds its fp32 softmax
(``N * V * 4``). With several chunks nothing ``[N, V]``-sized is kept and backward recomputes each
chunk's logits (4 GEMMs): the path for sequences whose logits do not fit. A second backward
through the same graph (``retain_graph``) recomputes too, since the first one consumed the logits.

Why not produce the gradients in forward (as liger-kernel's fused linear cross-entropy does)? They
need the upstream ``dL/dloss`` per token, which in training is ``loss_mask / loss_tokens`` times the
schedule's scale (``1 / num_microbatches``, the sequence-parallel factor, a loss scale): known only
once Megatron's schedule calls backward. Producing them in forward would hard-code the loss
function into the op (any other use of the per-token losses would get silently wrong gradients)
and keep ``dL/dW`` (fp32 ``V * h``, 2.2 GB at 7B width) alive from forward to backward; keeping
the bf16 logits of one chunk instead costs no GEMM and no assumption.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from ops.loss.chunked import WeightGradSum, chunk_bounds, chunk_logits
from ops.loss.kernels import grad_logits_, lse_and_loss
from ops.main_grad import fused_main_grad


def _logits_buffer(hidden: Tensor, weight: Tensor, chunk_tokens: int) -> Tensor:
    """One chunk's ``[min(chunk, N), V]`` logits in the inputs' dtype, reused by every chunk."""
    rows = min(chunk_tokens, hidden.shape[0])
    return torch.empty(rows, weight.shape[0], dtype=hidden.dtype, device=hidden.device)


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Same contract as ``ops.loss.chunked.ChunkedLinearCrossEntropy`` (token-major ``[N, h]``, ``[N]``)."""

    @staticmethod
    def forward(ctx: FunctionCtx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk_tokens: int,
                grad_accum_fusion: bool = False) -> Tensor:
        n = hidden.shape[0]
        loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        buffer = _logits_buffer(hidden, weight, chunk_tokens)
        chunks = chunk_bounds(n, chunk_tokens)
        for start, end in chunks:
            logits = chunk_logits(hidden[start:end], weight, out=buffer[:end - start])
            lse_and_loss(logits, labels[start:end], lse[start:end], loss[start:end])
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk_tokens = chunk_tokens
        ctx.main_grad = fused_main_grad(weight, grad_accum_fusion)  # on ctx, as the torch backend
        # one chunk: its logits are kept for backward, which turns them into the gradient in place
        ctx.saved_logits = buffer if len(chunks) == 1 else None
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_loss: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        hidden, weight, labels, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_hidden or need_weight):
            ctx.saved_logits = None
            return None, None, None, None, None
        # autograd may hand an expanded (stride 0) or lower-precision gradient; the kernel reads fp32 rows
        grad_loss = grad_loss.to(torch.float32).contiguous()
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = WeightGradSum(weight, ctx.main_grad) if need_weight else None
        saved, ctx.saved_logits = ctx.saved_logits, None  # consumed: a second backward recomputes
        buffer = saved if saved is not None else _logits_buffer(hidden, weight, ctx.chunk_tokens)
        for start, end in chunk_bounds(hidden.shape[0], ctx.chunk_tokens):
            h_chunk = hidden[start:end]
            logits = buffer if saved is not None else chunk_logits(h_chunk, weight, out=buffer[:end - start])
            g = grad_logits_(logits, labels[start:end], lse[start:end], grad_loss[start:end])
            if grad_hidden is not None:
                torch.mm(g, weight, out=grad_hidden[start:end])
            if grad_weight is not None:
                grad_weight.add(g, h_chunk)
        return grad_hidden, None if grad_weight is None else grad_weight.result(), None, None, None
