"""Grouped expert FFN: every local expert's SwiGLU MLP in one grouped GEMM per projection.

Rows of ``x`` are Megatron's permuted tokens, grouped by local expert in order
(``tokens_per_expert[e]`` rows for expert ``e``). Weights are stacked per expert in the
layout of Megatron's per-expert linears: ``w1`` [E, 2F, H] (rows [gate; up], i.e.
``linear_fc1.weight`` of each expert) and ``w2`` [E, H, F] (``linear_fc2.weight``).

The op ``grouped_linear`` (``y[rows of e] = x[rows of e] @ w[e].T``) is registered with
three backends:

* ``torch`` (reference): one matmul per expert, split on the host;
* ``grouped_mm`` (vendor, CUDA Hopper): ``torch._grouped_mm`` with device offsets;
* ``triton`` (CUDA and MetaX): ``ops.grouped_mlp.triton_kernels``.

The fast backends share one autograd function: forward ``X W^T``, ``dX = dY W`` (both
row-grouped GEMMs) and ``dW[e] = dY_e^T X_e`` (a GEMM grouped along the reduction dim),
with the counts kept on the device (no host synchronisation). :func:`grouped_swiglu_mlp`
composes two of them around the SwiGLU activation (swappable via ``activation``) and
Megatron's per-token routing-probability scale.

Gradient-accumulation fusion (``grad_accum_fusion``: the run's Megatron
``gradient_accumulation_fusion``; ``ops.main_grad`` has the protocol): when every expert weight
has ``main_grad`` (Megatron DDP), the fast backends write ``dW`` into the main grads instead of
returning ``E`` weight gradients that DDP's hook adds one kernel each. DDP's buffer usually holds
the experts' main grads at one constant distance (``ops.main_grad.StridedRegion``): Triton's
``dW`` kernel then accumulates into them in place (fp32, beta = 1: no extra kernel, no bf16
rounding), ``grouped_mm`` adds its bf16 ``[E, N, K]`` result with one elementwise Triton launch
(the same sums as DDP's adds; negative steps, as in Megatron's reversed layout, included); any
other layout takes one foreach add. The reference backend ignores the flag: its gradients go through autograd and DDP.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ops.backends import Backend, Check, dispatch, get_registry, triton_available
from ops.grouped_mlp import torch_backend
from ops.grouped_mlp.reference import loop_grouped_linear
from ops.main_grad import ExpertMainGrads, StridedRegion
from ops.swiglu import swiglu

__all__ = ["grouped_linear", "grouped_swiglu_mlp", "swiglu"]

GROUPED_MM_DTYPES = (torch.bfloat16,)
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


Weights = Tensor | Sequence[Tensor]
"""``[E, N, K]`` stacked, or ``E`` tensors ``[N, K]`` (e.g. per-expert parameters)."""


def _weight_shape(weight: Weights) -> tuple[int, int, int]:
    if isinstance(weight, Tensor):
        if weight.dim() != 3:
            raise ValueError(f"grouped_linear needs weight [E, N, K], got {tuple(weight.shape)}")
        return tuple(weight.shape)
    if not weight or any(w.dim() != 2 or w.shape != weight[0].shape for w in weight):
        raise ValueError("grouped_linear needs a non-empty list of equal-shape [N, K] weights, got "
                         f"{[tuple(w.shape) for w in weight]}")
    return (len(weight), *weight[0].shape)


def _stacked(weight: Weights) -> Tensor:
    return weight if isinstance(weight, Tensor) else torch.stack(list(weight))


def _check_args(x: Tensor, tokens_per_expert: Tensor, weight: Weights) -> None:
    """Same shape errors on every backend."""
    experts, _, k = _weight_shape(weight)
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"grouped_linear: x {tuple(x.shape)} must be [T, K] with K={k}")
    if tokens_per_expert.shape != (experts,):
        raise ValueError(f"grouped_linear: tokens_per_expert shape {tuple(tokens_per_expert.shape)} "
                         f"!= ({experts},) experts")


@dispatch("grouped_linear")
def grouped_linear(x: Tensor, tokens_per_expert: Tensor, weight: Weights, *,
                   grad_accum_fusion: bool = False) -> Tensor:
    """Per-expert linear over expert-grouped rows (no bias).

    Args:
        x: ``[T, K]`` rows grouped by expert; ``T == tokens_per_expert.sum()``.
        tokens_per_expert: ``[E]`` integer counts (may be zero), on any device.
        weight: ``[E, N, K]``, or a list of ``E`` ``[N, K]``: expert ``e``'s ``nn.Linear``
            weight at ``weight[e]``. A list is stacked inside the op, in the forward and
            again in the backward, so no stacked copy is kept for the backward.
        grad_accum_fusion: the run's gradient-accumulation fusion; when every weight has
            ``main_grad`` (Megatron DDP) the fast backends accumulate ``dW`` into it (module doc).
            This reference returns the gradients to autograd either way.

    Returns:
        ``[T, N]`` with ``y[rows of e] = x[rows of e] @ weight[e].T``.
    """
    _check_args(x, tokens_per_expert, weight)
    return loop_grouped_linear(x, tokens_per_expert, weight)


@dataclass(frozen=True)
class GroupedGemms:
    """A backend's grouped-GEMM primitives.

    ``rows_mm(a, groups, b_t)``: ``out[rows of e] = a[rows of e] @ b_t[e]``;
    ``k_mm(p, groups, q, E)``: ``out[e] = p[rows of e].T @ q[rows of e]``;
    ``k_mm_accum(p, groups, q, region)`` (optional): ``k_mm`` added in place into a
    ``ops.main_grad.StridedRegion`` (gradient-accumulation fusion).
    ``groups`` is what the primitives take (offsets or counts), built on the device.
    """

    rows_mm: Callable
    k_mm: Callable
    k_mm_accum: Callable | None = None


class _GroupedLinearFn(torch.autograd.Function):
    """Forward/backward of ``grouped_linear`` from a backend's :class:`GroupedGemms`.

    ``weights``: one stacked ``[E, N, K]`` tensor or ``E`` tensors ``[N, K]``.
    ``grad_accum_fusion``: ``dW`` into the weights' ``main_grad`` when they all have one.
    """

    @staticmethod
    def forward(ctx, x: Tensor, groups: Tensor, gemms: GroupedGemms, grad_accum_fusion: bool,
                *weights: Tensor):
        ctx.save_for_backward(x, groups, *weights)
        ctx.gemms = gemms
        # on ctx, not saved (as Megatron keeps main_grad): every backward writes these buffers
        ctx.main_grads = ExpertMainGrads.of(weights, grad_accum_fusion)
        return gemms.rows_mm(x, groups, _stacked(_unpacked(weights)).transpose(1, 2))

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, groups, *weights = ctx.saved_tensors
        gemms: GroupedGemms = ctx.gemms
        weight = _stacked(_unpacked(weights))
        grad_y = grad_y.contiguous()
        grad_x = gemms.rows_mm(grad_y, groups, weight) if ctx.needs_input_grad[0] else None
        grad_w: tuple = (None,) * len(weights)
        if any(ctx.needs_input_grad[4:]):
            if ctx.main_grads is not None:
                _accumulate_weight_grads(gemms, grad_y, groups, x, ctx.main_grads)
                grad_w = ctx.main_grads.grads_for_autograd()
            else:
                stacked_grad = gemms.k_mm(grad_y, groups, x, weight.shape[0])
                grad_w = (stacked_grad,) if len(weights) == 1 and weights[0].dim() == 3 \
                    else tuple(stacked_grad.unbind(0))
        return grad_x, None, None, None, *grad_w


def _accumulate_weight_grads(gemms: GroupedGemms, grad_y: Tensor, groups: Tensor, x: Tensor,
                             main_grads: ExpertMainGrads) -> None:
    """``main_grad[e] += grad_y[rows of e].T @ x[rows of e]``: in the GEMM when the backend can
    and the main grads form one strided region, else the GEMM's ``[E, N, K]`` added at once."""
    region = main_grads.region
    if gemms.k_mm_accum is not None and region is not None:
        gemms.k_mm_accum(grad_y, groups, x, region)
    else:
        main_grads.add_(gemms.k_mm(grad_y, groups, x, len(main_grads.experts)))


def _unpacked(weights: tuple[Tensor, ...]) -> Weights:
    return weights[0] if len(weights) == 1 and weights[0].dim() == 3 else weights


def _packed(weight: Weights) -> tuple[Tensor, ...]:
    return (weight,) if isinstance(weight, Tensor) else tuple(weight)


def _on_device(tokens_per_expert: Tensor, device: torch.device) -> Tensor:
    """The counts on ``device`` without blocking the host.

    Megatron's alltoall dispatcher hands over counts it already copied to the host; a
    pageable host-to-device copy can block, so those go through pinned memory.
    """
    if tokens_per_expert.device.type == "cpu" and device.type == "cuda":
        return tokens_per_expert.pin_memory().to(device, non_blocking=True)
    return tokens_per_expert.to(device)


def _device_offsets(tokens_per_expert: Tensor, device: torch.device) -> Tensor:
    """Cumulative end rows as int32 on ``device`` (a device-side cumsum: no host sync)."""
    return torch.cumsum(_on_device(tokens_per_expert, device), 0).to(torch.int32)


def _grouped_mm_linear(x: Tensor, tokens_per_expert: Tensor, weight: Weights, *,
                       grad_accum_fusion: bool = False) -> Tensor:
    _check_args(x, tokens_per_expert, weight)
    offsets = _device_offsets(tokens_per_expert, x.device)
    return _GroupedLinearFn.apply(x.contiguous(), offsets, GROUPED_MM_GEMMS, grad_accum_fusion,
                                  *_packed(weight))


def _grouped_mm_k(p: Tensor, offsets: Tensor, q: Tensor, _num_experts: int) -> Tensor:
    return torch_backend.k_grouped_mm(p, offsets, q)


def _grouped_mm_k_accum(p: Tensor, offsets: Tensor, q: Tensor, region: StridedRegion) -> None:
    """torch's grouped matmul has no accumulating form: its bf16 ``dW`` is added into the region
    in one Triton launch (on the CUDA GPUs this backend runs on), else by torch."""
    stacked = torch_backend.k_grouped_mm(p, offsets, q)
    if triton_available(p)[0]:
        # deferred: Triton loads only when a GPU backend runs
        from ops.grouped_mlp import triton_kernels

        triton_kernels.add_into_region(region, stacked)
    else:
        region.add_(stacked)


GROUPED_MM_GEMMS = GroupedGemms(torch_backend.rows_grouped_mm, _grouped_mm_k, _grouped_mm_k_accum)


def _triton_linear(x: Tensor, tokens_per_expert: Tensor, weight: Weights, *,
                   grad_accum_fusion: bool = False) -> Tensor:
    _check_args(x, tokens_per_expert, weight)
    # The kernels' module imports triton; loaded on first call so CPU-only imports stay cheap.
    # deferred: Triton loads only when the GPU backend is called
    from ops.grouped_mlp import triton_kernels

    counts = _on_device(tokens_per_expert, x.device).to(torch.int32).contiguous()
    return _GroupedLinearFn.apply(x.contiguous(), counts, triton_kernels.GEMMS, grad_accum_fusion,
                                  *_packed(weight))


def _tensors_ok(x: Tensor, weight: Weights, dtypes: tuple[torch.dtype, ...]) -> Check:
    for t in (x, *_packed(weight)):
        if t.device.type != "cuda":
            return False, f"input device {t.device.type!r} is not a GPU"
        if t.dtype not in dtypes:
            return False, f"input dtype {t.dtype} not in {tuple(str(d) for d in dtypes)}"
        if t.dtype != x.dtype:
            return False, f"x dtype {x.dtype} != weight dtype {t.dtype}"
    return True, "accepted"


def _grouped_mm_verifier(x: Tensor, tokens_per_expert: Tensor, weight: Weights, **_options) -> Check:
    """bf16 on a CUDA GPU of compute capability >= 9.0, GEMM widths multiples of 8."""
    ok, reason = _tensors_ok(x, weight, GROUPED_MM_DTYPES)
    if not ok:
        return ok, reason
    if torch.cuda.get_device_capability(x.device) < (9, 0):
        return False, "torch._grouped_mm needs compute capability >= 9.0"
    _, n, k = _weight_shape(weight)
    if n % 8 or k % 8:
        return False, f"torch._grouped_mm needs 16-byte aligned rows: N={n}, K={k} not multiples of 8"
    return True, "accepted"


def _grouped_mm_available() -> Check:
    if not hasattr(torch, "_grouped_mm"):
        return False, f"torch {torch.__version__} has no _grouped_mm"
    return True, "available"


def _triton_verifier(x: Tensor, tokens_per_expert: Tensor, weight: Weights, **_options) -> Check:
    return _tensors_ok(x, weight, TRITON_DTYPES)


def _register_backends() -> None:
    registry = get_registry("grouped_linear")
    # a CUTLASS kernel MetaX lacks: the registry's platform rule keeps it off under maca
    registry.register(Backend(name="grouped_mm", fn=_grouped_mm_linear, kind="vendor",
                              platforms=("cuda",), available=_grouped_mm_available,
                              verifier=_grouped_mm_verifier))
    registry.register(Backend(name="triton", fn=_triton_linear, kind="triton",
                              available=lambda: triton_available("cuda"), verifier=_triton_verifier))


_register_backends()


def grouped_swiglu_mlp(x: Tensor, tokens_per_expert: Tensor, w1: Weights, w2: Weights,
                       probs: Tensor | None = None,
                       activation: Callable[[Tensor], Tensor] = swiglu,
                       input_hook: Callable[[Tensor], Tensor] | None = None,
                       fc2_input_hook: Callable[[Tensor], Tensor] | None = None,
                       grad_accum_fusion: bool = False) -> Tensor:
    """Every expert's ``fc2(act(fc1(x)) * probs)`` over expert-grouped rows.

    Args:
        x: ``[T, H]`` permuted tokens, grouped by expert.
        tokens_per_expert: ``[E]`` counts (device tensor: no host sync on fast backends).
        w1: ``[E, 2F, H]`` (rows [gate; up]) or E tensors ``[2F, H]``; w2: ``[E, H, F]`` or
            E tensors ``[H, F]``.
        probs: optional ``[T]`` routing weight per row, applied after the activation and
            cast back to ``x.dtype`` (as Megatron's ``MLP`` does with ``per_token_scale``).
        activation: ``[T, 2F] -> [T, F]``; default SwiGLU.
        input_hook, fc2_input_hook: optional maps of fc1's and fc2's inputs (e.g. a
            spiking neuron, whose per-row threshold makes grouping irrelevant).
        grad_accum_fusion: passed to both :func:`grouped_linear` calls.

    Returns:
        ``[T, H]``.
    """
    if input_hook is not None:
        x = input_hook(x)
    hidden = activation(grouped_linear(x, tokens_per_expert, w1, grad_accum_fusion=grad_accum_fusion))
    if probs is not None:
        hidden = (hidden * probs.unsqueeze(-1)).to(x.dtype)
    if fc2_input_hook is not None:
        hidden = fc2_input_hook(hidden)
    return grouped_linear(hidden, tokens_per_expert, w2, grad_accum_fusion=grad_accum_fusion)
