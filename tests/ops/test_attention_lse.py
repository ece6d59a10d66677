"""op ``attention_lse`` (op ``attention`` plus each query's log-sum-exp) and the lse merge that
sequence parallelism's early exchange relies on: the reference against op ``attention`` and an
independent logsumexp, queries that see nothing (output 0, lse -inf, finite gradients), two
disjoint key sets merged by lse equal to one call (forward and every gradient), flex (eager, on
CPU) against the reference. The CUDA flex kernel is checked by the ``gpu`` test at the bottom.
"""

from __future__ import annotations

import pytest
import torch

from ops.attention import Positions, merge_attention, naive_attention
from ops.attention.flex import BlockMaskCache, flex_attention_lse
from ops.attention.local import local_attention_lse
from ops.attention.masks import dense_mask, mask_layout
from ops.attention.naive import naive_attention_lse

B, H, HKV, D = 2, 4, 2, 16


def _qkv(Lq: int, Lk: int, dtype=torch.float64, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(B, HKV, Lk, D, generator=gen, dtype=torch.float64) for _ in range(2))
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]


def _segments(T: int, cuts=(5, 12)) -> torch.Tensor:
    ids = torch.zeros(B, T, dtype=torch.long)
    for cut in cuts:
        ids[0, cut:] += 1
    ids[1, T // 2:] = 1
    return ids


def _earlier_keys(T: int, window: int | None, docs: bool, device="cpu") -> tuple[Positions, torch.Tensor | None]:
    """An SP rank's view: T queries at positions [T, 2T) over T received keys at [0, T), the last
    two slots padding; with documents, the first query document continues the keys' last one."""
    query = T + torch.arange(T, device=device)
    key_valid = torch.ones(T, dtype=torch.bool, device=device)
    key_valid[-2:] = False
    ids = key_ids = None
    if docs:
        ids = torch.ones(B, T, dtype=torch.long, device=device)
        ids[:, T // 2:] = 2
        key_ids = torch.zeros(B, T, dtype=torch.long, device=device)
        key_ids[:, T // 3:] = 1
    return Positions(query=query, key=torch.arange(T, device=device), key_valid=key_valid,
                     key_documents=key_ids), ids


@pytest.mark.parametrize("window,docs,sinks", [(None, False, 0), (3, True, 2), (7, False, 3), (None, True, 1)])
def test_reference_output_is_attention_and_lse_is_the_logsumexp(window, docs, sinks):
    T = 17
    q, k, v = _qkv(sinks + T, sinks + T)
    seg = _segments(T) if docs else None
    out, lse = naive_attention_lse(q, k, v, window=window, documents=seg, sinks=sinks)
    torch.testing.assert_close(out, naive_attention(q, k, v, window=window, documents=seg, sinks=sinks))
    mask = dense_mask(mask_layout(sinks + T, sinks + T, window=window, documents=seg, sinks=sinks,
                                  positions=None, device="cpu"))[:, None]
    scores = torch.matmul(q, k.repeat_interleave(H // HKV, 1).transpose(-1, -2)) * D ** -0.5
    torch.testing.assert_close(lse, scores.masked_fill(~mask, float("-inf")).logsumexp(-1))


def test_a_query_that_sees_nothing_gets_zeros_minus_infinity_and_finite_gradients():
    # query 8 sees key 5; queries 9.. reach only the padding slots 6, 7 or nothing
    positions, _ = _earlier_keys(8, window=3, docs=False)
    q, k, v = _qkv(8, 8)
    out, lse = naive_attention_lse(q, k, v, window=3, positions=positions)
    assert not out[:, :, 1:].any() and torch.isneginf(lse[:, :, 1:]).all()
    assert torch.isfinite(lse[:, :, 0]).all() and out[:, :, 0].abs().sum() > 0
    (out.sum() + torch.where(lse.isfinite(), lse, 0).sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("window,docs,sinks", [(None, False, 2), (4, True, 3), (12, True, 0), (2, False, 1)])
def test_own_and_earlier_keys_merged_by_lse_equal_one_call(window, docs, sinks):
    """The split of ops/attention/sequence_parallel.py's early exchange on one process: the
    slice over [sinks; itself], the slice over the received keys at their positions, merged,
    equals one call over [sinks; received; slice]: output and the q, k, v gradients."""
    T = 10
    positions, ids = _earlier_keys(T, window, docs)
    q, k_own, v_own = _qkv(sinks + T, sinks + T, seed=1)
    _, k_in, v_in = _qkv(T, T, seed=2)
    weight = torch.randn(B, H, sinks + T, D, dtype=torch.float64)

    own, own_lse = naive_attention_lse(q, k_own, v_own, window=window, documents=ids, sinks=sinks)
    earlier, earlier_lse = naive_attention_lse(q[:, :, sinks:], k_in, v_in, window=window, documents=ids,
                                               positions=positions)
    merged, _ = merge_attention(own[:, :, sinks:], own_lse[:, :, sinks:], earlier, earlier_lse)
    split = torch.cat([own[:, :, :sinks], merged], dim=2)
    split_grads = torch.autograd.grad((split * weight).sum(), (q, k_own, v_own, k_in, v_in))

    every = lambda a, b: torch.cat([a[:, :, :sinks], b, a[:, :, sinks:]], dim=2)  # noqa: E731
    whole_pos = Positions(query=positions.query, key=torch.cat([positions.key, positions.query]),
                          key_valid=torch.cat([positions.key_valid, torch.ones(T, dtype=torch.bool)]),
                          key_documents=None if ids is None else torch.cat([positions.key_documents, ids], 1))
    whole = naive_attention(q, every(k_own, k_in), every(v_own, v_in), window=window, documents=ids, sinks=sinks,
                            positions=whole_pos)
    whole_grads = torch.autograd.grad((whole * weight).sum(), (q, k_own, v_own, k_in, v_in))
    torch.testing.assert_close(split, whole, rtol=1e-12, atol=1e-12)
    for name, a, b in zip(["q", "k_own", "v_own", "k_in", "v_in"], split_grads, whole_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"d{n}: {m}")


def test_dispatch_on_cpu_picks_the_reference():
    q, k, v = _qkv(6, 6)
    assert local_attention_lse.registry.select(q, k, v).name == "torch"


def _compare_flex(flex_fn, dtype, device, tol):
    T = 40
    positions, ids = _earlier_keys(T, 9, True, device)
    for kwargs, (Lq, Lk) in [(dict(window=9, documents=ids, sinks=3), (3 + T, 3 + T)),
                             (dict(window=9, documents=ids, positions=positions), (T, T))]:
        q, k, v = _qkv(Lq, Lk, dtype, device, seed=4)
        out, lse = flex_attention_lse(q, k, v, **kwargs, flex_fn=flex_fn, cache=BlockMaskCache())
        want_out, want_lse = naive_attention_lse(q, k, v, **kwargs)
        torch.testing.assert_close(out, want_out, rtol=tol, atol=tol)
        torch.testing.assert_close(lse.float(), want_lse.float(), rtol=tol, atol=tol)  # -inf rows included
        grads = torch.autograd.grad(out.float().sum() + torch.where(lse.isfinite(), lse, 0).sum(), (q, k, v))
        want = torch.autograd.grad(want_out.float().sum() + torch.where(want_lse.isfinite(), want_lse, 0).sum(),
                                   (q, k, v))
        for name, a, b in zip("qkv", grads, want):
            assert torch.isfinite(a).all(), name
            torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol, msg=lambda m, n=name: f"d{n}: {m}")


def test_flex_lse_matches_reference(eager_flex):
    _compare_flex(eager_flex, torch.float32, "cpu", 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gpu_flex_lse_matches_reference(compile_enabled, dtype):
    assert local_attention_lse.registry.select(*_qkv(8, 8, dtype, "cuda")).name == "flex"
    _compare_flex(None, dtype, "cuda", 2e-2 if dtype == torch.bfloat16 else 1e-4)
