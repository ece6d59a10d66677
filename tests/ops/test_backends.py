"""Op-backend registry: priority, verifiers, env switches, logging (CPU-only, fast)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ops import backends
from ops.backends import Backend, OpRegistry, dispatch, get_registry, registries, tensor_verifier, triton_available

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch):
    for var in ("SB_DISABLE_BACKEND_DISPATCH", "SB_OP_BACKEND_TOY_OP"):
        monkeypatch.delenv(var, raising=False)


def tag(name: str):
    return lambda *args, **kwargs: name


def make_registry(*extra: Backend) -> OpRegistry:
    reg = OpRegistry("toy.op")
    reg.register(Backend("torch", tag("torch"), kind="torch"))
    for b in extra:
        reg.register(b)
    return reg


def reject(reason: str):
    return lambda *args, **kwargs: (False, reason)


def test_force_env_name_is_normalised():
    assert make_registry().force_env == "SB_OP_BACKEND_TOY_OP"


def test_priority_ordering():
    reg = make_registry(Backend("low", tag("low"), priority=5), Backend("high", tag("high"), priority=50),
                        Backend("vendor", tag("vendor"), kind="vendor"))
    assert [b.name for b in reg.backends] == ["high", "vendor", "low", "torch"]
    assert reg(torch.zeros(1)) == "high"


def test_default_priority_by_kind():
    assert Backend("v", tag("v"), kind="vendor").priority > Backend("t", tag("t")).priority
    assert Backend("t", tag("t")).priority > Backend("r", tag("r"), kind="torch").priority


def test_verifier_rejection_falls_through():
    reg = make_registry(Backend("fast", tag("fast"), priority=20, verifier=reject("dtype float64")),
                        Backend("slow", tag("slow"), priority=10))
    assert reg.select(torch.zeros(1)).name == "slow"


def test_verifier_sees_call_arguments():
    verifier = tensor_verifier(device_types=("cpu",), dtypes=(torch.float32,))
    reg = make_registry(Backend("f32", tag("f32"), verifier=verifier))
    assert reg(torch.zeros(1)) == "f32"
    assert reg(torch.zeros(1, dtype=torch.float64)) == "torch"
    assert reg(x=torch.zeros(1, dtype=torch.float64)) == "torch"


def test_unavailable_backend_skipped_with_reason(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="sbtrain.ops")
    calls = []

    def probe():
        calls.append(1)
        return False, "no MetaX library"

    reg = make_registry(Backend("metax", tag("metax"), kind="vendor", available=probe))
    assert reg() == "torch" and reg() == "torch"
    assert len(calls) == 1
    (record,) = caplog.records
    assert "metax: no MetaX library" in record.getMessage()


def test_forced_backend(monkeypatch: pytest.MonkeyPatch):
    reg = make_registry(Backend("high", tag("high"), priority=50), Backend("low", tag("low"), priority=5))
    monkeypatch.setenv("SB_OP_BACKEND_TOY_OP", "low")
    assert reg() == "low"
    monkeypatch.setenv("SB_OP_BACKEND_TOY_OP", "torch")
    assert reg() == "torch"


def test_forced_unknown_backend_names_env_var(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SB_OP_BACKEND_TOY_OP", "cutlass")
    with pytest.raises(ValueError, match="SB_OP_BACKEND_TOY_OP='cutlass'.*registered"):
        make_registry().select()


def test_forced_unavailable_or_rejecting_backend_errors(monkeypatch: pytest.MonkeyPatch):
    reg = make_registry(Backend("gone", tag("gone"), available=lambda: (False, "needs a GPU")),
                        Backend("picky", tag("picky"), priority=1, verifier=reject("bad shape")))
    monkeypatch.setenv("SB_OP_BACKEND_TOY_OP", "gone")
    with pytest.raises(RuntimeError, match="SB_OP_BACKEND_TOY_OP.*needs a GPU"):
        reg()
    monkeypatch.setenv("SB_OP_BACKEND_TOY_OP", "picky")
    with pytest.raises(RuntimeError, match="bad shape"):
        reg()


def test_disabled_dispatch_uses_reference(monkeypatch: pytest.MonkeyPatch):
    reg = make_registry(Backend("fast", tag("fast"), priority=50))
    monkeypatch.setenv("SB_DISABLE_BACKEND_DISPATCH", "1")
    monkeypatch.setenv("SB_OP_BACKEND_TOY_OP", "fast")
    assert reg() == "torch"
    monkeypatch.setenv("SB_DISABLE_BACKEND_DISPATCH", "0")
    assert reg() == "fast"


def test_selection_logged_once_per_reason(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch):
    caplog.set_level(logging.INFO, logger="sbtrain.ops")
    reg = make_registry(Backend("fast", tag("fast"), priority=50))
    for _ in range(5):
        reg()
    assert len(caplog.records) == 1
    assert "op toy.op -> backend fast" in caplog.records[0].getMessage()
    monkeypatch.setenv("SB_DISABLE_BACKEND_DISPATCH", "1")
    reg(), reg()
    assert len(caplog.records) == 2
    assert "SB_DISABLE_BACKEND_DISPATCH" in caplog.records[1].getMessage()


def test_reference_is_required_unique_and_lowest():
    reg = OpRegistry("no_ref")
    reg.register(Backend("fast", tag("fast")))
    with pytest.raises(RuntimeError, match="no torch reference"):
        reg()
    reg.register(Backend("torch", tag("torch"), kind="torch"))
    with pytest.raises(ValueError, match="already has reference"):
        reg.register(Backend("torch2", tag("torch2"), kind="torch"))
    with pytest.raises(ValueError, match="already has a backend named"):
        reg.register(Backend("fast", tag("fast")))
    with pytest.raises(ValueError, match="must be above the reference"):
        reg.register(Backend("slowest", tag("slowest"), priority=-1))


def test_unknown_kind_rejected():
    with pytest.raises(ValueError, match="kind"):
        Backend("x", tag("x"), kind="cuda")  # type: ignore[arg-type]


def test_dispatch_decorator_and_module_registry(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(backends, "_REGISTRIES", {})

    @dispatch("double")
    def double(x: torch.Tensor) -> torch.Tensor:
        """Reference."""
        return 2 * x

    assert double.__doc__ == "Reference." and double.__name__ == "double"
    assert get_registry("double") is double.registry and set(registries()) == {"double"}
    get_registry("double").register(Backend("triple", lambda x: 3 * x, verifier=tensor_verifier(device_types=("cpu",))))
    assert double(torch.ones(1)).item() == 3.0
    with pytest.raises(TypeError):
        registries()["other"] = OpRegistry("other")  # type: ignore[index]


def test_triton_available_on_cpu():
    ok, reason = triton_available(torch.zeros(1))
    assert not ok and "triton kernels need a GPU" in reason
    assert triton_available("cpu")[0] is False


def test_triton_available_on_gpu_device_type():
    # device objects can be built without a GPU; only the device type and triton install matter
    ok, reason = triton_available(torch.device("cuda", 0))
    assert (ok, reason) == backends._triton_importable()


def test_import_has_no_side_effects():
    code = (
        "import json, os, sys; before = dict(os.environ)\n"
        "import ops, ops.backends\n"
        "print(json.dumps({'env_changed': dict(os.environ) != before, 'triton': 'triton' in sys.modules,\n"
        "  'megatron': sorted(m for m in sys.modules if m.split('.')[0] == 'megatron')}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"env_changed": False, "triton": False, "megatron": []}


@pytest.mark.parametrize("vendor, expected", [("cuda", "cuda_lib"), ("maca", "triton_k"), ("cpu", "cuda_lib")])
def test_platform_restricted_backend_is_skipped_on_other_platforms(monkeypatch: pytest.MonkeyPatch,
                                                                     vendor: str, expected: str):
    """SB_PLATFORM=maca on an NVIDIA GPU must run only what MetaX runs (issue 14's --platform maca)."""
    from maca_compat.platform import reset_platform_cache

    monkeypatch.setenv("SB_PLATFORM", vendor)
    reset_platform_cache()
    try:
        reg = make_registry(Backend("cuda_lib", tag("cuda_lib"), kind="vendor", platforms=("cuda",)),
                            Backend("triton_k", tag("triton_k"), kind="triton"))
        assert reg.select().name == expected
        if vendor == "maca":
            assert reg.backends[0].is_available() == (False, "runs on cuda, not on platform maca")
    finally:
        monkeypatch.delenv("SB_PLATFORM")
        reset_platform_cache()


def test_cuda_only_library_backends_name_their_platform():
    """torch's flash SDPA and grouped matmul (CUTLASS) are the CUDA-only library kernels among
    the registered backends."""
    import ops.attention  # noqa: F401  (registers the attention backends)
    import ops.gla  # noqa: F401
    import ops.grouped_mlp  # noqa: F401

    marked = {(op, b.name): b.platforms for op, reg in registries().items() for b in reg.backends
              if b.platforms is not None}
    assert marked == {("attention", "sdpa"): ("cuda",),
                      ("grouped_linear", "grouped_mm"): ("cuda",)}
