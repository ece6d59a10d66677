"""op attention with sinks: reference vs a naive loop, flex and lse_merge (eager, on CPU) vs reference, merge, masks.

Tolerances (relative RMS, rms(a - b) / rms(b)):
    fp32 vs fp32 of the same math: 1e-5 (summation order only; the lse merge adds a few fp32
    roundings per element).
    bf16 inputs: 2e-2 (8 mantissa bits; the lse_merge pieces are also rounded to bf16 before
    the fp32 merge).

The eager flex path applies the mask_mod densely and ignores the tile lists, so the tile lists
are checked against the dense mask separately (test_sink_block_structure_*) and, with
SB_TEST_CPU_COMPILE=1, in inductor's compiled CPU flex kernel. The CUDA backends are checked by
the tests marked ``gpu`` at the bottom.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch

from ops.attention import attention, merge_attention
from ops.attention import attention_mask as dense_attention_mask
from ops.attention import naive_attention as op_reference
from ops.attention.flex import BLOCK_MASKS as SINK_BLOCK_MASKS
from ops.attention.flex import BlockMaskCache, build_block_mask, flex_attention_backend
from ops.attention.lse_merge import lse_merge_attention
from ops.attention.masks import BLOCK_SIZE, mask_layout, tile_structure
from ops.documents import Documents
from tests.flex_eager import flex_module

FORCE_ENV = "SB_OP_BACKEND_ATTENTION"


def joined(inputs):
    """(q, k, v, q_sink, k_sink, v_sink) -> [sinks; regular] q, k, v: the op's form."""
    q, k, v, q_sink, k_sink, v_sink = inputs
    return [torch.cat([s, t], dim=2) for s, t in zip((q_sink, k_sink, v_sink), (q, k, v))]


def sink_form(fn):
    """``fn(q, k, v, q_sink, k_sink, v_sink, window, segment_ids, scale, **kw) -> (out, out_sink)``
    over op ``attention``'s form (sinks first in one sequence), as this file calls it."""

    def call(q, k, v, q_sink, k_sink, v_sink, window=None, segment_ids=None, scale=None, **kw):
        S = q_sink.shape[2]
        out = fn(*joined((q, k, v, q_sink, k_sink, v_sink)), window=window, documents=segment_ids, sinks=S,
                 scale=scale, **kw)
        return out[:, :, S:], out[:, :, :S]

    return call


reference_sink_attention = sink_form(op_reference)
sink_attention = sink_form(attention)
flex_sink_attention = sink_form(flex_attention_backend)
lse_merge_sink_attention = sink_form(lse_merge_attention)


def attention_mask(T, window=None, segment_ids=None):
    return dense_attention_mask(T, window=window, documents=segment_ids)[:, None]


def sink_attention_mask(T, S, window=None, segment_ids=None):
    """[Bm, 1, S + T, S + T] mask over [sinks; regular]."""
    return dense_attention_mask(S + T, window=window, documents=segment_ids, sinks=S)[:, None]


def sink_layout(T, S, window, segment_ids, device="cpu"):
    return mask_layout(S + T, S + T, window=window, documents=segment_ids, sinks=S, positions=None,
                       device=torch.device(device))


def sink_block_structure(T, S, window, segment_ids, device):
    return tile_structure(sink_layout(T, S, window, segment_ids, device))


def sink_mask_mod(sinks, window):
    """The sink rule as create_block_mask takes it (written here, independent of masks.py)."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx < sinks) | ((kv_idx >= sinks) & (kv_idx <= q_idx) & (q_idx - kv_idx <= window))

    return mask_mod


TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
NAMES = ("out", "out_sink", "dq", "dk", "dv", "dq_sink", "dk_sink", "dv_sink")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch):
    for var in ("SB_DISABLE_BACKEND_DISPATCH", FORCE_ENV):
        monkeypatch.delenv(var, raising=False)


def rms(t: torch.Tensor) -> float:
    return t.detach().double().pow(2).mean().sqrt().item()


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return rms(a.detach().double() - b.detach().double()) / max(rms(b), 1e-30)


def make_inputs(B=2, H=6, Hkv=2, T=37, S=4, D=16, dtype=torch.float32, device="cpu", seed=0):
    """q, k, v, q_sink, k_sink, v_sink; the sinks are one set expanded over the batch, as in the model."""
    g = torch.Generator().manual_seed(seed)
    regular = [torch.randn(B, h, T, D, generator=g) for h in (H, Hkv, Hkv)]
    sinks = [torch.randn(1, h, S, D, generator=g).expand(B, h, S, D) for h in (H, Hkv, Hkv)]
    return [t.to(device=device, dtype=dtype) for t in regular + sinks]


def make_segments(B: int, T: int, seed: int = 0, device="cpu") -> torch.Tensor:
    """Packed documents: ids increase by one at random boundaries (several documents per row)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.rand(B, T, generator=g) < 6 / T
    starts[:, 0] = False
    return starts.int().cumsum(dim=1, dtype=torch.int32).to(device)


def run(fn, inputs, window, segment_ids, grads, **kwargs):
    """(out, out_sink) and the grads of the six inputs for upstream grads ``grads`` = (dout, dout_sink)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out, out_sink = fn(*leaves, window, segment_ids, **kwargs)
    torch.autograd.backward([out, out_sink], list(grads))
    return [out, out_sink] + [t.grad for t in leaves]


def assert_all_close(got, want, tol: float, what: str = ""):
    errors = {n: rel_rms(a, b) for n, a, b in zip(NAMES, got, want)}
    # With S = 1 the sink row's softmax is constant, so dq_sink is exactly zero: measure it on
    # the scale of dq, the same quantity for the regular rows.
    dq, dq_sink = (NAMES.index(n) for n in ("dq", "dq_sink"))
    if not want[dq_sink].any():
        errors["dq_sink"] = rms(got[dq_sink]) / rms(want[dq])
    assert all(e < tol for e in errors.values()), f"{what}: {errors} (tol {tol})"


def upstream(inputs) -> tuple[torch.Tensor, torch.Tensor]:
    q, q_sink = inputs[0], inputs[3]
    g = torch.Generator().manual_seed(99)
    return (torch.randn(q.shape, generator=g).to(q.dtype), torch.randn(q_sink.shape, generator=g).to(q.dtype))


def naive_sink_attention(q, k, v, q_sink, k_sink, v_sink, window=None, segment_ids=None, scale=None):
    """One query row at a time; keys listed by the rules in plain Python (independent of the masks)."""
    B, H, T, D = q.shape
    S = q_sink.shape[2]
    group = H // k.shape[1]
    scale = D**-0.5 if scale is None else scale
    outs, sink_outs = [], []
    for b in range(B):
        ks = torch.cat([k_sink[b], k[b]], dim=1).double().repeat_interleave(group, dim=0)  # [H, S+T, D]
        vs = torch.cat([v_sink[b], v[b]], dim=1).double().repeat_interleave(group, dim=0)
        for i in range(S + T):
            if i < S:
                query, keys = q_sink[b, :, i], list(range(S))
            else:
                r = i - S
                query = q[b, :, r]
                keys = list(range(S)) + [S + j for j in range(r + 1)
                                         if (window is None or r - j <= window)
                                         and (segment_ids is None or segment_ids[b, r] == segment_ids[b, j])]
            scores = (ks[:, keys] @ query[:, :, None].double()).squeeze(-1) * scale  # [H, n]
            row = (torch.softmax(scores, dim=-1)[:, None] @ vs[:, keys]).squeeze(1)
            (sink_outs if i < S else outs).append(row)
    out = torch.stack(outs).view(B, T, H, D).transpose(1, 2)
    out_sink = torch.stack(sink_outs).view(B, S, H, D).transpose(1, 2)
    return out.to(q.dtype), out_sink.to(q.dtype)


@pytest.mark.parametrize("window,docs,S", [(None, False, 1), (None, False, 16), (3, False, 4), (36, False, 4),
                                           (None, True, 4), (3, True, 1), (3, True, 16)])
def test_reference_matches_naive_loop(window, docs, S):
    inputs = make_inputs(T=37, S=S)
    seg = make_segments(2, 37) if docs else None
    grads = upstream(inputs)
    want = run(naive_sink_attention, inputs, window, seg, grads)
    assert_all_close(run(reference_sink_attention, inputs, window, seg, grads), want, 1e-5, f"w={window} S={S}")


def test_sink_attention_mask_rules():
    seg = torch.tensor([[0, 0, 1, 1], [3, 3, 3, 3]])
    mask = sink_attention_mask(4, 2, window=1, segment_ids=seg)
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.bool
    assert mask[0, 0].int().tolist() == [[1, 1, 0, 0, 0, 0],
                                         [1, 1, 0, 0, 0, 0],
                                         [1, 1, 1, 0, 0, 0],
                                         [1, 1, 1, 1, 0, 0],
                                         [1, 1, 0, 0, 1, 0],
                                         [1, 1, 0, 0, 1, 1]]
    assert mask[1, 0, 2:, 2:].equal(attention_mask(4, window=1)[0, 0])
    plain = sink_attention_mask(5, 3)
    assert plain.shape == (1, 1, 8, 8) and plain[0, 0, 3:, 3:].equal(torch.ones(5, 5, dtype=torch.bool).tril())
    assert sink_attention_mask(5, 0).equal(attention_mask(5))  # no sinks: the plain rule


@pytest.fixture
def eager_flex(eager_flex):
    """tests/conftest.py's eager flex_attention, where it can return the lse (lse_merge needs it)."""
    if not hasattr(flex_module(), "AuxRequest"):
        pytest.skip("this torch's flex_attention has no return_aux (lse_merge needs it)")
    return eager_flex


def eager_backend(name: str, flex) -> object:
    if name == "flex":
        return lambda *a, **kw: flex_sink_attention(*a, **kw, flex_fn=flex, cache=BlockMaskCache())
    return lambda *a, **kw: lse_merge_sink_attention(*a, **kw, flex_fn=flex, cache=BlockMaskCache())


FLEX_CASES = [(None, False), (3, False), (None, True), (50, True)]  # (window, documents)


@pytest.mark.parametrize("backend", ["flex", "lse_merge"])
@pytest.mark.parametrize("S", [1, 4, 16])
@pytest.mark.parametrize("T", [37, 130])
@pytest.mark.parametrize("window,docs", FLEX_CASES)
def test_eager_backend_matches_reference(eager_flex, backend, T, S, window, docs):
    inputs = make_inputs(T=T, S=S, seed=T + S)
    seg = make_segments(2, T, seed=T) if docs else None
    grads = upstream(inputs)
    got = run(eager_backend(backend, eager_flex), inputs, window, seg, grads)
    want = run(reference_sink_attention, inputs, window, seg, grads)
    assert_all_close(got, want, 1e-5, f"{backend} T={T} S={S} window={window} docs={docs}")


@pytest.mark.parametrize("backend", ["flex", "lse_merge"])
@pytest.mark.parametrize("window,docs", [(None, False), (7, True)])
def test_eager_backend_bf16_scale_no_gqa(eager_flex, backend, window, docs):
    inputs = make_inputs(H=4, Hkv=4, T=130, S=16, dtype=torch.bfloat16, seed=5)
    seg = make_segments(2, 130, seed=5) if docs else None
    grads = upstream(inputs)
    got = run(eager_backend(backend, eager_flex), inputs, window, seg, grads, scale=0.3)
    want = run(reference_sink_attention, inputs, window, seg, grads, scale=0.3)
    assert_all_close(got, want, TOL[torch.bfloat16], f"{backend} bf16")


def attention_with_lse(q, k, v, mask, scale):
    """Masked softmax attention in fp32 with its natural-log log-sum-exp: the reference pieces."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.float().repeat_interleave(group, dim=1) for t in (k, v))
    scores = (q.float() @ k.transpose(-2, -1) * scale).masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v, scores.logsumexp(dim=-1)


def merged_reference_pieces(q, k, v, q_sink, k_sink, v_sink, window=None, segment_ids=None, scale=None):
    """The lse_merge composition on the torch reference: regular part + all queries to the sinks."""
    S, scale = q_sink.shape[2], q.shape[-1] ** -0.5 if scale is None else scale
    out1, lse1 = attention_with_lse(q, k, v, attention_mask(q.shape[2], window, segment_ids), scale)
    everything = torch.ones(1, 1, 1, S, dtype=torch.bool)
    out2, lse2 = attention_with_lse(torch.cat([q_sink, q], dim=2), k_sink, v_sink, everything, scale)
    out, _ = merge_attention(out1, lse1, out2[:, :, S:], lse2[:, :, S:])
    return out.to(q.dtype), out2[:, :, :S].to(q.dtype)


@pytest.mark.parametrize("S", [1, 16])
@pytest.mark.parametrize("window,docs", [(None, False), (5, True)])
def test_merge_of_reference_pieces_matches_reference(S, window, docs):
    inputs = make_inputs(T=130, S=S, seed=3)
    seg = make_segments(2, 130, seed=3) if docs else None
    grads = upstream(inputs)
    got = run(merged_reference_pieces, inputs, window, seg, grads)
    assert_all_close(got, run(reference_sink_attention, inputs, window, seg, grads), 1e-5, f"S={S}")


def test_merge_attention_is_attention_over_the_union_and_stable():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 5, 8, generator=g), torch.randn(3, 11, 8, generator=g), torch.randn(3, 11, 8, generator=g)
    s = q @ k.transpose(-2, -1)
    full, full_lse = torch.softmax(s, -1) @ v, s.logsumexp(-1)
    a, b = slice(0, 4), slice(4, 11)
    out, lse = merge_attention(torch.softmax(s[..., a], -1) @ v[:, a], s[..., a].logsumexp(-1),
                               torch.softmax(s[..., b], -1) @ v[:, b], s[..., b].logsumexp(-1))
    assert rel_rms(out, full) < 1e-6 and rel_rms(lse, full_lse) < 1e-6
    # exp(±2000) overflows fp32; the sigmoid form does not.
    o1, o2 = torch.ones(2, 3), -torch.ones(2, 3)
    out, lse = merge_attention(o1, torch.tensor([2000.0, -2000.0]), o2, torch.tensor([-2000.0, 2000.0]))
    assert torch.equal(out, torch.stack([o1[0], o2[1]])) and torch.equal(lse, torch.tensor([2000.0, 2000.0]))
    out, lse = merge_attention(o1.bfloat16(), torch.zeros(2), o2.bfloat16(), torch.zeros(2))
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32 and not out.any()
    assert torch.allclose(lse, torch.full((2,), 2.0).log())


def implementations(request) -> dict:
    flex = request.getfixturevalue("eager_flex")
    return {"reference": reference_sink_attention, "flex": eager_backend("flex", flex),
            "lse_merge": eager_backend("lse_merge", flex)}


@pytest.mark.parametrize("impl", ["reference", "flex", "lse_merge"])
def test_sink_outputs_ignore_regular_tokens(request, impl):
    fn = implementations(request)[impl]
    q, k, v, qs, ks, vs = make_inputs(T=37, S=4)
    seg = make_segments(2, 37)
    _, base = fn(q, k, v, qs, ks, vs, 3, seg)
    _, out_sink = fn(q + 2.0, k * 3.0, v - 4.0, qs, ks, vs, None, None)
    assert torch.equal(out_sink, base)
    # and the sinks are seen by every regular token, across documents
    out, _ = fn(q, k, v, qs, ks, vs, 3, seg)
    out2, _ = fn(q, k, v, qs, ks, vs + 1.0, 3, seg)
    assert ((out2 - out).abs().amax(dim=-1) > 1e-3).all()


@pytest.mark.parametrize("impl", ["reference", "flex", "lse_merge"])
def test_window_counts_regular_tokens_only(request, impl):
    fn = implementations(request)[impl]
    T, S, w, i = 37, 16, 4, 20
    q, k, v, qs, ks, vs = make_inputs(T=T, S=S)
    base, _ = fn(q, k, v, qs, ks, vs, w)

    def output_i_changes(pos: int) -> bool:
        k2, v2 = k.clone(), v.clone()
        k2[:, :, pos] += 3.0
        v2[:, :, pos] -= 3.0
        return not torch.equal(fn(q, k2, v2, qs, ks, vs, w)[0][:, :, i], base[:, :, i])

    assert not output_i_changes(i - w - 1)
    assert output_i_changes(i - w)
    assert output_i_changes(i)
    assert not output_i_changes(i + 1)


def test_documents_split_regular_tokens_only():
    seg = torch.tensor([[0] * 15 + [1] * 10 + [2] * 15, [5] * 40])
    q, k, v, qs, ks, vs = make_inputs(T=40, S=4)
    base, base_sink = sink_attention(q, k, v, qs, ks, vs, segment_ids=seg)
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 17] += 5.0  # a token of document 1 in row 0
    v2[0, :, 17] += 5.0
    out, out_sink = sink_attention(q, k2, v2, qs, ks, vs, segment_ids=seg)
    doc1 = seg[0] == 1
    assert torch.equal(out[0][:, ~doc1], base[0][:, ~doc1]) and torch.equal(out_sink, base_sink)
    assert not torch.allclose(out[0][:, 17:25], base[0][:, 17:25])
    assert torch.equal(out[1], base[1])


@pytest.mark.parametrize("window,docs", [(None, False), (3, True)])
def test_zero_sinks_is_plain_attention(window, docs):
    q, k, v = make_inputs(T=37, S=4)[:3]
    seg = make_segments(2, 37) if docs else None
    plain = op_reference(q, k, v, window=window, documents=seg)
    assert torch.equal(op_reference(q, k, v, window=window, documents=seg, sinks=0), plain)


def test_invalid_sink_arguments_raise():
    q, k, v = joined(make_inputs(T=8, S=4))
    with pytest.raises(ValueError, match="sinks must be in"):
        op_reference(q, k, v, sinks=13)
    with pytest.raises(ValueError, match="documents must be"):
        op_reference(q, k, v, sinks=4, documents=torch.zeros(2, 12, dtype=torch.long))
    with pytest.raises(ValueError, match="window"):
        op_reference(q, k, v, sinks=4, window=-1)


def tile_truth(T: int, S: int, window: int | None, seg: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(any allowed, all allowed and tile not ragged) per tile of [sinks; regular], from the dense mask."""
    L = S + T
    n = -(-L // BLOCK_SIZE)
    mask = sink_attention_mask(T, S, window, seg)
    padded = torch.zeros(mask.shape[0], 1, n * BLOCK_SIZE, n * BLOCK_SIZE, dtype=torch.bool)
    padded[..., :L, :L] = mask
    tiles = padded.view(-1, 1, n, BLOCK_SIZE, n, BLOCK_SIZE).transpose(3, 4)
    return tiles.any(-1).any(-1), tiles.all(-1).all(-1)


@pytest.mark.parametrize("T", [37, 130, 300, 512])
@pytest.mark.parametrize("S", [1, 16, 127, 128, 130])
@pytest.mark.parametrize("window", [None, 0, 5, 127, 200])
def test_sink_block_structure_exact_without_documents(T, S, window):
    some, every = tile_truth(T, S, window, None)
    partial, full = sink_block_structure(T, S, window, None, "cpu")
    assert torch.equal(full, every) and torch.equal(partial, some & ~every)


@pytest.mark.parametrize("S", [1, 128, 200])
@pytest.mark.parametrize("sorted_ids", [True, False])
@pytest.mark.parametrize("window", [None, 100, 300])
def test_sink_block_structure_documents_never_skip_allowed_tiles(S, sorted_ids, window):
    T = 700
    seg = make_segments(3, T, seed=1)
    if not sorted_ids:
        seg = torch.randint(0, 3, (3, T), generator=torch.Generator().manual_seed(2))
    seg[1] = 7  # one row holding a single document: its tiles can be full
    some, every = tile_truth(T, S, window, seg)
    partial, full = sink_block_structure(T, S, window, seg, "cpu")
    assert not (partial & full).any()
    assert (some <= (partial | full)).all(), "a tile with allowed pairs would be skipped"
    assert (full <= every).all(), "a full tile (mask_mod not applied) has masked pairs"
    # the single-document row is exact, as without documents
    assert torch.equal(full[1], every[1]) and torch.equal(partial[1], some[1] & ~every[1])


def listed(num: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Decode BlockMask tile lists (count per row, indices) into a [.., n, n] bool bitmap."""
    n = idx.shape[-1]
    keep = torch.arange(n) < num[..., None]
    dense = torch.zeros(*idx.shape[:-1], n + 1, dtype=torch.bool)
    dense.scatter_(-1, torch.where(keep, idx.long(), n), True)
    return dense[..., :n]


@pytest.mark.parametrize("T,S,window", [(37, 4, None), (300, 128, 3), (300, 100, 200), (130, 1, None)])
def test_sink_block_mask_equals_create_block_mask(T, S, window):
    from torch.nn.attention.flex_attention import create_block_mask

    L = S + T
    mod = sink_mask_mod(torch.tensor(S), torch.tensor(T if window is None else window))
    ours = build_block_mask(sink_layout(T, S, window, None))
    theirs = create_block_mask(mod, None, None, L, L, device="cpu")
    assert ours.shape == theirs.shape == (1, 1, L, L)
    for name in ("kv", "full_kv", "q", "full_q"):
        a = listed(getattr(ours, f"{name}_num_blocks"), getattr(ours, f"{name}_indices"))
        b = listed(getattr(theirs, f"{name}_num_blocks"), getattr(theirs, f"{name}_indices"))
        assert torch.equal(a, b), name


def test_sink_block_mask_cache():
    cache = BlockMaskCache(max_plain=2)
    cpu = torch.device("cpu")
    a = cache.get(428, 128, None, None, cpu)
    assert cache.get(428, 128, None, None, cpu) is a and cache.builds == 1
    assert cache.get(428, 16, None, None, cpu) is not a and cache.builds == 2  # per sink count
    seg = Documents.from_ids(make_segments(2, 300))  # one micro-batch's documents
    m = cache.get(428, 128, 5, seg, cpu)
    assert cache.get(428, 128, 5, seg, cpu) is m and cache.builds == 3  # the next layer of the same forward
    assert cache.get(428, 128, 5, Documents.from_ids(seg.ids.clone()), cpu) is not m  # a new batch
    cache.clear()
    assert cache.get(428, 128, None, None, cpu) is not a


def test_flex_normalises_long_windows(eager_flex):
    cache = BlockMaskCache()
    inputs = make_inputs(T=37, S=4)
    for window in (None, 36, 1000):
        flex_sink_attention(*inputs, window, flex_fn=eager_flex, cache=cache)
    assert cache.builds == 1


def test_dispatch_on_cpu_picks_reference(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch):
    caplog.set_level(logging.INFO, logger="sbtrain.ops")
    registry = attention.registry
    monkeypatch.setattr(registry, "_logged", set())
    assert registry.force_env == FORCE_ENV
    assert [(b.name, b.kind) for b in registry.backends] == [("sdpa", "vendor"), ("flex", "triton"),
                                                             ("lse_merge", "triton"), ("torch", "torch")]
    inputs = make_inputs(T=37, S=4)
    assert registry.select(*joined(inputs), sinks=4).name == "torch"
    assert registry.select(*joined(inputs), window=3, documents=make_segments(2, 37), sinks=4).name == "torch"
    got = sink_attention(*inputs, 3)
    want = reference_sink_attention(*inputs, 3)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert "flex" in " ".join(r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("backend", ["flex", "lse_merge"])
def test_forcing_a_cuda_backend_on_cpu_errors(monkeypatch: pytest.MonkeyPatch, backend):
    monkeypatch.setenv(FORCE_ENV, backend)
    with pytest.raises(RuntimeError, match=f"{FORCE_ENV}='{backend}'"):
        sink_attention(*make_inputs(T=8, S=2))


@pytest.mark.skipif(os.environ.get("SB_TEST_CPU_COMPILE") != "1", reason="compiles inductor's CPU flex kernel "
                    "(~1 min); set SB_TEST_CPU_COMPILE=1")
def test_compiled_flex_forward_on_cpu(compile_enabled):
    # Inductor's CPU flex kernel walks the tile lists like the CUDA one (a wrong list changes the
    # output), and it has no backward: this checks our sink BlockMask in a real block-sparse kernel.
    # It returns no lse either, so lse_merge cannot run compiled on CPU.
    SINK_BLOCK_MASKS.clear()
    for T, S, window, docs in [(300, 128, 50, False), (520, 100, 130, False), (300, 16, None, True),
                               (520, 128, 130, True)]:
        inputs = make_inputs(B=2, H=4, Hkv=2, T=T, S=S, D=32, seed=T)
        seg = make_segments(2, T, seed=T) if docs else None
        with torch.no_grad():
            want = reference_sink_attention(*inputs, window, seg)
            got = flex_sink_attention(*inputs, window, seg)
        errors = [rel_rms(a, b) for a, b in zip(got, want)]
        assert max(errors) < 1e-5, (T, S, window, docs, errors)


# ---- GPU: the fast backends against the reference ----

GPU_CASES = [  # (T, S, window, documents)
    (100, 128, None, False), (1000, 128, None, False), (4097, 128, None, False), (4500, 128, 4096, False),
    (1000, 128, 300, False), (100, 1, 17, False), (1000, 16, None, False), (1000, 100, 300, False),
    (100, 128, None, True), (1000, 128, 300, True), (4500, 128, 4096, True), (1000, 16, 300, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("T,S,window,docs", GPU_CASES)
@pytest.mark.parametrize("backend", ["flex", "lse_merge"])
def test_gpu_backend_matches_reference(monkeypatch, compile_enabled, backend, T, S, window, docs, dtype):
    monkeypatch.setenv(FORCE_ENV, backend)
    inputs = make_inputs(B=2, H=8, Hkv=2, T=T, S=S, D=128, dtype=dtype, device="cuda", seed=T)
    seg = make_segments(2, T, seed=T, device="cuda") if docs else None
    grads = tuple(g.cuda() for g in upstream(inputs))
    got = run(sink_attention, inputs, window, seg, grads)
    want = run(reference_sink_attention, inputs, window, seg, grads)
    # fp32 flex kernels may use other summation orders and exp2; 1e-4 keeps margin.
    assert_all_close(got, want, 2e-2 if dtype == torch.bfloat16 else 1e-4, f"{backend} T={T} S={S} w={window}")


@pytest.mark.gpu
def test_gpu_dispatch_picks_flex(compile_enabled):
    inputs = make_inputs(B=1, H=8, Hkv=2, T=256, S=128, D=128, dtype=torch.bfloat16, device="cuda")
    registry = attention.registry
    assert registry.select(*joined(inputs), sinks=128).name == "flex"
    assert registry.select(*joined(inputs), window=64, documents=make_segments(1, 256, device="cuda"),
                           sinks=128).name == "flex"
    q, k, v = joined(inputs)
    assert registry.select(q, k.float(), v.float(), sinks=128).name == "torch"  # mixed dtypes


@pytest.mark.gpu
def test_gpu_flex_reuses_document_mask_across_layers(compile_enabled):
    inputs = make_inputs(B=2, H=8, Hkv=2, T=1000, S=128, D=128, dtype=torch.bfloat16, device="cuda")
    seg = Documents.from_ids(make_segments(2, 1000, device="cuda"))  # one micro-batch's, as the trainer builds it
    builds = SINK_BLOCK_MASKS.builds
    for _ in range(4):
        flex_sink_attention(*inputs, 300, seg)
    assert SINK_BLOCK_MASKS.builds == builds + 1 and len(seg.block_masks) == 1
