"""Gated linear attention over a sequence split across ranks (LASP-2 style state exchange).

Each rank of the sequence-parallel group holds one contiguous slice of every sequence (rank
order = sequence order; slices may differ in length). Per rank:

1. the state the slice leaves, ``S_r`` (from zero, over the slice's last document), and the
   slice's total decay ``D_r = exp(sum of g)`` (0 when a document starts inside the slice);
2. one all-gather of ``(S_r, D_r)``: ``[b, Hkv, K, V + 1]`` per rank, independent of the
   sequence length, issued at once (``SPContext.early_exchange``; False: it blocks here);
3. the local recurrence from a zero state (op ``gla``, the fused kernel on GPUs), which
   needs nothing from the gather and runs while it is in flight;
4. the state entering rank r, ``E_r = S_{r-1} + D_{r-1} E_{r-1}`` (zero when rank r's first
   token starts a new document; ``D`` is 0 for a slice that starts or contains a document
   start), added to the outputs of rank r's first document as the term
   ``ops.gla.reference.initial_state_output``.

The backward pass is autograd through the same steps; the gather's backward sums every
rank's gradient for each rank's ``(S_r, D_r)`` with one all-reduce of the same size, so state
gradients flow back to the earlier slices. That all-reduce is issued once step 4's backward
has produced its gradient and waited for after the local kernel's backward
(``ops.comm.start_all_gather``). Documents (``documents``, global ids sliced
like the tokens) restart the state wherever they start, also inside a slice.

An ``initial_state`` I (the sink tokens' state, the same on every rank) starts every row and
every document instead of zero. Each rank then computes its slice as if I entered its first
token too, and the exchange carries corrections: the packet holds ``S_r - I`` (``S_r`` now
starts from I at its last document's start) and the state entering rank r is ``I + Δ_r`` with
``Δ_{r+1} = (S_r - I) + D_r Δ_r`` (zero where a document starts). Without I this is the
recursion above.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ops.comm import SPContext, all_gather_values, start_all_gather
from ops.documents import document_ids
from ops.gla.local import gla_documents
from ops.gla.reference import initial_state_output


def _slice_state(k: Tensor, v: Tensor, g: Tensor, last_doc: Tensor | None,
                 initial_state: Tensor | None) -> tuple[Tensor, Tensor]:
    """(state left by the slice's last document [b, Hkv, K, V], starting from zero, or from
    ``initial_state`` at that document's start; log of the decay the whole slice applies to an
    incoming state [b, Hkv, K]), in fp32 (fp64 for fp64)."""
    dtype = torch.float64 if k.dtype == torch.float64 else torch.float32
    k, v, g = k.to(dtype), v.to(dtype), g.to(dtype)
    cum = g.cumsum(1)
    total = cum[:, -1]
    weight = (total[:, None] - cum).exp()
    if last_doc is not None:
        weight = weight * last_doc[:, :, None, None]
    state = torch.einsum("bsgk,bsgv->bgkv", k * weight, v)
    if initial_state is not None:
        last_doc_decay = total if last_doc is None else (g * last_doc[:, :, None, None]).sum(1)
        state = state + initial_state.to(dtype) * last_doc_decay.exp()[..., None]
    return state, total


def sp_gla(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float, sp: SPContext,
           documents: Tensor | None = None, initial_state: Tensor | None = None) -> Tensor:
    """GLA of this rank's slice ``[b, s_r, ...]`` (layout of ``ops.gla.gla``) of sequences
    split over ``sp``; returns this slice's outputs ``[b, s_r, H, V]``. ``initial_state``
    ``[b, Hkv, K, V]``: the state every row and document starts from (None: zero)."""
    batch = q.shape[0]
    local_documents, documents = documents, document_ids(documents)
    if documents is None:
        first_doc = last_doc = None
        through = torch.ones(batch, device=q.device)
    else:
        first_doc = (documents == documents[:, :1]).float()
        last_doc = (documents == documents[:, -1:]).float()
        # an incoming state passes through only a slice that is one document throughout
        through = first_doc.amin(1)
    group, rank = sp.group, sp.rank
    continues = _continues(documents, sp, batch, q.device)
    state, log_total = _slice_state(k, v, g, last_doc, initial_state)
    if initial_state is not None:
        state = state - initial_state.to(state.dtype)
    # what this slice does to a state arriving from the previous slice: decay it, or stop it
    # (its first token starts a new document, or a document starts inside it)
    decay = log_total.exp() * (through * continues)[:, None, None]
    packed = torch.cat([state, decay[..., None]], dim=-1)
    # the packet needs no local output: gather it while the local kernel runs (and, backward,
    # reduce its gradient while the kernel's backward runs)
    exchange = start_all_gather(packed, group, early=sp.early_exchange)
    out = gla_documents(q, k, v, g, scale, local_documents)
    if initial_state is not None:
        out = out + initial_state_output(q, g, initial_state, scale, documents).to(out.dtype)
    gathered = exchange.wait()                              # [P, b, Hkv, K, V + 1]
    entering = torch.zeros_like(state)
    for j in range(gathered.shape[0]):
        # every slot enters the graph (weight 0 from rank j >= this rank on), so that every
        # rank, rank 0 included, joins the all-reduce of the gather's backward
        keep = 1.0 if j < rank else 0.0
        step = gathered[j, ..., :-1] + gathered[j, ..., -1:] * entering
        entering = keep * step + (1.0 - keep) * entering
    entering = entering * continues[:, None, None, None]
    term = initial_state_output(q, g, entering, scale)
    if first_doc is not None:
        term = term * first_doc[:, :, None, None]
    return out + term.to(out.dtype)


def _continues(documents: Tensor | None, sp: SPContext, batch: int, device) -> Tensor:
    """[b] 1 where this slice's first token continues the previous slice's last document
    (rank 0 receives nothing, so its value does not matter). The edges come from the
    micro-batch's ``sp.documents`` when it has them, else from an all-gather here."""
    if documents is None:
        return torch.ones(batch, device=device)
    rank = sp.rank
    if sp.documents is not None:
        gathered = torch.stack([sp.documents[:, :, 0], sp.documents[:, :, -1]], dim=-1)
    else:
        edges = torch.stack([documents[:, 0], documents[:, -1]], dim=-1)
        gathered = all_gather_values(edges, sp.group)         # [P, b, 2], every rank joins
    if rank == 0:
        return torch.ones(batch, device=device)
    return (gathered[rank, :, 0] == gathered[rank - 1, :, 1]).float()
