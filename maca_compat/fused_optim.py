"""Torch-only fast paths for megatron-core's optimizer step without Apex/TE (see patches.py).

Without Apex/TE, megatron-core 0.19.2 builds a plain ``torch.optim.AdamW`` (torch then takes its
multi-kernel foreach path on GPUs), computes the grad norm with one ``torch.norm`` and one host
sync per tensor (``megatron.core.utils.local_multi_tensor_l2_norm``), scales/copies tensor lists
in a Python loop (``local_multi_tensor_scale``), and writes each linear's weight gradient as a
bf16 tensor that DDP's hook then adds into the fp32 ``main_grad``. The replacements here keep
the same results (Adam to fp32 rounding; norm and scale exactly on CPU):

* :func:`pinned_adam`: an Adam/AdamW subclass that always runs one torch implementation
  (``fused``, ``foreach`` or ``for_loop``), also after ``load_state_dict`` (which otherwise
  adopts the checkpoint's flags) with the ``step`` placement torch's fused kernel needs.
* :func:`foreach_l2_norm`, :func:`foreach_scale`: drop-in ``multi_tensor_l2norm`` /
  ``multi_tensor_scale`` built on ``torch._foreach_*``; no host sync.
* :data:`WGRAD_ACCUM`: stands in for apex's ``fused_weight_gradient_mlp_cuda``: the weight
  gradient GEMM accumulates straight into the fp32 ``main_grad``.
"""

from __future__ import annotations

import functools
import logging
from types import SimpleNamespace
from typing import Any

import torch

logger = logging.getLogger("sbtrain.maca_compat")

# impl -> the constructor flags that make torch's Adam run it.
ADAM_FLAGS: dict[str, dict[str, bool]] = {
    "fused": {"fused": True, "foreach": False},
    "foreach": {"fused": False, "foreach": True},
    "for_loop": {"fused": False, "foreach": False},
}


def pinned_adam(base: type[torch.optim.Optimizer], impl: str) -> type[torch.optim.Optimizer]:
    """A subclass of torch's ``Adam``/``AdamW`` that always runs implementation ``impl``."""
    if impl not in ADAM_FLAGS:
        raise ValueError(f"unknown Adam implementation {impl!r}; known: {sorted(ADAM_FLAGS)}")
    flags = ADAM_FLAGS[impl]

    class PinnedAdam(base):  # type: ignore[misc, valid-type]
        adam_impl = impl

        def __init__(self, params: Any, **kwargs: Any) -> None:
            super().__init__(params, **{**kwargs, **flags})

        def load_state_dict(self, state_dict: dict) -> None:
            # torch adopts the saved param groups, flags included: a checkpoint written by
            # another implementation (or platform) would silently switch this one.
            super().load_state_dict(state_dict)
            pin_adam_impl(self, impl)

    PinnedAdam.__name__ = PinnedAdam.__qualname__ = f"{base.__name__}[{impl}]"
    return PinnedAdam


def pin_adam_impl(optimizer: torch.optim.Optimizer, impl: str) -> None:
    """Set ``impl``'s flags on every param group; for ``fused`` put each state's ``step`` where
    torch's fused kernel reads it (a float32 tensor on the parameter's device; megatron's
    distributed-optimizer load creates one float32 CPU tensor for all parameters)."""
    flags = ADAM_FLAGS[impl]
    for group in optimizer.param_groups:
        group.update(flags)
        if not flags["fused"]:
            continue
        for param in group["params"]:
            state = optimizer.state.get(param)
            step = state.get("step") if state else None
            if torch.is_tensor(step) and (step.device != param.device
                                          or step.dtype != torch.float32):
                state["step"] = step.to(device=param.device, dtype=torch.float32)


def foreach_l2_norm(chunk_size: int, noop_flag: torch.Tensor, tensor_lists: list[list[torch.Tensor]],
                    per_tensor: bool, *args: Any) -> tuple[torch.Tensor, None]:
    """``multi_tensor_l2norm``: the L2 norm of all tensors as a 1-element float32 tensor on
    their device, from one foreach norm and one reduction (no ``.item()``)."""
    tensors = [t for tensor_list in tensor_lists for t in tensor_list]
    if not tensors:
        return torch.zeros(1, dtype=torch.float32, device=noop_flag.device), None
    norms = torch._foreach_norm(tensors, 2)
    norms = [n if n.dtype == torch.float32 else n.float() for n in norms]
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1), None


def foreach_scale(chunk_size: int, noop_flag: torch.Tensor, tensor_lists: list[list[torch.Tensor]],
                  scale: float) -> None:
    """``multi_tensor_scale``: ``dst = src * scale`` for each pair, in foreach kernels."""
    src, dst = tensor_lists
    if not dst:
        return
    if all(s is d for s, d in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
        return
    scaled = src if scale == 1.0 else torch._foreach_mul(src, scale)
    if hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(dst, scaled)
    else:  # torch < 2.2 (an older mcPyTorch): no foreach copy
        for s, d in zip(scaled, dst):
            d.copy_(s)


def wgrad_gemm_accum(total_input: torch.Tensor, grad_output: torch.Tensor,
                     main_grad: torch.Tensor) -> None:
    """``main_grad += grad_output^T @ total_input`` (2-D operands), the product never rounded to
    the operands' low precision.

    CUDA with bf16/fp16 operands and fp32 ``main_grad``: one cuBLAS GEMM with fp32 output and
    beta=1, through torch's ``baddbmm(..., out_dtype=)`` (its ``addmm`` ``out_dtype`` overload
    requires the addend in the operands' dtype). A torch without it gets an fp32 ``mm`` plus an
    add. CPU has neither overload: the operands are upcast (tests; the platform keeps the fusion
    off there for training).
    """
    a, b = grad_output.t(), total_input
    if a.dtype == main_grad.dtype:
        main_grad.addmm_(a, b)
    elif main_grad.is_cuda and cuda_wgrad_route() == "baddbmm_out_dtype":
        out = main_grad.unsqueeze(0)
        torch.baddbmm(out, a.unsqueeze(0), b.unsqueeze(0), out_dtype=main_grad.dtype, out=out)
    elif main_grad.is_cuda and cuda_wgrad_route() == "mm_out_dtype":
        main_grad.add_(torch.mm(a, b, out_dtype=main_grad.dtype))
    else:
        main_grad.addmm_(a.to(main_grad.dtype), b.to(main_grad.dtype))


@functools.cache
def cuda_wgrad_route() -> str:
    """The fastest of torch's mixed-precision GEMMs that works on this CUDA build (tried once on
    a 2x2 problem and checked, since builds differ in which ``out_dtype`` kernels they have)."""
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], device="cuda", dtype=torch.bfloat16)
    want = torch.full((2, 2), 0.5, device="cuda") + (a.float() @ a.float())
    for route in ("baddbmm_out_dtype", "mm_out_dtype"):
        got = torch.full((2, 2), 0.5, device="cuda")
        try:
            if route == "baddbmm_out_dtype":
                out = got.unsqueeze(0)
                torch.baddbmm(out, a[None], a[None], out_dtype=torch.float32, out=out)
            else:
                got.add_(torch.mm(a, a, out_dtype=torch.float32))
        except (RuntimeError, TypeError, NotImplementedError):
            continue
        if torch.equal(got, want):
            logger.info("gradient-accumulation fusion: weight gradients via %s", route)
            return route
    logger.warning("gradient-accumulation fusion: no fp32-output GEMM in this torch; "
                   "operands are upcast to fp32 (slow: turn the fusion off on this platform)")
    return "upcast"


# The attributes megatron's LinearWithGradAccumulationAndAsyncCommunication.backward calls.
WGRAD_ACCUM = SimpleNamespace(wgrad_gemm_accum_fp32=wgrad_gemm_accum,
                              wgrad_gemm_accum_fp16=wgrad_gemm_accum)
