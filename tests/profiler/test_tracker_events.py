"""The step tracker on a device with timing events (issue 15, no host stalls in the step): one
device wait per step however many sections, section times read from the events (what the
device did, not what the host clock saw), and the summary reports them. The device is a fake
injected through the tracker's ``_device_module`` seam: a queue that runs behind the host."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
import torch

from sbtrain.profiler import tracker as tracker_module
from sbtrain.profiler.tracker import ThroughputTracker


class FakeDevice:
    """Kernels run in launch order, each starting when the device is free and the host has
    launched it; an event's time is when the device reaches it; ``synchronize`` makes the host
    wait for everything launched. Reading an event that has not happened raises, as CUDA's
    ``cudaErrorNotReady`` does."""

    def __init__(self) -> None:
        self.host = 100.0
        self.busy_until = 0.0
        self.syncs = 0
        self.created = 0
        self.recorded: list = []

    def clock(self) -> float:
        return self.host

    def launch(self, seconds: float) -> None:
        self.busy_until = max(self.busy_until, self.host) + seconds

    def synchronize(self) -> None:
        self.syncs += 1
        self.host = max(self.host, self.busy_until)
        for event in self.recorded:
            event.done = True
        self.recorded.clear()

    def module(self) -> SimpleNamespace:
        device = self

        class Event:
            def __init__(self, enable_timing: bool = False) -> None:
                assert enable_timing
                device.created += 1
                self.at, self.done = None, False

            def record(self) -> None:
                self.at, self.done = max(device.busy_until, device.host), False
                device.recorded.append(self)

            def elapsed_time(self, end: Event) -> float:
                if not (self.done and end.done):
                    raise RuntimeError("CUDA error: device not ready")
                return (end.at - self.at) * 1e3

        return SimpleNamespace(Event=Event, synchronize=self.synchronize,
                               max_memory_allocated=lambda: 2**30)


@pytest.fixture
def device(monkeypatch) -> FakeDevice:
    fake = FakeDevice()
    monkeypatch.setattr(tracker_module, "_device_module", lambda device_type: fake.module())
    return fake


def make_tracker(device: FakeDevice, device_type: str = "cuda") -> ThroughputTracker:
    return ThroughputTracker(flops_per_token=1.0, peak_flops_per_device=0.0, peak_source="",
                             num_devices=1, device_type=device_type, clock=device.clock)


def trainer_like_step(tracker: ThroughputTracker, device: FakeDevice, scale: float = 1.0):
    """The trainer's sections (sbtrain/trainer.py): data_wait (host, twice) and grad_reduce
    inside forward_backward, then optimizer. Launches take no host time; the data loader does."""
    tracker.start_step()
    with tracker.section("forward_backward"):
        for _ in range(2):  # two micro-batches
            with tracker.section("data_wait", parent="forward_backward", sync=False):
                device.host += 0.125
            device.launch(0.5 * scale)
        with tracker.section("grad_reduce", parent="forward_backward"):
            device.launch(0.25 * scale)
    with tracker.section("optimizer"):
        device.launch(0.0625 * scale)
    return tracker.end_step(tokens=1000)


def test_one_device_wait_per_step_and_sections_from_events(device):
    tracker = make_tracker(device)
    stats = [trainer_like_step(tracker, device, scale) for scale in (1.0, 1.0, 2.0)]
    assert device.syncs == 3  # the host path waited 2 x 3 sections + 2 = 8 times per step
    assert device.created == 6  # 3 event-timed sections x 2 events, reused by later steps
    # Step 1 on the device: idle for the first data wait (0.125 s), fwd/bwd 1.0 s (the second
    # data wait ran on the host while the device was busy), grad_reduce 0.25, optimizer 0.0625.
    first = stats[0]
    assert first.step_time_s == 0.125 + 1.0 + 0.25 + 0.0625
    # forward_backward: its events span 1.375 s, less what was charged to its two inner sections
    assert first.sections_s == {"data_wait": 0.25, "grad_reduce": 0.25,
                                "forward_backward": 1.375 - 0.25 - 0.25, "optimizer": 0.0625}
    assert list(first.sections_s) == ["data_wait", "grad_reduce", "forward_backward",
                                      "optimizer"]  # the host path's order (metrics.jsonl keys)
    assert sum(first.sections_s.values()) == first.step_time_s
    third = stats[2]
    assert third.sections_s["grad_reduce"] == 0.5 and third.sections_s["optimizer"] == 0.125
    assert third.step_time_s == 0.125 + 2 * 1.0 + 0.5 + 0.125


def test_summary_reports_the_event_times(device, tmp_path):
    tracker = make_tracker(device)
    for scale in (4.0, 1.0, 3.0):  # the first step is left out of the means
        trainer_like_step(tracker, device, scale)
    summary = tracker.write_summary(tmp_path / "profile.json")
    assert summary["sections_s"]["grad_reduce"] == {"mean": 0.5, "median": 0.5}
    assert summary["sections_s"]["optimizer"] == {"mean": 0.125, "median": 0.125}
    assert summary["sections_s"]["data_wait"] == {"mean": 0.25, "median": 0.25}
    written = json.loads((tmp_path / "profile.json").read_text())
    assert [s["sections_s"]["grad_reduce"] for s in written["history"]] == [1.0, 0.25, 0.75]
    assert written["peak_memory_bytes"] == 2**30


def test_without_events_the_host_waits_at_each_boundary(device, monkeypatch):
    """A device without timing events keeps the exact host timing (a wait at each boundary);
    CPU never uses events (torch.cpu.Event has no timing) and is timed on the host."""
    no_events = SimpleNamespace(synchronize=device.synchronize)
    monkeypatch.setattr(tracker_module, "_device_module", lambda device_type: no_events)
    tracker = make_tracker(device, device_type="xpu")
    first = trainer_like_step(tracker, device)
    assert device.syncs == 8
    assert first.sections_s["grad_reduce"] == 0.25 and first.step_time_s == 1.4375
    monkeypatch.setattr(tracker_module, "_device_module", lambda device_type: device.module())
    cpu = make_tracker(device, device_type="cpu")
    cpu._read_peak_memory = lambda: None  # noqa: SLF001 - psutil is not what this test is about
    trainer_like_step(cpu, device)
    assert device.created == 0 and device.syncs == 16


@pytest.mark.gpu
def test_cuda_events_time_the_device_with_one_wait_per_step(monkeypatch):
    """On the GPU: each section's time is its kernel's device time (a spin of known length,
    launched without waiting), with one torch.cuda.synchronize per step."""
    def busy():
        torch.cuda._sleep(50_000_000)  # tens of ms of device time, no host time

    torch.cuda.synchronize()
    start = time.perf_counter()
    busy()
    torch.cuda.synchronize()
    spin = time.perf_counter() - start
    waits = []
    real = torch.cuda.synchronize
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: (waits.append(1), real(*a))[1])
    tracker = ThroughputTracker(1.0, 0.0, "", 1, "cuda")
    for _ in range(3):
        tracker.start_step()
        with tracker.section("forward_backward"):
            busy()
            with tracker.section("grad_reduce", parent="forward_backward"):
                busy()
        with tracker.section("optimizer"):
            busy()
        stats = tracker.end_step(tokens=10)
    assert len(waits) == 3
    for name in ("forward_backward", "grad_reduce", "optimizer"):
        assert stats.sections_s[name] == pytest.approx(spin, rel=0.2), name
    assert stats.step_time_s == pytest.approx(3 * spin, rel=0.2)
