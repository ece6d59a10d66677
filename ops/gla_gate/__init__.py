"""Log-decay of the linear-attention gates: ``logsigmoid(±g) / normalizer`` in fp32.

    GLA (SpikingBrain-7B):    log a = logsigmoid(W_up W_down x + b) / normalizer
    parallel hybrid (76B):    log g = logsigmoid(-k)          (key-tied gate, g = 1 - sigmoid(k))

``gate_log_decay(gate, normalizer, negate)`` returns fp32 of ``gate``'s shape; the gradient
flows back to ``gate`` in its dtype.

Backends:
    torch (reference): ``F.logsigmoid(±gate.float()) / normalizer`` (the model's formula before
        this op existed; three passes over the gate plus a cast).
    triton: one elementwise kernel forward, one backward; CUDA and MACA tensors of
        fp32/bf16/fp16. ``log1p`` is computed without libdevice (Goldberg's correction), the
        division by the normalizer is round-to-nearest (``div_rn``).

Numerics of the Triton path: fp32 within a few ulp of the reference (``exp``/``log``
implementations differ); the bf16/fp16 input gradient can differ by one ulp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ops.backends import Backend, Check, dispatch, get_registry, tensor_verifier, triton_available

__all__ = ["gate_log_decay"]

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_args(gate: Tensor, normalizer: float) -> None:
    if not gate.is_floating_point():
        raise TypeError(f"gate_log_decay needs a floating-point gate, got {gate.dtype}")
    if not normalizer > 0:
        raise ValueError(f"gate normalizer must be > 0, got {normalizer}")


@dispatch("gate_log_decay")
def gate_log_decay(gate: Tensor, normalizer: float = 1.0, negate: bool = False) -> Tensor:
    """``logsigmoid(-gate if negate else gate) / normalizer`` in fp32 (shape of ``gate``)."""
    _check_args(gate, normalizer)
    g = gate.float()
    return F.logsigmoid(-g if negate else g) / normalizer


def _triton_gate_log_decay(gate: Tensor, normalizer: float = 1.0, negate: bool = False) -> Tensor:
    _check_args(gate, normalizer)
    # imported on first call: the kernels' module imports triton
    # deferred: Triton loads only when the GPU backend is called
    from ops.gla_gate.triton_kernels import gate_log_decay_triton

    return gate_log_decay_triton(gate, normalizer, negate)


_verify_device_dtype = tensor_verifier(device_types=("cuda",), dtypes=TRITON_DTYPES)


def _triton_verifier(gate: Tensor, normalizer: float = 1.0, negate: bool = False) -> Check:
    return _verify_device_dtype(gate)


get_registry("gate_log_decay").register(
    Backend(name="triton", fn=_triton_gate_log_decay, kind="triton",
            available=lambda: triton_available("cuda"), verifier=_triton_verifier))
