"""GLA split over 2 and 4 sequence-parallel ranks (gloo, CPU) equals the one-process op:
outputs and the gradients of q, k, v and g, with uneven slices and packed documents."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

B, T, H, HKV, K, V = 2, 23, 4, 2, 8, 6
SCALE = K ** -0.5


def _inputs():
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(B, T, h, d, generator=gen, dtype=torch.float64)
               for h, d in ((H, K), (HKV, K), (HKV, V)))
    # strong and weak decays both (log decay down to about -5 per step)
    g = F.logsigmoid(2 * torch.randn(B, T, HKV, K, generator=gen, dtype=torch.float64))
    weight = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    segments = torch.zeros(B, T, dtype=torch.long)
    # row 0: documents start at 5 and 12 (inside slices and at an edge of the 4-way split);
    # row 1: one start at 18
    segments[0, 5:], segments[0, 12:], segments[1, 18:] = 1, 2, 1
    return q, k, v, g, weight, segments


def _bounds(world: int) -> list[int]:
    """Uneven contiguous slices: 23 tokens -> [12, 11] or [6, 6, 6, 5]."""
    sizes = [T // world + (r < T % world) for r in range(world)]
    return [sum(sizes[:r]) for r in range(world + 1)]


def _reference(q, k, v, g, weight, segments, documents: bool):
    from ops.gla import gla_recurrent_reference

    leaves = [t.clone().requires_grad_() for t in (q, k, v, g)]
    if documents:
        starts = torch.ones_like(segments, dtype=torch.bool)
        starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
        cu = torch.cat([torch.nonzero(starts.reshape(-1)).reshape(-1), torch.tensor([B * T])])
        flat = [t.reshape(1, B * T, *t.shape[2:]) for t in leaves]
        out, _ = gla_recurrent_reference(*flat, SCALE, cu_seqlens=cu)
        out = out.reshape(B, T, H, V)
    else:
        out, _ = gla_recurrent_reference(*leaves, SCALE)
    (out * weight).sum().backward()
    return out.detach(), [t.grad for t in leaves]


def _worker(rank: int, world: int, store: str, documents: bool) -> None:
    from parallel.sequence_gla import sp_gla

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        q, k, v, g, weight, segments = _inputs()
        ref_out, ref_grads = _reference(q, k, v, g, weight, segments, documents)
        lo, hi = _bounds(world)[rank:rank + 2]
        mine = [t[:, lo:hi].clone().requires_grad_() for t in (q, k, v, g)]
        seg = segments[:, lo:hi] if documents else None
        out = sp_gla(*mine, SCALE, dist.group.WORLD, seg)
        (out * weight[:, lo:hi]).sum().backward()
        torch.testing.assert_close(out, ref_out[:, lo:hi], rtol=1e-9, atol=1e-9)
        for name, leaf, ref in zip("qkvg", mine, ref_grads):
            torch.testing.assert_close(leaf.grad, ref[:, lo:hi], rtol=1e-9, atol=1e-9,
                                       msg=lambda m, n=name: f"rank {rank} d{n}: {m}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("documents", [False, True], ids=["one_document", "packed_documents"])
def test_sequence_parallel_gla_matches_one_process(world, documents, tmp_path):
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), documents), nprocs=world, join=True)


def test_reference_documents_differ():
    """The two cases differ, so passing both is not one result twice."""
    q, k, v, g, weight, segments = _inputs()
    plain, _ = _reference(q, k, v, g, weight, segments, False)
    docs, _ = _reference(q, k, v, g, weight, segments, True)
    assert (plain - docs).abs().max() > 1e-3
