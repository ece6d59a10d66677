"""Megatron DDP's gradient bookkeeping on a few parameters, without building DDP.

What our fused ops interact with is DDP's per-parameter state (``main_grad`` views into one
flat buffer, ``grad_added_to_main_grad``) and its backward post-hook on each parameter's
``AccumulateGrad`` node. :class:`DDPGrads` sets up both, the hook being megatron-core's own
``DistributedDataParallel._make_backward_post_hook`` (bound to this object), so the tests run
the real protocol: with ``overlap_grad_reduce`` the hook asserts ``param.grad is not None``
and marks the parameter ready for its bucket, which this object counts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from types import SimpleNamespace

import torch
from megatron.core.distributed.distributed_data_parallel import DistributedDataParallel


class DDPGrads:
    """``main_grad`` for ``params`` laid out in one zeroed buffer in ``buffer_order`` (default:
    reversed, as DDP lays them out), ``gaps[i]`` spare elements before the i-th of that order."""

    def __init__(self, params: Sequence[torch.nn.Parameter], buffer_order: Sequence[int] | None = None,
                 gaps: Sequence[int] | None = None, dtype: torch.dtype = torch.float32,
                 overlap_grad_reduce: bool = True) -> None:
        order = list(range(len(params)))[::-1] if buffer_order is None else list(buffer_order)
        gaps = list(gaps or [0] * len(order))
        device = params[0].device
        self.buffer = torch.zeros(sum(params[i].numel() for i in order) + sum(gaps), dtype=dtype,
                                  device=device)
        offset = 0
        for i, gap in zip(order, gaps):
            offset += gap
            p = params[i]
            p.main_grad = self.buffer[offset:offset + p.numel()].view(p.shape)
            offset += p.numel()
        # the attributes and objects _make_backward_post_hook reads on its DDP instance
        self.ready: Counter = Counter()
        bucket = SimpleNamespace(register_grad_ready=lambda param, force: self.ready.update([id(param)]))
        self.param_to_bucket_group = {p: bucket for p in params}
        self.ddp_config = SimpleNamespace(overlap_grad_reduce=overlap_grad_reduce)
        self.force_all_reduce = False
        self.params = list(params)
        self.grad_accs = []
        for p in params:
            p.grad_added_to_main_grad = False  # what DDP.__init__ / zero_grad_buffer set
            grad_acc = p.expand_as(p).grad_fn.next_functions[0][0]  # as DDP registers it
            grad_acc.register_hook(DistributedDataParallel._make_backward_post_hook(self, p))
            self.grad_accs.append(grad_acc)

    def main_grads(self) -> list[torch.Tensor]:
        return [p.main_grad.clone() for p in self.params]

    def ready_counts(self) -> list[int]:
        """How often DDP's hook marked each parameter ready (once per backward it ran in)."""
        return [self.ready[id(p)] for p in self.params]

    def added_flags(self) -> list[bool]:
        return [bool(p.grad_added_to_main_grad) for p in self.params]


def interleaved_megatron_order(experts: int) -> list[int]:
    """Buffer order of DDP for parameters ``[fc1_0 .. fc1_{E-1}, fc2_0 .. fc2_{E-1}]`` declared
    as SequentialMLP declares them (``local_experts.<e>.linear_fc1``, ``.linear_fc2``, ...):
    reversed, fc1 and fc2 interleaved."""
    declared = [i for e in range(experts) for i in (e, experts + e)]
    return declared[::-1]
