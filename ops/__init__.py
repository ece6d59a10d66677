"""sbtrain ops: per-op packages (``ops/<op>/``) dispatched through ``ops.backends``.

Importing ``ops`` loads only the registry (no kernels, no triton, no megatron) and
changes no environment; op packages register their backends when they are imported.
"""

from __future__ import annotations

from ops.backends import (
    DEFAULT_PRIORITY,
    DISABLE_DISPATCH_ENV,
    FORCE_ENV_PREFIX,
    Backend,
    BackendKind,
    OpRegistry,
    dispatch,
    get_registry,
    registries,
    tensor_verifier,
    triton_available,
)

__all__ = [
    "DEFAULT_PRIORITY",
    "DISABLE_DISPATCH_ENV",
    "FORCE_ENV_PREFIX",
    "Backend",
    "BackendKind",
    "OpRegistry",
    "dispatch",
    "get_registry",
    "registries",
    "tensor_verifier",
    "triton_available",
]
