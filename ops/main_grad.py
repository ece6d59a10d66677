"""Megatron's gradient-accumulation fusion for sbtrain's own autograd functions.

Under Megatron DDP every parameter has ``main_grad``, its slice of the (fp32) gradient buffer,
and DDP's backward hook on the parameter's ``AccumulateGrad`` adds the autograd gradient into it
(``main_grad += param.grad``, one elementwise kernel per parameter per micro-batch). With
``TransformerConfig.gradient_accumulation_fusion`` Megatron's linears skip that add: their weight
gradient GEMM accumulates straight into ``main_grad`` (fp32 output, beta = 1), and autograd gets
a placeholder. ``ops.loss`` (the output layer) and ``ops.grouped_mlp`` (the routed experts) do the
same here, so they follow that protocol exactly
(``megatron/core/tensor_parallel/layers.py`` ``LinearWithGradAccumulationAndAsyncCommunication``,
``megatron/core/distributed/distributed_data_parallel.py`` ``_make_backward_post_hook``):

* the op accumulates only when it was asked to (the run's fusion flag, an argument of the op:
  ``config.gradient_accumulation_fusion``, which ``maca_compat.platform.grad_accum_fusion_enabled``
  sets) *and* the weight has ``main_grad`` (it is under DDP). Otherwise the gradient is returned
  as usual: a model outside DDP (conversion, tests) trains unchanged.
* after accumulating, a weight that DDP tracks (it has ``grad_added_to_main_grad``) gets
  ``grad_added_to_main_grad = True`` and a placeholder gradient of its shape and dtype. Why not
  ``None``: autograd would then not run the parameter's ``AccumulateGrad`` node, whose hook is
  where DDP marks the parameter ready for its bucket's reduce (with ``overlap_grad_reduce`` it
  asserts ``param.grad is not None``); the flag tells the hook to skip the add. The placeholder is
  ``torch.empty`` (no kernel), or zeros when the weight has ``zero_out_wgrad``: Megatron sets that
  on the embedding shared with the output layer on one pipeline stage, whose ``param.grad`` is then
  the placeholder plus the embedding's own gradient, which the hook must still add.
* a weight with ``main_grad`` but without ``grad_added_to_main_grad`` (not Megatron's DDP) gets
  ``None``, as in Megatron.

DDP resets ``grad_added_to_main_grad`` in ``zero_grad_buffer`` (each step), not per micro-batch:
every micro-batch accumulates, the hook skips every time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def fused_main_grad(weight: Tensor, grad_accum_fusion: bool) -> Tensor | None:
    """``weight.main_grad`` when the run fuses gradient accumulation and DDP gave the weight one."""
    if not grad_accum_fusion:
        return None
    return getattr(weight, "main_grad", None)


def grad_for_autograd(weight: Tensor) -> Tensor | None:
    """What an op returns as ``weight``'s gradient once it accumulated it into ``main_grad``
    (the protocol in the module doc): a placeholder for DDP's hook, or None outside DDP."""
    if not hasattr(weight, "grad_added_to_main_grad"):
        return None
    make = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty
    placeholder = make(weight.shape, dtype=weight.dtype, device=weight.device)
    weight.grad_added_to_main_grad = True
    return placeholder


@dataclass(frozen=True)
class StridedRegion:
    """``E`` equal ``[N, K]`` main grads at a constant element distance ``step`` in one buffer.

    Megatron's DDP lays parameters out in reverse order (backward order), the experts' fc1 and
    fc2 weights interleaved (``local_experts.<e>.linear_fc1``, ``.linear_fc2``, ...): expert
    ``e``'s fc1 main grad starts ``-(|fc1| + |fc2|)`` elements after expert ``e - 1``'s, so ``step``
    is usually negative. Torch views cannot have negative strides; Triton pointers can.
    """

    first: Tensor
    """Expert 0's main grad."""
    step: int
    """Elements from expert ``e``'s main grad to expert ``e + 1``'s (may be negative)."""
    experts: int

    def view(self) -> tuple[Tensor, bool]:
        """A torch view ``[E, N, K]`` of the region in memory order, and whether that order is
        the experts' reversed (a negative ``step``)."""
        n, k = self.first.shape
        start = self.first.storage_offset() + min(0, self.step * (self.experts - 1))
        view = torch.as_strided(self.first, (self.experts, n, k), (abs(self.step), k, 1), start)
        return view, self.step < 0

    def add_(self, stacked: Tensor) -> None:
        """``main_grad[e] += stacked[e]`` in torch: one elementwise kernel over the region's view,
        after a flipped copy of ``stacked`` when the region runs backwards (GPU backends use
        ``ops.grouped_mlp.triton_kernels.add_into_region`` instead: one kernel, no copy)."""
        view, reversed_ = self.view()
        view.add_(stacked.flip(0) if reversed_ else stacked)


class ExpertMainGrads:
    """The ``main_grad`` of each local expert's weight, for a grouped weight-gradient GEMM.

    ``weights``: the op's weight arguments: ``E`` per-expert ``[N, K]`` parameters, or one stacked
    ``[E, N, K]`` parameter.
    """

    def __init__(self, weights: Sequence[Tensor], main_grads: Sequence[Tensor]) -> None:
        self.weights = tuple(weights)
        self.experts: list[Tensor] = [v for g in main_grads for v in (g.unbind(0) if g.dim() == 3 else (g,))]
        self.region = _strided_region(self.experts)
        """The experts' main grads as one strided region, or None (then :meth:`add_` uses foreach)."""

    @classmethod
    def of(cls, weights: Sequence[Tensor], grad_accum_fusion: bool) -> ExpertMainGrads | None:
        """The weights' main grads when the run fuses and every weight has one; else None."""
        main_grads = [fused_main_grad(w, grad_accum_fusion) for w in weights]
        if not main_grads or any(g is None for g in main_grads):
            return None
        return cls(weights, main_grads)

    def add_(self, stacked: Tensor) -> None:
        """``main_grad[e] += stacked[e]`` for ``stacked`` ``[E, N, K]`` (any float dtype): over the
        strided region (:meth:`StridedRegion.add_`), else one foreach add over the ``E`` tensors."""
        if self.region is not None:
            self.region.add_(stacked)
            return
        dtype = self.experts[0].dtype
        # one dtype across both lists: torch's foreach fast path (one launch per few tensors)
        torch._foreach_add_(self.experts, list(stacked.to(dtype).unbind(0)))

    def grads_for_autograd(self) -> tuple[Tensor | None, ...]:
        """:func:`grad_for_autograd` of each weight, in the op's argument order."""
        return tuple(grad_for_autograd(w) for w in self.weights)


def _strided_region(experts: list[Tensor]) -> StridedRegion | None:
    first = experts[0]
    storage = first.untyped_storage().data_ptr()
    for g in experts:
        if (g.dim() != 2 or g.shape != first.shape or g.dtype != first.dtype or g.device != first.device
                or not g.is_contiguous() or g.untyped_storage().data_ptr() != storage):
            return None
    if len(experts) == 1:
        return StridedRegion(first, first.numel(), 1)
    offsets = [g.storage_offset() for g in experts]
    step = offsets[1] - offsets[0]
    if abs(step) < first.numel() or any(b - a != step for a, b in zip(offsets, offsets[1:])):
        return None
    return StridedRegion(first, step, len(experts))
