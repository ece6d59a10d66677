"""Device seam for NVIDIA CUDA, MetaX MACA and CPU.

Importing this package is free of side effects and does not import torch or megatron:
the names below are loaded on first access (PEP 562), so ``import maca_compat.patches``
or ``maca_compat.cpu_shims`` does not drag the platform code in. Megatron patches and
comm tuning are applied only when the trainer calls them explicitly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from maca_compat.comm import apply_comm_env, comm_env_for
    from maca_compat.platform import (
        COMM_BACKENDS,
        PEAK_BF16_FLOPS,
        Platform,
        comm_backend_for,
        get_platform,
        lookup_peak_table,
        reset_platform_cache,
        resolve_peak_flops,
    )

_EXPORTS: dict[str, str] = {
    "Platform": "maca_compat.platform",
    "get_platform": "maca_compat.platform",
    "reset_platform_cache": "maca_compat.platform",
    "resolve_peak_flops": "maca_compat.platform",
    "lookup_peak_table": "maca_compat.platform",
    "PEAK_BF16_FLOPS": "maca_compat.platform",
    "COMM_BACKENDS": "maca_compat.platform",
    "comm_backend_for": "maca_compat.platform",
    "comm_env_for": "maca_compat.comm",
    "apply_comm_env": "maca_compat.comm",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the defining submodule on first access of an exported name."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'maca_compat' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
