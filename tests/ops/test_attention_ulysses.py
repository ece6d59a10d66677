"""``ops.attention.attention(..., sp=ctx)`` with ``softmax_exchange: ulysses`` (all-to-all over
heads, ``ops/attention/ulysses.py``) on 2 and 4 gloo ranks equals the one-process reference:
outputs and q/k/v gradients (sink keys/values: summed over the ranks), full attention and
sliding windows, packed documents crossing slices, sink tokens, GQA (2 and 4 query heads per
kv head), with the micro-batch's gathered documents (``for_batch``) and without; two
all-to-alls forward and two backward, no all-gather of keys; uneven slices and heads that do
not divide the SP size are refused."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist


B, T, D, S = 2, 16, 8, 3
SCALE = D ** -0.5


def _inputs(heads: int, kv_heads: int, length: int = T):
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(B, heads, S + length, D, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(B, kv_heads, S + length, D, generator=gen, dtype=torch.float64) for _ in range(2))
    weight = torch.randn(B, heads, S + length, D, generator=gen, dtype=torch.float64)
    segments = torch.zeros(B, length, dtype=torch.long)
    segments[0, 5:], segments[0, 11:], segments[1, 7:] = 1, 2, 1       # documents cross slices
    return q, k, v, weight, segments


class _Counting:
    """Counts the all-to-alls of ``ops.attention.ulysses`` while entered, with the exchanges of
    keys (``sequence_parallel.EXCHANGES``) taken away: Ulysses must not call them."""

    def __enter__(self):
        from ops.attention import sequence_parallel, ulysses

        self.module, self.original = ulysses, ulysses._all_to_all
        self.exchanges = dict(sequence_parallel.EXCHANGES)
        sequence_parallel.EXCHANGES.clear()
        counts = self.counts = {"all_to_all": 0}

        def counted(*args, **kwargs):
            counts["all_to_all"] += 1
            return self.original(*args, **kwargs)

        ulysses._all_to_all = counted
        return counts

    def __exit__(self, *exc):
        from ops.attention import sequence_parallel

        self.module._all_to_all = self.original
        sequence_parallel.EXCHANGES.update(self.exchanges)


def _check(rank, world, window, documents, sinks, heads, kv_heads, batch_context=False):
    """Ulysses on this rank's slice == naive attention over the whole sequence."""
    from ops.attention import attention, naive_attention
    from ops.comm import SPContext

    q, k, v, weight, segments = _inputs(heads, kv_heads)
    segments = segments if documents else None
    keep = slice(S - sinks, None)                       # sinks = 0: drop the sink rows
    q, k, v, weight = (t[:, :, keep] for t in (q, k, v, weight))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = naive_attention(*leaves, window=window, documents=segments, sinks=sinks, scale=SCALE)
    (ref * weight).sum().backward()
    local = T // world
    rows = torch.cat([torch.arange(sinks), sinks + rank * local + torch.arange(local)])
    mine = [t[:, :, rows].clone().requires_grad_() for t in (q, k, v)]
    seg = None if segments is None else segments[:, rank * local:(rank + 1) * local]
    sp = SPContext(dist.group.WORLD, softmax_exchange="ulysses")
    if batch_context:
        sp = sp.for_batch(local, seg)
    share = weight[:, :, rows].clone()
    share[:, :, :sinks] /= world           # every rank computes the sink rows: count them once
    with _Counting() as counts:
        out = attention(*mine, window=window, documents=seg, sinks=sinks, sp=sp, scale=SCALE)
        (out * share).sum().backward()
    assert counts == {"all_to_all": 4}, counts
    torch.testing.assert_close(out, ref[:, :, rows].detach(), rtol=1e-6, atol=1e-6)
    for name, leaf, full in zip("qkv", mine, leaves):
        grad = leaf.grad.clone()
        shared = grad[:, :, :sinks].contiguous()    # each rank holds a share of the sinks'
        dist.all_reduce(shared)
        grad[:, :, :sinks] = shared
        torch.testing.assert_close(grad, full.grad[:, :, rows], rtol=1e-6, atol=1e-6,
                                   msg=lambda m, n=name: f"rank {rank} d{n}: {m}")


def _refusals(rank, world):
    """Heads that do not divide the SP size, and uneven slices, are refused by name."""
    from ops.attention import attention
    from ops.comm import SPContext

    sp = SPContext(dist.group.WORLD, softmax_exchange="ulysses")
    q, k, v, _, _ = _inputs(4, 1)
    with pytest.raises(ValueError, match=r"Ulysses exchange cannot run: query heads \(4\) and kv heads \(1\)"):
        attention(q[:, :, S:S + 8], k[:, :, S:S + 8], v[:, :, S:S + 8], sp=sp)
    q, k, v, _, _ = _inputs(4, 2)
    length = 8 + rank                                   # 8 and 9 tokens
    with pytest.raises(ValueError, match=r"every slice must have one length \(got \[8, 9"):
        attention(q[:, :, :length], k[:, :, :length], v[:, :, :length], sp=sp)


# (window, documents, sinks, heads, kv heads[, the micro-batch's gathered documents])
CASES = {
    2: {"full": (None, False, 0, 4, 2),
        "window3-docs": (3, True, 0, 4, 2),
        "window3-docs-batch": (3, True, 0, 4, 2, True),
        "full-docs-sinks": (None, True, S, 4, 2),
        "window5-sinks-gqa4": (5, False, S, 8, 2),
        "window10-docs-sinks-mha": (10, True, S, 2, 2, True)},
    4: {"window3-docs-sinks": (3, True, S, 8, 4, True),
        "full": (None, False, 0, 4, 4)},
}


def spawn_plan() -> dict[int, dict[str, tuple]]:
    """Every case by world size (run by the session's SpawnPool, tests/parallel/ranks.py)."""
    plan = {}
    for world, cases in CASES.items():
        plan[world] = {f"sp{world}-{name}": (_check, *case) for name, case in cases.items()}
    plan[2]["sp2-refusals"] = (_refusals,)
    return plan


@pytest.fixture(scope="module")
def results(spawn_pool):
    return {key: value for world in CASES
            for key, value in spawn_pool.results(__name__, world).items()}


@pytest.mark.parametrize("case", [f"sp{w}-{name}" for w, cases in CASES.items() for name in cases])
def test_ulysses_matches_one_process(case, results):
    assert results[case] == "", results[case]


def test_ulysses_refuses_what_it_cannot_split(results):
    assert results["sp2-refusals"] == "", results["sp2-refusals"]
