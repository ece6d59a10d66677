"""The compiled flex_attention wrapper (``ops.attention.flex.compiled_flex_attention``) does not
recompile in steady state, and running out of recompiles fails loudly.

One ``torch.compile(fullgraph=True)`` wrapper serves every layer and call of a run. Dynamo
guards each compiled graph on the inputs' shapes, dtypes, requires_grad, the grad mode and the
mask_mod's code and closure (tensor shapes, ``layout.indexed``), never on tensor values: a new
micro-batch's documents or a sequence-parallel call's positions (new tensors, same shapes) must
reuse the graphs the first micro-batch compiled. Each run below calls the wrapper the way one
training run does (sliding-window and full layers, sinks, GQA, packed documents; without
sequence parallelism, or with SP's positions in its two orders: own slice plus received keys
merged by lse, or one call over all keys), for several micro-batches with new ``Documents`` and
new position tensors, then validation under ``no_grad``. After the first micro-batch (and the
first validation one) ``torch.compiler.set_stance("fail_on_recompile")`` makes any recompile an
error, and the graph count stays under dynamo's ``recompile_limit`` (8) with room to spare.

The guards are dynamo's, whatever the backend: the wrapper is compiled here with the ``eager``
backend (inductor's CPU flex kernel has no backward, no lse and fails to build the dynamic-shape
variant in torch 2.13), by patching ``torch.compile`` while building the production wrapper.
"""

from __future__ import annotations

import functools

import pytest
import torch

from ops.attention import flex as flex_backend
from ops.attention.flex import BlockMaskCache, block_mask_of
from ops.attention.masks import Positions
from ops.attention.naive import naive_attention
from ops.documents import Documents

fa = pytest.importorskip("torch.nn.attention.flex_attention")
dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.utils import counters  # noqa: E402  (after the importorskip)

B, H, HKV, D, S, WINDOW = 2, 4, 2, 16, 4, 4
T = 200          # tokens per row without SP
P, RANK = 2, 1   # SP: this is rank 1 of 2, its slice of SLICE tokens
SLICE = 136
LAYERS = (WINDOW, None)  # a sliding-window layer and a full-attention layer, both with sinks


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture
def compiled(monkeypatch: pytest.MonkeyPatch):
    """The production wrapper, built with dynamo's ``eager`` backend, fresh dynamo caches and
    the default recompile limit (the suite disables compile; ``compile_enabled`` raises the limit)."""
    monkeypatch.setattr(dynamo.config, "disable", False)
    monkeypatch.setattr(dynamo.config, "recompile_limit", 8)
    # CPU flex refuses inputs that require grad; training inputs do (requires_grad is guarded)
    monkeypatch.setattr(fa, "_validate_device", lambda *args: None)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    dynamo.reset()
    yield flex_backend.compiled_flex_attention.__wrapped__()
    dynamo.reset()


def make_documents(seed: int, length: int, device: str = "cpu") -> Documents:
    """A new micro-batch's packed documents: same shape, other boundaries."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.rand(B, length, generator=g) < 8 / length
    starts[:, 0] = False
    return Documents.from_ids(starts.int().cumsum(dim=1, dtype=torch.int32).to(device))


def make_qkv(Lq: int, Lk: int, seed: int, device: str = "cpu") -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = ((B, H, Lq, D), (B, HKV, Lk, D), (B, HKV, Lk, D))
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    return [torch.randn(s, generator=g).to(device, dtype).requires_grad_(torch.is_grad_enabled()) for s in shapes]


def tail_positions(window: int | None, gathered_ids: list[torch.Tensor]) -> Positions:
    """The received keys of rank RANK as ``exchange_tails`` lays them out: every rank's last
    ``width`` keys in rank order, this rank's own tail invalid. New tensors on every call."""
    device = gathered_ids[0].device
    width = SLICE if window is None else min(window, SLICE)
    key = torch.cat([torch.arange((j + 1) * SLICE - width, (j + 1) * SLICE, device=device) for j in range(P)])
    valid = torch.cat([torch.full((width,), j != RANK, device=device) for j in range(P)])
    key_documents = torch.cat([ids[:, SLICE - width:] for ids in gathered_ids], dim=1)
    return Positions(query=RANK * SLICE + torch.arange(SLICE, device=device), key=key, key_valid=valid,
                     key_documents=key_documents)


def call(flex, q, k, v, *, window, documents, sinks, positions=None, lse=False):
    """What ``flex_attention_backend`` / ``flex_attention_lse`` do with the wrapper."""
    mask = block_mask_of(q, k, window, documents, sinks, positions, BlockMaskCache())
    aux = {"return_aux": fa.AuxRequest(lse=True)} if lse else {}
    return flex(q, k, v, block_mask=mask, enable_gqa=True, **aux)


def micro_batch_without_sp(flex, seed: int, device: str = "cpu") -> None:
    documents = make_documents(seed, T, device)
    for layer, window in enumerate(LAYERS):
        q, k, v = make_qkv(S + T, S + T, seed * 10 + layer, device)
        call(flex, q, k, v, window=window, documents=documents, sinks=S)


def micro_batch_sp_early(flex, seed: int, device: str = "cpu") -> None:
    """sp_attention's default order: [sinks; slice] over [sinks; slice] with the batch's
    Documents (lse), then the slice over the received keys at their positions (lse)."""
    gathered = [make_documents(seed * P + j, SLICE, device).ids for j in range(P)]
    documents = Documents.from_ids(gathered[RANK])
    for layer, window in enumerate(LAYERS):
        q, k, v = make_qkv(S + SLICE, S + SLICE, seed * 10 + layer, device)
        call(flex, q, k, v, window=window, documents=documents, sinks=S, lse=True)
        positions = tail_positions(window, gathered)
        _, k2, v2 = make_qkv(1, positions.key.shape[0], seed * 10 + layer + 5, device)
        call(flex, q[:, :, S:], k2, v2, window=window, documents=documents.ids, sinks=0, positions=positions,
             lse=True)


def micro_batch_sp_blocking(flex, seed: int, device: str = "cpu") -> None:
    """sp_attention without early exchange: one call over [sinks; received keys; own slice]."""
    gathered = [make_documents(seed * P + j, SLICE, device).ids for j in range(P)]
    ids = gathered[RANK]
    for layer, window in enumerate(LAYERS):
        received = tail_positions(window, gathered)
        own = RANK * SLICE + torch.arange(SLICE, device=device)
        positions = Positions(query=own, key=torch.cat([received.key, own]),
                              key_valid=torch.cat([received.key_valid, torch.ones_like(own, dtype=torch.bool)]),
                              key_documents=torch.cat([received.key_documents, ids], dim=1))
        q, k, v = make_qkv(S + SLICE, S + positions.key.shape[0], seed * 10 + layer, device)
        call(flex, q, k, v, window=window, documents=ids, sinks=S, positions=positions)


def micro_batch_sp_auto(flex, seed: int, device: str = "cpu") -> None:
    """``sp_softmax_exchange: auto``'s mix: the window layer by halo (early order), the full
    layer by Ulysses (the whole sequence for H / P heads, then the sink rows alone)."""
    gathered = [make_documents(seed * P + j, SLICE, device).ids for j in range(P)]
    documents = Documents.from_ids(gathered[RANK])
    whole = Documents(torch.cat(gathered, dim=1), cu_seqlens=None)
    q, k, v = make_qkv(S + SLICE, S + SLICE, seed * 10, device)
    call(flex, q, k, v, window=WINDOW, documents=documents, sinks=S, lse=True)
    own = RANK * SLICE + torch.arange(SLICE, device=device)
    positions = Positions(query=own, key=own[:WINDOW] - WINDOW, key_valid=torch.ones_like(own[:WINDOW], dtype=torch.bool),
                          key_documents=gathered[RANK - 1][:, SLICE - WINDOW:])
    _, k2, v2 = make_qkv(1, WINDOW, seed * 10 + 5, device)
    call(flex, q[:, :, S:], k2, v2, window=WINDOW, documents=documents.ids, positions=positions, sinks=0, lse=True)
    q, k, v = (t[:, :t.shape[1] // P] for t in make_qkv(S + P * SLICE, S + P * SLICE, seed * 10 + 1, device))
    call(flex, q, k, v, window=None, documents=whole, sinks=S)
    call(flex, q[:, :, :S], k[:, :, :S], v[:, :, :S], window=None, documents=None, sinks=S)


RUNS = {"no_sp": micro_batch_without_sp, "sp_early": micro_batch_sp_early, "sp_blocking": micro_batch_sp_blocking,
        "sp_auto": micro_batch_sp_auto}


def run_training_and_validation(flex, micro_batch, device: str = "cpu") -> tuple[int, int]:
    """Micro-batches as a run sees them; recompiling after the first of each mode raises.
    Returns (graphs of the first micro-batch, graphs in all)."""
    start = graphs()
    micro_batch(flex, 0, device)                   # warm-up: the run's graphs compile here
    warm = graphs() - start
    with torch.compiler.set_stance("fail_on_recompile"):
        for seed in (1, 2, 3):                     # new documents and positions, same shapes
            micro_batch(flex, seed, device)
    with torch.no_grad():                          # validation: grad mode and requires_grad differ
        micro_batch(flex, 4, device)
        with torch.compiler.set_stance("fail_on_recompile"):
            micro_batch(flex, 5, device)
    with torch.compiler.set_stance("fail_on_recompile"):
        micro_batch(flex, 6, device)               # back to training: still compiled
    return warm, graphs() - start


@pytest.mark.parametrize("run", list(RUNS))
def test_steady_state_micro_batches_do_not_recompile(compiled, run):
    warm, total = run_training_and_validation(compiled, RUNS[run])
    # measured (torch 2.13, eager backend), training + validation graphs: no_sp 1 + 1,
    # sp_early 3 + 3, sp_blocking 2 + 1, sp_auto 4 + 4: half the wrapper's limit at most
    assert 1 <= warm and total <= 8 <= flex_backend.FLEX_RECOMPILE_LIMIT // 2, (run, warm, total)


@pytest.mark.gpu
@pytest.mark.parametrize("run", list(RUNS))
def test_gpu_steady_state_micro_batches_do_not_recompile(monkeypatch, run):
    """The same on the GPU with inductor's kernels (bf16), which may add shape guards of its own."""
    monkeypatch.setattr(dynamo.config, "disable", False)
    monkeypatch.setattr(dynamo.config, "recompile_limit", 8)
    dynamo.reset()
    try:
        warm, total = run_training_and_validation(flex_backend.compiled_flex_attention(), RUNS[run], "cuda")
    finally:
        dynamo.reset()
    print(f"{run}: {warm} graphs at the first micro-batch, {total} in all")
    assert 1 <= warm and total <= flex_backend.FLEX_RECOMPILE_LIMIT // 2, (run, warm, total)


def test_compiled_wrapper_matches_reference(compiled):
    documents = make_documents(7, T)
    with torch.no_grad():
        q, k, v = make_qkv(S + T, S + T, 7)
        got = call(compiled, q, k, v, window=WINDOW, documents=documents, sinks=S)
        want = naive_attention(q, k, v, window=WINDOW, documents=documents.ids, sinks=S)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_recompile_limit_fails_loudly(compiled, monkeypatch: pytest.MonkeyPatch):
    """Past the limit a fullgraph wrapper raises instead of running flex unfused (eager flex
    materialises the Lq x Lk scores): a run that outgrows the limit stops at once."""
    monkeypatch.setattr(flex_backend, "FLEX_RECOMPILE_LIMIT", 1)
    monkeypatch.setattr(dynamo.config, "recompile_limit", 1)  # a torch without per-wrapper limits
    dynamo.reset()
    compiled = flex_backend.compiled_flex_attention.__wrapped__()
    with torch.no_grad():
        micro_batch_without_sp(compiled, seed=0)
        q, k, v = make_qkv(S + 2 * T, S + 2 * T, 0)  # another length: one more graph
        # torch 2.13: dynamo's FailOnRecompileLimitHit (fullgraph); a torch that falls back to
        # eager instead meets the wrapper's own check
        loud = tuple(e for e in (getattr(dynamo.exc, "FailOnRecompileLimitHit", None), RuntimeError) if e)
        with pytest.raises(loud, match="fullgraph|recompile_limit|ran eagerly"):
            call(compiled, q, k, v, window=WINDOW, documents=make_documents(0, 2 * T), sinks=S)


def test_wrapper_refuses_to_run_eagerly(compiled):
    """Outside dynamo (an older torch's fall-back past the limit, a force_eager stance, a code
    object dynamo marked to skip) the wrapper raises instead of running flex unfused."""
    q, k, v = (t.detach() for t in make_qkv(S + T, S + T, 0))
    documents = make_documents(0, T)

    def run():
        return call(compiled, q, k, v, window=WINDOW, documents=documents, sinks=S)

    run()                                              # compiled: runs
    with torch.compiler.set_stance("force_eager"), pytest.raises(RuntimeError, match="ran eagerly"):
        run()
    run()
    # a first call while compile is disabled makes dynamo skip the code for good: every later
    # call ran eagerly and silently before the check
    dynamo.reset()
    for disabled in (True, False):
        with dynamo.config.patch(disable=disabled), pytest.raises(RuntimeError, match="ran eagerly"):
            run()
    dynamo.reset()
    run()
