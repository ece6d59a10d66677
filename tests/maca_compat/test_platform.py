"""Platform detection, peak-FLOP/s resolution and comm env defaults (CPU-only, fast)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from maca_compat import comm
from maca_compat.comm import apply_comm_env, comm_env_for
from maca_compat.platform import (
    UNKNOWN_DEVICE_SOURCE,
    Platform,
    get_platform,
    lookup_peak_table,
    reset_platform_cache,
    resolve_peak_flops,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_platform(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("SB_PLATFORM", raising=False)
    monkeypatch.delenv("SB_PEAK_FLOPS", raising=False)
    reset_platform_cache()
    yield
    reset_platform_cache()


def make_platform(vendor: str = "cuda", name: str = "NVIDIA H100 80GB HBM3") -> Platform:
    return Platform(vendor=vendor, device_type="cpu" if vendor == "cpu" else "cuda",
                    comm_backend="gloo" if vendor == "cpu" else "nccl", device_name=name,
                    device_count=1, peak_bf16_flops=0.0, peak_source="test",
                    warp_size=64 if vendor == "maca" else 32)


def test_cpu_detected_here():
    p = get_platform()
    assert (p.vendor, p.device_type, p.comm_backend) == ("cpu", "cpu", "gloo")
    assert p.device_module is torch.cpu
    assert p.device(3) == torch.device("cpu")
    assert not p.is_gpu and p.device_count == 0
    assert "nominal" in p.peak_source and p.peak_bf16_flops > 0


def test_platform_is_cached_and_reset(monkeypatch: pytest.MonkeyPatch):
    first = get_platform()
    assert get_platform() is first
    monkeypatch.setenv("SB_PLATFORM", "maca")
    assert get_platform() is first
    reset_platform_cache()
    assert get_platform().vendor == "maca"


@pytest.mark.parametrize(
    ("value", "vendor", "backend", "warp"),
    [
        ("maca", "maca", "nccl", 64),
        ("cuda", "cuda", "nccl", 32),
        ("cpu", "cpu", "gloo", 32),
        (" MACA ", "maca", "nccl", 64),
    ],
)
def test_sb_platform_override(monkeypatch: pytest.MonkeyPatch, value, vendor, backend, warp):
    monkeypatch.setenv("SB_PLATFORM", value)
    p = get_platform()
    assert (p.vendor, p.comm_backend, p.warp_size) == (vendor, backend, warp)
    if vendor != "cpu":
        assert p.device_type == "cuda" and p.device_module is torch.cuda
        assert p.device(2) == torch.device("cuda", 2) and p.is_gpu


def test_sb_platform_invalid(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SB_PLATFORM", "rocm")
    with pytest.raises(ValueError, match=r"SB_PLATFORM.*allowed values: cuda, maca, cpu"):
        get_platform()


def test_negative_local_rank_rejected():
    with pytest.raises(ValueError, match="local_rank"):
        make_platform().device(-1)


def _fake_gpu(monkeypatch: pytest.MonkeyPatch, name: str, version: str = "2.4.0+cu124") -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda idx=0: name)
    monkeypatch.setattr(torch, "__version__", version)


@pytest.mark.parametrize(
    ("name", "version", "vendor"),
    [
        ("NVIDIA H100 80GB HBM3", "2.4.0+cu124", "cuda"),
        ("MetaX C550", "2.4.0+cu124", "maca"),
        ("C550", "2.4.0+metax2.32.0.3", "maca"),
        ("C550", "2.1.2+maca2.27", "maca"),
    ],
)
def test_auto_detection_with_fake_gpu(monkeypatch: pytest.MonkeyPatch, name, version, vendor):
    _fake_gpu(monkeypatch, name, version)
    p = get_platform()
    assert (p.vendor, p.device_count, p.device_name, p.comm_backend) == (vendor, 8, name, "nccl")
    assert p.warp_size == (64 if vendor == "maca" else 32)


def test_maca_detected_from_torch_version_attr(monkeypatch: pytest.MonkeyPatch):
    _fake_gpu(monkeypatch, "Some GPU")
    monkeypatch.setattr(torch.version, "maca", "2.32", raising=False)
    assert get_platform().vendor == "maca"


@pytest.mark.parametrize(
    ("name", "peak", "key"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12, "H100"),
        ("NVIDIA H200", 989e12, "H200"),
        ("NVIDIA GH200 480GB", 989e12, "GH200"),
        ("NVIDIA H100 PCIe", 756e12, "H100 PCIe"),
        ("NVIDIA A800-SXM4-80GB", 312e12, "A800"),
        ("NVIDIA A100-SXM4-40GB", 312e12, "A100"),
        ("MetaX C550", 280e12, "C550"),
    ],
)
def test_peak_table(name, peak, key):
    value, source = resolve_peak_flops(make_platform(name=name))
    assert value == peak
    assert source.startswith(f"table: {key}")


def test_c550_marked_as_placeholder():
    assert "placeholder" in lookup_peak_table("MetaX C550")[1]


def test_unknown_gpu_has_zero_peak():
    assert resolve_peak_flops(make_platform(name="Mystery Accelerator")) == (0.0, UNKNOWN_DEVICE_SOURCE)
    assert "profiler.peak_flops" in UNKNOWN_DEVICE_SOURCE


def test_peak_precedence_config_env_table(monkeypatch: pytest.MonkeyPatch):
    p = make_platform(vendor="maca", name="MetaX C550")
    assert resolve_peak_flops(p) == (280e12, "table: C550 (inferred placeholder)")
    monkeypatch.setenv("SB_PEAK_FLOPS", "2.5e14")
    assert resolve_peak_flops(p) == (2.5e14, "env SB_PEAK_FLOPS")
    assert resolve_peak_flops(p, override=3e14) == (3e14, "config")
    assert resolve_peak_flops(replace(p, vendor="cpu")) == (2.5e14, "env SB_PEAK_FLOPS")


def test_env_peak_reaches_platform(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SB_PEAK_FLOPS", "1e14")
    p = get_platform()
    assert (p.peak_bf16_flops, p.peak_source) == (1e14, "env SB_PEAK_FLOPS")


@pytest.mark.parametrize("raw", ["fast", "-1", "0"])
def test_bad_peak_env(monkeypatch: pytest.MonkeyPatch, raw):
    monkeypatch.setenv("SB_PEAK_FLOPS", raw)
    with pytest.raises(ValueError, match="SB_PEAK_FLOPS"):
        resolve_peak_flops(make_platform())


def test_negative_config_peak_rejected():
    with pytest.raises(ValueError, match="peak_flops"):
        resolve_peak_flops(make_platform(), override=-1.0)


def test_comm_env_per_vendor():
    assert comm_env_for(make_platform("cpu")) == {}
    assert comm_env_for(make_platform("cuda")) == {"TORCH_NCCL_AVOID_RECORD_STREAMS": "1"}
    single = comm_env_for(make_platform("maca", "MetaX C550"))
    multi = comm_env_for(make_platform("maca", "MetaX C550"), multi_node=True)
    assert not any(k.startswith("MCCL_") for k in single)
    assert multi["MCCL_CROSS_NIC"] == "1" and multi["MCCL_NET_GDR_LEVEL"] == "SYS"
    assert "MCCL_CROSS_NIC" not in comm_env_for(make_platform("cuda"), multi_node=True)


def test_apply_comm_env_keeps_user_values(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(comm, "_logged", set())
    environ = {"MCCL_CROSS_NIC": "0", "UNRELATED": "x"}
    applied = apply_comm_env(make_platform("maca", "MetaX C550"), environ, multi_node=True)
    assert environ["MCCL_CROSS_NIC"] == "0"
    assert "MCCL_CROSS_NIC" not in applied
    assert applied == {"TORCH_NCCL_AVOID_RECORD_STREAMS": "1", "MCCL_NET_GDR_LEVEL": "SYS"}
    assert all(environ[k] == v for k, v in applied.items())
    assert apply_comm_env(make_platform("maca", "MetaX C550"), environ, multi_node=True) == {}


def test_apply_comm_env_logs_once(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    monkeypatch.setattr(comm, "_logged", set())
    caplog.set_level("INFO", logger="sbtrain.maca_compat")
    for _ in range(3):
        apply_comm_env(make_platform("cuda"), {"TORCH_NCCL_AVOID_RECORD_STREAMS": "0"})
    assert len([r for r in caplog.records if "comm backend" in r.getMessage()]) == 1


def test_import_has_no_side_effects():
    code = (
        "import json, os, sys; before = dict(os.environ)\n"
        "import maca_compat; lazy_torch = 'torch' in sys.modules\n"
        "import maca_compat.platform, maca_compat.comm\n"
        "print(json.dumps({'env_changed': dict(os.environ) != before, 'lazy_torch': lazy_torch,\n"
        "  'megatron': sorted(m for m in sys.modules if m.split('.')[0] == 'megatron')}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"env_changed": False, "lazy_torch": False, "megatron": []}
