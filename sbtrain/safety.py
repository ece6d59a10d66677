"""Run safety for the training loop: the non-finite / loss-spike step guard, stop requests
(signals, wall-clock limit) and the run-directory lock. See docs/training.md, "Run safety".

Every decision that changes what a rank does next is agreed across all ranks in one small
all-reduce per step (``StepGuard.check``), so no rank steps, stops or saves alone.
"""

from __future__ import annotations

import dataclasses
import fcntl
import math
import os
import signal
import statistics
import time
from collections import deque
from pathlib import Path

import torch
import torch.distributed as dist

from sbtrain.errors import KnownCause

# Process exit codes (documented in docs/training.md): 0 also after a signal or time-limit stop.
EXIT_ERROR = 1
"""A known cause, reported as one ``error: ...`` line."""
EXIT_CONFIG = 2
EXIT_DIVERGED = 3
"""train.max_skipped_steps consecutive steps were skipped; nothing was saved."""
EXIT_HANG = 4
"""The watchdog saw no step finish within train.hang_timeout_minutes (sbtrain.watchdog)."""
EXIT_ORPHANED = 5
"""The launcher (torchrun) died; this worker stopped instead of training on as an orphan."""

SPIKE_WINDOW = 100
"""Accepted losses the running median of the loss-spike guard is taken over."""
SPIKE_MIN_HISTORY = 10
"""Steps of history before the loss-spike guard can fire (early losses fall fast)."""


class TrainingDiverged(KnownCause, RuntimeError):
    """Too many consecutive skipped steps; raised on every rank at the same step."""


class RunDirectoryLocked(KnownCause, RuntimeError):
    """Another live run holds run_dir or save_dir, or one of them cannot be written."""


@dataclasses.dataclass
class Verdict:
    """What every rank does with this step, identical on all ranks."""

    skip_reason: str = ""
    """Empty: apply the optimizer step. Otherwise why it is skipped (logged, in metrics)."""
    stop_reason: str = ""
    """Non-empty: finish this step, save, and exit 0 (signal or wall-clock limit)."""


class StopRequest:
    """Remembers a stop signal (or the wall-clock limit) until the loop can act on it."""

    def __init__(self, signal_names: list[str], exit_duration_minutes: float) -> None:
        self.signals = [getattr(signal, name) for name in signal_names]
        self.deadline = (time.monotonic() + 60 * exit_duration_minutes
                         if exit_duration_minutes > 0 else math.inf)
        self.received: str = ""
        self._previous: dict = {}

    def install(self) -> None:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        # Only a flag: the loop finishes the step in flight and agrees with the other ranks.
        self.received = signal.Signals(signum).name

    def pending(self) -> bool:
        return bool(self.received) or time.monotonic() >= self.deadline

    def reason(self) -> str:
        if self.received:
            return f"{self.received} received"
        return "train.exit_duration_minutes reached"


class StepGuard:
    """Decides, on every rank alike, whether a step's update is applied and whether to stop.

    Inputs per rank: its share of the loss (last pipeline stage) and whether its own
    gradients were finite *before* the data-parallel reduction (``wrap_finalize``), which
    names the rank a NaN came from; the reduced loss is the same on every rank.
    """

    def __init__(self, max_skipped_steps: int, loss_spike_factor: float, model,
                 device: torch.device) -> None:
        self.max_skipped, self.spike_factor = max_skipped_steps, loss_spike_factor
        self.model, self.device = model, device
        self.consecutive = self.total = 0
        self.history: deque[float] = deque(maxlen=SPIKE_WINDOW)
        self._local_grads_bad: torch.Tensor | float = 0.0
        """1 when this rank's gradients had a NaN/inf: a device tensor, read with the flags."""

    def wrap_finalize(self, finalize):
        """Wrap Megatron's finalize_model_grads_func: look at this rank's gradients first."""

        def finalize_and_check(*args, **kwargs):
            self._local_grads_bad = _grads_nonfinite(self.model)
            return finalize(*args, **kwargs)

        return finalize_and_check

    def check(self, step: int, loss: float, local_loss: float, stop: StopRequest) -> Verdict:
        """One all-reduce: [loss non-finite, grads non-finite, stop requested] of every rank,
        and the step's one host read of the device for the guard (the gradients' check stays on
        the device until here)."""
        world, rank = dist.get_world_size(), dist.get_rank()
        flags = torch.zeros(world, 3, dtype=torch.float32, device=self.device)
        flags[rank, 0] = float(not math.isfinite(local_loss))
        flags[rank, 1] = self._local_grads_bad
        flags[rank, 2] = float(stop.pending())
        dist.all_reduce(flags)
        flags = flags.cpu()
        self._local_grads_bad = 0.0
        verdict = Verdict(skip_reason=self._skip_reason(loss, flags))
        if flags[:, 2].any():
            verdict.stop_reason = (stop.reason() if stop.pending()
                                   else f"stop requested on rank(s) {_ranks(flags[:, 2])}")
        self._count(verdict, loss)
        return verdict

    def _skip_reason(self, loss: float, flags: torch.Tensor) -> str:
        bad_loss, bad_grads = _ranks(flags[:, 0]), _ranks(flags[:, 1])
        if bad_loss or bad_grads or not math.isfinite(loss):
            parts = [f"loss {loss:.6g}"]
            if bad_loss:
                parts.append(f"non-finite loss on rank(s) {bad_loss}")
            if bad_grads:
                parts.append(f"non-finite gradients on rank(s) {bad_grads}")
            return "non-finite: " + ", ".join(parts)
        if (self.spike_factor > 0 and len(self.history) >= SPIKE_MIN_HISTORY
                and loss > self.spike_factor * statistics.median(self.history)):
            return (f"loss spike: {loss:.6g} > {self.spike_factor:g} x running median "
                    f"{statistics.median(self.history):.6g}")
        return ""

    def _count(self, verdict: Verdict, loss: float) -> None:
        if verdict.skip_reason:
            self.consecutive += 1
            self.total += 1
        else:
            self.consecutive = 0
            self.history.append(loss)

    @property
    def diverged(self) -> bool:
        return self.consecutive >= self.max_skipped


def _grads_nonfinite(model) -> torch.Tensor | float:
    """1 if any gradient is NaN/inf: one sum per gradient buffer (no full-size mask), left on
    the device (a host read here, before the gradient reduction, drained the device's queue)."""
    buffers = getattr(model, "buffers", []) + getattr(model, "expert_parallel_buffers", [])
    if not buffers:
        return 0.0
    total = torch.stack([b.grad_data.sum(dtype=torch.float32) for b in buffers]).sum()
    return torch.isfinite(total).logical_not().float()


def _ranks(column: torch.Tensor) -> list[int]:
    return [int(i) for i in torch.nonzero(column).flatten()]


class RunLock:
    """An exclusive ``flock`` on ``.sbtrain.lock`` in each directory, taken by rank 0.

    The kernel drops it when the holder dies, so a crashed run never leaves it stuck; a
    second launch into the same run_dir/save_dir while the first is alive is refused.
    """

    NAME = ".sbtrain.lock"

    def __init__(self, directories: list[str]) -> None:
        self.directories = [d for d in dict.fromkeys(directories) if d]
        self._files: list = []

    def acquire(self, device: torch.device) -> None:
        """Collective: rank 0 locks, every rank learns the outcome."""
        message = self._try_lock() if dist.get_rank() == 0 else ""
        failed = torch.tensor([float(bool(message))], device=device)
        dist.all_reduce(failed)
        if failed.item():
            self.release()
            raise RunDirectoryLocked(message or "run_dir/save_dir is in use by another live run "
                                     "(see rank 0)")

    def _try_lock(self) -> str:
        for directory in self.directories:
            path = Path(directory) / self.NAME
            try:
                # also the start-up check that the directories are writable, before any step
                path.parent.mkdir(parents=True, exist_ok=True)
                handle = open(path, "a+")
            except OSError as exc:
                return (f"cannot write to {directory}: {exc.strerror} (train.run_dir and "
                        "checkpoint.save_dir must be writable directories)")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                handle.close()
                return (f"{directory} is in use by a live run ({holder}); wait for it to end "
                        f"or choose another directory (lock: {path})")
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
            handle.flush()
            self._files.append(handle)
        return ""

    def release(self) -> None:
        for handle in self._files:
            handle.close()
        self._files.clear()
