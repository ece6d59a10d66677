"""Softmax attention split over 2 and 4 sequence-parallel ranks (gloo, CPU) equals the
one-process reference: outputs and q/k/v gradients, full and sliding-window (halo longer and
shorter than a slice), uneven slices, with and without packed documents."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

B, H, HKV, T, D = 2, 4, 2, 23, 8
SCALE = D ** -0.5


def _inputs():
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(B, H, T, D, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(B, HKV, T, D, generator=gen, dtype=torch.float64) for _ in range(2))
    weight = torch.randn(B, H, T, D, generator=gen, dtype=torch.float64)
    segments = torch.zeros(B, T, dtype=torch.long)
    segments[0, 5:], segments[0, 12:], segments[1, 18:] = 1, 2, 1
    return q, k, v, weight, segments


def _bounds(world: int) -> list[int]:
    sizes = [T // world + (r < T % world) for r in range(world)]
    return [sum(sizes[:r]) for r in range(world + 1)]


def _reference(q, k, v, weight, window, segments):
    from ops.attention import reference_attention

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = reference_attention(*leaves, window=window, segment_ids=segments, scale=SCALE)
    (out * weight).sum().backward()
    return out.detach(), [t.grad for t in leaves]


def _worker(rank, world, store, window, documents):
    from parallel.sequence_attention import sp_softmax_attention

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        q, k, v, weight, segments = _inputs()
        segments = segments if documents else None
        ref_out, ref_grads = _reference(q, k, v, weight, window, segments)
        lo, hi = _bounds(world)[rank:rank + 2]
        mine = [t[:, :, lo:hi].clone().requires_grad_() for t in (q, k, v)]
        seg = None if segments is None else segments[:, lo:hi]
        out = sp_softmax_attention(*mine, window, SCALE, dist.group.WORLD, seg)
        (out * weight[:, :, lo:hi]).sum().backward()
        # the reference computes in fp32 whatever the input dtype (ours in fp64): 1e-6
        torch.testing.assert_close(out, ref_out[:, :, lo:hi], rtol=1e-6, atol=1e-6)
        for name, leaf, ref in zip("qkv", mine, ref_grads):
            torch.testing.assert_close(leaf.grad, ref[:, :, lo:hi], rtol=1e-6, atol=1e-6,
                                       msg=lambda m, n=name: f"rank {rank} d{n}: {m}")
    finally:
        dist.destroy_process_group()


# window 3 < every slice; window 8 > the 4-way slices (5-6 tokens): the halo spans 2 ranks.
# Each of full / window / chaining halo runs with and without documents on some world size
# (the whole 3 x 2 x 2 product took 90 s of the CI budget for little more coverage).
CASES = [(None, 2, True), (None, 4, False), (3, 2, False), (3, 4, True), (8, 4, True),
         (8, 4, False)]


@pytest.mark.parametrize("window,world,documents", CASES,
                         ids=[f"{w or 'full'}-sp{n}-{'docs' if d else 'one_doc'}"
                              for w, n, d in CASES])
def test_sequence_parallel_attention_matches_one_process(window, world, documents, tmp_path):
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), window, documents), nprocs=world,
             join=True)


S = 3  # sink tokens


def _sink_worker(rank, world, store, window):
    from ops.attention import reference_sink_attention
    from parallel.sequence_attention import sp_softmax_attention

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        q, k, v, weight, segments = _inputs()
        gen = torch.Generator().manual_seed(9)
        q_sink, k_sink, v_sink = (torch.randn(B, h, S, D, generator=gen, dtype=torch.float64)
                                  for h in (H, HKV, HKV))
        leaves = [t.clone().requires_grad_() for t in (q, k, v, k_sink, v_sink)]
        ref_out, _ = reference_sink_attention(*leaves[:3], q_sink, *leaves[3:], window=window,
                                              segment_ids=segments, scale=SCALE)
        (ref_out * weight).sum().backward()
        lo, hi = _bounds(world)[rank:rank + 2]
        mine = [t[:, :, lo:hi].clone().requires_grad_() for t in (q, k, v)]
        sinks = [t.clone().requires_grad_() for t in (k_sink, v_sink)]
        out = sp_softmax_attention(*mine, window, SCALE, dist.group.WORLD, segments[:, lo:hi],
                                   *sinks)
        (out * weight[:, :, lo:hi]).sum().backward()
        torch.testing.assert_close(out, ref_out[:, :, lo:hi].detach(), rtol=1e-6, atol=1e-6)
        for name, leaf, ref in zip("qkv", mine, leaves):
            torch.testing.assert_close(leaf.grad, ref.grad[:, :, lo:hi], rtol=1e-6, atol=1e-6,
                                       msg=lambda m, n=name: f"rank {rank} d{n}: {m}")
        for name, sink, ref in zip(("k_sink", "v_sink"), sinks, leaves[3:]):
            dist.all_reduce(sink.grad)  # each rank holds its queries' share
            torch.testing.assert_close(sink.grad, ref.grad, rtol=1e-6, atol=1e-6,
                                       msg=lambda m, n=name: f"rank {rank} d{n}: {m}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("window,world", [(None, 2), (3, 4)], ids=["full-sp2", "window3-sp4"])
def test_sequence_parallel_attention_with_sinks_matches_one_process(window, world, tmp_path):
    """Sink keys are seen by every query across windows and documents, as in sink_attention."""
    mp.spawn(_sink_worker, args=(world, str(tmp_path / "store"), window), nprocs=world, join=True)
