from __future__ import annotations

import json

import pytest

from sbtrain.profiler.tracker import StepStats, ThroughputTracker, format_step


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_tracker(clock: FakeClock, peak: float = 1e13) -> ThroughputTracker:
    return ThroughputTracker(flops_per_token=1e9, peak_flops_per_device=peak,
                             peak_source="test table", num_devices=4, device_type="cpu",
                             clock=clock, sync=False)


def run_step(tracker: ThroughputTracker, clock: FakeClock, seconds: float, tokens: int,
             fb: float = 0.0) -> StepStats:
    tracker.start_step()
    with tracker.section("forward_backward"):
        clock.now += fb
    clock.now += seconds - fb
    return tracker.end_step(tokens)


def test_mfu_tgs_arithmetic():
    clock = FakeClock()
    tracker = make_tracker(clock)
    stats = run_step(tracker, clock, seconds=2.0, tokens=8000, fb=1.5)
    assert stats.step_time_s == pytest.approx(2.0)
    assert stats.tokens_per_s == pytest.approx(4000)
    assert stats.tgs == pytest.approx(1000)
    # 1e9 FLOP/token * 8000 tokens / 2 s / (1e13 * 4 devices)
    assert stats.mfu == pytest.approx(0.1)
    assert stats.sections_s == {"forward_backward": pytest.approx(1.5)}
    assert stats.peak_memory_bytes and stats.peak_memory_bytes > 0


def test_summary_skips_warmup_and_writes_json(tmp_path):
    clock = FakeClock()
    tracker = make_tracker(clock)
    for seconds in (10.0, 1.0, 2.0, 3.0):
        run_step(tracker, clock, seconds=seconds, tokens=4000, fb=seconds / 2)
    summary = tracker.summary()
    assert summary["steps"] == 4 and summary["steps_averaged"] == 3
    assert summary["total_tokens"] == 16000
    assert summary["step_time_s"] == {"mean": pytest.approx(2.0), "median": pytest.approx(2.0)}
    assert summary["sections_s"]["forward_backward"]["mean"] == pytest.approx(1.0)
    assert summary["mfu"]["median"] == pytest.approx(1e9 * 4000 / 2.0 / 4e13)
    assert summary["peak_memory_source"].startswith("psutil")
    path = tmp_path / "sub" / "profile.json"
    tracker.write_summary(path)
    data = json.loads(path.read_text())
    assert data["peak_source"] == "test table" and len(data["history"]) == 4


def test_format_step_line():
    stats = StepStats(step=5, step_time_s=1.0, tokens=12345, tokens_per_s=12345.0, tgs=3086.25,
                      mfu=0.123, peak_memory_bytes=int(1.2 * 1024**3))
    line = format_step(stats, total_steps=100, loss=4.12341, lr=3e-4, grad_norm=1.234,
                       elapsed_s=5.2, eta_s=3725)
    assert line == ("step 5/100 | loss 4.1234 | lr 3.0e-04 | gn 1.23 | 12,345 tok/s | TGS 3,086"
                    " | MFU 12.3% | 1.2 GiB | 0:05 eta 1:02:05")
    assert len(line) < 120


def test_step_line_elapsed_eta_and_peak_said_once():
    """The tracker's line carries elapsed time since the run's first step and the ETA at this
    run's pace; the peak and its source are in describe_peak, not on the line."""
    clock = FakeClock()
    tracker = make_tracker(clock)
    for _ in range(4):
        stats = run_step(tracker, clock, seconds=2.0, tokens=4000)
    line = tracker.format_step(stats, total_steps=10, loss=4.0, lr=1e-3, grad_norm=1.0)
    assert line.endswith("| 0:08 eta 0:12")  # 4 steps in 8 s, 6 to go
    assert "TFLOP" not in line and len(line) < 120
    assert tracker.describe_peak() == "MFU against 10 TFLOP/s per device x 4 (test table)"


def test_no_peak_gives_no_mfu():
    clock = FakeClock()
    tracker = make_tracker(clock, peak=0.0)
    stats = run_step(tracker, clock, seconds=1.0, tokens=10)
    assert stats.mfu is None
    assert "MFU n/a" in tracker.format_step(stats)


def test_end_without_start_raises():
    with pytest.raises(RuntimeError):
        make_tracker(FakeClock()).end_step(1)
