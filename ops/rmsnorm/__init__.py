"""RMSNorm over the last dim computed in fp32, output in the input's dtype (the mixers' per-head norm).

    y = (x / sqrt(mean(x^2, -1) + eps) * w).to(x.dtype)     x: [..., d], w: [d], math in fp32

GLA and both branches of the parallel hybrid normalise every head's output this way, with
one weight shared by all heads (``sbtrain.model.gla.head_rms_norm`` adds the TP reduction of
the weight's gradient around this op).

Backends:
    torch (reference): the fp32 formula above in plain torch (what the model computed before
        this op existed, operation for operation).
    triton: one kernel forward (reads x once, writes y once), one backward (recomputes the
        normalised row; ``dw`` as fp32 per-program partial sums then one torch sum); CUDA and
        MACA tensors of fp32/bf16/fp16. Saves only ``x`` and ``w``.

The layer norms (input, pre-MLP, final) are not here: they are ``torch.nn.RMSNorm``
(Megatron's ``WrappedTorchNorm`` without TE/apex), and ``torch.rms_norm`` on CUDA dispatches
to ATen's fused ``_fused_rms_norm`` / ``_fused_rms_norm_backward`` kernels (torch >= 2.8;
checked by ``tests/ops/test_rmsnorm.py::test_torch_rms_norm_is_fused_on_gpu``).

Numerics of the Triton path: the same fp32 formula with a different summation order and
Triton's ``rsqrt``: fp32 results within a few ulp; bf16/fp16 outputs and ``dx`` can differ by
one ulp of the output dtype where the fp32 value sits at a rounding boundary; ``dw`` is an
fp32 sum over all rows in a different order (relative differences ~1e-6).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ops.backends import Backend, Check, dispatch, get_registry, tensor_verifier, triton_available

__all__ = ["head_rms_norm"]

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# One row must fit a Triton block; head dims are 64-256.
MAX_TRITON_DIM = 8192


def _check_args(x: Tensor, weight: Tensor) -> None:
    if x.dim() == 0 or weight.shape != x.shape[-1:]:
        raise ValueError(f"head_rms_norm: weight shape {tuple(weight.shape)} must equal the last dim "
                         f"of x {tuple(x.shape)}")


@dispatch("head_rms_norm")
def head_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm of ``x`` over its last dim in fp32 with ``weight`` [d]; returns ``x.dtype``."""
    _check_args(x, weight)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)


def _triton_head_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    _check_args(x, weight)
    # imported on first call: the kernels' module imports triton
    # deferred: Triton loads only when the GPU backend is called
    from ops.rmsnorm.triton_kernels import head_rms_norm_triton

    return head_rms_norm_triton(x, weight, eps)


_device_dtype_ok = tensor_verifier(device_types=("cuda",), dtypes=TRITON_DTYPES)


def _triton_verifier(x: Tensor, weight: Tensor, eps: float) -> Check:
    """CUDA/MACA fp32/bf16/fp16 tensors with a row of at most MAX_TRITON_DIM elements."""
    ok, reason = _device_dtype_ok(x, weight)
    if ok and (x.dim() == 0 or not 0 < x.shape[-1] <= MAX_TRITON_DIM):
        return False, f"last dim must be in 1..{MAX_TRITON_DIM} (shape {tuple(x.shape)})"
    return ok, reason


get_registry("head_rms_norm").register(
    Backend(name="triton", fn=_triton_head_rms_norm, kind="triton",
            available=lambda: triton_available("cuda"), verifier=_triton_verifier))
