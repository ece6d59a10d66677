"""Building blocks for the CPU platform's shims of megatron-core (see ``patches.py``).

megatron-core 0.19.2 calls ``torch.cuda.*`` and allocates on ``device="cuda"`` in many places.
Rather than redirecting ``torch.cuda`` for the whole process, we rebind the module-global name
``torch`` *inside selected megatron modules* to ``CPU_TORCH``: an object that forwards every
attribute to the real ``torch`` except ``torch.cuda`` (a CPU stand-in) and tensor factories
(which map ``device="cuda"`` to the CPU). Code outside those modules sees the real torch.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch


class _NullStream:
    """A CUDA stream stand-in: on CPU all work is already ordered, so waits are no-ops."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, other: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> "_NullEvent":
        return event or _NullEvent()

    def synchronize(self) -> None:
        pass

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _NullStream)

    def __hash__(self) -> int:
        return 0


class _NullEvent:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


class _CpuGraphStub:
    """Has no ``register_generator_state``, which tells megatron no graph-safe RNG is possible."""


class CpuCudaNamespace:
    """What ``torch.cuda`` means inside a shimmed megatron module on the CPU platform."""

    Stream = _NullStream
    Event = _NullEvent
    CUDAGraph = _CpuGraphStub
    OutOfMemoryError = torch.OutOfMemoryError

    @staticmethod
    def is_available() -> bool:
        return False

    @staticmethod
    def current_device() -> str:
        return "cpu"

    @staticmethod
    def device_count() -> int:
        return 0

    @staticmethod
    def synchronize(device: Any = None) -> None:
        pass

    @staticmethod
    def empty_cache() -> None:
        pass

    @staticmethod
    def current_stream(device: Any = None) -> _NullStream:
        return _NullStream()

    default_stream = current_stream

    @staticmethod
    def stream(stream: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @staticmethod
    def is_current_stream_capturing() -> bool:
        return False

    # The "CUDA" RNG that megatron's tracker forks is the CPU default generator here: CPU
    # dropout and init draw from it, so forking it gives the same semantics as on a GPU.
    @staticmethod
    def get_rng_state(device: Any = None) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, device: Any = None) -> None:
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    @property
    def default_generators(self) -> tuple[torch.Generator, ...]:
        return (torch.default_generator,)

    @property
    def random(self) -> "CpuCudaNamespace":
        return self

    @staticmethod
    def memory_allocated(device: Any = None) -> int:
        return 0

    max_memory_allocated = memory_allocated

    @staticmethod
    def get_device_capability(device: Any = None) -> tuple[int, int]:
        return (0, 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


def _cpu_device(device: Any) -> Any:
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, int):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


def _device_mapped(factory: Any) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return factory(*args, **kwargs)

    call.__name__ = getattr(factory, "__name__", "factory")
    return call


_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "arange", "empty_like", "zeros_like", "ones_like",
    "full_like", "rand", "randn", "randint", "as_tensor", "linspace", "eye",
)


class _CpuDeviceFactory:
    """``torch.device("cuda", i)`` inside shimmed modules means the CPU."""

    def __call__(self, *args: Any, **kwargs: Any) -> torch.device:
        if args and isinstance(args[0], str) and args[0].startswith("cuda"):
            return torch.device("cpu")
        return torch.device(*args, **kwargs)

    def __instancecheck__(self, obj: object) -> bool:
        return isinstance(obj, torch.device)


class CpuTorch:
    """Stands in for the ``torch`` module inside a shimmed megatron module (see module doc)."""

    def __init__(self) -> None:
        self.cuda = CpuCudaNamespace()
        self.device = _CpuDeviceFactory()
        for name in _FACTORIES:
            setattr(self, name, _device_mapped(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


CPU_TORCH = CpuTorch()


@contextlib.contextmanager
def cpu_tensors_report_cuda_types():
    """While active, ``t.type()`` of a CPU tensor reads ``torch.cuda.<X>Tensor``.

    Megatron's optimizer classifies parameters by comparing ``param.type()`` with CUDA type
    names; a CPU fp32 parameter (``torch.FloatTensor``) is rejected though it is handled the
    same way. Scoped to the wrapped call only; ``t.type(dtype)`` conversions are untouched.
    """
    original = torch.Tensor.type

    def type_name(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any):
        if dtype is None and not kwargs and self.device.type == "cpu":
            return original(self).replace("torch.", "torch.cuda.", 1)
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_name
    try:
        yield
    finally:
        torch.Tensor.type = original


@contextlib.contextmanager
def cpu_tensor_cuda_is_identity():
    """While active, ``t.cuda()`` of a CPU tensor returns ``t`` (the collective runs on gloo).

    Scoped to the wrapped call: megatron's optimizer-state gather moves its send buffer to the
    GPU before an all-gather that, on the CPU platform, is a gloo collective on CPU tensors.
    """
    original = torch.Tensor.cuda

    def to_cuda(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self if self.device.type == "cpu" else original(self, *args, **kwargs)

    torch.Tensor.cuda = to_cuda
    try:
        yield
    finally:
        torch.Tensor.cuda = original
