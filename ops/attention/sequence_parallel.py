"""Op ``attention`` over sequences split across the ranks of an SP group (``sp=`` argument).

Each rank holds one contiguous slice of every sequence (rank order = sequence order; slices
may differ in length) plus the same sink tokens. A query needs the keys/values of its own
slice plus, from earlier slices, those its window reaches. An *exchange* brings them:
a function ``(k, v, documents, window, sp) -> Exchanged`` of this rank's regular keys that
returns the keys it attends to with their global positions. Two exist:

* ``tails`` (:func:`exchange_tails`): every rank all-gathers the last ``min(w, s_j)``
  keys/values of each slice (a halo): volume ``P * w`` per rank for a window ``w``,
  independent of the sequence length; every earlier position (all-gather of K/V) for full
  attention. With slices shorter than the window the tails of several earlier ranks chain
  into the halo. Gradients of the gathered keys/values return to their ranks through one
  all-reduce of the same size.
* ``halo`` (:func:`exchange_halo`): when every slice holds at least one window, a rank's
  window reaches into the previous slice only: one send of the last ``w`` keys/values to the
  next rank and one receive from the previous (volume ``w`` per rank instead of ``P * w``;
  the gradients go back the same way). Otherwise (full attention, slices shorter than the
  window) it is ``tails``. Chosen per SP context (``SPContext.softmax_exchange``).

Chosen over Ulysses (all-to-all over heads) because it needs no head padding when heads do
not divide the SP size and, for a window, moves a volume that does not grow with the sequence:
at SpikingBrain-7B's shape and sp 8, Ulysses moves less below about 44K tokens and 3x more at
128K (``sbtrain plan`` prints both; docs/sequence_parallel.md). Another exchange (Ulysses)
would be one more function in :data:`EXCHANGES`.

The attention itself is one ``local_attention`` call (the registry: flex on GPUs, the explicit
mask on the CPU) of [sinks; slice] queries over [sinks; exchanged keys] at their positions;
the sinks (seen by every query, attending to each other only) are the same on every rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ops.attention.local import local_attention
from ops.attention.masks import Positions
from ops.comm import (
    SPContext,
    all_gather_values,
    all_gather_with_grad,
    from_previous_rank,
    from_previous_rank_values,
)
from ops.documents import document_ids


@dataclass(frozen=True)
class Exchanged:
    """What an exchange returns: keys/values ``[b, Hkv, Sk, D]`` this rank's queries attend to
    (its own slice included) and their positions (``positions.query``: this slice's)."""

    keys: Tensor
    values: Tensor
    positions: Positions


def sp_attention(q: Tensor, k: Tensor, v: Tensor, *, window: int | None, documents: Tensor | None, sinks: int,
                 scale: float | None, sp: SPContext, exchange: str | None = None) -> Tensor:
    """This rank's ``q [b, H, S + s_r, D]``, ``k, v [b, Hkv, S + s_r, D]`` (S sinks, then its
    slice; ``documents [b, s_r]`` global ids sliced like the tokens) -> ``[b, H, S + s_r, D]``.
    ``exchange``: a name in EXCHANGES; None: ``sp.softmax_exchange``."""
    regular_k, regular_v = k[:, :, sinks:], v[:, :, sinks:]
    documents = document_ids(documents)
    got = EXCHANGES[exchange or sp.softmax_exchange](regular_k, regular_v, documents, window, sp)
    keys = torch.cat([k[:, :, :sinks], got.keys], dim=2)
    values = torch.cat([v[:, :, :sinks], got.values], dim=2)
    return local_attention(q, keys, values, window=window, documents=documents, sinks=sinks,
                           positions=got.positions, scale=scale)


def exchange_tails(k: Tensor, v: Tensor, documents: Tensor | None, window: int | None, sp: SPContext) -> Exchanged:
    """All-gather every rank's last ``min(window, s_j)`` keys/values (all of them without a
    window), left-padded to one width; slot j holds positions ``[end_j - width, end_j)``."""
    rank, seq, device = sp.rank, k.shape[2], k.device
    lengths = sp.slice_lengths(seq, device)
    starts = [sum(lengths[:j]) for j in range(len(lengths))]
    tails = [n if window is None else min(window, n) for n in lengths]
    width = max(tails)
    kv_tail = torch.cat([k, v], dim=1)[:, :, seq - tails[rank]:]
    kv_tail = F.pad(kv_tail, (0, 0, width - tails[rank], 0))
    gathered = all_gather_with_grad(kv_tail, sp.group)          # [P, b, 2 Hkv, width, D]
    tail_pos, tail_valid = _tail_positions(starts, lengths, tails, width, rank, device)
    own = starts[rank] + torch.arange(seq, device=device)
    keys = torch.cat([*gathered[:, :, :k.shape[1]].unbind(0), k], dim=2)
    values = torch.cat([*gathered[:, :, k.shape[1]:].unbind(0), v], dim=2)
    key_documents = None if documents is None else _tail_documents(documents, tails, width, rank, sp)
    positions = Positions(query=own, key=torch.cat([tail_pos, own]),
                          key_valid=torch.cat([tail_valid, torch.ones(seq, dtype=torch.bool, device=device)]),
                          key_documents=key_documents)
    return Exchanged(keys, values, positions)


def exchange_halo(k: Tensor, v: Tensor, documents: Tensor | None, window: int | None, sp: SPContext) -> Exchanged:
    """The previous rank's last ``window`` keys/values by send/recv when every slice holds at
    least ``window`` (the window then reaches one slice back); else :func:`exchange_tails`."""
    rank, seq, device = sp.rank, k.shape[2], k.device
    lengths = sp.slice_lengths(seq, device)
    if window is None or min(lengths) < window:
        return exchange_tails(k, v, documents, window, sp)
    start = sum(lengths[:rank])
    halo = from_previous_rank(torch.cat([k, v], dim=1)[:, :, seq - window:], sp.group)
    own = start + torch.arange(seq, device=device)
    key_valid = torch.cat([torch.full((window,), rank > 0, device=device),   # rank 0: no halo
                           torch.ones(seq, dtype=torch.bool, device=device)])
    key_documents = None if documents is None else torch.cat(
        [_previous_documents(documents, window, sp), documents], dim=1)
    positions = Positions(query=own, key=torch.cat([start - window + torch.arange(window, device=device), own]),
                          key_valid=key_valid, key_documents=key_documents)
    heads = k.shape[1]
    return Exchanged(torch.cat([halo[:, :heads], k], dim=2), torch.cat([halo[:, heads:], v], dim=2),
                     positions)


def _tail_positions(starts, lengths, tails, width, rank, device) -> tuple[Tensor, Tensor]:
    """Global positions of the gathered tail slots and which slots hold a real earlier key
    (this rank's own tail is left out: its slice is used whole)."""
    positions, valid = [], []
    for j, (start, length, tail) in enumerate(zip(starts, lengths, tails)):
        end = start + length
        positions.append(torch.arange(end - width, end, device=device))
        slot = torch.arange(width, device=device) >= width - tail
        valid.append(slot & (j != rank))
    return torch.cat(positions), torch.cat(valid)


def _tail_documents(documents: Tensor, tails, width, rank, sp: SPContext) -> Tensor:
    """Ids of the gathered tail slots (-1 in padding) followed by this slice's ids: sliced from
    the micro-batch's ``sp.documents`` when it has them, else all-gathered here."""
    seq = documents.shape[1]
    if sp.documents is not None:
        gathered = torch.stack([F.pad(ids[:, ids.shape[1] - tail:], (width - tail, 0), value=-1)
                                for ids, tail in zip(sp.documents.unbind(0), tails)])
    else:
        tail = F.pad(documents[:, seq - tails[rank]:], (width - tails[rank], 0), value=-1)
        gathered = all_gather_values(tail, sp.group)              # [P, b, width]
    return torch.cat([*gathered.unbind(0), documents], dim=1)


def _previous_documents(documents: Tensor, window: int, sp: SPContext) -> Tensor:
    """The previous rank's last ``window`` ids (zeros on rank 0), from ``sp.documents`` when the
    micro-batch gathered them, else received here."""
    if sp.documents is None:
        return from_previous_rank_values(documents[:, documents.shape[1] - window:], sp.group)
    if sp.rank == 0:
        return torch.zeros_like(documents[:, documents.shape[1] - window:])
    previous = sp.documents[sp.rank - 1]
    return previous[:, previous.shape[1] - window:]


EXCHANGES: dict[str, Callable[..., Exchanged]] = {"tails": exchange_tails, "halo": exchange_halo}
