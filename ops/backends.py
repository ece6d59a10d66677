"""Per-op backend registry: every fast kernel stands next to its torch reference.

An :class:`OpRegistry` holds the implementations of one op. On each call it picks the
highest-priority backend that is available on this machine and whose verifier accepts
the arguments (device, dtype, shape); the torch reference is the last resort and must
be registered. The choice and its reason are logged once per (op, backend, reason) on
the ``sbtrain.ops`` logger.

Environment switches (read per call, so tests can flip them with monkeypatch):
    SB_DISABLE_BACKEND_DISPATCH=1: always use the torch reference.
    SB_OP_BACKEND_<OP>=<name>: force one backend for op ``<OP>`` (upper-cased, non
    alphanumerics as ``_``); an unknown, unavailable or rejecting backend is an error.

Backend kinds: ``triton`` (our kernels), ``vendor`` (fla-core, MetaX libraries) and
``torch`` (the reference).

Platforms: a backend that names ``platforms`` runs on a GPU platform only if the process's
vendor (``maca_compat.platform.get_platform().vendor``, ``SB_PLATFORM`` overrides it) is one of
them; on platform ``cpu`` its verifier's device check decides.
A library kernel MetaX lacks is marked ``platforms=("cuda",)``, so ``SB_PLATFORM=maca`` on an
NVIDIA GPU runs exactly the Triton and torch paths a MetaX GPU would.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import torch

from maca_compat.platform import get_platform
from ops.autotune_pin import install_autotune_pin

logger = logging.getLogger("sbtrain.ops")

BackendKind = Literal["triton", "vendor", "torch"]
Check = tuple[bool, str]

DISABLE_DISPATCH_ENV = "SB_DISABLE_BACKEND_DISPATCH"
FORCE_ENV_PREFIX = "SB_OP_BACKEND_"

# Used when a backend does not state its priority. A vendor library is preferred over
# our own Triton kernel only by default; a backend can state any priority it needs.
DEFAULT_PRIORITY: dict[str, int] = {"vendor": 20, "triton": 10, "torch": 0}
_TRUE = frozenset({"1", "true", "yes", "on"})


@dataclass
class Backend:
    """One implementation of an op.

    Attributes:
        name: unique within the op, used by ``SB_OP_BACKEND_<OP>`` and in logs.
        fn: the implementation; called with the op's arguments unchanged.
        kind: ``triton``, ``vendor`` or ``torch`` (the reference).
        priority: higher wins; defaults by kind (see ``DEFAULT_PRIORITY``).
        available: ``() -> (ok, reason)``; evaluated once and cached. None: always available.
        verifier: ``(*args, **kwargs) -> (ok, reason)`` rejecting calls this backend
            cannot serve. None: accepts every call.
        platforms: GPU platform vendors (``cuda``, ``maca``) this backend runs on; None: all.

    Subclasses may override :meth:`is_available` and :meth:`verify` instead.
    """

    name: str
    fn: Callable[..., Any]
    kind: BackendKind = "triton"
    priority: int | None = None
    available: Callable[[], Check] | None = None
    verifier: Callable[..., Check] | None = None
    platforms: tuple[str, ...] | None = None
    _availability: Check | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in DEFAULT_PRIORITY:
            raise ValueError(f"backend {self.name!r}: kind must be one of {sorted(DEFAULT_PRIORITY)}")
        if self.priority is None:
            self.priority = DEFAULT_PRIORITY[self.kind]

    def is_available(self) -> Check:
        """Whether this backend can run in this process, with the reason if not (cached)."""
        if self._availability is None:
            self._availability = self._platform_check()
            if self._availability[0] and self.available is not None:
                self._availability = self.available()
        return self._availability

    def _platform_check(self) -> Check:
        if self.platforms is None:
            return True, "available"
        vendor = get_platform().vendor
        # on platform cpu (the test suite's setting, also when it drives a GPU) the verifiers'
        # device checks decide
        if vendor != "cpu" and vendor not in self.platforms:
            return False, f"runs on {'/'.join(self.platforms)}, not on platform {vendor}"
        return True, "available"

    def verify(self, *args: Any, **kwargs: Any) -> Check:
        """Whether this backend accepts this particular call."""
        return (True, "accepted") if self.verifier is None else self.verifier(*args, **kwargs)


class OpRegistry:
    """The backends of one op, with dispatch (see module docstring)."""

    def __init__(self, op_name: str) -> None:
        self.op_name = op_name
        self.force_env = FORCE_ENV_PREFIX + re.sub(r"[^A-Z0-9]", "_", op_name.upper())
        self._backends: dict[str, Backend] = {}
        self._reference: Backend | None = None
        self._logged: set[tuple[str, str]] = set()

    def __repr__(self) -> str:
        return f"OpRegistry({self.op_name!r}, backends={list(self._backends)})"

    @property
    def backends(self) -> list[Backend]:
        """Non-reference backends, highest priority first, then the reference."""
        ranked = sorted((b for b in self._backends.values() if b is not self._reference),
                        key=lambda b: -b.priority)  # type: ignore[operator]
        return ranked + ([self._reference] if self._reference else [])

    @property
    def reference(self) -> Backend:
        """The torch reference backend."""
        if self._reference is None:
            raise RuntimeError(f"op {self.op_name!r} has no torch reference backend registered")
        return self._reference

    def register(self, backend: Backend) -> Backend:
        """Add ``backend``; names are unique and there is exactly one ``torch`` reference."""
        if backend.name in self._backends:
            raise ValueError(f"op {self.op_name!r} already has a backend named {backend.name!r}")
        if backend.kind == "torch":
            if self._reference is not None:
                raise ValueError(f"op {self.op_name!r} already has reference {self._reference.name!r}")
            self._reference = backend
        self._backends[backend.name] = backend
        self._check_reference_is_lowest()
        return backend

    def select(self, *args: Any, **kwargs: Any) -> Backend:
        """Return the backend that would run this call (and log the choice once)."""
        reference = self.reference
        if os.environ.get(DISABLE_DISPATCH_ENV, "").strip().lower() in _TRUE:
            return self._chosen(reference, f"{DISABLE_DISPATCH_ENV} is set")
        forced = os.environ.get(self.force_env, "").strip()
        if forced:
            return self._chosen(self._forced(forced, args, kwargs), f"forced by {self.force_env}")
        skipped: list[str] = []
        for backend in self.backends:
            if backend is reference:
                break
            ok, reason = backend.is_available()
            if ok:
                ok, reason = backend.verify(*args, **kwargs)
            if ok:
                return self._chosen(backend, "highest-priority backend available and accepting the call")
            skipped.append(f"{backend.name}: {reason}")
        why = "fallback to reference" + (f" ({'; '.join(skipped)})" if skipped else "")
        return self._chosen(reference, why)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the op on the selected backend."""
        return self.select(*args, **kwargs).fn(*args, **kwargs)

    def _forced(self, name: str, args: tuple, kwargs: dict) -> Backend:
        """The backend named by the force variable; errors name that variable."""
        backend = self._backends.get(name)
        if backend is None:
            raise ValueError(f"{self.force_env}={name!r}: unknown backend for op {self.op_name!r}; "
                             f"registered: {sorted(self._backends)}")
        for check in (backend.is_available, functools.partial(backend.verify, *args, **kwargs)):
            ok, reason = check()
            if not ok:
                raise RuntimeError(f"{self.force_env}={name!r} cannot run op {self.op_name!r}: {reason}")
        return backend

    def _chosen(self, backend: Backend, reason: str) -> Backend:
        """Log ``backend`` and ``reason`` the first time this pair is seen for this op."""
        key = (backend.name, reason)
        if key not in self._logged:
            self._logged.add(key)
            logger.info("op %s -> backend %s (%s): %s", self.op_name, backend.name, backend.kind, reason)
        return backend

    def _check_reference_is_lowest(self) -> None:
        """The reference is the last resort, so its priority must be strictly the lowest."""
        if self._reference is None:
            return
        for b in self._backends.values():
            if b is not self._reference and b.priority <= self._reference.priority:  # type: ignore[operator]
                raise ValueError(f"op {self.op_name!r}: backend {b.name!r} priority {b.priority} must be "
                                 f"above the reference's {self._reference.priority}")


_REGISTRIES: dict[str, OpRegistry] = {}


def get_registry(op_name: str) -> OpRegistry:
    """The registry of ``op_name``, created empty on first use."""
    if op_name not in _REGISTRIES:
        _REGISTRIES[op_name] = OpRegistry(op_name)
    return _REGISTRIES[op_name]


def registries() -> Mapping[str, OpRegistry]:
    """Read-only view of every op registry created so far."""
    return MappingProxyType(_REGISTRIES)


def dispatch(op_name: str, *, reference_name: str = "torch") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate an op's torch reference: register it and return the dispatching entry point.

    ``@dispatch("spike_encode") def spike_encode(x, ...)`` keeps the reference's name and
    docstring; faster backends are added with ``get_registry("spike_encode").register``.
    """

    def wrap(reference: Callable[..., Any]) -> Callable[..., Any]:
        registry = get_registry(op_name)
        registry.register(Backend(name=reference_name, fn=reference, kind="torch"))

        @functools.wraps(reference)
        def entry(*args: Any, **kwargs: Any) -> Any:
            return registry(*args, **kwargs)

        entry.registry = registry  # type: ignore[attr-defined]
        return entry

    return wrap


@functools.cache
def _triton_importable() -> Check:
    """Whether triton is installed (find_spec avoids importing it)."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    return True, "triton importable"


def triton_available(device: torch.device | torch.Tensor | str) -> Check:
    """Whether Triton kernels can run on ``device`` (or a tensor's device).

    MetaX keeps the ``cuda`` device type, so one check covers CUDA and MACA GPUs.
    """
    device = device.device if isinstance(device, torch.Tensor) else torch.device(device)
    if device.type != "cuda":
        return False, f"triton kernels need a GPU (got device {device.type!r})"
    ok, reason = _triton_importable()
    if ok:
        install_autotune_pin()  # a no-op unless SB_TRITON_PIN=1 (test runs)
    return ok, reason


def tensor_verifier(
    *, device_types: tuple[str, ...] = ("cuda",), dtypes: tuple[torch.dtype, ...] | None = None
) -> Callable[..., Check]:
    """Build a verifier that checks the device type and dtype of every tensor argument."""

    def verify(*args: Any, **kwargs: Any) -> Check:
        for t in (*args, *kwargs.values()):
            if not isinstance(t, torch.Tensor):
                continue
            if t.device.type not in device_types:
                return False, f"input device {t.device.type!r} not in {device_types}"
            if dtypes is not None and t.dtype not in dtypes:
                return False, f"input dtype {t.dtype} not in {tuple(str(d) for d in dtypes)}"
        return True, "accepted"

    return verify
