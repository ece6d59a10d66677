"""Sequence parallelism (``parallel.sp``) around the model: batch slices and RoPE positions.

Each rank of the sequence-parallel group (Megatron's context-parallel group, built with
``context_parallel_size = sp``) trains on one contiguous slice of every sequence of the
micro-batch its data-parallel rank reads: rank r keeps tokens ``[r T/P, (r + 1) T/P)``.
Contiguous slices (not Megatron's load-balanced two-chunk split) are what the linear
attention's state passing needs: a slice's incoming state is the state after the slice
before it. The mixers pass an ``ops.comm.SPContext`` to the ops (``sp=``), which exchange
what crosses slices (``ops.gla.sequence_parallel``, ``ops.attention.sequence_parallel``;
each softmax layer with the exchange of its kind, :func:`with_exchange`);
everything else in a layer is per token.

What stays right under the split:

* **RoPE**: a slice's tokens keep their global positions (``SliceRotaryEmbedding``).
* **Sink tokens**: every rank prepends the same sinks to its slice (they are input-independent),
  so they cost no communication; their gradients add up across ranks with the rest.
* **Loss**: each rank sums its tokens' losses and divides by the micro-batch's token count
  over all slices (``loss_tokens``), so the ranks' losses add up to the micro-batch loss;
  Megatron's schedule multiplies the loss by ``sp`` and the data-parallel gradient average
  runs over data x sequence ranks, which together give the gradient of that sum.
* **Documents**: segment ids are computed on the whole sequence before slicing, so ids are
  global and a document that crosses a slice boundary keeps one id.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ops.comm import SPContext

# The per-token entries of a micro-batch that are split along the sequence.
SLICED_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "segment_ids")


SOFTMAX_EXCHANGES = ("tails", "halo", "ulysses")
"""What a softmax layer under SP can run (``ops.attention.sequence_parallel``): two exchanges
of keys and Ulysses' all-to-all over heads. ``parallel.sp_softmax_exchange: auto`` is resolved
per layer kind before the model is built (``sbtrain.profiler.comm.softmax_exchanges``)."""


def sp_context(pg_collection, softmax_exchange: str = "tails") -> SPContext | None:
    """The SP context of the group sequences are split over (``parallel.sp``; Megatron's
    context-parallel group ``pg_collection.cp``), or None when sequences are whole (sp 1):
    what the mixers pass to the ops as ``sp=``. ``softmax_exchange``: one of
    :data:`SOFTMAX_EXCHANGES` (a softmax mixer's, chosen for its layer kind)."""
    _check_exchange(softmax_exchange)
    sp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
    if sp_group is None or sp_group.size() == 1:
        return None
    return SPContext(sp_group, softmax_exchange=softmax_exchange)


def with_exchange(sp: SPContext | None, softmax_exchange: str) -> SPContext | None:
    """``sp`` (the micro-batch's context, shared by every layer) with one softmax layer's
    exchange: the exchange is chosen per layer kind (window, full)."""
    if sp is None or sp.softmax_exchange == softmax_exchange:
        return sp
    _check_exchange(softmax_exchange)
    return replace(sp, softmax_exchange=softmax_exchange)


def _check_exchange(name: str) -> None:
    if name not in SOFTMAX_EXCHANGES:
        raise ValueError(f"unknown softmax exchange {name!r}; known: {', '.join(SOFTMAX_EXCHANGES)} "
                         "(auto is resolved per layer kind: sbtrain.profiler.comm.softmax_exchanges)")


def slice_bounds(seq_length: int, rank: int, size: int) -> tuple[int, int]:
    """[start, end) of rank ``rank``'s contiguous slice; ``seq_length`` must divide by ``size``."""
    if seq_length % size:
        raise ValueError(f"sequence length {seq_length} does not divide by sp={size}")
    local = seq_length // size
    return rank * local, (rank + 1) * local


def slice_microbatch(batch: dict[str, torch.Tensor], rank: int, size: int) -> dict[str, torch.Tensor]:
    """This rank's slice of a [b, T] micro-batch, plus ``loss_tokens``: the loss-mask count of
    the whole micro-batch, which normalises every slice's loss (see the module docstring)."""
    out = dict(batch)
    out["loss_tokens"] = batch["loss_mask"].float().sum()
    if size == 1:
        return out
    start, end = slice_bounds(batch["tokens"].shape[1], rank, size)
    for key in SLICED_KEYS:
        if key in batch:
            out[key] = batch[key][:, start:end]
    return out


class SliceRotaryEmbedding(torch.nn.Module):
    """Megatron's RotaryEmbedding at this rank's global positions.

    GPTModel asks its ``rotary_pos_emb`` for ``sp * local`` positions (``get_rotary_seq_len``
    multiplies the local length by the context-parallel size) and would hand each rank two
    load-balanced chunks of them; a contiguous slice needs positions ``0..S-1`` for the sink
    tokens and ``S + r * T_local + i`` for its tokens. Holds no state of its own (RoPE's
    ``inv_freq`` is a plain attribute), so checkpoints do not depend on ``sp``.
    """

    def __init__(self, rope: torch.nn.Module, sink_tokens: int, sp_group) -> None:
        super().__init__()
        self.rope = rope
        self.sink_tokens = sink_tokens
        self.rank, self.size = sp_group.rank(), sp_group.size()
        self._cache: tuple[int, torch.Tensor] | None = None

    def get_rotary_seq_len(self, *args, **kwargs) -> int:
        return self.rope.get_rotary_seq_len(*args, **kwargs)

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False,
                cp_group=None) -> torch.Tensor:
        if packed_seq or offset:
            raise NotImplementedError("sequence parallelism takes no packed_seq_params or "
                                      "RoPE offset; packed documents use segment ids")
        if self._cache is not None and self._cache[0] == max_seq_len:
            return self._cache[1]
        local = max_seq_len // self.size - self.sink_tokens
        emb = self.rope.get_emb(self.sink_tokens + self.size * local)
        sinks = torch.arange(self.sink_tokens, device=emb.device)
        mine = self.sink_tokens + self.rank * local + torch.arange(local, device=emb.device)
        result = emb[torch.cat([sinks, mine])]
        self._cache = (max_seq_len, result)
        return result


def install_slice_rotary(model: torch.nn.Module, sink_tokens: int, sp_group) -> None:
    """Give a GPTModel the RoPE positions of this rank's slice (no-op for sp == 1)."""
    if sp_group.size() == 1 or getattr(model, "rotary_pos_emb", None) is None:
        return
    model.rotary_pos_emb = SliceRotaryEmbedding(model.rotary_pos_emb, sink_tokens, sp_group)
