"""SwiGLU on Megatron's fused fc1 output: ``swiglu(x) = silu(x1) * x2`` with ``x1, x2 = chunk(x, 2, -1)``.

Layout: ``x`` is ``[..., 2F]``; the first half is the gate (silu), the second the linear
part, as Megatron's ``MLP`` (``torch.chunk(x, 2, -1)`` then ``activation_func(x_glu) *
x_linear``) and its fused ``fusions/fused_bias_swiglu.swiglu`` both read it.

Backends:
    torch (reference): ``F.silu(x1) * x2`` in ``x.dtype`` (what Megatron's unfused path computes).
    triton: one kernel forward, one backward (``ops.swiglu.triton_kernels``); saves only ``x``
        and recomputes the sigmoid in backward. CUDA and MACA tensors of fp32/bf16/fp16.

Numerics of the Triton path: it computes ``silu(x1) * x2`` in fp32 and rounds once to
``x.dtype``; the reference rounds ``silu(x1)`` to ``x.dtype`` first. In fp32 the two agree to
a few ulp (sigmoid implementations differ); in bf16/fp16 an element can differ by one ulp
of the output (a double rounding). The same holds for both input gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ops.backends import Backend, Check, dispatch, get_registry, tensor_verifier, triton_available

__all__ = ["swiglu", "SwiGLU"]

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_args(x: Tensor) -> None:
    """Same error on every backend for an input with no two equal halves."""
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"swiglu needs an even last dim [..., 2F] (gate half first), got shape {tuple(x.shape)}")


@dispatch("swiglu")
def swiglu(x: Tensor) -> Tensor:
    """``silu(x[..., :F]) * x[..., F:]`` for ``x`` of shape ``[..., 2F]``; returns ``[..., F]``."""
    _check_args(x)
    gate, linear = torch.chunk(x, 2, dim=-1)
    return F.silu(gate) * linear


def _triton_swiglu(x: Tensor) -> Tensor:
    _check_args(x)
    # imported on first call: the kernels' module imports triton
    # deferred: Triton loads only when the GPU backend is called
    from ops.swiglu.triton_kernels import swiglu_triton

    return swiglu_triton(x)


_device_dtype_ok = tensor_verifier(device_types=("cuda",), dtypes=TRITON_DTYPES)


def _triton_verifier(x: Tensor) -> Check:
    """CUDA/MACA tensor of fp32/bf16/fp16 with an even, non-empty last dim."""
    ok, reason = _device_dtype_ok(x)
    if ok and (x.dim() == 0 or x.shape[-1] == 0 or x.shape[-1] % 2):
        return False, f"last dim must be even and non-empty (shape {tuple(x.shape)})"
    return ok, reason


get_registry("swiglu").register(
    Backend(name="triton", fn=_triton_swiglu, kind="triton",
            available=lambda: triton_available("cuda"), verifier=_triton_verifier))


class SwiGLU(torch.nn.Module):
    """The op as a module, for Megatron's ``MLPSubmodules.activation_func`` slot.

    Megatron builds that slot with ``activation_func(config=config)`` and, when
    ``config.use_te_activation_func`` is set, applies it to the whole fc1 output
    (``transformer/mlp.py`` ``MLP.__init__`` / ``forward``); ``config`` is not needed here.
    """

    def __init__(self, config=None) -> None:
        super().__init__()

    def forward(self, x: Tensor) -> Tensor:
        return swiglu(x)
