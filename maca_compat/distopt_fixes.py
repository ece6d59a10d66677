"""A fix of megatron-core 0.19.2's distributed-optimizer checkpointing, applied by the reviewed
patch list (``maca_compat/patches.py``, entry ``distopt_empty_shard_step``).

Megatron gives every rank the same optimizer parameter groups, so that distributed checkpoints
line up (``_get_param_groups``: groups are all-gathered across ranks). A rank without
expert parameters, e.g. a pipeline stage whose layers are all dense while a later stage holds
the MoE layers, therefore gets an expert ``DistributedOptimizer`` whose one group is empty.
Without Apex/TE, ``DistributedOptimizer.state_dict`` reads the iteration from the torch
optimizer's per-parameter ``step`` (``assert len(steps) == 1``): with no parameters there is
none, and every save (and every load) under such a layout stops with an AssertionError.

The empty optimizer's step is not a placeholder: its param-group state is common state, which
dist_checkpointing keeps from rank 0 only, so it is the step every rank's expert optimizer gets
on a resume. It must be the run's real step: the one its sibling optimizers hold.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

# A key of torch.optim's state that is not a parameter: torch's state_dict() keeps it as it is,
# so megatron's own state_dict() finds a step and writes its stock format around it.
_STEP_KEY = "sbtrain_step_of_empty_shard"


def _holds_nothing(optimizer: Any) -> bool:
    inner = getattr(optimizer, "optimizer", None)
    return (isinstance(inner, torch.optim.Optimizer) and not inner.state
            and not any(group["params"] for group in inner.param_groups))


def _torch_step(optimizer: Any) -> torch.Tensor | None:
    """The per-parameter ``step`` of a member optimizer that holds state (None if none does)."""
    inner = getattr(optimizer, "optimizer", None)
    for state in getattr(inner, "state", {}).values():
        if "step" in state:
            return state["step"]
    return None


def empty_shard_step(original: Any) -> Any:
    """``ChainedOptimizer.sharded_state_dict`` that gives member optimizers without parameters
    the step of those with state, for the duration of the call."""

    @functools.wraps(original)
    def sharded_state_dict(self, *args, **kwargs):
        empty = [opt for opt in self.chained_optimizers if _holds_nothing(opt)]
        if not empty:
            return original(self, *args, **kwargs)
        steps = [s for s in map(_torch_step, self.chained_optimizers) if s is not None]
        # No member with state: a fresh optimizer about to load, whose steps are overwritten.
        step = steps[0].detach().clone() if steps else torch.zeros(())
        for opt in empty:
            opt.optimizer.state[_STEP_KEY] = {"step": step}
        try:
            return original(self, *args, **kwargs)
        finally:
            for opt in empty:
                # a load replaces the whole state dict: the key may already be gone
                opt.optimizer.state.pop(_STEP_KEY, None)

    return sharded_state_dict
