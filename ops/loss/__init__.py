"""Output layer + cross-entropy fused over chunks of tokens: per-token losses without the full logits.

What and why
------------
Megatron computes the LM loss as ``logits = hidden @ weight.T`` (``[s, b, V]`` in bf16), then
cross-entropy on ``logits.float()``. At 128K tokens and SpikingBrain's vocabulary (152,064) the bf16
logits alone take ~40 GB, the fp32 copy and the fp32 log-softmax that autograd saves ~80 GB more:
a 7B-width model cannot train at 128K on one 80 GB GPU. :func:`linear_cross_entropy` takes the last
hidden states and the output-layer weight instead of the logits and walks the tokens in chunks of
``chunk_tokens``: only one chunk's logits ``[chunk, V]`` exist at a time, and with several chunks
backward recomputes them rather than keeping them. What is saved for backward is the inputs plus
one fp32 logsumexp per token (and, on the Triton backend, a single chunk's logits). The price of
recomputation is the forward GEMM done twice (4 GEMM-equivalents instead of 3).

Backends (``ops.backends`` registry, op ``linear_cross_entropy``; ``SB_OP_BACKEND_LINEAR_CROSS_ENTROPY``
forces one):

- ``triton`` (``ops.loss.fused`` + ``ops.loss.kernels``, GPUs: CUDA and MetaX): the logits stay in
  the inputs' dtype; fp32 logsumexp/loss in one kernel, the gradient written over the logits in
  place by another. One chunk's bf16 logits are the only ``[chunk, V]`` tensor; when all tokens
  fit in one chunk they are kept for backward instead of recomputed (3 GEMMs, as Megatron).
- ``torch_chunked`` (``ops.loss.chunked``, the reference backend, every device): the same steps in
  plain torch, with an fp32 copy of each chunk's logits.

Both sum the weight gradient over chunks in fp32 (``chunked.WeightGradSum``: a GEMM with an fp32
output accumulating into the sum on CUDA, fp32 GEMMs of upcast operands elsewhere), so the result
does not depend on the chunk size. With ``grad_accum_fusion`` (the run's Megatron
``gradient_accumulation_fusion``) and a weight under Megatron DDP, that sum is the weight's fp32
``main_grad`` itself: no ``[V, h]`` temporary, no cast to the weight's dtype and no DDP add
(``ops.main_grad`` has the protocol; a tied embedding's ``main_grad`` then gets both gradients).
``reference_linear_cross_entropy`` (whole logits, Megatron's unfused math) is the spec in tests.

Math
----
Per token ``i`` with logits ``z_i = W h_i`` (``W`` is ``[V, h]``), ``lse_i = log sum_v exp(z_iv)``
and ``loss_i = lse_i - z_i[y_i]``. Given the upstream gradient ``g_i = dL/dloss_i``::

    dL/dz_i = g_i * (softmax(z_i) - onehot(y_i)),   softmax(z_i) = exp(z_i - lse_i)
    dL/dh_i = (dL/dz_i) @ W                          [h]
    dL/dW   = sum_i (dL/dz_i)^T h_i                  [V, h]

Backward rebuilds ``z`` chunk by chunk, turns it into ``dL/dz`` (computed in fp32, rounded to the
input dtype for the GEMMs, as the unfused autograd does), writes that chunk's rows of ``dL/dh`` and
adds its share of ``dL/dW``, a product with an fp32 result, into an fp32 sum cast to the weight's
dtype at the end. A gradient the caller does not need (``needs_input_grad``) is not computed: no
``dL/dW`` GEMMs for a frozen output layer, no ``dL/dh`` GEMMs for a detached hidden state.

Layout
------
``hidden [s, b, h]`` (Megatron's sequence-first order) and ``labels [b, s]`` in, fp32 losses ``[b, s]``
out, the shape and layout of ``compute_language_model_loss``. Internally the tokens are a contiguous
``[s * b, h]`` view (sequence-major; labels are transposed to match, a small copy) chunked along
rows; the losses are transposed back at the end.

Limits: the weight is the *whole* vocabulary (tensor-parallel vocab shards need Megatron's
vocab-parallel cross-entropy, with its all-reduces of max, sum and target logit); labels must lie in
``[0, V)`` or be ``IGNORE_INDEX`` (-100: loss 0, no gradient, as ``F.cross_entropy``); other values
are unchecked (checking would sync: an index error on CPU, undefined reads on GPU); no double
backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ops.backends import Backend, Check, dispatch, get_registry, triton_available
from ops.loss.chunked import IGNORE_INDEX, ChunkedLinearCrossEntropy
from ops.loss.reference import check_inputs, reference_linear_cross_entropy

__all__ = ["IGNORE_INDEX", "linear_cross_entropy", "reference_linear_cross_entropy"]

TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _run(function: type, hidden: Tensor, weight: Tensor, labels: Tensor, chunk_tokens: int,
         grad_accum_fusion: bool = False) -> Tensor:
    """Check the call, map ``[s, b, h]`` / ``[b, s]`` to token-major rows, apply ``function``, map back."""
    check_inputs(hidden, weight, labels)
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be an int >= 1; got {chunk_tokens!r}")
    s, b, h = hidden.shape
    tokens_h = hidden.reshape(s * b, h).contiguous()
    tokens_y = labels.t().reshape(s * b)
    loss = function.apply(tokens_h, weight, tokens_y, chunk_tokens, bool(grad_accum_fusion))
    return loss.view(s, b).t().contiguous()


@dispatch("linear_cross_entropy", reference_name="torch_chunked")
def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, chunk_tokens: int = 4096, *,
                         grad_accum_fusion: bool = False) -> Tensor:
    """Per-token cross-entropy of ``hidden @ weight.T`` against ``labels``, ``chunk_tokens`` logits rows at a time.

    Args:
        hidden: last hidden states ``[s, b, h]`` (sequence first).
        weight: output-layer weight ``[V, h]`` (the full vocabulary), same dtype as ``hidden``.
        labels: int64 targets ``[b, s]`` (batch first) in ``[0, V)``, or ``IGNORE_INDEX``.
        chunk_tokens: tokens per chunk (>= 1); the transient memory is about
            ``chunk_tokens * V * (4 + 2 * itemsize)`` bytes on this torch backend (fp32 logits and
            their input-dtype twin), ``chunk_tokens * V * itemsize`` on the Triton backend.
        grad_accum_fusion: the run's gradient-accumulation fusion (``config.gradient_accumulation_fusion``):
            when the weight has ``main_grad`` (Megatron DDP) its gradient is accumulated straight
            into it, chunk by chunk, and autograd gets Megatron's placeholder (``ops.main_grad``).

    Returns:
        fp32 losses ``[b, s]`` (contiguous), equal to :func:`reference_linear_cross_entropy` up to
        rounding; differentiable w.r.t. ``hidden`` and ``weight``.
    """
    return _run(ChunkedLinearCrossEntropy, hidden, weight, labels, chunk_tokens, grad_accum_fusion)


def _triton_linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, chunk_tokens: int = 4096, *,
                                 grad_accum_fusion: bool = False) -> Tensor:
    # deferred: ops.loss.fused imports triton, which CPU-only installs may lack
    from ops.loss.fused import FusedLinearCrossEntropy

    return _run(FusedLinearCrossEntropy, hidden, weight, labels, chunk_tokens, grad_accum_fusion)


def _triton_verifier(hidden: Tensor, weight: Tensor, *args, **kwargs) -> Check:
    """GPU tensors of one 16/32-bit float dtype; anything else goes to the torch backend (which raises on bad calls)."""
    for t in (hidden, weight):
        if t.device.type != "cuda":
            return False, f"input device {t.device.type!r} is not a GPU"
    if hidden.dtype not in TRITON_DTYPES or weight.dtype != hidden.dtype:
        return False, f"dtypes {hidden.dtype}/{weight.dtype}: need one of {TRITON_DTYPES} for both"
    return True, "accepted"


def _triton_importable() -> Check:
    # the device is checked per call by the verifier; here only whether triton can load
    return triton_available("cuda")


get_registry("linear_cross_entropy").register(
    Backend(name="triton", fn=_triton_linear_cross_entropy, kind="triton", available=_triton_importable,
            verifier=_triton_verifier))
