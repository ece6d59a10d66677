"""Op ``attention`` over split sequences by Ulysses: an all-to-all over heads (``sp=`` with
``softmax_exchange: ulysses``).

Each of the P ranks holds ``q [b, H, S + s, D]``, ``k, v [b, Hkv, S + s, D]``: S sink tokens
(the same on every rank) and its slice of s positions. One all-to-all trades the slice's
regular rows of every head for all T = P s positions of H / P query heads and Hkv / P
key/value heads; the ordinary one-process attention (``local_attention``: the same window,
documents and sinks rule, the whole sequence's document ids) runs on them; a second
all-to-all of its output returns every head of the rank's own positions. Rank r takes query
heads ``[r H/P, (r+1) H/P)`` and kv heads ``[r Hkv/P, (r+1) Hkv/P)``, which keeps GQA's
query head -> kv head map (h -> h // (H / Hkv)) inside each rank.

The sinks stay out of the all-to-all: each rank prepends its heads' slice of the sink rows,
and computes the sink rows of the output (sinks see each other only) for every head itself.
A sink key's gradient from a query of another rank's slice lands on the rank that holds the
query's head instead of the query's rank; the sinks are the same on every rank and their
gradients add up over the ranks (``parallel.sequence``), so the sum is unchanged.

Eligible when H and Hkv divide by P and every slice has one length (``for_batch`` gives the
training loop equal slices); ``sbtrain plan`` checks the heads from the config and ``auto``
chooses Ulysses only where it is eligible (docs/sequence_parallel.md). Per layer and
micro-batch every rank sends (P - 1) / P of q, k, v and the output forward, as much for the
gradients: the volume of its slice, whatever the window.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ops.attention.local import local_attention
from ops.comm import SPContext, all_gather_values
from ops.documents import Documents, document_ids


class _AllToAll(torch.autograd.Function):
    """``x [P, ...]``: slot j goes to rank j, slot j of the result came from rank j. The
    exchange is its own adjoint: backward runs it on the gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return _all_to_all(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_to_all(grad, ctx.group), None


def _all_to_all(x: Tensor, group) -> Tensor:
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    dist.all_to_all_single(out, x.contiguous(), group=group)
    return out


def all_to_all_with_grad(x: Tensor, group) -> Tensor:
    """[P, ...] -> [P, ...]: every rank's slot j sent to rank j, differentiable."""
    return _AllToAll.apply(x, group)


def ulysses_blocker(heads: int, kv_heads: int, lengths: list[int]) -> str | None:
    """Why Ulysses cannot split these heads over ``len(lengths)`` ranks, or None."""
    size = len(lengths)
    if heads % size or kv_heads % size:
        return f"query heads ({heads}) and kv heads ({kv_heads}) must divide by the SP size ({size})"
    if len(set(lengths)) > 1:
        return f"every slice must have one length (got {lengths})"
    return None


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, *, window: int | None, documents, sinks: int,
                      scale: float | None, sp: SPContext) -> Tensor:
    """This rank's ``q [b, H, S + s, D]``, ``k, v [b, Hkv, S + s, D]`` (``documents [b, s]``:
    global ids of its slice) -> ``[b, H, S + s, D]``, as one process over the whole sequence."""
    size, rank = sp.size, sp.rank
    heads, kv_heads, seq = q.shape[1], k.shape[1], q.shape[2] - sinks
    blocker = ulysses_blocker(heads, kv_heads, sp.slice_lengths(seq, q.device))
    if blocker is not None:
        raise ValueError(f"the Ulysses exchange cannot run: {blocker}")
    h, hkv = heads // size, kv_heads // size
    packed = torch.cat([_by_head_group(t[:, :, sinks:], size) for t in (q, k, v)], dim=2)
    received = all_to_all_with_grad(packed, sp.group)         # [P (slice), b, h + 2 hkv, s, D]
    whole = received.permute(1, 2, 0, 3, 4).flatten(2, 3)    # [b, h + 2 hkv, P s, D]
    mine = (slice(rank * h, (rank + 1) * h), slice(rank * hkv, (rank + 1) * hkv),
            slice(rank * hkv, (rank + 1) * hkv))
    parts = whole.split([h, hkv, hkv], dim=1)
    q_all, k_all, v_all = (torch.cat([t[:, heads_r, :sinks], part], dim=2)
                           for t, heads_r, part in zip((q, k, v), mine, parts))
    out = local_attention(q_all, k_all, v_all, window=window, documents=_whole_documents(documents, sp),
                          sinks=sinks, scale=scale)[:, :, sinks:]       # [b, h, P s, D]
    back = out.unflatten(2, (size, seq)).permute(2, 0, 1, 3, 4)        # [P (slice), b, h, s, D]
    regular = all_to_all_with_grad(back, sp.group)            # [P (head group), b, h, s, D]
    regular = regular.permute(1, 0, 2, 3, 4).flatten(1, 2)    # [b, H, s, D]
    if not sinks:
        return regular
    sink_rows = local_attention(q[:, :, :sinks], k[:, :, :sinks], v[:, :, :sinks], sinks=sinks, scale=scale)
    return torch.cat([sink_rows, regular], dim=2)


def _by_head_group(t: Tensor, size: int) -> Tensor:
    """[b, H, s, D] -> [P, b, H / P, s, D]: slot j holds rank j's heads."""
    return t.unflatten(1, (size, t.shape[1] // size)).transpose(0, 1)


def _whole_documents(documents, sp: SPContext) -> Documents | Tensor | None:
    """[b, P s] ids of the whole sequence: every rank's slice from the micro-batch's
    ``sp.documents`` when it has them, else all-gathered here. Within a micro-batch they are
    one ``Documents`` for every layer (kept with the batch's block masks), so that flex builds
    their block mask once per window kind, not once per layer."""
    ids = document_ids(documents)
    if ids is None:
        return None
    if sp.documents is None:
        return torch.cat(all_gather_values(ids, sp.group).unbind(0), dim=1)
    held = sp.block_masks_for("ulysses")
    if held is None:
        return torch.cat(sp.documents.unbind(0), dim=1)
    if "documents" not in held:  # attention reads the ids only: no cu_seqlens (a host sync)
        held["documents"] = Documents(torch.cat(sp.documents.unbind(0), dim=1), cu_seqlens=None)
    return held["documents"]
