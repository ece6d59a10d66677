"""maca_compat.fused_optim and the platform's choices, without megatron (the megatron paths
are covered by test_patches.py's fused_optim and wgrad_fusion probes)."""

from __future__ import annotations

import copy

import pytest
import torch

from maca_compat import platform as plat
from maca_compat.fused_optim import (
    foreach_l2_norm,
    foreach_scale,
    pin_adam_impl,
    pinned_adam,
    wgrad_gemm_accum,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _platform(vendor: str) -> plat.Platform:
    return plat.Platform(vendor=vendor, device_type="cpu" if vendor == "cpu" else "cuda",
                         comm_backend="gloo", device_name="x", device_count=0,
                         peak_bf16_flops=0.0, peak_source="", warp_size=32)


def test_adam_impl_per_platform(monkeypatch):
    monkeypatch.delenv(plat.ADAM_IMPL_ENV, raising=False)
    assert [plat.adam_impl_for(_platform(v)) for v in ("cuda", "maca", "cpu")] == [
        "fused", "foreach", "for_loop"]
    monkeypatch.setenv(plat.ADAM_IMPL_ENV, "foreach")
    assert plat.adam_impl_for(_platform("cuda")) == "foreach"
    monkeypatch.setenv(plat.ADAM_IMPL_ENV, "apex")
    with pytest.raises(ValueError, match="SB_ADAM_IMPL='apex' is invalid"):
        plat.adam_impl_for(_platform("cuda"))
    assert [plat.grad_accum_fusion_for(_platform(v)) for v in ("cuda", "maca", "cpu")] == [
        True, False, False]


def _train(opt_cls, params, steps: int = 3, **kwargs):
    opt = opt_cls(params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, **kwargs)
    gen = torch.Generator().manual_seed(5)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.device)
        opt.step()
    return opt


def _params(device: str) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(1)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in (5, (3, 4), 1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_pinned_adam_matches_the_default_loop(device, impl):
    ref, got = _params(device), _params(device)
    _train(torch.optim.AdamW, ref, foreach=False)
    opt = _train(pinned_adam(torch.optim.AdamW, impl), got)
    assert all(g[impl] is True for g in opt.param_groups)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_for_loop_is_bit_identical_to_torch_default_on_cpu():
    ref, got = _params("cpu"), _params("cpu")
    _train(torch.optim.AdamW, ref)  # no flags: what megatron builds today
    _train(pinned_adam(torch.optim.AdamW, "for_loop"), got)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


def test_pinned_adam_keeps_its_implementation_through_load_state_dict():
    """A checkpoint written by another implementation, with megatron's one shared float32 CPU
    ``step`` (DistributedOptimizer.load_state_dict), loads into a fused optimizer: the flags
    stay fused and step is where the fused kernel reads it; training continues identically."""
    saved_params = _params("cpu")
    saved = _train(torch.optim.AdamW, saved_params, foreach=False)
    state = copy.deepcopy(saved.state_dict())  # torch hands out its live state tensors
    shared = torch.tensor(3.0)
    for s in state["state"].values():
        s["step"] = shared
    fused_cls = pinned_adam(torch.optim.AdamW, "fused")
    params = [torch.nn.Parameter(p.detach().clone()) for p in saved_params]
    opt = fused_cls(params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    opt.load_state_dict(state)
    assert all(g["fused"] is True and g["foreach"] is False for g in opt.param_groups)
    for p in params:
        step = opt.state[p]["step"]
        assert step.dtype == torch.float32 and step.device == p.device and float(step) == 3.0
    # Same next step as the optimizer that wrote the checkpoint (to fp32 rounding).
    gen = torch.Generator().manual_seed(9)
    for p, q in zip(params, saved_params):
        p.grad = torch.randn(p.shape, generator=gen)
        q.grad = p.grad.clone()
    for s in opt.state.values():
        s["step"] = s["step"].clone()  # what sbtrain.checkpoint.unshare_adam_step does
    opt.step()
    saved.step()
    for a, b in zip(params, saved_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_pin_moves_a_float64_step():
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([p])
    opt.state[p] = {"step": torch.tensor(2.0, dtype=torch.float64), "exp_avg": torch.zeros(2),
                    "exp_avg_sq": torch.zeros(2)}
    pin_adam_impl(opt, "fused")
    assert opt.state[p]["step"].dtype == torch.float32 and opt.param_groups[0]["fused"]


@pytest.mark.parametrize("device", DEVICES)
def test_foreach_l2_norm_and_scale_match_per_tensor_math(device):
    gen = torch.Generator().manual_seed(2)
    ts = [torch.randn(n, generator=gen).to(device) for n in (3, 100, 1, 17)]
    norm, per_tensor = foreach_l2_norm(0, torch.zeros(1, device=device), [ts], False)
    want = torch.norm(torch.stack([torch.norm(t) for t in ts]))
    assert norm.shape == (1,) and norm.device.type == device
    torch.testing.assert_close(norm[0], want, rtol=1e-6, atol=0)
    assert per_tensor is None
    empty, _ = foreach_l2_norm(0, torch.zeros(1, device=device), [[]], False)
    assert float(empty) == 0.0
    dst = [torch.empty_like(t, dtype=torch.bfloat16) for t in ts]
    foreach_scale(0, None, [ts, dst], 0.5)
    assert all(torch.equal(d, (t * 0.5).to(torch.bfloat16)) for t, d in zip(ts, dst))
    inplace = [t.clone() for t in ts]
    foreach_scale(0, None, [inplace, inplace], 0.25)
    assert all(torch.equal(a, t * 0.25) for a, t in zip(inplace, ts))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wgrad_gemm_accum(device, dtype):
    """main_grad += grad_output^T @ input, accumulated in fp32 (vs an fp64 reference)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(64, 48, generator=gen).to(device, dtype)
    go = torch.randn(64, 32, generator=gen).to(device, dtype)
    main_grad = torch.randn(32, 48, generator=gen).to(device)
    want = main_grad.double() + go.double().t() @ x.double()
    wgrad_gemm_accum(x, go, main_grad)
    assert main_grad.dtype == torch.float32
    err = (main_grad.double() - want).abs().max() / want.abs().max()
    assert err < 1e-5, err  # bf16 products are exact in fp32: no bf16 rounding of the wgrad


@pytest.mark.gpu
def test_cuda_wgrad_route_is_a_fused_gemm():
    from maca_compat.fused_optim import cuda_wgrad_route

    assert cuda_wgrad_route() in ("baddbmm_out_dtype", "mm_out_dtype")
