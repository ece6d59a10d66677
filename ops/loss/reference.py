"""Plain-torch output layer + cross-entropy: the spec that ``ops.loss.chunked`` matches.

It does what Megatron-Core does unfused: the output layer's ``logits = hidden @ weight.T`` in the
inputs' dtype, then ``compute_language_model_loss``'s cross-entropy on ``logits.float()``. It
materialises the whole ``[s, b, V]`` logits (in the input dtype, plus the fp32 copy and the fp32
log-softmax autograd saves), so it is for tests and short sequences only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def check_inputs(hidden: Tensor, weight: Tensor, labels: Tensor) -> None:
    """Raise ``ValueError`` (shapes) or ``TypeError`` (dtypes) unless the call follows the layout.

    Only metadata is read: label values are not checked (that would sync with the device).
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [s, b, h] (sequence first); got shape {tuple(hidden.shape)}")
    s, b, h = hidden.shape
    if weight.dim() != 2 or weight.shape[1] != h:
        raise ValueError(f"weight must be [V, h] with h = {h} (hidden's last dim); got shape {tuple(weight.shape)}")
    if tuple(labels.shape) != (b, s):
        raise ValueError(f"labels must be [b, s] = [{b}, {s}] (batch first, hidden is [s, b, h]); "
                         f"got shape {tuple(labels.shape)}")
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise TypeError(f"hidden and weight must share one floating dtype; got {hidden.dtype} and {weight.dtype}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be int64 class indices; got {labels.dtype}")


def reference_linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """Per-token ``-log softmax(hidden @ weight.T)[label]``, the whole logits at once.

    Args:
        hidden: last hidden states ``[s, b, h]`` (Megatron's sequence-first layout).
        weight: output-layer weight ``[V, h]``, same dtype as ``hidden``.
        labels: int64 targets ``[b, s]`` in ``[0, V)``.

    Returns:
        fp32 losses ``[b, s]`` (contiguous), as Megatron's ``compute_language_model_loss``.
    """
    check_inputs(hidden, weight, labels)
    s, b, _ = hidden.shape
    logits = torch.matmul(hidden, weight.t())
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.t().reshape(-1), reduction="none")
    return loss.view(s, b).t().contiguous()
