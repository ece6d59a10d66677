"""The SP ops read a micro-batch's gathered segment ids (``SPContext.documents``, filled once
by ``SPContext.for_batch``) instead of gathering per layer: what they slice from it is the
global ids' edges and tails. One process; the rank is faked (no collective runs on this path).
The multi-rank parity of the whole path: tests/parallel/test_sequence_layouts.py."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ops.attention.sequence_parallel import _previous_documents, _tail_documents
from ops.comm import SPContext
from ops.gla.sequence_parallel import _continues

P, B, S = 4, 2, 6


@dataclass(frozen=True)
class _FakeRank(SPContext):
    """An SP context whose rank is given, over ``documents`` already gathered."""

    fake_rank: int = 0

    @property
    def rank(self) -> int:
        return self.fake_rank

    @property
    def size(self) -> int:
        return self.documents.shape[0]


def _global_ids() -> torch.Tensor:
    """[B, P * S] ids: row 0 has documents starting at 6 (a slice edge) and 9; row 1 at 15."""
    ids = torch.zeros(B, P * S, dtype=torch.int32)
    ids[0, 6:], ids[0, 9:], ids[1, 15:] = 1, 2, 1
    return ids


def _context(rank: int) -> _FakeRank:
    slices = _global_ids().view(B, P, S).transpose(0, 1)       # [P, B, S]
    return _FakeRank(group=None, lengths=(S,) * P, documents=slices.contiguous(), fake_rank=rank)


def test_continues_reads_the_edges_of_the_gathered_ids():
    ids = _global_ids()
    for rank in range(1, P):
        sp = _context(rank)
        got = _continues(sp.documents[rank], sp, B, "cpu")
        want = (ids[:, rank * S] == ids[:, rank * S - 1]).float()
        torch.testing.assert_close(got, want)
    # rank 1 of row 0 starts a document exactly at its first token
    assert _continues(_context(1).documents[1], _context(1), B, "cpu")[0] == 0


def test_halo_and_tail_ids_are_slices_of_the_global_ids():
    ids, window = _global_ids(), 4
    for rank in range(P):
        sp = _context(rank)
        mine = sp.documents[rank]
        previous = _previous_documents(mine, window, sp)
        want = torch.zeros(B, window, dtype=ids.dtype) if rank == 0 else ids[:, rank * S - window:rank * S]
        torch.testing.assert_close(previous, want)
        tails = _tail_documents(mine, [window] * P, window, rank, sp)
        slots = [ids[:, (j + 1) * S - window:(j + 1) * S] for j in range(P)]
        torch.testing.assert_close(tails, torch.cat(slots, dim=1))


def test_tail_ids_pad_short_tails():
    sp = _context(2)
    tails = _tail_documents(sp.documents[2], [3, 3, 3, 3], 5, 2, sp)
    assert (tails[:, :2] == -1).all() and (tails[:, 5:7] == -1).all()
    torch.testing.assert_close(tails[:, 2:5], _global_ids()[:, S - 3:S])
