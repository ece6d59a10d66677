"""Output layer + cross-entropy fused over chunks of tokens: per-token losses without the full logits.

What and why
------------
Megatron computes the LM loss as ``logits = hidden @ weight.T`` (``[s, b, V]`` in bf16), then
cross-entropy on ``logits.float()``. At 128K tokens and SpikingBrain's vocabulary (152,064) the bf16
logits alone take ~40 GB, the fp32 copy and the fp32 log-softmax that autograd saves ~80 GB more:
a 7B-width model cannot train at 128K on one 80 GB GPU. :func:`linear_cross_entropy` takes the last
hidden states and the output-layer weight instead of the logits and walks the tokens in chunks of
``chunk_tokens``: only one chunk's logits ``[chunk, V]`` exist at a time (in the input dtype from the
GEMM, then fp32 for the softmax, as Megatron does), and backward recomputes them rather than keeping
them. What is saved for backward is the inputs plus one fp32 logsumexp per token. The price is the
forward GEMM done twice (4 GEMM-equivalents instead of 3).

Math
----
Per token ``i`` with logits ``z_i = W h_i`` (``W`` is ``[V, h]``), ``lse_i = log sum_v exp(z_iv)``
and ``loss_i = lse_i - z_i[y_i]``. Given the upstream gradient ``g_i = dL/dloss_i``::

    dL/dz_i = g_i * (softmax(z_i) - onehot(y_i)),   softmax(z_i) = exp(z_i - lse_i)
    dL/dh_i = (dL/dz_i) @ W                          [h]
    dL/dW   = sum_i (dL/dz_i)^T h_i                  [V, h]

Backward rebuilds ``z`` chunk by chunk, turns it into ``dL/dz`` in place (fp32, cast to the input
dtype for the GEMMs, as the unfused autograd does), writes that chunk's rows of ``dL/dh`` and adds
its share of ``dL/dW`` into an fp32 accumulator cast to the weight's dtype at the end. A gradient
the caller does not need (``needs_input_grad``) is not computed: no ``dL/dW`` GEMMs for a frozen
output layer, no ``dL/dh`` GEMMs for a detached hidden state.

Layout
------
``hidden [s, b, h]`` (Megatron's sequence-first order) and ``labels [b, s]`` in, fp32 losses ``[b, s]``
out, the shape and layout of ``compute_language_model_loss``. Internally the tokens are a contiguous
``[s * b, h]`` view (sequence-major; labels are transposed to match, a small copy) chunked along
rows; the losses are transposed back at the end.

Limits: the weight is the *whole* vocabulary (tensor-parallel vocab shards need Megatron's
vocab-parallel cross-entropy, with its all-reduces of max, sum and target logit); labels must lie in
``[0, V)`` (unchecked, which would sync: an index error on CPU, a device assert on GPU; note that
the reference, through ``F.cross_entropy``, gives 0 for the label -100); no double backward.
"""

from __future__ import annotations

from torch import Tensor

from ops.loss.chunked import ChunkedLinearCrossEntropy
from ops.loss.reference import check_inputs, reference_linear_cross_entropy

__all__ = ["linear_cross_entropy", "reference_linear_cross_entropy"]


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, chunk_tokens: int = 4096) -> Tensor:
    """Per-token cross-entropy of ``hidden @ weight.T`` against ``labels``, ``chunk_tokens`` logits rows at a time.

    Args:
        hidden: last hidden states ``[s, b, h]`` (sequence first).
        weight: output-layer weight ``[V, h]`` (the full vocabulary), same dtype as ``hidden``.
        labels: int64 targets ``[b, s]`` (batch first) in ``[0, V)``.
        chunk_tokens: tokens per chunk (>= 1); the transient memory is about
            ``chunk_tokens * V * (4 + 2 * itemsize)`` bytes (fp32 logits and their input-dtype twin).

    Returns:
        fp32 losses ``[b, s]`` (contiguous), equal to :func:`reference_linear_cross_entropy` up to
        rounding; differentiable w.r.t. ``hidden`` and ``weight``.
    """
    check_inputs(hidden, weight, labels)
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be an int >= 1; got {chunk_tokens!r}")
    s, b, h = hidden.shape
    tokens_h = hidden.reshape(s * b, h).contiguous()
    tokens_y = labels.t().reshape(s * b)
    loss = ChunkedLinearCrossEntropy.apply(tokens_h, weight, tokens_y, chunk_tokens)
    return loss.view(s, b).t().contiguous()
