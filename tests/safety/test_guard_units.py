"""In-process checks of the run-safety pieces on a one-rank gloo group: stop requests
(signals, wall-clock limit), the loss-spike guard, the consecutive-skip limit, the run lock."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from sbtrain.safety import RunDirectoryLocked, RunLock, StepGuard, StopRequest

CPU = torch.device("cpu")


# every test here runs inside a one-rank gloo group (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_rank_group")


@pytest.mark.parametrize("sig", ["SIGUSR1", "SIGTERM"])
def test_signal_requests_a_stop_and_handlers_are_restored(sig):
    before = signal.getsignal(getattr(signal, sig))
    stop = StopRequest(["SIGTERM", "SIGUSR1"], 0)
    stop.install()
    assert not stop.pending()
    os.kill(os.getpid(), getattr(signal, sig))
    assert stop.pending() and stop.reason() == f"{sig} received"
    guard = StepGuard(5, 0, None, CPU)
    verdict = guard.check(0, 1.0, 1.0, stop)
    assert verdict.stop_reason == f"{sig} received" and not verdict.skip_reason
    stop.uninstall()
    assert signal.getsignal(getattr(signal, sig)) == before


def test_wall_clock_limit_requests_a_stop():
    stop = StopRequest([], exit_duration_minutes=0.5 / 60)
    assert not stop.pending()
    time.sleep(0.6)
    assert stop.pending() and "exit_duration_minutes" in stop.reason()


def test_loss_spike_and_consecutive_skips():
    guard = StepGuard(max_skipped_steps=2, loss_spike_factor=3.0, model=None, device=CPU)
    stop = StopRequest([], 0)
    for step in range(10):  # no history yet: even a jump is accepted while the loss settles
        assert not guard.check(step, 2.0 if step else 50.0, 0.0, stop).skip_reason
    assert guard.check(10, 5.9, 0.0, stop).skip_reason == ""       # below 3 x median 2.0
    reason = guard.check(11, 6.5, 0.0, stop).skip_reason
    assert reason.startswith("loss spike: 6.5 > 3 x running median")
    assert guard.consecutive == 1 and not guard.diverged
    assert guard.check(12, 2.1, 0.0, stop).skip_reason == "" and guard.consecutive == 0
    assert "non-finite loss on rank(s) [0]" in guard.check(13, math.nan, math.nan, stop).skip_reason
    assert "non-finite" in guard.check(14, math.inf, 1.0, stop).skip_reason
    assert guard.diverged and guard.total == 3


LOCK_HOLDER = """
import fcntl, sys, time
f = open(sys.argv[1], "a+"); fcntl.flock(f, fcntl.LOCK_EX); f.write("pid holder"); f.flush()
print("locked", flush=True); time.sleep(60)
"""


def test_run_lock_refuses_a_live_run_and_not_a_dead_one(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(run_dir / RunLock.NAME)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunDirectoryLocked, match=f"{run_dir} is in use by a live run"):
        RunLock([str(run_dir), ""]).acquire(CPU)
    holder.kill()  # a crashed run: the kernel drops its lock
    holder.wait()
    lock = RunLock([str(run_dir), str(tmp_path / "ckpt")])
    lock.acquire(CPU)
    assert (tmp_path / "ckpt" / RunLock.NAME).read_text().startswith(f"pid {os.getpid()}")
    lock.release()


def test_run_lock_reports_a_directory_it_cannot_write(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(RunDirectoryLocked, match=f"cannot write to {tmp_path / 'file'}/ckpt: "):
        RunLock([str(tmp_path / "run"), str(tmp_path / "file" / "ckpt")]).acquire(CPU)
