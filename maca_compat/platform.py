"""Which accelerator this process runs on, detected lazily and without side effects.

MetaX's mcPyTorch keeps the ``cuda`` device type (``torch.cuda.is_available()`` is True
and tensors live on ``cuda:N``), so MACA differs from CUDA in which kernels, collectives
and Triton configs to use, not in device strings. Library code should take the device
module and device from :func:`get_platform` instead of hard-coding ``torch.cuda``.

Environment variables (read when :func:`get_platform` first runs, never at import):
    SB_PLATFORM: ``maca`` | ``cuda`` | ``cpu`` overrides detection.
    SB_PEAK_FLOPS: dense bf16 peak per device in FLOP/s; overrides the table below.
    SB_ADAM_IMPL: ``fused`` | ``foreach`` | ``for_loop`` overrides :func:`adam_impl_for`.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Literal, get_args

import torch

from maca_compat.patches import applied_patches

# The name ``torch.distributed.init_process_group`` receives. MetaX's mcPyTorch keeps the
# ``nccl`` name and routes it to MCCL, so CUDA and MACA share it.
COMM_BACKENDS: dict[str, str] = {"cuda": "nccl", "maca": "nccl", "cpu": "gloo"}
"""torch.distributed backend per platform vendor."""


def comm_backend_for(vendor: str) -> str:
    """Return the ``torch.distributed`` backend name for a platform vendor."""
    try:
        return COMM_BACKENDS[vendor]
    except KeyError:
        raise ValueError(f"unknown platform vendor {vendor!r}; known: {sorted(COMM_BACKENDS)}") from None


Vendor = Literal["cuda", "maca", "cpu"]
VENDORS: tuple[str, ...] = get_args(Vendor)

PLATFORM_ENV = "SB_PLATFORM"
PEAK_FLOPS_ENV = "SB_PEAK_FLOPS"
ADAM_IMPL_ENV = "SB_ADAM_IMPL"
ADAM_IMPLS = ("fused", "foreach", "for_loop")
# CUDA: torch's one-kernel fused AdamW. MACA: foreach (multi-tensor kernels that mcPyTorch
# runs; its fused Adam is unverified). CPU: the per-tensor loop torch picks by default, so
# results stay bit-identical to earlier runs and checkpoints.
_ADAM_IMPL_BY_VENDOR = {"cuda": "fused", "maca": "foreach", "cpu": "for_loop"}

# Dense (no 2:4 sparsity) bf16 tensor-core peak per device, keyed by a case-insensitive
# substring of the device name. The first match wins, so specific names precede generic.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    # Inferred placeholder, not a MetaX spec: the SpikingBrain report gives 7B MFU 23.4%
    # at 1558 tok/s/GPU, i.e. about 71 TFLOP/s achieved and an implied peak of 240-300
    # TFLOP/s. Set profiler.peak_flops or SB_PEAK_FLOPS once the real number is known.
    ("C550", 280e12),
)
_PLACEHOLDER_KEYS = frozenset({"C550"})

CPU_NOMINAL_PEAK_FLOPS = 1e12
"""A round constant, not a measurement: MFU printed on CPU is only a smoke-test number."""

UNKNOWN_DEVICE_SOURCE = "unknown device: set profiler.peak_flops"


@dataclass(frozen=True)
class Platform:
    """The accelerator platform of this process.

    Attributes:
        vendor: ``cuda`` (NVIDIA), ``maca`` (MetaX mcPyTorch) or ``cpu``.
        device_type: the torch device type; ``cuda`` on both NVIDIA and MetaX.
        comm_backend: ``torch.distributed`` backend name (``nccl`` maps to MCCL on MACA).
        device_name: name of device 0, or ``"none"`` when no device is visible.
        device_count: visible devices (0 on CPU).
        peak_bf16_flops: dense bf16 peak per device in FLOP/s from env or table; 0 if unknown.
        peak_source: where ``peak_bf16_flops`` came from, for logs.
        warp_size: threads per warp (64 on MetaX, 32 on NVIDIA).
    """

    vendor: Vendor
    device_type: str
    comm_backend: str
    device_name: str
    device_count: int
    peak_bf16_flops: float
    peak_source: str
    warp_size: int

    @property
    def device_module(self) -> ModuleType:
        """``torch.cuda`` on CUDA and MACA, ``torch.cpu`` on CPU."""
        return getattr(torch, self.device_type)

    @property
    def is_gpu(self) -> bool:
        """True on CUDA and MACA."""
        return self.vendor != "cpu"

    def device(self, local_rank: int = 0) -> torch.device:
        """The device a process with ``local_rank`` should use (always ``cpu`` on CPU)."""
        if local_rank < 0:
            raise ValueError(f"local_rank must be >= 0, got {local_rank}")
        if not self.is_gpu:
            return torch.device("cpu")
        return torch.device(self.device_type, local_rank)


@functools.cache
def get_platform() -> Platform:
    """Detect the platform once per process (see module docstring for the overrides).

    On a GPU this reads device 0's name, which creates a CUDA context: call it after
    ``CUDA_VISIBLE_DEVICES`` is final and worker processes are spawned, not at import.
    """
    vendor = _detect_vendor()
    count, name = _device_info(vendor)
    peak, source = _env_or_table_peak(vendor, name)
    return Platform(
        vendor=vendor,
        device_type="cpu" if vendor == "cpu" else "cuda",
        comm_backend=comm_backend_for(vendor),
        device_name=name,
        device_count=count,
        peak_bf16_flops=peak,
        peak_source=source,
        warp_size=64 if vendor == "maca" else 32,
    )


def adam_impl_for(platform: Platform) -> str:
    """Which torch Adam implementation the optimizer runs: SB_ADAM_IMPL, else by vendor."""
    raw = os.environ.get(ADAM_IMPL_ENV, "").strip().lower()
    if raw and raw not in ADAM_IMPLS:
        raise ValueError(f"{ADAM_IMPL_ENV}={raw!r} is invalid; allowed values: {', '.join(ADAM_IMPLS)}")
    return raw or _ADAM_IMPL_BY_VENDOR[platform.vendor]


def grad_accum_fusion_for(platform: Platform) -> bool:
    """Whether linear layers accumulate weight gradients straight into fp32 ``main_grad``.

    Only on CUDA, where torch has a bf16 x bf16 -> fp32 GEMM (see maca_compat.fused_optim):
    elsewhere the fused path would upcast whole activations to fp32, slower than the stock
    bf16 gradient plus an add.
    """
    return platform.vendor == "cuda"


def grad_accum_fusion_enabled(platform: Platform) -> bool:
    """:func:`grad_accum_fusion_for` and the ``grad_accum_fusion`` shim applied (maca_compat.setup),
    without which megatron's linear layers refuse the fusion. The fused backward reads
    ``weight.main_grad``: models built with it train under megatron DDP only."""
    return grad_accum_fusion_for(platform) and "grad_accum_fusion" in applied_patches()


def reset_platform_cache() -> None:
    """Forget the detected platform so the next :func:`get_platform` re-detects (tests)."""
    get_platform.cache_clear()


def resolve_peak_flops(platform: Platform, override: float = 0.0) -> tuple[float, str]:
    """Return ``(peak FLOP/s per device, source)`` with precedence config > env > table.

    Args:
        platform: the detected platform (vendor and device name select the table row).
        override: ``profiler.peak_flops`` from the run config; 0 means not set.

    Returns:
        The peak and a human-readable source such as ``"config"``, ``"env SB_PEAK_FLOPS"``,
        ``"table: H100"``; ``(0.0, "unknown device: ...")`` for an unlisted GPU.
    """
    if override < 0:
        raise ValueError(f"profiler.peak_flops must be >= 0, got {override}")
    if override > 0:
        return float(override), "config"
    return _env_or_table_peak(platform.vendor, platform.device_name)


def lookup_peak_table(device_name: str) -> tuple[float, str] | None:
    """Return ``(peak, "table: KEY")`` for the first table key found in ``device_name``."""
    lowered = device_name.lower()
    for key, peak in PEAK_BF16_FLOPS:
        if key.lower() in lowered:
            note = " (inferred placeholder)" if key in _PLACEHOLDER_KEYS else ""
            return peak, f"table: {key}{note}"
    return None


def _env_or_table_peak(vendor: str, device_name: str) -> tuple[float, str]:
    """Peak from SB_PEAK_FLOPS, else the CPU nominal value or the device table."""
    env_peak = _read_peak_env()
    if env_peak is not None:
        return env_peak, f"env {PEAK_FLOPS_ENV}"
    if vendor == "cpu":
        return CPU_NOMINAL_PEAK_FLOPS, "CPU nominal (not measured; MFU on CPU is not meaningful)"
    return lookup_peak_table(device_name) or (0.0, UNKNOWN_DEVICE_SOURCE)


def _read_peak_env() -> float | None:
    """Parse SB_PEAK_FLOPS; None when unset or empty."""
    raw = os.environ.get(PEAK_FLOPS_ENV, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{PEAK_FLOPS_ENV}={raw!r} is not a number (FLOP/s, e.g. 2.8e14)") from None
    if value <= 0:
        raise ValueError(f"{PEAK_FLOPS_ENV}={raw!r} must be > 0")
    return value


def _detect_vendor() -> Vendor:
    """SB_PLATFORM if set, else MACA/CUDA/CPU from what torch reports."""
    raw = os.environ.get(PLATFORM_ENV, "").strip().lower()
    if raw:
        if raw not in VENDORS:
            raise ValueError(f"{PLATFORM_ENV}={raw!r} is invalid; allowed values: {', '.join(VENDORS)}")
        return raw  # type: ignore[return-value]
    if not torch.cuda.is_available():
        return "cpu"
    return "maca" if _looks_like_maca() else "cuda"


def _looks_like_maca() -> bool:
    """mcPyTorch marks itself in the version string, ``torch.version`` or the device name."""
    version = torch.__version__.lower()
    if "metax" in version or "maca" in version or hasattr(torch.version, "maca"):
        return True
    return "metax" in torch.cuda.get_device_name(0).lower()


def _device_info(vendor: str) -> tuple[int, str]:
    """(visible device count, name of device 0); ``(0, "none")`` without a device."""
    if vendor == "cpu" or not torch.cuda.is_available():
        return 0, "none"
    count = torch.cuda.device_count()
    return count, (torch.cuda.get_device_name(0) if count else "none")
