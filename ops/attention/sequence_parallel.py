"""Op ``attention`` over sequences split across the ranks of an SP group (``sp=`` argument).

Each rank holds one contiguous slice of every sequence (rank order = sequence order; slices
may differ in length) plus the same sink tokens. A query needs the keys/values of its own
slice plus, from earlier slices, those its window reaches. An *exchange* brings them:
a function ``(k, v, documents, window, sp) -> Incoming`` of this rank's regular keys that
issues the transfer of the earlier slices' keys and returns them in flight with their global
positions. Two exist:

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

A third option, ``ulysses`` (``ulysses.py``), is not an exchange of keys: an all-to-all over
heads gives each rank all positions of some heads, the one-process attention runs on them and
a second all-to-all returns the output. It needs the heads and kv heads to divide by the SP
size and equal slices, and moves the slice's q, k, v and output whatever the window: less
than ``tails`` for full attention, more than ``halo`` wherever the halo runs, and more than
``tails`` for a window once slices exceed 4/3 of it (SpikingBrain-7B's heads; at sp 8, above
about 44K tokens). ``parallel.sp_softmax_exchange:
auto`` picks per layer kind (window, full) the option that moves fewer bytes, by ``sbtrain
plan``'s count (``sbtrain.profiler.comm.softmax_exchanges``; docs/sequence_parallel.md).

The sinks (seen by every query, attending to each other only) are the same on every rank.
With ``SPContext.early_exchange`` (the default) the attention runs in two parts while the keys
travel: [sinks; slice] queries over [sinks; own slice] (op ``attention_lse``, no positions:
the one-process call and its cached block mask) as soon as the exchange is issued, then,
after the wait, the slice's queries over the received keys only, at their positions; the two
are merged by their log-sum-exps (``lse_merge.merge_attention``: exact, gradients included,
up to the rounding of the parts' outputs to the input dtype). Backward, the keys' gradients
travel back while the own-slice part's backward runs (``ops.comm.InFlight``). Without it, one
``local_attention`` call over [sinks; received keys; own slice] after the exchange (the
registry: flex on GPUs, the explicit mask on the CPU).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ops.attention.local import local_attention, local_attention_lse
from ops.attention.lse_merge import merge_attention
from ops.attention.masks import Positions
from ops.attention.ulysses import ulysses_attention
from ops.comm import (
    InFlight,
    SPContext,
    all_gather_values,
    from_previous_rank_values,
    start_all_gather,
    start_from_previous_rank,
)
from ops.documents import document_ids


@dataclass(frozen=True)
class Incoming:
    """What an exchange returns: the earlier slices' keys/values, in flight until :meth:`wait`,
    and where they sit: ``query [s_r]`` this slice's global positions, ``key [Tk]`` the received
    keys' (``key_valid``: False for padding and slots this rank must not see), ``key_documents
    [b, Tk]`` their ids (None without documents)."""

    kv: InFlight  # [b, 2 Hkv, Tk, D], or the tails' slots [P, b, 2 Hkv, width, D] in rank order
    query: Tensor
    key: Tensor
    key_valid: Tensor
    key_documents: Tensor | None

    def wait(self) -> tuple[Tensor, Tensor]:
        """The received ``(keys, values)``, ``[b, Hkv, Tk, D]`` each."""
        kv = self.kv.wait()
        if kv.dim() == 5:
            kv = torch.cat(kv.unbind(0), dim=2)
        heads = kv.shape[1] // 2
        return kv[:, :heads], kv[:, heads:]


def sp_attention(q: Tensor, k: Tensor, v: Tensor, *, window: int | None, documents: Tensor | None, sinks: int,
                 scale: float | None, sp: SPContext, exchange: str | None = None) -> Tensor:
    """This rank's ``q [b, H, S + s_r, D]``, ``k, v [b, Hkv, S + s_r, D]`` (S sinks, then its
    slice; ``documents [b, s_r]`` global ids sliced like the tokens) -> ``[b, H, S + s_r, D]``.
    ``exchange``: a name in EXCHANGES or ``ulysses``; None: ``sp.softmax_exchange``."""
    if (exchange or sp.softmax_exchange) == "ulysses":
        return ulysses_attention(q, k, v, window=window, documents=documents, sinks=sinks, scale=scale, sp=sp)
    ids = document_ids(documents)
    incoming = EXCHANGES[exchange or sp.softmax_exchange](k[:, :, sinks:], v[:, :, sinks:], ids, window, sp)
    # every layer's positions of this exchange are equal: their block mask is built once per micro-batch
    block_masks = sp.block_masks_for(exchange or sp.softmax_exchange)
    if not sp.early_exchange:
        return _attend_at_once(q, k, v, incoming, window=window, documents=ids, sinks=sinks, scale=scale,
                               block_masks=block_masks)
    # the own slice (and the sinks) while the keys travel; ``documents`` may be the batch's
    # Documents, which keeps this call's block mask for the next layers
    own, own_lse = local_attention_lse(q, k, v, window=window, documents=documents, sinks=sinks, scale=scale)
    keys, values = incoming.wait()
    positions = Positions(query=incoming.query, key=incoming.key, key_valid=incoming.key_valid,
                          key_documents=incoming.key_documents, block_masks=block_masks)
    earlier, earlier_lse = local_attention_lse(q[:, :, sinks:], keys, values, window=window, documents=ids,
                                               positions=positions, scale=scale)
    merged, _ = merge_attention(own[:, :, sinks:], own_lse[:, :, sinks:], earlier, earlier_lse)
    return torch.cat([own[:, :, :sinks], merged], dim=2)


def _attend_at_once(q: Tensor, k: Tensor, v: Tensor, incoming: Incoming, *, window: int | None,
                    documents: Tensor | None, sinks: int, scale: float | None,
                    block_masks: dict | None = None) -> Tensor:
    """One attention call over [sinks; received keys; own slice] once the keys have arrived."""
    keys, values = incoming.wait()
    seq = q.shape[2] - sinks
    positions = Positions(
        query=incoming.query, key=torch.cat([incoming.key, incoming.query]),
        key_valid=torch.cat([incoming.key_valid, torch.ones(seq, dtype=torch.bool, device=q.device)]),
        key_documents=None if documents is None else torch.cat([incoming.key_documents, documents], dim=1),
        block_masks=block_masks)
    keys = torch.cat([k[:, :, :sinks], keys, k[:, :, sinks:]], dim=2)
    values = torch.cat([v[:, :, :sinks], values, v[:, :, sinks:]], dim=2)
    return local_attention(q, keys, values, window=window, documents=documents, sinks=sinks,
                           positions=positions, scale=scale)


def exchange_tails(k: Tensor, v: Tensor, documents: Tensor | None, window: int | None, sp: SPContext) -> Incoming:
    """All-gather every rank's last ``min(window, s_j)`` keys/values (all of them without a
    window), left-padded to one width; slot j holds positions ``[end_j - width, end_j)``."""
    rank, seq, device = sp.rank, k.shape[2], k.device
    lengths = sp.slice_lengths(seq, device)
    starts = [sum(lengths[:j]) for j in range(len(lengths))]
    tails = [n if window is None else min(window, n) for n in lengths]
    width = max(tails)
    kv_tail = torch.cat([k, v], dim=1)[:, :, seq - tails[rank]:]
    kv_tail = F.pad(kv_tail, (0, 0, width - tails[rank], 0))
    slots = start_all_gather(kv_tail, sp.group, early=sp.early_exchange)  # [P, b, 2 Hkv, width, D]
    tail_pos, tail_valid = _tail_positions(starts, lengths, tails, width, rank, device)
    key_documents = None if documents is None else _tail_documents(documents, tails, width, rank, sp)
    return Incoming(slots, query=starts[rank] + torch.arange(seq, device=device), key=tail_pos,
                    key_valid=tail_valid, key_documents=key_documents)


def exchange_halo(k: Tensor, v: Tensor, documents: Tensor | None, window: int | None, sp: SPContext) -> Incoming:
    """The previous rank's last ``window`` keys/values by send/recv when every slice holds at
    least ``window`` (the window then reaches one slice back); else :func:`exchange_tails`."""
    rank, seq, device = sp.rank, k.shape[2], k.device
    lengths = sp.slice_lengths(seq, device)
    if window is None or min(lengths) < window:
        return exchange_tails(k, v, documents, window, sp)
    start = sum(lengths[:rank])
    halo = start_from_previous_rank(torch.cat([k, v], dim=1)[:, :, seq - window:], sp.group,
                                    early=sp.early_exchange)
    key_documents = None if documents is None else _previous_documents(documents, window, sp)
    return Incoming(halo, query=start + torch.arange(seq, device=device),
                    key=start - window + torch.arange(window, device=device),
                    key_valid=torch.full((window,), rank > 0, device=device),  # rank 0: no halo
                    key_documents=key_documents)


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
    """Ids of the gathered tail slots (-1 in padding): sliced from the micro-batch's
    ``sp.documents`` when it has them, else all-gathered here."""
    seq = documents.shape[1]
    if sp.documents is not None:
        gathered = torch.stack([F.pad(ids[:, ids.shape[1] - tail:], (width - tail, 0), value=-1)
                                for ids, tail in zip(sp.documents.unbind(0), tails)])
    else:
        tail = F.pad(documents[:, seq - tails[rank]:], (width - tails[rank], 0), value=-1)
        gathered = all_gather_values(tail, sp.group)              # [P, b, width]
    return torch.cat(gathered.unbind(0), dim=1)


def _previous_documents(documents: Tensor, window: int, sp: SPContext) -> Tensor:
    """The previous rank's last ``window`` ids (zeros on rank 0), from ``sp.documents`` when the
    micro-batch gathered them, else received here."""
    if sp.documents is None:
        return from_previous_rank_values(documents[:, documents.shape[1] - window:], sp.group)
    if sp.rank == 0:
        return torch.zeros_like(documents[:, documents.shape[1] - window:])
    previous = sp.documents[sp.rank - 1]
    return previous[:, previous.shape[1] - window:]


EXCHANGES: dict[str, Callable[..., Incoming]] = {"tails": exchange_tails, "halo": exchange_halo}
