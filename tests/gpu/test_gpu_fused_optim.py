"""CUDA: fused Adam == foreach Adam in training; the gradient-accumulation fusion (fp32 main_grad
written by the weight-gradient GEMM) == megatron's unfused linear, forward and every gradient."""

from __future__ import annotations

import pytest
import torch

from tests.parallel import harness

pytestmark = pytest.mark.gpu
MOE = {"model.pattern": harness.MOE_PATTERN}


@pytest.fixture(scope="module")
def adam_runs(tmp_path_factory) -> dict[str, dict[str, list[dict]]]:
    """impl -> precision -> curve: one GPU launch per Adam implementation (the environment
    picks it), both precisions inside it."""
    return {impl: harness.run_many(tmp_path_factory.mktemp(f"adam_{impl}"), 1,
                                   {p: {**MOE, "train.precision": p} for p in ("fp32", "bf16")},
                                   timeout=900, env={"SB_PLATFORM": "cuda", "SB_ADAM_IMPL": impl})
            for impl in ("fused", "foreach")}


@pytest.mark.parametrize("precision, tol", [("fp32", 1e-5), ("bf16", 5e-3)])
def test_fused_adam_matches_foreach_over_three_steps(adam_runs, precision, tol):
    fused, foreach = adam_runs["fused"][precision], adam_runs["foreach"][precision]
    assert len(fused) == 3
    harness.assert_same_curve(foreach, fused, tol=tol)


@pytest.fixture
def fusion_patch():
    from maca_compat import patches

    patches.apply_patches(["grad_accum_fusion"], vendor="cuda")
    yield
    patches.revert_patches(["grad_accum_fusion"])


def _linear(x, weight, bias, fusion: bool):
    from megatron.core.tensor_parallel.layers import (
        LinearWithGradAccumulationAndAsyncCommunication as Linear,
    )

    # input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
    # grad_output_buffer, wgrad_deferral_limit, tp_group, gtp_remat_size
    return Linear.apply(x, weight, bias, fusion, False, False, None, 0, None, 1)


def _run(dtype: torch.dtype, fusion: bool):
    gen = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(24, 16, generator=gen).to("cuda", dtype))
    bias = torch.nn.Parameter(torch.randn(24, generator=gen).to("cuda", dtype))
    for p in (weight, bias):  # what megatron DDP gives each parameter
        p.main_grad = torch.zeros(p.shape, device="cuda")
        p.grad_added_to_main_grad = False
    outs, dxs, xs = [], [], []
    for _ in range(2):  # two micro-batches accumulate
        x = torch.randn(10, 16, generator=gen).to("cuda", dtype).requires_grad_()
        out = _linear(x, weight, bias, fusion)
        (out.float() ** 2).sum().backward()
        for p in (weight, bias):  # DDP's hook
            if p.grad is not None and not p.grad_added_to_main_grad:
                p.main_grad.add_(p.grad.float())
            p.grad = None
        outs.append(out.detach())
        dxs.append(x.grad)
        xs.append(x.detach())
    return outs, dxs, weight.main_grad, bias.main_grad, xs, weight.grad_added_to_main_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_accum_fusion_matches_unfused(fusion_patch, dtype):
    f_out, f_dx, f_w, f_b, xs, added = _run(dtype, True)
    p_out, p_dx, p_w, p_b, _, plain_added = _run(dtype, False)
    assert added and not plain_added
    assert all(torch.equal(a, b) for a, b in zip(f_out, p_out))
    assert all(torch.equal(a, b) for a, b in zip(f_dx, p_dx))
    assert torch.equal(f_b, p_b)
    # fp64 reference of the weight gradient from the same bf16/fp32 operands.
    want = sum((2 * o.double()).to(dtype).double().t() @ x.double() for o, x in zip(f_out, xs))
    f_err = float((f_w.double() - want).abs().max() / want.abs().max())
    p_err = float((p_w.double() - want).abs().max() / want.abs().max())
    if dtype == torch.float32:
        torch.testing.assert_close(f_w, p_w, rtol=1e-5, atol=1e-5)  # TF32 off: fp32 GEMMs
    else:
        assert f_err < 1e-5 and f_err <= p_err, (f_err, p_err)  # no bf16 rounding of the wgrad
