"""``ops.attention.attention(..., sp=ctx)``: softmax attention split over 2 and 4 sequence-parallel
ranks (gloo, CPU) equals the one-process reference: outputs and q/k/v gradients, full and
sliding-window (halo longer and shorter than a slice), uneven slices, with and without packed
documents, with sink tokens, GQA. Every case runs both orders (``SPContext.early_exchange``):
the own slice while the keys travel, merged by lse, and the blocking single call; the two
also agree with each other to fp64 rounding."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist


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
    from ops.attention import naive_attention

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = naive_attention(*leaves, window=window, documents=segments, scale=SCALE)
    (out * weight).sum().backward()
    return out.detach(), [t.grad for t in leaves]


def _sp(exchange: str = "tails", early: bool = True):
    from ops.comm import SPContext

    return SPContext(dist.group.WORLD, softmax_exchange=exchange, early_exchange=early)


def _check(rank, world, window, documents, exchange="tails"):
    from ops.attention import attention

    q, k, v, weight, segments = _inputs()
    segments = segments if documents else None
    ref_out, ref_grads = _reference(q, k, v, weight, window, segments)
    lo, hi = _bounds(world)[rank:rank + 2]
    seg = None if segments is None else segments[:, lo:hi]
    results = []
    for early in (True, False):
        mine = [t[:, :, lo:hi].clone().requires_grad_() for t in (q, k, v)]
        with _counting_all_gathers() as gathers:
            out = attention(*mine, window=window, documents=seg, sp=_sp(exchange, early), scale=SCALE)
            (out * weight[:, :, lo:hi]).sum().backward()
        if exchange == "halo":  # send/recv only when every slice holds a window; else the tails
            slices = [b - a for a, b in zip(_bounds(world), _bounds(world)[1:])]
            assert (gathers["keys"] == 0) == (window is not None and min(slices) >= window), gathers
        torch.testing.assert_close(out, ref_out[:, :, lo:hi], rtol=1e-6, atol=1e-6)
        for name, leaf, ref in zip("qkv", mine, ref_grads):
            torch.testing.assert_close(leaf.grad, ref[:, :, lo:hi], rtol=1e-6, atol=1e-6,
                                       msg=lambda m, n=name, e=early: f"rank {rank} early={e} d{n}: {m}")
        results.append([out.detach(), *(t.grad for t in mine)])
    _assert_orders_agree(*results)


def _assert_orders_agree(early: list, blocking: list) -> None:
    """The lse-merged early path equals the blocking single call to fp64 rounding."""
    for name, a, b in zip(["out", "dq", "dk", "dv", "dk_sink", "dv_sink"], early, blocking):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"early vs blocking {n}: {m}")


# window 3 < every slice; window 8 > the 4-way slices (5-6 tokens): the halo spans 2 ranks.
# Each of full / window / chaining halo runs with and without documents on some world size
# (the whole 3 x 2 x 2 product took 90 s of the CI budget for little more coverage).
CASES = [(None, 2, True), (None, 4, False), (3, 2, False), (3, 4, True), (8, 4, True),
         (8, 4, False)]
# the send/recv halo (slices >= window: 3 at sp 2 and 4, 5 at sp 4) and its fallback to the
# tails (window 8 > the sp 4 slices; full attention)
HALO_CASES = [(3, 2, True), (3, 4, False), (5, 4, True), (8, 4, True), (None, 2, False)]


def _case_id(window, world, documents, exchange="tails"):
    halo = "-halo" if exchange == "halo" else ""
    return f"{window or 'full'}-sp{world}-{'docs' if documents else 'one_doc'}{halo}"


class _counting_all_gathers:
    """Counts the differentiable all-gathers of keys the exchange issues."""

    def __enter__(self):
        from ops.attention import sequence_parallel

        self.module, self.original = sequence_parallel, sequence_parallel.start_all_gather
        counts = self.counts = {"keys": 0}

        def counted(*args, **kwargs):
            counts["keys"] += 1
            return self.original(*args, **kwargs)

        sequence_parallel.start_all_gather = counted
        return counts

    def __exit__(self, *exc):
        self.module.start_all_gather = self.original


SINK_CASES = [(None, 2), (3, 4), (3, 4, "halo")]


def _sink_case_id(window, world, exchange="tails"):
    halo = "-halo" if exchange == "halo" else ""
    return f"{'window' + str(window) if window else 'full'}-sp{world}{halo}"


def spawn_plan() -> dict[int, dict[str, tuple]]:
    """Every case of this file by world size (run by the session's SpawnPool)."""
    plan = {}
    for world in (2, 4):
        cases = {_case_id(*case): (_check, case[0], case[2]) for case in CASES
                 if case[1] == world}
        cases.update({_case_id(*case, "halo"): (_check, case[0], case[2], "halo")
                      for case in HALO_CASES if case[1] == world})
        cases.update({"sinks-" + _sink_case_id(*case): (_sink_check, case[0], *case[2:])
                      for case in SINK_CASES if case[1] == world})
        plan[world] = cases
    return plan


@pytest.fixture(scope="module")
def results(spawn_pool):
    return {**spawn_pool.results(__name__, 2), **spawn_pool.results(__name__, 4)}


@pytest.mark.parametrize("case", [_case_id(*c) for c in CASES])
def test_sequence_parallel_attention_matches_one_process(case, results):
    assert results[case] == "", results[case]


@pytest.mark.parametrize("case", [_case_id(*c, "halo") for c in HALO_CASES])
def test_send_recv_halo_matches_one_process(case, results):
    """SPContext.softmax_exchange = halo: outputs and q/k/v gradients as on one process, with
    no all-gather of keys when every slice holds a window."""
    assert results[case] == "", results[case]


S = 3  # sink tokens


def _sink_check(rank, world, window, exchange="tails"):
    from ops.attention import attention, naive_attention

    q, k, v, weight, segments = _inputs()
    gen = torch.Generator().manual_seed(9)
    q_sink, k_sink, v_sink = (torch.randn(B, h, S, D, generator=gen, dtype=torch.float64)
                              for h in (H, HKV, HKV))
    leaves = [t.clone().requires_grad_() for t in (q, k, v, k_sink, v_sink)]
    q_all, k_all, v_all = (torch.cat([s, t], dim=2) for s, t in zip((q_sink, *leaves[3:]), leaves[:3]))
    ref_all = naive_attention(q_all, k_all, v_all, window=window, documents=segments, sinks=S, scale=SCALE)
    ref_sinks, ref_out = ref_all[:, :, :S], ref_all[:, :, S:]
    (ref_out * weight).sum().backward()
    lo, hi = _bounds(world)[rank:rank + 2]
    results = []
    for early in (True, False):
        mine = [t[:, :, lo:hi].clone().requires_grad_() for t in (q, k, v)]
        sinks = [t.clone().requires_grad_() for t in (k_sink, v_sink)]
        got = attention(*(torch.cat([s, t], dim=2) for s, t in zip((q_sink, *sinks), mine)), window=window,
                        documents=segments[:, lo:hi], sinks=S, sp=_sp(exchange, early), scale=SCALE)
        out = got[:, :, S:]
        (out * weight[:, :, lo:hi]).sum().backward()
        # the sink rows (sinks see each other only) are the same on every rank
        torch.testing.assert_close(got[:, :, :S], ref_sinks.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out, ref_out[:, :, lo:hi].detach(), rtol=1e-6, atol=1e-6)
        for name, leaf, ref in zip("qkv", mine, leaves):
            torch.testing.assert_close(leaf.grad, ref.grad[:, :, lo:hi], rtol=1e-6, atol=1e-6,
                                       msg=lambda m, n=name, e=early: f"rank {rank} early={e} d{n}: {m}")
        for name, sink, ref in zip(("k_sink", "v_sink"), sinks, leaves[3:]):
            dist.all_reduce(sink.grad)  # each rank holds its queries' share
            torch.testing.assert_close(sink.grad, ref.grad, rtol=1e-6, atol=1e-6,
                                       msg=lambda m, n=name, e=early: f"rank {rank} early={e} d{n}: {m}")
        results.append([got.detach(), *(t.grad for t in mine), *(t.grad for t in sinks)])
    _assert_orders_agree(*results)


@pytest.mark.parametrize("case", [_sink_case_id(*c) for c in SINK_CASES])
def test_sequence_parallel_attention_with_sinks_matches_one_process(case, results):
    """Sink keys are seen by every query across windows and documents, as on one process."""
    assert results["sinks-" + case] == "", results["sinks-" + case]
