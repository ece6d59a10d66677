"""op attention without sinks or positions: reference vs a naive loop, flex (eager, on CPU) vs reference, mask rules, dispatch.

Tolerances (relative RMS, rms(a - b) / rms(b)):
    fp32 vs fp32 of the same math: 1e-5 (summation order only).
    bf16 inputs: 2e-2 (8 mantissa bits; both sides accumulate in fp32, the rounding of the
    bf16 output and of the bf16 grads dominates).

The fast CUDA backends are checked by the tests marked ``gpu`` at the bottom.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ops.attention import attention
from ops.attention import naive_attention as op_reference
from ops.attention import attention_mask as dense_attention_mask
from ops.attention import flex as flex_backend
from ops.attention.flex import BlockMaskCache, flex_attention_backend
from ops.attention.masks import BLOCK_SIZE, mask_layout, tile_structure
from ops.attention.sdpa import sdpa_attention
from ops.documents import Documents


def positional(fn):
    """``fn(q, k, v, window, segment_ids, **kw)``: op ``attention``'s keyword form, as this file calls it."""
    return lambda q, k, v, window=None, segment_ids=None, **kw: fn(q, k, v, window=window, documents=segment_ids, **kw)


reference_attention = positional(op_reference)
softmax_attention = positional(attention)
flex_softmax_attention = positional(flex_attention_backend)
sdpa_causal_attention = positional(sdpa_attention)


def attention_mask(T, window=None, segment_ids=None):
    """[Bm, 1, T, T] mask of a call without sinks or positions."""
    return dense_attention_mask(T, window=window, documents=segment_ids)[:, None]


def layout(T, window, segment_ids, device="cpu", sinks=0):
    return mask_layout(T, T, window=window, documents=segment_ids, sinks=sinks, positions=None,
                       device=torch.device(device))


def block_structure(T, window, segment_ids, device):
    return tile_structure(layout(T, window, segment_ids, device))


def causal_mask_mod(window):
    """The causal/window rule as create_block_mask takes it (written here, independent of masks.py)."""
    return lambda b, h, q_idx, kv_idx: (kv_idx <= q_idx) & (q_idx - kv_idx <= window)


REPO = Path(__file__).resolve().parents[2]
FORCE_ENV = "SB_OP_BACKEND_ATTENTION"
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch):
    for var in ("SB_DISABLE_BACKEND_DISPATCH", FORCE_ENV):
        monkeypatch.delenv(var, raising=False)


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def make_qkv(B=2, H=6, Hkv=2, T=37, D=16, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((B, H, T, D), (B, Hkv, T, D), (B, Hkv, T, D))
    return [torch.randn(s, generator=g).to(device=device, dtype=dtype).requires_grad_() for s in shapes]


def make_segments(B: int, T: int, seed: int = 0, device="cpu") -> torch.Tensor:
    """Packed documents: ids increase by one at random boundaries (several documents per row)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.rand(B, T, generator=g) < 6 / T
    starts[:, 0] = False
    return starts.int().cumsum(dim=1, dtype=torch.int32).to(device)  # int32, as ops.documents


def run(fn, q, k, v, window, segment_ids, do, **kwargs):
    """Output and (dq, dk, dv) of ``fn`` for upstream gradient ``do``."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, window, segment_ids, **kwargs)
    out.backward(do)
    return out, (q.grad, k.grad, v.grad)


def assert_all_close(got, want, tol: float, what: str = ""):
    out, grads = got
    ref_out, ref_grads = want
    errors = {"out": rel_rms(out, ref_out)}
    errors.update({n: rel_rms(a, b) for n, a, b in zip(("dq", "dk", "dv"), grads, ref_grads)})
    assert all(e < tol for e in errors.values()), f"{what}: {errors} (tol {tol})"


def naive_attention(q, k, v, window=None, segment_ids=None, scale=None):
    """One query row at a time, keys listed by the rules in plain Python (independent of attention_mask)."""
    B, H, T, D = q.shape
    group = H // k.shape[1]
    scale = D**-0.5 if scale is None else scale
    rows = []
    for b in range(B):
        kb = k[b].double().repeat_interleave(group, dim=0)  # [H, T, D]
        vb = v[b].double().repeat_interleave(group, dim=0)
        for i in range(T):
            keys = [j for j in range(i + 1)
                    if (window is None or i - j <= window)
                    and (segment_ids is None or segment_ids[b, i] == segment_ids[b, j])]
            scores = (kb[:, keys] @ q[b, :, i, :, None].double()).squeeze(-1) * scale  # [H, n]
            rows.append((torch.softmax(scores, dim=-1)[:, None] @ vb[:, keys]).squeeze(1))
    return torch.stack(rows).view(B, T, H, D).transpose(1, 2).to(q.dtype)


CASES = [  # (window, documents)
    (None, False), (3, False), (36, False), (100, False), (None, True), (3, True), (10, True),
]


@pytest.mark.parametrize("window,docs", CASES)
def test_reference_matches_naive_loop(window, docs):
    q, k, v = make_qkv(T=37)
    seg = make_segments(2, 37) if docs else None
    do = torch.randn_like(q)
    want = run(naive_attention, q, k, v, window, seg, do)
    assert_all_close(run(reference_attention, q, k, v, window, seg, do), want, 1e-5, f"window={window}")


def test_attention_mask_shape_and_rules():
    seg = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]])
    mask = attention_mask(5, window=1, segment_ids=seg)
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.bool
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0],
                                         [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]
    assert attention_mask(5).shape == (1, 1, 5, 5)
    assert torch.equal(attention_mask(5, window=4)[0, 0], torch.ones(5, 5, dtype=torch.bool).tril())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", [37, 130])
@pytest.mark.parametrize("window,docs", [(None, False), (3, False), (100, False), (None, True), (50, True)])
def test_flex_matches_reference(eager_flex, T, window, docs, dtype):
    q, k, v = make_qkv(T=T, dtype=dtype, seed=T)
    seg = make_segments(2, T, seed=T) if docs else None
    do = torch.randn_like(q)
    got = run(flex_softmax_attention, q, k, v, window, seg, do, flex_fn=eager_flex, cache=BlockMaskCache())
    want = run(reference_attention, q, k, v, window, seg, do)
    assert_all_close(got, want, TOL[dtype], f"T={T} window={window} docs={docs}")


def test_flex_scale_and_no_gqa(eager_flex):
    q, k, v = make_qkv(H=4, Hkv=4, T=37)
    do = torch.randn_like(q)
    got = run(flex_softmax_attention, q, k, v, 5, None, do, scale=0.3, flex_fn=eager_flex, cache=BlockMaskCache())
    want = run(reference_attention, q, k, v, 5, None, do, scale=0.3)
    assert_all_close(got, want, 1e-5)


def test_sdpa_causal_function_matches_reference():
    # The function itself runs on CPU too (its verifier keeps dispatch to CUDA); fp32 + GQA
    # exercises the expanded-K/V branch.
    q, k, v = make_qkv(T=37)
    do = torch.randn_like(q)
    for window in (None, 36, 1000):
        assert_all_close(run(sdpa_causal_attention, q, k, v, window, None, do),
                         run(reference_attention, q, k, v, None, None, do), 1e-5)
    with pytest.raises(ValueError, match="plain causal"):
        sdpa_causal_attention(q, k, v, window=35)
    with pytest.raises(ValueError, match="plain causal"):
        sdpa_causal_attention(q, k, v, segment_ids=make_segments(2, 37))


def tile_truth(T: int, window: int | None, seg: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(any allowed, all allowed and tile not ragged) per tile, from the dense mask."""
    n = -(-T // BLOCK_SIZE)
    mask = attention_mask(T, window, seg)
    padded = torch.zeros(mask.shape[0], 1, n * BLOCK_SIZE, n * BLOCK_SIZE, dtype=torch.bool)
    padded[..., :T, :T] = mask
    tiles = padded.view(-1, 1, n, BLOCK_SIZE, n, BLOCK_SIZE).transpose(3, 4)
    return tiles.any(-1).any(-1), tiles.all(-1).all(-1)


def listed(num: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Decode BlockMask tile lists (count per row, indices) into a [.., n, n] bool bitmap."""
    n = idx.shape[-1]
    keep = torch.arange(n) < num[..., None]
    dense = torch.zeros(*idx.shape[:-1], n + 1, dtype=torch.bool)
    dense.scatter_(-1, torch.where(keep, idx.long(), n), True)
    return dense[..., :n]


@pytest.mark.parametrize("T", [37, 128, 130, 300, 513])
@pytest.mark.parametrize("window", [None, 0, 5, 127, 128, 200, 1000])
def test_block_structure_exact_without_documents(T, window):
    some, every = tile_truth(T, window, None)
    partial, full = block_structure(T, window, None, "cpu")
    assert torch.equal(full, every) and torch.equal(partial, some & ~every)


@pytest.mark.parametrize("sorted_ids", [True, False])
@pytest.mark.parametrize("window", [None, 100, 300])
def test_block_structure_documents_never_skip_allowed_tiles(sorted_ids, window):
    T = 700
    seg = make_segments(3, T, seed=1)
    if not sorted_ids:
        seg = torch.randint(0, 3, (3, T), generator=torch.Generator().manual_seed(2))
    seg[1] = 7  # one row holding a single document: its tiles can be full
    some, every = tile_truth(T, window, seg)
    partial, full = block_structure(T, window, seg, "cpu")
    assert not (partial & full).any()
    assert (some <= (partial | full)).all(), "a tile with allowed pairs would be skipped"
    assert (full <= every).all(), "a full tile (mask_mod not applied) has masked pairs"
    if window is None or window >= 2 * BLOCK_SIZE - 1:  # a smaller window leaves no tile fully visible
        assert full[1].any() and not full[[0, 2]].all()


@pytest.mark.parametrize("T", [37, 130, 300])
@pytest.mark.parametrize("window", [None, 3, 200])
def test_block_mask_equals_create_block_mask(T, window):
    from torch.nn.attention.flex_attention import create_block_mask

    window_t = torch.tensor(T if window is None else window)
    ours = flex_backend.build_block_mask(layout(T, window, None))
    theirs = create_block_mask(causal_mask_mod(window_t), None, None, T, T, device="cpu")
    assert ours.shape == theirs.shape == (1, 1, T, T)
    for name in ("kv", "full_kv", "q", "full_q"):
        a = listed(getattr(ours, f"{name}_num_blocks"), getattr(ours, f"{name}_indices"))
        b = listed(getattr(theirs, f"{name}_num_blocks"), getattr(theirs, f"{name}_indices"))
        assert torch.equal(a, b), name


@pytest.mark.parametrize("impl", ["reference", "flex"])
def test_window_semantics(request, impl):
    fn = reference_attention
    if impl == "flex":
        flex = request.getfixturevalue("eager_flex")
        fn = lambda *a: flex_softmax_attention(*a, flex_fn=flex, cache=BlockMaskCache())  # noqa: E731
    T, w, i = 37, 4, 20
    q, k, v = (t.detach() for t in make_qkv(T=T))
    base = fn(q, k, v, w)

    def output_i_changes(pos: int) -> bool:
        k2, v2 = k.clone(), v.clone()
        k2[:, :, pos] += 3.0
        v2[:, :, pos] -= 3.0
        return not torch.allclose(fn(q, k2, v2, w)[:, :, i], base[:, :, i], atol=0, rtol=0)

    assert not output_i_changes(i - w - 1)
    assert output_i_changes(i - w)
    assert output_i_changes(i)
    assert not output_i_changes(i + 1)


def test_document_mask_isolates_documents():
    T = 40
    seg = torch.tensor([[0] * 15 + [1] * 10 + [2] * 15, [5] * 40])
    q, k, v = (t.detach() for t in make_qkv(T=T))
    base = softmax_attention(q, k, v, segment_ids=seg)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[0, :, 17] += 5.0  # a token of document 1 in row 0
    out = softmax_attention(q2, k2, v2, segment_ids=seg)
    doc1 = seg[0] == 1
    assert torch.equal(out[0][:, ~doc1], base[0][:, ~doc1])
    assert not torch.allclose(out[0][:, 17:25], base[0][:, 17:25])
    assert torch.equal(out[1], base[1])


def test_dispatch_on_cpu_picks_reference(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch):
    caplog.set_level(logging.INFO, logger="sbtrain.ops")
    registry = attention.registry
    monkeypatch.setattr(registry, "_logged", set())  # each choice is logged once per process
    assert registry.force_env == FORCE_ENV
    assert [b.name for b in registry.backends] == ["sdpa", "flex", "lse_merge", "torch"]
    q, k, v = make_qkv(T=37)
    assert registry.select(q, k, v).name == "torch"
    assert registry.select(q, k, v, window=3, documents=make_segments(2, 37)).name == "torch"
    out = softmax_attention(q, k, v, 3)
    assert torch.equal(out, reference_attention(q, k, v, 3))
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "sdpa: sdpa is the CUDA flash path" in messages
    assert "flex" in messages


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_forcing_a_cuda_backend_on_cpu_errors(monkeypatch: pytest.MonkeyPatch, backend):
    monkeypatch.setenv(FORCE_ENV, backend)
    q, k, v = make_qkv(T=8)
    with pytest.raises(RuntimeError, match=f"{FORCE_ENV}='{backend}'"):
        softmax_attention(q, k, v)


def test_invalid_inputs_raise():
    q, k, v = make_qkv(T=8)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        reference_attention(q, k[:, :1].expand(2, 4, 8, 16), v[:, :1].expand(2, 4, 8, 16))
    with pytest.raises(ValueError, match="window"):
        reference_attention(q, k, v, window=-1)
    with pytest.raises(ValueError, match="documents"):
        reference_attention(q, k, v, segment_ids=torch.zeros(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, H, L, D\]"):
        reference_attention(q[0], k, v)


def test_block_mask_cache():
    cache = BlockMaskCache(max_plain=2)
    cpu = torch.device("cpu")
    a = cache.get(300, 0, None, None, cpu)
    assert cache.get(300, 0, None, None, cpu) is a and cache.builds == 1
    cache.get(300, 0, 5, None, cpu), cache.get(200, 0, None, None, cpu)
    assert cache.builds == 3 and cache.get(300, 0, None, None, cpu) is not a  # evicted (max_plain=2)

    seg = Documents.from_ids(make_segments(2, 300))  # one micro-batch's documents
    m = cache.get(300, 0, 5, seg, cpu)
    assert cache.get(300, 0, 5, seg, cpu) is m  # the next layer of the same forward
    assert cache.get(300, 0, 7, seg, cpu) is not m and len(seg.block_masks) == 2  # per window
    assert cache.get(300, 0, 5, Documents.from_ids(seg.ids.clone()), cpu) is not m  # a new batch
    builds = cache.builds
    cache.get(300, 0, 5, seg.ids, cpu), cache.get(300, 0, 5, seg.ids, cpu)
    assert cache.builds == builds + 2  # bare ids: built per call, nothing kept across batches


def test_flex_normalises_long_windows(eager_flex):
    cache = BlockMaskCache()
    q, k, v = (t.detach() for t in make_qkv(T=37))
    for window in (None, 36, 1000):
        flex_softmax_attention(q, k, v, window, flex_fn=eager_flex, cache=cache)
    assert cache.builds == 1


def test_import_has_no_side_effects():
    code = ("import json, sys\nimport ops.attention\n"
            "print(json.dumps({m: m in sys.modules for m in ('triton', 'torch._dynamo', 'torch._inductor')}))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"triton": False, "torch._dynamo": False,
                                                               "torch._inductor": False}


@pytest.mark.skipif(os.environ.get("SB_TEST_CPU_COMPILE") != "1", reason="compiles inductor's CPU flex kernel "
                    "(~1 min); set SB_TEST_CPU_COMPILE=1")
def test_compiled_flex_forward_on_cpu(compile_enabled):
    # Inductor's CPU flex kernel walks the tile lists like the CUDA one (a wrong list changes the
    # output), and it has no backward: this checks our BlockMask in a real block-sparse kernel.
    flex_backend.BLOCK_MASKS.clear()
    for T, window, docs in [(300, 50, False), (520, 130, False), (300, None, True), (520, 130, True)]:
        q, k, v = (t.detach() for t in make_qkv(B=2, H=4, Hkv=2, T=T, D=32, seed=T))
        seg = make_segments(2, T, seed=T) if docs else None
        with torch.no_grad():
            got = flex_softmax_attention(q, k, v, window, seg)
        assert rel_rms(got, reference_attention(q, k, v, window, seg)) < 1e-5, (T, window, docs)


# ---- GPU: the fast backends against the reference (H100, torch 2.11) ----

GPU_CASES = [  # (T, window, documents)
    (100, None, False), (1000, None, False), (4097, None, False), (4097, 4096, False), (4097, 10_000, False),
    (100, 17, False), (1000, 300, False), (4500, 4096, False),
    (100, None, True), (1000, 300, True), (4500, 4096, True),
]


def _accepts(backend: str, T: int, window: int | None, docs: bool) -> bool:
    return backend == "flex" or (not docs and (window is None or window >= T - 1))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("T,window,docs", GPU_CASES)
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_gpu_backend_matches_reference(monkeypatch, compile_enabled, backend, T, window, docs, dtype):
    if not _accepts(backend, T, window, docs):
        pytest.skip(f"{backend} does not take this mask")
    monkeypatch.setenv(FORCE_ENV, backend)
    q, k, v = make_qkv(B=2, H=8, Hkv=2, T=T, D=128, dtype=dtype, device="cuda", seed=T)
    seg = make_segments(2, T, seed=T, device="cuda") if docs else None
    do = torch.randn_like(q)
    got = run(softmax_attention, q, k, v, window, seg, do)
    want = run(reference_attention, q, k, v, window, seg, do)
    # fp32 flex/SDPA kernels may use other summation orders and exp2; 1e-4 keeps margin.
    assert_all_close(got, want, 2e-2 if dtype == torch.bfloat16 else 1e-4, f"{backend} T={T} w={window}")


@pytest.mark.gpu
def test_gpu_dispatch_picks_fast_backends(compile_enabled):
    q, k, v = make_qkv(B=1, H=8, Hkv=2, T=256, D=128, dtype=torch.bfloat16, device="cuda")
    registry = attention.registry
    assert registry.select(q, k, v).name == "sdpa"
    assert registry.select(q, k, v, window=255).name == "sdpa"
    assert registry.select(q, k, v, window=64).name == "flex"
    assert registry.select(q, k, v, documents=make_segments(1, 256, device="cuda")).name == "flex"


@pytest.mark.gpu
def test_gpu_flex_reuses_document_mask_across_layers(compile_enabled):
    q, k, v = (t.detach() for t in make_qkv(B=2, H=8, Hkv=2, T=1000, D=128, dtype=torch.bfloat16, device="cuda"))
    seg = Documents.from_ids(make_segments(2, 1000, device="cuda"))  # one micro-batch's, as the trainer builds it
    builds = flex_backend.BLOCK_MASKS.builds
    for _ in range(4):
        flex_softmax_attention(q, k, v, 300, seg)
    assert flex_backend.BLOCK_MASKS.builds == builds + 1 and len(seg.block_masks) == 1
