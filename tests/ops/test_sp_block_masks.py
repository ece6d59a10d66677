"""Flex block masks of sequence-parallel attention's positions are built once per micro-batch.

Every layer of one micro-batch gets equal positions from an exchange (same slice lengths, ranks,
documents): the micro-batch's ``SPContext`` (``for_batch``) hands them one dict
(``block_masks_for``) that ``Positions.block_masks`` carries to flex, which keeps each distinct
mask there (``BlockMaskCache.builds`` counts the builds). Checked on one process with layouts
built like ``exchange_tails`` and on 2 gloo ranks through ``sp_attention`` itself (flex run
eagerly on CPU in place of the registry), against the explicit-mask reference.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import pytest
import torch

from ops.attention.flex import BlockMaskCache, flex_attention_backend
from ops.attention.masks import Positions
from ops.attention.naive import naive_attention
from ops.comm import SPContext
from ops.documents import Documents
from tests.flex_eager import enable_eager_flex

B, H, HKV, D, S, WINDOW = 2, 4, 2, 16, 4, 5
P, RANK, SLICE = 2, 1, 40  # short slices: the eager flex is slow on CPU
LAYERS = (WINDOW, None, WINDOW, None, WINDOW, None)  # sliding-window and full layers alternate


def segments(seed: int, batch: int, length: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    starts = torch.rand(batch, length, generator=g) < 6 / length
    starts[:, 0] = False
    return starts.int().cumsum(dim=1, dtype=torch.int32)


def tail_positions(window, gathered_ids, block_masks) -> Positions:
    """Rank RANK's received keys as ``exchange_tails`` lays them out, then its own slice (the
    blocking order's one call); new tensors on every call, as every layer builds them."""
    width = SLICE if window is None else min(window, SLICE)
    own = RANK * SLICE + torch.arange(SLICE)
    key = torch.cat([*(torch.arange((j + 1) * SLICE - width, (j + 1) * SLICE) for j in range(P)), own])
    valid = torch.cat([*(torch.full((width,), j != RANK) for j in range(P)), torch.ones(SLICE, dtype=torch.bool)])
    key_documents = torch.cat([*(ids[:, SLICE - width:] for ids in gathered_ids), gathered_ids[RANK]], dim=1)
    return Positions(query=own, key=key, key_valid=valid, key_documents=key_documents, block_masks=block_masks)


def micro_batch(ctx: SPContext, seed: int, flex, cache: BlockMaskCache) -> None:
    """LAYERS layers of one micro-batch: flex with the context's mask dict == the reference."""
    gathered = [segments(seed * P + j, B, SLICE) for j in range(P)]
    g = torch.Generator().manual_seed(seed)
    for window in LAYERS:
        positions = tail_positions(window, gathered, ctx.block_masks_for("tails"))
        Lk = S + positions.key.shape[0]
        q = torch.randn(B, H, S + SLICE, D, generator=g)
        k, v = (torch.randn(B, HKV, Lk, D, generator=g) for _ in range(2))
        kwargs = dict(window=window, documents=gathered[RANK], sinks=S, positions=positions)
        got = flex_attention_backend(q, k, v, **kwargs, flex_fn=flex, cache=cache)
        want = naive_attention(q, k, v, **{**kwargs, "positions": replace(positions, block_masks=None)})
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_positions_masks_are_built_once_per_micro_batch(eager_flex):
    cache = BlockMaskCache()
    first = SPContext(group=None, block_masks={})    # what for_batch returns for one micro-batch
    micro_batch(first, seed=0, flex=eager_flex, cache=cache)
    assert cache.builds == 2                          # one per window kind, not one per layer
    assert len(first.block_masks_for("tails")) == 2
    second = replace(first, block_masks={})           # the next micro-batch: other documents
    micro_batch(second, seed=1, flex=eager_flex, cache=cache)   # == reference: nothing stale reused
    assert cache.builds == 4
    structural = SPContext(group=None)                # outside a micro-batch: built per call
    micro_batch(structural, seed=2, flex=eager_flex, cache=cache)
    assert cache.builds == 4 + len(LAYERS)


def test_mask_dicts_are_per_micro_batch_and_exchange(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(SPContext, "size", property(lambda self: 2))
    structural = SPContext(group=None)
    assert structural.block_masks_for("tails") is None
    first, second = structural.for_batch(8, None), structural.for_batch(8, None)
    assert first.block_masks == {} and first.block_masks is not second.block_masks
    assert first.block_masks_for("tails") is first.block_masks_for("tails")
    assert first.block_masks_for("halo") is not first.block_masks_for("tails")
    blocking = replace(first, early_exchange=False)   # other positions (own slice among the keys)
    assert blocking.block_masks_for("tails") is not first.block_masks_for("tails")


# ---- through sp_attention on 2 gloo ranks ----

T_GLOBAL = P * SLICE


def _sp_case(rank: int, world: int, exchange: str, early: bool) -> None:
    """Two micro-batches of LAYERS layers through sp_attention with flex (eager): outputs equal
    the one-process reference; flex builds each distinct mask once per micro-batch."""
    import torch.distributed as dist

    from ops.attention import sequence_parallel as sp_module
    from ops.attention import ulysses as ulysses_module
    from ops.attention.flex import flex_attention_lse

    flex, cache = enable_eager_flex(), BlockMaskCache()
    sp_module.local_attention = ulysses_module.local_attention = functools.partial(
        flex_attention_backend, flex_fn=flex, cache=cache)
    sp_module.local_attention_lse = functools.partial(flex_attention_lse, flex_fn=flex, cache=cache)
    structural = SPContext(dist.group.WORLD, softmax_exchange=exchange, early_exchange=early)
    lo, hi = rank * SLICE, (rank + 1) * SLICE
    for seed in range(2):
        ids = segments(seed, B, T_GLOBAL)
        documents = Documents.from_ids(ids[:, lo:hi].contiguous())
        ctx = structural.for_batch(SLICE, documents.ids)
        builds = cache.builds
        g = torch.Generator().manual_seed(seed)
        for window in LAYERS[:4]:
            q = torch.randn(B, H, S + T_GLOBAL, D, generator=g)
            k, v = (torch.randn(B, HKV, S + T_GLOBAL, D, generator=g) for _ in range(2))
            mine = [torch.cat([t[:, :, :S], t[:, :, S + lo:S + hi]], dim=2) for t in (q, k, v)]
            got = sp_module.sp_attention(*mine, window=window, documents=documents, sinks=S, scale=None, sp=ctx)
            want = naive_attention(q, k, v, window=window, documents=ids, sinks=S)
            want = torch.cat([want[:, :, :S], want[:, :, S + lo:S + hi]], dim=2)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # per window kind: the received keys' mask, and with early exchange the own slice's
        # (kept on the micro-batch's Documents); without the reuse: one per layer and part.
        # Ulysses: the whole sequence's mask per window kind, and once per process the sink
        # rows' (no documents: kept across batches)
        expected = 2 + (seed == 0) if exchange == "ulysses" else 2 * (2 if early else 1)
        assert cache.builds - builds == expected, (exchange, early, cache.builds - builds)


SP_CASES = {"tails-early": (_sp_case, "tails", True), "tails-blocking": (_sp_case, "tails", False),
            "halo-early": (_sp_case, "halo", True), "ulysses": (_sp_case, "ulysses", True)}


def spawn_plan() -> dict[int, dict[str, tuple]]:
    """The multi-rank cases (run by the session's SpawnPool, tests/parallel/ranks.py)."""
    return {P: SP_CASES}


@pytest.fixture(scope="module")
def sp_results(spawn_pool):
    pytest.importorskip("torch.nn.attention.flex_attention")
    return spawn_pool.results(__name__, P)


@pytest.mark.parametrize("case", list(SP_CASES))
def test_sp_attention_builds_each_mask_once_per_micro_batch(case, sp_results):
    assert sp_results[case] == "", sp_results[case]
