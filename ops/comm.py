"""Sequence parallelism below the model: the SP context the ops take, and its collectives.

``SPContext`` names the group that sequences are split over (the user's ``parallel.sp``; in
the code always ``sp`` for the context and ``sp.group`` for the group) and this rank's place
in it. The ops that mix tokens take it as ``sp=``: ``ops.attention.attention(..., sp=ctx)``
and ``ops.gla.gla(..., sp=ctx)``. It is unrelated to Megatron's tensor-parallel
``sequence_parallel`` (activations split over the TP group between layers).

The collectives are autograd-aware where gradients must cross ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


@dataclass(frozen=True)
class SPContext:
    """Sequences split over ``group``: rank r holds the r-th contiguous slice of every sequence
    (rank order = sequence order).

    Attributes:
        group: the sequence-parallel process group (size > 1).
        lengths: every rank's slice length, when the caller knows them; None: the ops
            all-gather them per call (slices may differ in length).
        documents: [P, b, s] every rank's segment ids (equal slices), gathered once per
            micro-batch by :meth:`for_batch`; None: the ops gather the edges they need per call.
    """

    group: ProcessGroup
    lengths: tuple[int, ...] | None = None
    softmax_exchange: str = "tails"
    """How softmax attention gets earlier slices' keys (``ops.attention.sequence_parallel``
    EXCHANGES): ``tails`` (all-gather every rank's tail) or ``halo`` (send/recv from the
    previous rank only, when every slice holds at least one window)."""
    documents: Tensor | None = field(default=None, repr=False)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    def for_batch(self, local: int, documents: Tensor | None) -> SPContext:
        """This context with one micro-batch's metadata: every slice is ``local`` tokens long
        (``parallel.sequence.slice_bounds`` splits evenly: nothing to gather) and, with
        ``documents`` ([b, local] ids of this rank's slice), every rank's ids from one
        all-gather, which the ops then slice instead of gathering per layer."""
        gathered = None if documents is None else all_gather_values(documents, self.group)
        return replace(self, lengths=(local,) * self.size, documents=gathered)

    def slice_lengths(self, local: int, device: torch.device) -> list[int]:
        """Every rank's slice length (``local`` is this rank's)."""
        if self.lengths is not None:
            return list(self.lengths)
        return all_gather_values(torch.tensor([local], device=device), self.group).flatten().tolist()


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


class _FromPrevious(torch.autograd.Function):
    """Forward: send ``x`` to the next rank and receive the previous rank's (zeros on the
    first rank); backward: the reverse, each gradient back to the rank it came from (zeros for
    the last rank's ``x``, which nobody received)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return _shift(x, group, step=1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _shift(grad, ctx.group, step=-1), None


def _shift(x: Tensor, group, step: int) -> Tensor:
    """Send ``x`` to rank + step, receive from rank - step (ranks outside the group: none)."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    received = torch.zeros_like(x)
    ops = []
    if 0 <= rank + step < size:
        ops.append(dist.P2POp(dist.isend, x.contiguous(), dist.get_global_rank(group, rank + step),
                              group))
    if 0 <= rank - step < size:
        ops.append(dist.P2POp(dist.irecv, received, dist.get_global_rank(group, rank - step), group))
    for request in dist.batch_isend_irecv(ops) if ops else []:
        request.wait()
    return received


def from_previous_rank(x: Tensor, group) -> Tensor:
    """The previous rank's ``x`` (zeros on the first rank), differentiable: one send and one
    receive per rank each way instead of an all-gather (see ``_FromPrevious``)."""
    return _FromPrevious.apply(x, group)


def from_previous_rank_values(x: Tensor, group) -> Tensor:
    """The previous rank's ``x`` (zeros on the first rank), no gradient (e.g. document ids)."""
    return _shift(x, group, step=1)
