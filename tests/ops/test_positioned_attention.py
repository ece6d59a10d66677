"""op attention with explicit positions: reference vs a naive loop and vs reference_attention, mask rules, flex
(eager, on CPU) vs reference, block structure vs the dense mask, dispatch.

Key layouts are built like a sequence-parallel rank's (``sp_layout``): the tails of every
rank's slice gathered at one width and left-padded (own tail and short tails: invalid slots),
then this rank's slice, then sink keys (``k_always``) at a position no query reaches.

Tolerances (relative RMS, rms(a - b) / rms(b)): fp32 vs fp32 of the same math 1e-5
(summation order only); bf16 inputs 2e-2 (rounding of the bf16 outputs and grads).

The eager flex path applies the mask_mod densely and ignores the tile lists, so the tile lists
are checked against the dense mask (test_block_structure_*) and, with SB_TEST_CPU_COMPILE=1,
in inductor's compiled CPU flex kernel. The CUDA backend is checked by the ``gpu`` tests at
the bottom (they need TORCH_COMPILE_DISABLE=0 or the ``compile_enabled`` fixture).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import pytest
import torch

from ops.attention import Positions, attention
from ops.attention import naive_attention as op_reference
from ops.attention.flex import flex_attention_backend
from ops.attention.masks import BLOCK_SIZE, dense_mask, mask_layout, tile_structure

FORCE_ENV = "SB_OP_BACKEND_ATTENTION"


def op_form(q, k, v, q_pos, k_pos, window=None, q_segments=None, k_segments=None, k_valid=None, k_always=None):
    """The general layout of this file (always-visible keys anywhere) in op ``attention``'s form:
    the valid always-visible keys first, as sinks, with zero sink query rows in front of q
    (``general_form`` drops their outputs). Returns (q, k, v, keyword arguments)."""
    if k_pos.shape[0] != k.shape[2]:  # a layout error: passed on unchanged, for the op to report
        return q, k, v, dict(window=window, documents=q_segments, sinks=0,
                             positions=Positions(q_pos, k_pos, k_valid, k_segments))
    valid = torch.ones(k_pos.shape[0], dtype=torch.bool, device=k_pos.device) if k_valid is None else k_valid
    sinks = valid.bool() & (torch.zeros_like(valid, dtype=torch.bool) if k_always is None else k_always.bool())
    order = torch.cat([sinks.nonzero()[:, 0], (~sinks).nonzero()[:, 0]])
    S, rest = int(sinks.sum()), order[int(sinks.sum()):]
    positions = Positions(query=q_pos, key=k_pos[rest], key_valid=None if k_valid is None else k_valid[rest],
                          key_documents=None if k_segments is None else
                          k_segments[:, rest] if k_segments.shape[-1] == k_pos.shape[0] else k_segments)
    q = torch.cat([q.new_zeros(*q.shape[:2], S, q.shape[3]), q], dim=2)
    order = order.to(k.device)
    return q, k[:, :, order], v[:, :, order], dict(window=window, documents=q_segments, sinks=S, positions=positions)


def general_form(fn):
    """``fn`` called as ``fn(q, k, v, q_pos, k_pos, *, window, q_segments, k_segments, k_valid, k_always, scale)``."""

    def call(q, k, v, q_pos, k_pos, *, scale=None, flex_fn=None, **layout):
        q2, k2, v2, kwargs = op_form(q, k, v, q_pos, k_pos, **layout)
        extra = {} if flex_fn is None else {"flex_fn": flex_fn}
        return fn(q2, k2, v2, **kwargs, scale=scale, **extra)[:, :, kwargs["sinks"]:]

    return call


positioned_attention = general_form(attention)
reference_positioned_attention = general_form(op_reference)
flex_positioned_attention = general_form(flex_attention_backend)


def reference_attention(q, k, v, window=None, segment_ids=None):
    return op_reference(q, k, v, window=window, documents=segment_ids)


TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
SINK_POS = 10**9  # beyond every query: only k_always makes these keys visible


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch):
    for var in ("SB_DISABLE_BACKEND_DISPATCH", FORCE_ENV):
        monkeypatch.delenv(var, raising=False)


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


@dataclass
class Layout:
    """Positions, flags and segments of one call (keyword arguments of the op)."""

    q_pos: torch.Tensor
    k_pos: torch.Tensor
    window: int | None = None
    q_segments: torch.Tensor | None = None
    k_segments: torch.Tensor | None = None
    k_valid: torch.Tensor | None = None
    k_always: torch.Tensor | None = None

    @property
    def kwargs(self) -> dict:
        return {n: getattr(self, n) for n in ("window", "q_segments", "k_segments", "k_valid", "k_always")}

    def op_layout(self):
        """The op's mask layout of this call (sinks first, with their query rows)."""
        q = torch.zeros(1, 1, self.q_pos.shape[0], 1)
        k = torch.zeros(1, 1, self.k_pos.shape[0], 1)
        q, k, _, kw = op_form(q, k, k, self.q_pos, self.k_pos, **self.kwargs)
        return mask_layout(q.shape[2], k.shape[2], device=self.q_pos.device, **kw)

    def mask(self) -> torch.Tensor:
        return dense_mask(self.op_layout())


def sp_layout(lengths, rank, window=None, sinks=0, B=2, docs=False, sinks_first=False, shuffle=False,
              seed=0, device="cpu") -> Layout:
    """Keys of rank ``rank`` as ``parallel.sequence_attention`` gathers them, plus ``sinks`` sink keys."""
    g = torch.Generator().manual_seed(seed)
    starts = [sum(lengths[:j]) for j in range(len(lengths))]
    tails = [n if window is None else min(window, n) for n in lengths]
    width = max(tails)
    pos, valid = [], []
    for j, (start, n, tail) in enumerate(zip(starts, lengths, tails)):
        pos.append(torch.arange(start + n - width, start + n))
        valid.append((torch.arange(width) >= width - tail) & (j != rank))
    q_pos = starts[rank] + torch.arange(lengths[rank])
    pos.append(q_pos)
    valid.append(torch.ones(lengths[rank], dtype=torch.bool))
    k_pos, k_valid = torch.cat(pos), torch.cat(valid)
    k_always = torch.zeros_like(k_valid)
    sink_pos, sink_flag = torch.full((sinks,), SINK_POS), torch.ones(sinks, dtype=torch.bool)
    join = (lambda sink, t: torch.cat([sink, t])) if sinks_first else (lambda sink, t: torch.cat([t, sink]))
    k_pos, k_valid, k_always = join(sink_pos, k_pos), join(sink_flag, k_valid), join(sink_flag, k_always)
    q_seg = k_seg = None
    if docs:
        total = sum(lengths)
        starts_doc = torch.rand(B, total, generator=g) < 8 / max(lengths[rank], 1)
        ids = starts_doc.long().cumsum(dim=1)
        q_seg = ids[:, q_pos]
        k_seg = torch.where(k_valid & ~k_always, ids[:, k_pos.clamp(0, total - 1)], -1)
        k_seg = torch.where(k_always, 12345, k_seg)  # sinks belong to no document
    if shuffle:
        perm = torch.randperm(k_pos.shape[0], generator=g)
        k_pos, k_valid, k_always = k_pos[perm], k_valid[perm], k_always[perm]
        k_seg = None if k_seg is None else k_seg[:, perm]
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return Layout(to(q_pos), to(k_pos), window, to(q_seg), to(k_seg), to(k_valid), to(k_always) if sinks else None)


def make_qkv(B, H, Hkv, Sq, Sk, D=16, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((B, H, Sq, D), (B, Hkv, Sk, D), (B, Hkv, Sk, D))
    return [torch.randn(s, generator=g).to(device=device, dtype=dtype).requires_grad_() for s in shapes]


def run(fn, q, k, v, lay: Layout, do, **kwargs):
    """Output and (dq, dk, dv) of ``fn`` for upstream gradient ``do``."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, lay.q_pos, lay.k_pos, **lay.kwargs, **kwargs)
    out.backward(do)
    return out, (q.grad, k.grad, v.grad)


def assert_all_close(got, want, tol: float, what: str = ""):
    (out, grads), (ref_out, ref_grads) = got, want
    errors = {"out": rel_rms(out, ref_out)}
    errors.update({n: rel_rms(a, b) for n, a, b in zip(("dq", "dk", "dv"), grads, ref_grads)})
    assert all(e < tol for e in errors.values()), f"{what}: {errors} (tol {tol})"


def naive_positioned(q, k, v, q_pos, k_pos, window=None, q_segments=None, k_segments=None, k_valid=None,
                     k_always=None, scale=None):
    """One query row at a time, its keys listed by the rule in plain Python (fp64)."""
    B, H, Sq, D = q.shape
    Sk, group = k.shape[2], H // k.shape[1]
    scale = D**-0.5 if scale is None else scale
    qp, kp = q_pos.tolist(), k_pos.tolist()
    valid = [True] * Sk if k_valid is None else k_valid.tolist()
    always = [False] * Sk if k_always is None else k_always.tolist()
    rows = []
    for b in range(B):
        qs = None if q_segments is None else q_segments[b].tolist()
        ks = None if k_segments is None else k_segments[b].tolist()
        kb = k[b].double().repeat_interleave(group, dim=0)  # [H, Sk, D]
        vb = v[b].double().repeat_interleave(group, dim=0)
        for i in range(Sq):
            keys = [j for j in range(Sk) if valid[j] and (always[j] or (
                kp[j] <= qp[i] and (window is None or qp[i] - kp[j] <= window) and (qs is None or qs[i] == ks[j])))]
            scores = (kb[:, keys] @ q[b, :, i, :, None].double()).squeeze(-1) * scale  # [H, n]
            rows.append((torch.softmax(scores, dim=-1)[:, None] @ vb[:, keys]).squeeze(1))
    return torch.stack(rows).view(B, Sq, H, D).transpose(1, 2).to(q.dtype)


LENGTHS, RANK = [9, 30, 4, 25], 3  # short slices chain into the halo of rank 3


@pytest.mark.parametrize("shuffle", [False, True], ids=["ordered", "shuffled"])
@pytest.mark.parametrize("sinks", [0, 3])
@pytest.mark.parametrize("window,docs", [(None, False), (0, False), (6, False), (None, True), (6, True)])
def test_reference_matches_naive_loop(window, docs, sinks, shuffle):
    lay = sp_layout(LENGTHS, RANK, window, sinks=sinks, docs=docs, shuffle=shuffle, seed=sinks)
    q, k, v = make_qkv(2, 6, 2, lay.q_pos.shape[0], lay.k_pos.shape[0])
    do = torch.randn_like(q)
    assert_all_close(run(reference_positioned_attention, q, k, v, lay, do),
                     run(naive_positioned, q, k, v, lay, do), 1e-5, f"window={window} docs={docs}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("window,docs", [(None, False), (3, False), (None, True), (5, True)])
def test_equals_reference_attention_on_a_plain_sequence(window, docs, dtype):
    T = 37
    g = torch.Generator().manual_seed(1)
    seg = (torch.rand(2, T, generator=g) < 0.15).int().cumsum(1, dtype=torch.int32) if docs else None
    q, k, v = make_qkv(2, 6, 2, T, T, dtype=dtype)
    do = torch.randn_like(q)
    pos = torch.arange(T)
    lay = Layout(pos, pos, window, seg, seg)
    got = run(reference_positioned_attention, q, k, v, lay, do)
    want = run(lambda q, k, v, *_, **__: reference_attention(q, k, v, window, seg), q, k, v, lay, do)
    assert torch.equal(got[0], want[0])
    assert all(torch.equal(a, b) for a, b in zip(got[1], want[1]))


def _detached(B, H, Hkv, lay: Layout, seed=0, dtype=torch.float32):
    return [t.detach() for t in make_qkv(B, H, Hkv, lay.q_pos.shape[0], lay.k_pos.shape[0], dtype=dtype, seed=seed)]


def test_window_counts_positions_not_slots():
    # Queries at 1000..1009, keys at 990..1009 stored in reverse: the window reads positions.
    w, i = 4, 7
    lay = Layout(1000 + torch.arange(10), (990 + torch.arange(20)).flip(0), window=w)
    q, k, v = _detached(1, 2, 1, lay)
    base = positioned_attention(q, k, v, lay.q_pos, lay.k_pos, **lay.kwargs)

    def output_i_changes(position: int) -> bool:
        slot = int((lay.k_pos == position).nonzero())
        k2, v2 = k.clone(), v.clone()
        k2[:, :, slot] += 3.0
        v2[:, :, slot] -= 3.0
        out = positioned_attention(q, k2, v2, lay.q_pos, lay.k_pos, **lay.kwargs)
        return not torch.equal(out[:, :, i], base[:, :, i])

    qp = 1000 + i
    assert [output_i_changes(p) for p in (qp - w - 1, qp - w, qp, qp + 1)] == [False, True, True, False]


def test_padding_slots_are_ignored():
    lay = sp_layout(LENGTHS, RANK, window=6, sinks=2, docs=True)
    q, k, v = _detached(2, 4, 2, lay)
    base = reference_positioned_attention(q, k, v, lay.q_pos, lay.k_pos, **lay.kwargs)
    invalid = ~lay.k_valid
    assert invalid.sum() > 5
    k2, v2 = k.clone(), v.clone()
    k2[:, :, invalid] = 100.0
    v2[:, :, invalid] = -1e4
    k_always2 = lay.k_always | invalid  # k_always does not resurrect a padding slot
    kwargs = {**lay.kwargs, "k_always": k_always2}
    pos2 = torch.where(invalid, 0, lay.k_pos)  # nor does any position or segment
    assert torch.equal(reference_positioned_attention(q, k2, v2, lay.q_pos, pos2, **kwargs), base)
    q, k, v = make_qkv(2, 4, 2, lay.q_pos.shape[0], lay.k_pos.shape[0])
    positioned_attention(q, k, v, lay.q_pos, lay.k_pos, **lay.kwargs).sum().backward()
    assert not k.grad[:, :, invalid].any() and not v.grad[:, :, invalid].any()


def test_always_keys_are_seen_by_every_query():
    # Sinks at a position beyond every query, with their own segment id, under a window of 0.
    lay = sp_layout(LENGTHS, RANK, window=0, sinks=3, docs=True)
    q, k, v = _detached(2, 4, 2, lay)
    base = positioned_attention(q, k, v, lay.q_pos, lay.k_pos, **lay.kwargs)
    sink = int(lay.k_always.nonzero()[1])
    v2 = v.clone()
    v2[:, :, sink] += 1.0
    out = positioned_attention(q, k, v2, lay.q_pos, lay.k_pos, **lay.kwargs)
    assert (out != base).any(dim=-1).all(), "some query does not see the sink"
    no_sinks = {**lay.kwargs, "k_always": None, "k_valid": lay.k_valid & ~lay.k_always}
    plain = positioned_attention(q, k, v, lay.q_pos, lay.k_pos, **no_sinks)
    # With window 0 and no sinks every query sees only itself: the output is its own value.
    own = slice(lay.k_pos.shape[0] - 3 - lay.q_pos.shape[0], lay.k_pos.shape[0] - 3)
    assert torch.allclose(plain, v[:, :, own].repeat_interleave(2, dim=1), atol=1e-6)


def test_gqa_equals_repeated_kv():
    lay = sp_layout(LENGTHS, RANK, window=6, sinks=2, docs=True)
    q, k, v = _detached(2, 6, 2, lay)
    got = positioned_attention(q, k, v, lay.q_pos, lay.k_pos, **lay.kwargs)
    k3, v3 = (t.repeat_interleave(3, dim=1) for t in (k, v))
    assert torch.equal(got, positioned_attention(q, k3, v3, lay.q_pos, lay.k_pos, **lay.kwargs))


def test_gradcheck_fp64():
    lay = Layout(torch.tensor([3, 4, 5]), torch.tensor([0, 2, 3, 4, 5, 7, 99]), window=2,
                 q_segments=torch.tensor([[0, 1, 1]]), k_segments=torch.tensor([[0, 0, 0, 1, 1, 1, 5]]),
                 k_valid=torch.tensor([True, True, True, True, True, False, True]),
                 k_always=torch.tensor([False, False, False, False, False, False, True]))
    q, k, v = (t.detach().double().requires_grad_() for t in make_qkv(1, 2, 1, 3, 7, D=4))
    fn = lambda q, k, v: reference_positioned_attention(q, k, v, lay.q_pos, lay.k_pos, **lay.kwargs)  # noqa: E731
    assert fn(q, k, v).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_scale():
    lay = sp_layout(LENGTHS, RANK, window=6, sinks=1)
    q, k, v = _detached(2, 2, 2, lay)
    got = positioned_attention(q, k, v, lay.q_pos, lay.k_pos, **lay.kwargs, scale=0.3)
    want = naive_positioned(q, k, v, lay.q_pos, lay.k_pos, **lay.kwargs, scale=0.3)
    assert rel_rms(got, want) < 1e-6


def test_dispatch_on_cpu_picks_reference(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch):
    caplog.set_level(logging.INFO, logger="sbtrain.ops")
    registry = attention.registry
    monkeypatch.setattr(registry, "_logged", set())
    assert registry.force_env == FORCE_ENV
    assert [b.name for b in registry.backends] == ["sdpa", "flex", "lse_merge", "torch"]
    lay = sp_layout(LENGTHS, RANK, window=6, sinks=2, docs=True)
    q, k, v = _detached(2, 4, 2, lay)
    q2, k2, v2, kwargs = op_form(q, k, v, lay.q_pos, lay.k_pos, **lay.kwargs)
    assert registry.select(q2, k2, v2, **kwargs).name == "torch"
    out = positioned_attention(q, k, v, lay.q_pos, lay.k_pos, **lay.kwargs)
    assert torch.equal(out, reference_positioned_attention(q, k, v, lay.q_pos, lay.k_pos, **lay.kwargs))
    assert "flex" in " ".join(r.getMessage() for r in caplog.records)
    monkeypatch.setenv(FORCE_ENV, "flex")
    with pytest.raises(RuntimeError, match=f"{FORCE_ENV}='flex'"):
        positioned_attention(q, k, v, lay.q_pos, lay.k_pos)


def test_invalid_inputs_raise():
    lay = sp_layout(LENGTHS, RANK, sinks=1, docs=True)
    q, k, v = _detached(2, 4, 2, lay)
    qp, kp = lay.q_pos, lay.k_pos
    with pytest.raises(ValueError, match="given together"):
        positioned_attention(q, k, v, qp, kp, q_segments=lay.q_segments)
    with pytest.raises(ValueError, match="key_documents"):
        positioned_attention(q, k, v, qp, kp, q_segments=lay.q_segments, k_segments=lay.q_segments)
    with pytest.raises(ValueError, match="positions.query"):
        positioned_attention(q, k, v, qp.float(), kp)
    with pytest.raises(ValueError, match="positions.key"):
        positioned_attention(q, k, v, qp, kp[1:])
    with pytest.raises(ValueError, match="key_valid"):
        positioned_attention(q, k, v, qp, kp, k_valid=lay.k_valid.int())
    with pytest.raises(ValueError, match="window"):
        positioned_attention(q, k, v, qp, kp, window=-1)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        positioned_attention(q[:, :3], k, v, qp, kp)
    with pytest.raises(ValueError, match="sees no key"):  # query 0 at position -1: nothing precedes it
        positioned_attention(q, k, v, torch.cat([torch.tensor([-1]), qp[1:]]), kp, k_valid=lay.k_valid)


# ---- flex on CPU (eager debug path: same mask_mod, dense math) and the tile lists ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("window,docs,sinks,shuffle", [
    (None, False, 0, False), (6, False, 3, False), (None, True, 3, True), (0, True, 2, False), (6, True, 0, True),
])
def test_flex_matches_reference(eager_flex, window, docs, sinks, shuffle, dtype):
    lay = sp_layout(LENGTHS, RANK, window, sinks=sinks, docs=docs, shuffle=shuffle, seed=7)
    q, k, v = make_qkv(2, 6, 2, lay.q_pos.shape[0], lay.k_pos.shape[0], dtype=dtype, seed=3)
    do = torch.randn_like(q)
    got = run(flex_positioned_attention, q, k, v, lay, do, flex_fn=eager_flex)
    want = run(reference_positioned_attention, q, k, v, lay, do)
    assert_all_close(got, want, TOL[dtype], f"window={window} docs={docs} sinks={sinks}")


def test_flex_returns_zeros_for_a_query_that_sees_nothing(eager_flex):
    lay = Layout(torch.tensor([-1, 0, 1]), torch.arange(4))
    q, k, v = _detached(1, 2, 2, lay)
    out = flex_positioned_attention(q, k, v, lay.q_pos, lay.k_pos, flex_fn=eager_flex)
    assert not out[:, :, 0].any() and out[:, :, 1:].abs().sum() > 0


def tile_truth(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(any pair seen, every pair seen and tile not ragged) per tile of a [Bm, Sq, Sk] mask."""
    Bm, Sq, Sk = mask.shape
    nq, nk = -(-Sq // BLOCK_SIZE), -(-Sk // BLOCK_SIZE)
    padded = torch.zeros(Bm, nq * BLOCK_SIZE, nk * BLOCK_SIZE, dtype=torch.bool)
    padded[:, :Sq, :Sk] = mask
    tiles = padded.view(Bm, nq, BLOCK_SIZE, nk, BLOCK_SIZE).transpose(2, 3)
    return tiles.any(-1).any(-1)[:, None], tiles.all(-1).all(-1)[:, None]


def structure(lay: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    return tile_structure(lay.op_layout())


BIG_LENGTHS = [300, 200, 130, 300, 300]


@pytest.mark.parametrize("sinks,sinks_first,shuffle", [(0, False, False), (8, False, False), (8, True, False),
                                                       (130, True, False), (8, False, True)])
@pytest.mark.parametrize("window", [None, 0, 100, 200, 400])
@pytest.mark.parametrize("docs", [False, True])
def test_block_structure_never_skips_a_seen_pair(window, docs, sinks, sinks_first, shuffle):
    lay = sp_layout(BIG_LENGTHS, 4, window, sinks=sinks, B=3, docs=docs, sinks_first=sinks_first, shuffle=shuffle)
    if docs:
        lay.q_segments[1], lay.k_segments[1] = 4, torch.where(lay.k_valid, 4, -1)  # one document: full tiles
    some, every = tile_truth(lay.mask())
    partial, full = structure(lay)
    assert partial.shape == full.shape == (3 if docs else 1, 1, *some.shape[-2:])
    assert not (partial & full).any()
    assert (some <= (partial | full)).all(), "a tile with a seen pair would be skipped"
    assert (full <= every).all(), "a full tile (mask_mod not applied) has a masked pair"
    if not shuffle:  # positions ordered within each gathered slice: the tile test is exact
        assert torch.equal(partial | full, some.expand_as(full)) and torch.equal(full, every.expand_as(full))


def test_block_structure_is_exact_on_an_ordered_layout():
    # One rank without padding: the tile ranges are contiguous, so the test is exact.
    lay = Layout(640 + torch.arange(1000), torch.arange(1640), window=300)
    some, every = tile_truth(lay.mask())
    partial, full = structure(lay)
    assert torch.equal(full, every) and torch.equal(partial | full, some)


@pytest.mark.skipif(os.environ.get("SB_TEST_CPU_COMPILE") != "1", reason="compiles inductor's CPU flex kernel "
                    "(~1 min); set SB_TEST_CPU_COMPILE=1")
def test_compiled_flex_forward_on_cpu(compile_enabled):
    # Inductor's CPU flex kernel walks the tile lists like the CUDA one: a tile wrongly skipped
    # or wrongly full changes the output. It has no backward. Its recompile with dynamic shapes
    # fails to build in torch 2.13 ('cur_qSplitSize8' not declared), so every case compiles afresh.
    import torch._dynamo as dynamo

    for window, docs, sinks in [(100, False, 8), (None, True, 8), (200, True, 0), (0, True, 130)]:
        dynamo.reset()
        lay = sp_layout(BIG_LENGTHS, 4, window, sinks=sinks, docs=docs, seed=5)
        q, k, v = (t.detach() for t in make_qkv(2, 4, 2, lay.q_pos.shape[0], lay.k_pos.shape[0], D=32, seed=1))
        with torch.no_grad():
            got = flex_positioned_attention(q, k, v, lay.q_pos, lay.k_pos, **lay.kwargs)
            want = reference_positioned_attention(q, k, v, lay.q_pos, lay.k_pos, **lay.kwargs)
        assert rel_rms(got, want) < 1e-5, (window, docs, sinks)


# ---- GPU: flex against the reference (H100, torch 2.11; needs torch.compile) ----

GPU_LAYOUTS = {  # name: (slice lengths, rank, window); Sq = 1000, 8 sinks
    "full": ([1092, 1000], 1, None),  # Sk = 2 * 1092 + 1000 + 8 = 3192
    "window": ([1000, 1000, 1000, 1000, 1000, 100, 120, 1000], 7, 256),  # halo chains 3 ranks; Sk = 3056
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("docs", [False, True], ids=["plain", "docs"])
@pytest.mark.parametrize("name", list(GPU_LAYOUTS))
def test_gpu_flex_matches_reference(monkeypatch, compile_enabled, name, docs, dtype):
    lengths, rank, window = GPU_LAYOUTS[name]
    lay = sp_layout(lengths, rank, window, sinks=8, docs=docs, sinks_first=docs, seed=11, device="cuda")
    assert lay.q_pos.shape[0] % 128 and lay.k_pos.shape[0] % 128
    q, k, v = make_qkv(2, 8, 2, lay.q_pos.shape[0], lay.k_pos.shape[0], D=128, dtype=dtype, device="cuda")
    do = torch.randn_like(q)
    monkeypatch.setenv(FORCE_ENV, "flex")
    got = run(positioned_attention, q, k, v, lay, do)
    want = run(reference_positioned_attention, q, k, v, lay, do)
    # fp32 flex kernels may use other summation orders and exp2; 1e-4 keeps margin.
    assert_all_close(got, want, 2e-2 if dtype == torch.bfloat16 else 1e-4, f"{name} docs={docs}")


@pytest.mark.gpu
def test_gpu_dispatch_picks_flex(compile_enabled):
    lay = sp_layout(*GPU_LAYOUTS["window"], sinks=8, device="cuda")
    q, k, v = make_qkv(1, 8, 2, lay.q_pos.shape[0], lay.k_pos.shape[0], D=128, dtype=torch.bfloat16, device="cuda")
    registry = attention.registry
    q2, k2, v2, kwargs = op_form(q, k, v, lay.q_pos, lay.k_pos, **lay.kwargs)
    assert registry.select(q2, k2, v2, **kwargs).name == "flex"
    on_cpu = {**kwargs, "positions": Positions(lay.q_pos.cpu(), *list(vars(kwargs["positions"]).values())[1:])}
    assert registry.select(q2, k2, v2, **on_cpu).name == "torch"
