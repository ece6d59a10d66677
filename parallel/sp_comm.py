"""Collectives of the sequence-parallel ops (autograd-aware where gradients must cross ranks)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class _AllGather(torch.autograd.Function):
    """All-gather along a new leading rank axis; backward: all-reduce, keep this rank's slot.

    The all-reduce (not a reduce-scatter) keeps it on gloo, which has no reduce-scatter.
    Every rank must use the result in its graph (weight 0 is enough), so that every rank
    joins the backward collective.
    """

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[dist.get_rank(ctx.group)], None


def all_gather_with_grad(x: Tensor, group) -> Tensor:
    """[P, *x.shape]: every rank's ``x``, differentiable (see ``_AllGather``)."""
    return _AllGather.apply(x, group)


def all_gather_values(x: Tensor, group) -> Tensor:
    """[P, *x.shape]: every rank's ``x`` (no gradient), e.g. lengths or segment ids."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.stack(parts)
