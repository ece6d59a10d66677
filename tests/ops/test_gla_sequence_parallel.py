"""GLA split over 2 and 4 sequence-parallel ranks (gloo, CPU) equals the one-process op:
outputs and the gradients of q, k, v and g, with uneven slices, packed documents and an
initial state that starts every row and document (the sink tokens' state). Every case runs
both orders (``SPContext.early_exchange``: the state gather in flight during the local kernel,
or blocking), which also agree with each other to fp64 rounding."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
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
    initial = torch.randn(B, HKV, K, V, generator=gen, dtype=torch.float64)
    return q, k, v, g, weight, segments, initial


def _bounds(world: int) -> list[int]:
    """Uneven contiguous slices: 23 tokens -> [12, 11] or [6, 6, 6, 5]."""
    sizes = [T // world + (r < T % world) for r in range(world)]
    return [sum(sizes[:r]) for r in range(world + 1)]


def _reference(q, k, v, g, weight, segments, documents: bool, initial=None):
    """Outputs and the gradients of q, k, v, g (and of ``initial`` when given)."""
    from ops.gla import gla_recurrent_reference

    leaves = [t.clone().requires_grad_() for t in (q, k, v, g)]
    state = None if initial is None else initial.clone().requires_grad_()
    if documents:
        starts = torch.ones_like(segments, dtype=torch.bool)
        starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
        cu = torch.cat([torch.nonzero(starts.reshape(-1)).reshape(-1), torch.tensor([B * T])])
        flat = [t.reshape(1, B * T, *t.shape[2:]) for t in leaves]
        # every document starts from its row's initial state
        docs_per_row = starts.sum(1)
        per_doc = None if state is None else state.repeat_interleave(docs_per_row, dim=0)
        out, _ = gla_recurrent_reference(*flat, SCALE, initial_state=per_doc, cu_seqlens=cu)
        out = out.reshape(B, T, H, V)
    else:
        out, _ = gla_recurrent_reference(*leaves, SCALE, initial_state=state)
    (out * weight).sum().backward()
    grads = [t.grad for t in leaves] + ([] if state is None else [state.grad])
    return out.detach(), grads


def _check(rank: int, world: int, documents: bool, initial: bool) -> None:
    from ops.comm import SPContext
    from ops.gla.sequence_parallel import sp_gla

    q, k, v, g, weight, segments, initial_state = _inputs()
    initial_state = initial_state if initial else None
    ref_out, ref_grads = _reference(q, k, v, g, weight, segments, documents, initial_state)
    lo, hi = _bounds(world)[rank:rank + 2]
    seg = segments[:, lo:hi] if documents else None
    results = []
    for early in (True, False):
        mine = [t[:, lo:hi].clone().requires_grad_() for t in (q, k, v, g)]
        state = initial_state.clone().requires_grad_() if initial else None
        out = sp_gla(*mine, SCALE, SPContext(dist.group.WORLD, early_exchange=early), seg, initial_state=state)
        (out * weight[:, lo:hi]).sum().backward()
        torch.testing.assert_close(out, ref_out[:, lo:hi], rtol=1e-9, atol=1e-9)
        for name, leaf, ref in zip("qkvg", mine, ref_grads):
            torch.testing.assert_close(leaf.grad, ref[:, lo:hi], rtol=1e-9, atol=1e-9,
                                       msg=lambda m, n=name, e=early: f"rank {rank} early={e} d{n}: {m}")
        if initial:
            # each rank holds its slice's share of the initial state's gradient
            dist.all_reduce(state.grad)
            torch.testing.assert_close(state.grad, ref_grads[4], rtol=1e-9, atol=1e-9)
        results.append([out.detach(), *(t.grad for t in mine), *([state.grad] if initial else [])])
    for name, a, b in zip(["out", "dq", "dk", "dv", "dg", "dstate"], *results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13, msg=lambda m, n=name: f"early vs blocking {n}: {m}")


GLA_CASES = [(2, False, False), (4, True, False), (2, True, True), (4, True, True)]


GLA_IDS = ["sp2-one_document", "sp4-packed_documents", "sp2-documents_initial_state",
           "sp4-documents_initial_state"]


def spawn_plan() -> dict[int, dict[str, tuple]]:
    """Every case by world size (run by the session's SpawnPool, tests/parallel/ranks.py)."""
    return {world: {name: (_check, documents, initial)
                    for name, (n, documents, initial) in zip(GLA_IDS, GLA_CASES) if n == world}
            for world in (2, 4)}


@pytest.fixture(scope="module")
def results(spawn_pool):
    return {**spawn_pool.results(__name__, 2), **spawn_pool.results(__name__, 4)}


@pytest.mark.parametrize("case", GLA_IDS)
def test_sequence_parallel_gla_matches_one_process(case, results):
    assert results[case] == "", results[case]


def test_reference_documents_differ():
    """The two cases differ, so passing both is not one result twice."""
    q, k, v, g, weight, segments, initial = _inputs()
    plain, _ = _reference(q, k, v, g, weight, segments, False)
    docs, _ = _reference(q, k, v, g, weight, segments, True)
    docs_initial, _ = _reference(q, k, v, g, weight, segments, True, initial)
    assert (plain - docs).abs().max() > 1e-3
    assert (docs - docs_initial).abs().max() > 1e-3
