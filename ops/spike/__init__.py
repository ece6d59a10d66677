"""Adaptive-threshold spiking neuron of SpikingBrain (report Eq. 19-22, ``W8ASpike/quant_linear.py``).

Per row (the last dim, i.e. per token over its features)::

    V_th = clamp(mean(|x|) / k, vth_min, vth_max)     fp32
    s    = round(x / V_th)                            half to even, unbounded integer count
    y    = V_th * s                                   computed in fp32, cast to x.dtype

Backward of ``spike_activation`` is the straight-through estimator: ``dL/dx = dL/dy``.

Exactness contract (why the Triton counts equal the reference with atol 0)
--------------------------------------------------------------------------
A count is ``round(x / V_th)``; if two backends' ``V_th`` differed by one ulp, ``x / V_th``
could fall on either side of a ``.5`` boundary: about one flipped count per 10^7 elements
per ulp (measured on Gaussian rows of 3584), rare in a test, certain in every training
step. So the contract fixes every fp32 operation, not just the formula:

1. ``sum|x|`` is accumulated in a fixed order (``naive.row_abs_sum``): column ``c`` goes to
   lane ``c % L`` with ``L = min(1024, next_pow2(N))`` (``naive.SUM_LANES``), each lane adds
   its columns in increasing order, and the lanes are reduced by a pairwise tree over
   adjacent pairs. Both backends perform exactly these additions (``torch.sum`` and
   ``tl.sum`` leave their order unspecified, so neither is used).
2. ``mean = sum / N`` then ``V_th = mean / k``: two IEEE round-to-nearest fp32 divisions
   (``tl.math.div_rn`` in Triton, whose plain ``/`` is approximate; tensor divisors in
   torch, because CUDA turns a division by a CPU scalar into a reciprocal multiply).
   ``k``, ``vth_min``, ``vth_max`` are rounded to fp32 once. Then the clamp.
3. ``s = round(float32(x) / V_th)`` with an IEEE division and round half to even.
4. ``y = float32(V_th * s)`` rounded once to ``x.dtype`` (round to nearest even).

Hence, for finite inputs, ``vth`` and ``counts`` agree bit for bit between backends, and so
does ``y``. ``round(x / vth)`` is also exposed as ``naive.round_counts(x, vth)`` so a
backend's counts can be checked against its own ``vth`` independently of the sum.

Differences from the official code, on purpose: it takes ``mean(|x|)`` in ``x.dtype`` (a
bf16 rounding of the mean for bf16 inputs) with torch's unspecified order; here the mean
is fp32 in the order above (within a few fp32 ulps of ``x.abs().float().mean(-1)``).

Limits: counts are int32, exact while ``|x| / V_th < 2**31``. Without the upper clamp
``|s| <= N * k`` (the row max is at most ``N * mean|x|``); ``vth_max`` (default 1e4) can
break that bound only for rows whose ``mean|x|`` exceeds ``k * vth_max``. NaN and inf
inputs give unspecified counts. A row must have at least one element.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ops.backends import Backend, Check, dispatch, get_registry, tensor_verifier, triton_available
from ops.spike.naive import naive_spike_counts, naive_spike_forward, round_counts, spike_threshold

__all__ = ["spike_counts", "spike_activation", "spike_threshold", "round_counts"]

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_args(x: Tensor, k: float, vth_min: float, vth_max: float) -> None:
    """Reject calls with no defined threshold (same errors on every backend)."""
    if not x.is_floating_point():
        raise TypeError(f"spiking neuron needs a floating-point input, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"spiking neuron needs a non-empty last dim (the row), got shape {tuple(x.shape)}")
    if not k > 0:
        raise ValueError(f"k must be > 0, got {k}")
    if not 0 < vth_min <= vth_max:
        raise ValueError(f"need 0 < vth_min <= vth_max, got vth_min={vth_min}, vth_max={vth_max}")


class _SpikeSTE(torch.autograd.Function):
    """Forward: the neuron (by the given backend); backward: straight-through."""

    @staticmethod
    def forward(ctx, x: Tensor, forward_fn, k: float, vth_min: float, vth_max: float) -> Tensor:
        return forward_fn(x, k, vth_min, vth_max)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        # the report skips the spiking step's gradient: round() is treated as the identity
        return grad_y, None, None, None, None


@dispatch("spike_counts")
def spike_counts(x: Tensor, k: float = 3.0, vth_min: float = 1e-5, vth_max: float = 1e4) -> tuple[Tensor, Tensor]:
    """Integer spike counts of the adaptive-threshold neuron (no autograd).

    Args:
        x: ``[..., N]`` floating tensor; the threshold is per row of the last dim.
        k: threshold divisor; larger k -> lower threshold -> more spikes.
        vth_min, vth_max: clamp of the threshold.

    Returns:
        ``counts``: int32 ``[..., N]``, ``round(x / vth)``; ``vth``: fp32 ``[..., 1]``.
    """
    _check_args(x, k, vth_min, vth_max)
    return naive_spike_counts(x, k, vth_min, vth_max)


@dispatch("spike_activation")
def spike_activation(x: Tensor, k: float = 3.0, vth_min: float = 1e-5, vth_max: float = 1e4) -> Tensor:
    """Spiking activation ``vth * round(x / vth)`` in ``x.dtype``, straight-through gradient.

    Args:
        x: ``[..., N]`` floating tensor; the threshold is per row of the last dim.
        k, vth_min, vth_max: as in :func:`spike_counts`.

    Returns:
        ``[..., N]`` tensor of ``x.dtype``; ``dL/dx = dL/dy``.
    """
    _check_args(x, k, vth_min, vth_max)
    return _SpikeSTE.apply(x, naive_spike_forward, k, vth_min, vth_max)


def _triton_spike_counts(x: Tensor, k: float = 3.0, vth_min: float = 1e-5, vth_max: float = 1e4):
    _check_args(x, k, vth_min, vth_max)
    # deferred: Triton loads only when the GPU backend is called
    from ops.spike.fused import fused_spike_counts

    return fused_spike_counts(x, k, vth_min, vth_max)


def _triton_spike_activation(x: Tensor, k: float = 3.0, vth_min: float = 1e-5, vth_max: float = 1e4):
    _check_args(x, k, vth_min, vth_max)
    # deferred: Triton loads only when the GPU backend is called
    from ops.spike.fused import fused_spike_forward

    return _SpikeSTE.apply(x, fused_spike_forward, k, vth_min, vth_max)


_device_dtype_ok = tensor_verifier(device_types=("cuda",), dtypes=TRITON_DTYPES)


def _triton_verifier(x: Tensor, *args, **kwargs) -> Check:
    """CUDA/MACA tensor of fp32/bf16/fp16 with a non-empty last dim (the reference raises otherwise)."""
    ok, reason = _device_dtype_ok(x)
    if ok and (x.dim() == 0 or x.shape[-1] == 0):
        return False, f"empty row (shape {tuple(x.shape)})"
    return ok, reason


def _triton_importable() -> Check:
    # the device is checked per call by the verifier; here only whether triton can load
    return triton_available("cuda")


def _register_triton_backends() -> None:
    # the kernels' module (and so triton) is imported by the backend functions on first call
    for op, fn in (("spike_counts", _triton_spike_counts), ("spike_activation", _triton_spike_activation)):
        get_registry(op).register(
            Backend(name="triton", fn=fn, kind="triton", available=_triton_importable, verifier=_triton_verifier)
        )


_register_triton_backends()
