"""Step timing, tokens/s, TGS, MFU and peak memory for the training loop.

MFU = flops_per_token * tokens / step_time / (peak_flops_per_device * num_devices), where
``tokens`` are the tokens of the whole step over all devices and ``flops_per_token`` the
training model FLOPs of ``sbtrain.profiler.flops``. TGS = tokens / num_devices / step_time.

The device is named by ``device_type`` (``cuda``, ``cpu``, ...) and its torch module is
looked up lazily with ``getattr(torch, device_type)``, so importing this module touches no
device (and not even torch).

No host stalls inside a step: on a device with timing events (CUDA, and MetaX through the same
``torch.cuda`` API) a section records an event at each boundary instead of waiting for the
device, and ``end_step`` waits once, then reads the sections from the events. A wait at every
boundary drained the queue and left the device idle while the host launched the next section
(7 waits per step). On CPU (and devices without events) sections are timed on the host.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

GIB = 1024**3
_UNRESOLVED = object()


@dataclass
class StepStats:
    """What one training step cost."""

    step: int
    step_time_s: float
    tokens: int
    tokens_per_s: float
    tgs: float
    """Tokens per device per second."""
    mfu: float | None
    """Model FLOPs utilisation as a fraction (None when no peak is known)."""
    peak_memory_bytes: int | None
    sections_s: dict[str, float] = field(default_factory=dict)

    @property
    def peak_memory_gib(self) -> float | None:
        return None if self.peak_memory_bytes is None else self.peak_memory_bytes / GIB


def _device_module(device_type: str):
    import torch  # lazily: keep `import sbtrain.profiler` cheap and device-free

    return getattr(torch, device_type, None)


class ThroughputTracker:
    """Time steps (and named sections inside them) and turn them into throughput numbers.

    ``clock`` is injectable for tests; ``sync`` waits for the device at the end of each step
    (once), so asynchronous kernels are charged to the step that launched them, and times the
    sections with device events. ``sync=False``: host clock only, no device calls.
    """

    def __init__(self, flops_per_token: float, peak_flops_per_device: float, peak_source: str,
                 num_devices: int, device_type: str, clock: Callable[[], float] = time.perf_counter,
                 sync: bool = True) -> None:
        if num_devices < 1:
            raise ValueError(f"num_devices must be >= 1, got {num_devices}")
        self.flops_per_token = flops_per_token
        self.peak_flops_per_device = peak_flops_per_device
        self.peak_source = peak_source
        self.num_devices = num_devices
        self.device_type = device_type
        self._clock = clock
        self._sync = sync
        self._step_start: float | None = None
        self._sections: dict[str, float] = {}
        self._nested: dict[str, float] = {}
        self._pending: list[tuple[str, str | None, object, object]] = []
        """This step's event-timed sections (name, parent, start, end), read at end_step."""
        self._spare_events: list = []
        """Events whose times were read, recorded again by later sections."""
        self._event_class = _UNRESOLVED
        self._peak_memory: int | None = None
        self._run_start: float | None = None
        """When this run's first step started (elapsed time and ETA)."""
        self.history: list[StepStats] = []

    def start_step(self) -> None:
        if self._events() is None:
            self._synchronize()  # host timing: the previous step's work must not count here
        self._sections, self._nested, self._pending = {}, {}, []
        self._step_start = self._clock()
        if self._run_start is None:
            self._run_start = self._step_start

    @contextlib.contextmanager
    def section(self, name: str, parent: str | None = None, sync: bool = True) -> Iterator[None]:
        """Time a named part of the current step; repeated sections add up. A section inside
        ``parent`` is taken out of the parent's time, so the sections do not overlap (e.g.
        data_wait and grad_reduce happen inside the schedule's forward_backward). ``sync=True``
        charges the device's time (events read at end_step; without events: waits for the
        device at both ends); ``sync=False`` reads the host clock (host-side work such as data
        loading)."""
        if sync and self._events() is not None:
            start = self._recorded_event()
            try:
                yield
            finally:
                self._pending.append((name, parent, start, self._recorded_event()))
                self._sections.setdefault(name, 0.0)  # keeps the sections' order of the host path
            return
        if sync:
            self._synchronize()
        start = self._clock()
        try:
            yield
        finally:
            if sync:
                self._synchronize()
            self.add_time(name, self._clock() - start, parent)

    def add_time(self, name: str, seconds: float, parent: str | None = None) -> None:
        """Charge ``seconds`` to section ``name`` of the current step (see ``section``)."""
        self._sections[name] = self._sections.get(name, 0.0) + seconds
        if parent is not None:
            self._nested[parent] = self._nested.get(parent, 0.0) + seconds

    def add_after_step(self, name: str, seconds: float) -> None:
        """Charge work done between steps (e.g. the time a checkpoint save blocked training)
        to the last finished step's sections; its step time and throughput stay as they were."""
        if self.history:
            sections = self.history[-1].sections_s
            sections[name] = sections.get(name, 0.0) + seconds

    def end_step(self, tokens: int) -> StepStats:
        """Close the step; ``tokens`` = tokens processed by the step over all devices."""
        if self._step_start is None:
            raise RuntimeError("end_step() without start_step()")
        self._synchronize()  # the step's one wait: its wall time needs the device finished
        elapsed = max(self._clock() - self._step_start, 1e-12)
        self._step_start = None
        self._read_events()
        peak = self._read_peak_memory()
        for parent, inner in self._nested.items():
            if parent in self._sections:
                self._sections[parent] = max(self._sections[parent] - inner, 0.0)
        stats = StepStats(
            step=len(self.history) + 1,
            step_time_s=elapsed,
            tokens=tokens,
            tokens_per_s=tokens / elapsed,
            tgs=tokens / self.num_devices / elapsed,
            mfu=self._mfu(tokens, elapsed),
            peak_memory_bytes=peak,
            sections_s=dict(self._sections),
        )
        self.history.append(stats)
        return stats

    def _mfu(self, tokens: int, elapsed: float) -> float | None:
        if self.peak_flops_per_device <= 0:
            return None
        achieved = self.flops_per_token * tokens / elapsed
        return achieved / (self.peak_flops_per_device * self.num_devices)

    @property
    def memory_source(self) -> str:
        if self.device_type == "cpu":
            return "psutil RSS (max sampled at step ends)"
        return f"torch.{self.device_type}.max_memory_allocated"

    def _read_peak_memory(self) -> int | None:
        """Peak bytes so far: the device allocator's peak, or on CPU the largest sampled RSS."""
        if self.device_type == "cpu":
            # deferred: psutil is optional (host memory in the throughput log)
            import psutil

            current = psutil.Process().memory_info().rss
        else:
            module = _device_module(self.device_type)
            reader = getattr(module, "max_memory_allocated", None)
            current = int(reader()) if reader is not None else None
        if current is not None:
            self._peak_memory = max(self._peak_memory or 0, current)
        return self._peak_memory

    def _events(self):
        """The device's timing-event class, or None: CPU, ``sync=False``, no events."""
        if self._event_class is _UNRESOLVED:
            module = None if not self._sync or self.device_type == "cpu" else (
                _device_module(self.device_type))
            self._event_class = getattr(module, "Event", None)
        return self._event_class

    def _recorded_event(self):
        event = (self._spare_events.pop() if self._spare_events
                 else self._events()(enable_timing=True))
        event.record()
        return event

    def _read_events(self) -> None:
        """Charge the step's event-timed sections (after end_step's wait: all have happened)."""
        for name, parent, start, end in self._pending:
            self.add_time(name, start.elapsed_time(end) / 1e3, parent)  # ms -> s
            self._spare_events += (start, end)
        self._pending = []

    def _synchronize(self) -> None:
        if not self._sync:
            return
        module = _device_module(self.device_type)
        sync = getattr(module, "synchronize", None)
        if sync is not None:
            sync()

    def summary(self) -> dict:
        """Mean/median of per-step numbers, leaving out the first (warm-up) step if there are more."""
        steps = self.history[1:] if len(self.history) > 1 else self.history
        section_names = sorted({name for s in steps for name in s.sections_s})
        return {
            "steps": len(self.history),
            "steps_averaged": len(steps),
            "warmup_steps_excluded": len(self.history) - len(steps),
            "total_tokens": sum(s.tokens for s in self.history),
            "total_time_s": sum(s.step_time_s for s in self.history),
            "step_time_s": _stats([s.step_time_s for s in steps]),
            "tokens_per_s": _stats([s.tokens_per_s for s in steps]),
            "tgs": _stats([s.tgs for s in steps]),
            "mfu": _stats([s.mfu for s in steps if s.mfu is not None]),
            "sections_s": {n: _stats([s.sections_s.get(n, 0.0) for s in steps])
                           for n in section_names},
            "peak_memory_bytes": self._peak_memory,
            "peak_memory_gib": None if self._peak_memory is None else self._peak_memory / GIB,
            "peak_memory_source": self.memory_source,
            "flops_per_token": self.flops_per_token,
            "peak_flops_per_device": self.peak_flops_per_device,
            "peak_source": self.peak_source,
            "num_devices": self.num_devices,
            "device_type": self.device_type,
        }

    def write_summary(self, path: str | Path) -> dict:
        """Write ``summary()`` (plus every step) as JSON to ``path``; returns the summary."""
        data = self.summary()
        data["history"] = [asdict(s) for s in self.history]
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=2) + "\n")
        return data

    def format_step(self, stats: StepStats, *, total_steps: int | None = None,
                    loss: float | None = None, lr: float | None = None,
                    grad_norm: float | None = None) -> str:
        """The step line with elapsed time since this run's first step and the ETA to
        ``total_steps`` at the pace of this run so far (the peak's source: ``describe_peak``)."""
        elapsed = eta = None
        if self._run_start is not None and self.history:
            elapsed = self._clock() - self._run_start
            if total_steps:
                eta = elapsed / len(self.history) * max(total_steps - stats.step, 0)
        return format_step(stats, total_steps=total_steps, loss=loss, lr=lr, grad_norm=grad_norm,
                           elapsed_s=elapsed, eta_s=eta)

    def describe_peak(self) -> str:
        """What MFU is measured against, said once at the start rather than on every line."""
        if self.peak_flops_per_device <= 0:
            return "MFU: no peak FLOP/s known (set profiler.peak_flops or SB_PEAK_FLOPS)"
        tflops = self.peak_flops_per_device / 1e12
        # Small (CPU) peaks would print as "0" with no decimals.
        shown = f"{tflops:,.0f}" if tflops >= 100 else f"{tflops:.3g}"
        return (f"MFU against {shown} TFLOP/s per device x {self.num_devices} "
                f"({self.peak_source})")


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "median": None}
    return {"mean": statistics.fmean(values), "median": statistics.median(values)}


def format_step(stats: StepStats, *, total_steps: int | None = None, loss: float | None = None,
                lr: float | None = None, grad_norm: float | None = None,
                elapsed_s: float | None = None, eta_s: float | None = None) -> str:
    """One progress line under ~120 characters, e.g. ``step 5/100 | loss 4.1234 | lr 3.0e-04 |
    gn 1.23 | 12,345 tok/s | TGS 3,086 | MFU 12.3% | 1.2 GiB | 0:05 eta 1:35``.
    Fields given as None are left out (MFU shows ``n/a`` without a peak)."""
    step = f"step {stats.step}" + (f"/{total_steps}" if total_steps else "")
    parts = [step]
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if lr is not None:
        parts.append(f"lr {lr:.1e}")
    if grad_norm is not None:
        parts.append(f"gn {grad_norm:.2f}")
    parts += [f"{stats.tokens_per_s:,.0f} tok/s", f"TGS {stats.tgs:,.0f}"]
    parts.append("MFU n/a" if stats.mfu is None else f"MFU {100 * stats.mfu:.1f}%")
    if stats.peak_memory_gib is not None:
        parts.append(f"{stats.peak_memory_gib:.1f} GiB")
    if elapsed_s is not None:
        parts.append(format_duration(elapsed_s)
                     + (f" eta {format_duration(eta_s)}" if eta_s is not None else ""))
    return " | ".join(parts)


def format_duration(seconds: float) -> str:
    """``m:ss`` under an hour, ``h:mm:ss`` above."""
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
