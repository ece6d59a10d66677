"""``train.recompute: selective`` for the FFNs: the SwiGLU product is dropped after the forward
and recomputed from fc1's output in backward (elementwise work only).

A dense FFN or shared expert (Megatron's MLP) runs ``fc1 -> activation -> fc2``; ``ops.swiglu`` keeps only fc1's output ``x`` [.., 2F], and fc2 keeps its input, the
product ``y`` [.., F]. Here the activation module of each MLP is wrapped so that ``y`` is
computed without a graph (``_RecomputedActivation``), its storage is released once fc2 has run
(a forward hook on ``linear_fc2``), and refilled at storage level (no version bump, so fc2's
saved-tensor check still passes) when the gradient of fc2's output arrives, before fc2's
backward reads it. The same idea as megatron-core's ``CheckpointWithoutOutput``, which 0.19.2
cannot use without Transformer Engine (see ``megatron_config.recompute_fields``).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.mlp import MLP


class _RecomputedActivation(torch.autograd.Function):
    """``fn(x)`` that saves only ``x``; backward reruns ``fn`` with a graph."""

    @staticmethod
    def forward(ctx, fn, x):
        ctx.fn = fn
        ctx.save_for_backward(x)
        with torch.no_grad():
            return fn(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(x.requires_grad)
            out = ctx.fn(leaf)
        (grad_x,) = torch.autograd.grad(out, leaf, grad)
        return None, grad_x


class DiscardedActivation(torch.nn.Module):
    """Wraps an MLP's activation module; ``discard`` drops its last output until backward."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad):
            return self.inner(x)
        y = _RecomputedActivation.apply(self.inner, x)
        self._last = (x, y)
        return y

    def discard(self, hook_tensor: torch.Tensor) -> None:
        """Free the last output's storage; refill it when ``hook_tensor``'s gradient arrives."""
        if self._last is None or not hook_tensor.requires_grad:
            return
        x, y = self._last
        self._last = None
        nbytes = y.untyped_storage().nbytes()
        y.untyped_storage().resize_(0)

        def refill(grad: torch.Tensor) -> None:
            with torch.no_grad():
                again = self.inner(x).contiguous()
            storage = y.untyped_storage()
            storage.resize_(nbytes)
            storage.copy_(again.untyped_storage())

        hook_tensor.register_hook(refill)


def _discard_after_fc2(activation: DiscardedActivation):
    def hook(module, inputs, output) -> None:
        activation.discard(output[0] if isinstance(output, tuple) else output)
    return hook


def install_ffn_activation_recompute(model: torch.nn.Module) -> int:
    """Wrap the activation of every dense FFN and shared expert in ``model``; returns how many
    were wrapped. Routed experts are left alone: their product is also kept by the routing
    weights' multiply, and their fc2 runs without module hooks in megatron-core 0.19.2."""
    count = 0
    for name, module in model.named_modules():
        if ".local_experts." in f"{name}.":
            continue
        if isinstance(module, MLP) and not isinstance(module.activation_func, DiscardedActivation):
            if not isinstance(module.activation_func, torch.nn.Module):
                raise TypeError("FFN activation recompute needs the activation as a module "
                                "(the spec provider puts ops.swiglu.SwiGLU in every MLP)")
            module.activation_func = DiscardedActivation(module.activation_func)
            module.linear_fc2.register_forward_hook(_discard_after_fc2(module.activation_func))
            count += 1
    return count
