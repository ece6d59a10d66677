"""Causal softmax attention (full or sliding window) over a sequence split across ranks.

Each rank of the sequence-parallel group holds one contiguous slice of every sequence (rank
order = sequence order; slices may differ in length). A query needs the keys/values of its
own slice plus, from earlier slices:

* sliding window ``w``: the ``w`` positions before its slice starts (a halo). Every rank
  all-gathers the last ``min(w, s_j)`` keys/values of each slice: volume ``P * w`` per rank,
  independent of the sequence length. With slices shorter than the window the tails of
  several earlier ranks chain into the halo.
* full attention (``window=None``): every earlier position, i.e. an all-gather of K/V.

Chosen over Ulysses (all-to-all over heads) because it needs no head padding when heads do
not divide the SP size and, for a window, moves a volume that does not grow with the sequence:
at SpikingBrain-7B's shape and sp 8, Ulysses moves less below about 44K tokens and 3x more at
128K (``sbtrain plan`` prints both; docs/sequence_parallel.md). Gradients of the gathered
keys/values return to their ranks through one all-reduce of the same size.

The attention itself is ``ops.attention.positioned_attention`` over the gathered keys with
their global positions: flex_attention with a block-sparse mask on GPUs, an explicit mask on
the CPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ops.attention import positioned_attention
from parallel.sp_comm import all_gather_values, all_gather_with_grad


def sp_softmax_attention(q: Tensor, k: Tensor, v: Tensor, window: int | None, scale: float,
                         group, segment_ids: Tensor | None = None, sink_k: Tensor | None = None,
                         sink_v: Tensor | None = None) -> Tensor:
    """This rank's slice ``q [b, H, s_r, D]``, ``k, v [b, Hkv, s_r, D]`` (layout of
    ``ops.attention.softmax_attention``, ``segment_ids [b, s_r]`` global document ids sliced
    like the tokens) -> this slice's outputs ``[b, H, s_r, D]``. ``sink_k, sink_v``
    ``[b, Hkv, S, D]``: sink tokens' keys/values (the same on every rank), seen by every query
    whatever its window and document."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    seq = q.shape[2]
    lengths = all_gather_values(torch.tensor([seq], device=q.device), group).flatten().tolist()
    starts = [sum(lengths[:j]) for j in range(world)]
    tails = [n if window is None else min(window, n) for n in lengths]
    width = max(tails)
    # every rank's tail, left-padded to one width; slot j holds positions [end_j - width, end_j)
    kv_tail = torch.cat([k, v], dim=1)[:, :, seq - tails[rank]:]
    kv_tail = torch.nn.functional.pad(kv_tail, (0, 0, width - tails[rank], 0))
    gathered = all_gather_with_grad(kv_tail, group)          # [P, b, 2 Hkv, width, D]
    keys_pos, valid = _tail_positions(starts, lengths, tails, width, rank, q.device)
    keys = [*(gathered[:, :, :k.shape[1]].unbind(0)), k]
    values = [*(gathered[:, :, k.shape[1]:].unbind(0)), v]
    own = starts[rank] + torch.arange(seq, device=q.device)
    keys_pos = torch.cat([keys_pos, own])
    valid = torch.cat([valid, torch.ones(seq, dtype=torch.bool, device=q.device)])
    always = torch.zeros_like(valid)
    key_segments = None
    if segment_ids is not None:
        key_segments = _key_segments(segment_ids, tails, width, rank, group)
    if sink_k is not None:
        sinks = sink_k.shape[2]
        keys, values = [sink_k, *keys], [sink_v, *values]
        # sinks sit before every token; their position only matters through k_always
        keys_pos = torch.cat([torch.full((sinks,), -1, device=q.device), keys_pos])
        valid = torch.cat([torch.ones(sinks, dtype=torch.bool, device=q.device), valid])
        always = torch.cat([torch.ones(sinks, dtype=torch.bool, device=q.device), always])
        if key_segments is not None:
            key_segments = torch.nn.functional.pad(key_segments, (sinks, 0), value=-1)
    return positioned_attention(q, torch.cat(keys, dim=2), torch.cat(values, dim=2), own,
                                keys_pos, window=window, q_segments=segment_ids,
                                k_segments=key_segments, k_valid=valid, k_always=always,
                                scale=scale)


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


def _key_segments(segment_ids: Tensor, tails, width, rank, group) -> Tensor:
    seq = segment_ids.shape[1]
    tail = segment_ids[:, seq - tails[rank]:]
    tail = torch.nn.functional.pad(tail, (width - tails[rank], 0), value=-1)
    gathered = all_gather_values(tail, group)                  # [P, b, width]
    return torch.cat([*gathered.unbind(0), segment_ids], dim=1)
