"""Sequence parallelism below the model: the SP context the ops take, and its collectives.

``SPContext`` names the group that sequences are split over (the user's ``parallel.sp``; in
the code always ``sp`` for the context and ``sp.group`` for the group) and this rank's place
in it. The ops that mix tokens take it as ``sp=``: ``ops.attention.attention(..., sp=ctx)``
and ``ops.gla.gla(..., sp=ctx)``. It is unrelated to Megatron's tensor-parallel
``sequence_parallel`` (activations split over the TP group between layers).

The collectives are autograd-aware where gradients must cross ranks. The ``start_*`` variants
return an :class:`InFlight` exchange: the op is issued at once and :meth:`InFlight.wait`
returns its result, so that the caller computes something else meanwhile; their backward
overlaps the same way (see ``_Issue``).
"""

from __future__ import annotations

from collections.abc import Callable
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
        block_masks: the micro-batch's flex block masks of SP attention's positions, filled
            by the first layer and reused by the others (:meth:`block_masks_for`); a new dict
            per :meth:`for_batch`, None outside one micro-batch (masks built per call).
    """

    group: ProcessGroup
    lengths: tuple[int, ...] | None = None
    softmax_exchange: str = "tails"
    """How softmax attention sees earlier slices (``ops.attention.sequence_parallel``):
    ``tails`` (all-gather every rank's tail), ``halo`` (send/recv from the previous rank only,
    when every slice holds at least one window) or ``ulysses`` (all-to-all over heads,
    ``ops.attention.ulysses``). The model's softmax layers set their kind's on the
    micro-batch's context (``parallel.sequence.with_exchange``)."""
    documents: Tensor | None = field(default=None, repr=False)
    early_exchange: bool = True
    """Start each exchange (GLA state gather, softmax keys) before the local kernel and wait
    for it after (``parallel.sp_early_exchange``); False: block at the exchange (the A/B
    baseline). Same results either way."""
    block_masks: dict | None = field(default=None, repr=False, compare=False)

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
        return replace(self, lengths=(local,) * self.size, documents=gathered, block_masks={})

    def block_masks_for(self, exchange: str) -> dict | None:
        """The dict that keeps the block masks of ``exchange``'s positions in this micro-batch
        (``ops.masks.Positions.block_masks``): every layer's positions of one exchange are
        equal (slice lengths, ranks and documents are the micro-batch's). None outside one."""
        if self.block_masks is None:
            return None
        return self.block_masks.setdefault((exchange, self.early_exchange), {})

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
    received, ops = _shift_ops(x.contiguous(), group, step)
    for request in dist.batch_isend_irecv(ops) if ops else []:
        request.wait()
    return received


def _shift_ops(x: Tensor, group, step: int) -> tuple[Tensor, list]:
    """The receive buffer (zeros where nothing arrives) and the P2P ops of :func:`_shift`."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    received = torch.zeros_like(x)
    ops = []
    if 0 <= rank + step < size:
        ops.append(dist.P2POp(dist.isend, x, dist.get_global_rank(group, rank + step), group))
    if 0 <= rank - step < size:
        ops.append(dist.P2POp(dist.irecv, received, dist.get_global_rank(group, rank - step), group))
    return received, ops


def from_previous_rank(x: Tensor, group) -> Tensor:
    """The previous rank's ``x`` (zeros on the first rank), differentiable: one send and one
    receive per rank each way instead of an all-gather (see ``_FromPrevious``)."""
    return _FromPrevious.apply(x, group)


def from_previous_rank_values(x: Tensor, group) -> Tensor:
    """The previous rank's ``x`` (zeros on the first rank), no gradient (e.g. document ids)."""
    return _shift(x, group, step=1)


# ---- collectives started early ---------------------------------------------------------------


@dataclass(frozen=True)
class _Kind:
    """One differentiable exchange in two halves: ``forward(x)`` and ``backward(grad)`` issue
    the op without waiting and return ``(result buffer, requests, tensors the requests use)``;
    ``finish(buffer)`` turns the waited backward buffer into the input's gradient."""

    forward: Callable[[Tensor], tuple[Tensor, list, list]]
    backward: Callable[[Tensor], tuple[Tensor, list, list]]
    finish: Callable[[Tensor], Tensor]


@dataclass
class _Flight:
    """The requests of one exchange in flight, shared by its two autograd nodes."""

    requests: list = field(default_factory=list)
    buffers: list = field(default_factory=list)   # kept alive until the requests complete
    result: Tensor | None = None

    def issue(self, half: Callable[[Tensor], tuple[Tensor, list, list]], x: Tensor) -> Tensor:
        self.result, self.requests, self.buffers = half(x)
        return self.result

    def land(self) -> Tensor:
        for request in self.requests:
            request.wait()
        result, self.result, self.requests, self.buffers = self.result, None, [], []
        return result


class _Issue(torch.autograd.Function):
    """Forward: issue the exchange, return its (not yet written) buffer. Backward: wait for the
    reverse exchange that ``_Land``'s backward issued.

    Autograd runs backward nodes in reverse creation order, so everything computed between
    ``start_*`` and ``wait()`` (the local kernel) has its backward run while the reverse
    exchange is in flight."""

    @staticmethod
    def forward(ctx, x: Tensor, kind: _Kind, flight: _Flight) -> Tensor:
        ctx.kind, ctx.flight = kind, flight
        return flight.issue(kind.forward, x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # the gradient that arrives is the buffer _Land.backward handed on; read it only now
        return ctx.kind.finish(ctx.flight.land()), None, None


class _Land(torch.autograd.Function):
    """Forward: wait for the exchange ``_Issue`` started. Backward: issue the reverse
    exchange of the gradient, hand its (not yet written) buffer to ``_Issue``."""

    @staticmethod
    def forward(ctx, buffer: Tensor, kind: _Kind, flight: _Flight) -> Tensor:
        ctx.kind, ctx.flight = kind, flight
        flight.land()
        return buffer

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.flight.issue(ctx.kind.backward, grad), None, None


class InFlight:
    """An exchange that has been issued: :meth:`wait` (once) returns its result. The result is
    not reachable before the wait, so it cannot be read half-written."""

    def __init__(self, issued: Tensor, kind: _Kind | None, flight: _Flight | None) -> None:
        self._issued, self._kind, self._flight = issued, kind, flight

    def wait(self) -> Tensor:
        if self._issued is None:
            raise RuntimeError("InFlight.wait() was already called: keep the tensor it returned")
        issued, self._issued = self._issued, None
        if self._flight is None:  # completed when started (early=False)
            return issued
        return _Land.apply(issued, self._kind, self._flight)


def _start(x: Tensor, kind: _Kind) -> InFlight:
    flight = _Flight()
    return InFlight(_Issue.apply(x, kind, flight), kind, flight)


def _gather_kind(group) -> _Kind:
    size, rank = dist.get_world_size(group), dist.get_rank(group)

    def gather(x: Tensor) -> tuple[Tensor, list, list]:
        x = x.contiguous()
        out = x.new_empty((size, *x.shape))
        return out, [dist.all_gather(list(out.unbind(0)), x, group=group, async_op=True)], [x]

    def reduce(grad: Tensor) -> tuple[Tensor, list, list]:
        grad = grad.contiguous()
        return grad, [dist.all_reduce(grad, group=group, async_op=True)], []

    return _Kind(gather, reduce, lambda grad: grad[rank])


def start_all_gather(x: Tensor, group, early: bool = True) -> InFlight:
    """:func:`all_gather_with_grad` issued now, its result from ``.wait()``; backward: the
    all-reduce is issued where the gradient of the waited result is ready and waited for
    where ``x``'s gradient is needed. ``early=False``: the blocking op, done on return."""
    if not early:
        return InFlight(all_gather_with_grad(x, group), None, None)
    return _start(x, _gather_kind(group))


def _shift_kind(group) -> _Kind:
    def shifted(step: int) -> Callable[[Tensor], tuple[Tensor, list, list]]:
        def issue(x: Tensor) -> tuple[Tensor, list, list]:
            x = x.contiguous()
            received, ops = _shift_ops(x, group, step)
            return received, dist.batch_isend_irecv(ops) if ops else [], [x]
        return issue

    return _Kind(shifted(1), shifted(-1), lambda grad: grad)


def start_from_previous_rank(x: Tensor, group, early: bool = True) -> InFlight:
    """:func:`from_previous_rank` issued now, its result from ``.wait()`` (backward as
    :func:`start_all_gather`). ``early=False``: the blocking op, done on return."""
    if not early:
        return InFlight(from_previous_rank(x, group), None, None)
    return _start(x, _shift_kind(group))
