"""A per-rank watchdog thread: reports hangs with every Python stack, and stops orphans.

* Hang: when no training step (or eval / save) finishes within ``train.hang_timeout_minutes``,
  it prints one ``error:`` line, the stacks of all threads (``faulthandler``) and, on NCCL,
  how to get the Flight Recorder's record of the pending collectives; then exits with
  ``EXIT_HANG`` so that torchrun's ``--max-restarts`` can relaunch from the last checkpoint.
  The process-group timeout (``parallel.timeout_minutes``) is the backstop below it.
* Orphan: under torchrun, when the launcher dies (``kill -9``) the worker is re-parented;
  it notices within a second and exits with ``EXIT_ORPHANED`` instead of training on.

Either way the worker first ends its multiprocessing children (megatron-core's checkpoint
writer starts a ``Manager`` process for its results queue), which ``os._exit`` would orphan.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import sys
import threading
import time

from sbtrain.safety import EXIT_HANG, EXIT_ORPHANED

POLL_S = 1.0

FLIGHT_RECORDER_HINT = (
    "NCCL: relaunch with TORCH_NCCL_TRACE_BUFFER_SIZE=2000 TORCH_NCCL_DUMP_ON_TIMEOUT=1 "
    "(and TORCH_NCCL_DEBUG_INFO_TEMP_FILE=<dir>/nccl_trace_rank_) to get the Flight Recorder "
    "dump of the pending collectives per rank; read it with `python -m "
    "torch.distributed.flight_recorder.fr_trace <dir>`")


class Watchdog:
    """``start()`` when the loop begins, ``beat()`` after each step, ``stop()`` at the end."""

    def __init__(self, hang_timeout_minutes: float, rank: int, backend: str) -> None:
        self.timeout_s = 60 * hang_timeout_minutes
        self.rank, self.backend = rank, backend
        # Only a torchrun worker has a launcher to outlive; a plain (e.g. nohup) run does not.
        self.parent = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None
        self._last = time.monotonic()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sbtrain-watchdog", daemon=True)

    def start(self) -> None:
        self._last = time.monotonic()
        self._thread.start()

    def beat(self) -> None:
        self._last = time.monotonic()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=2 * POLL_S)

    def _run(self) -> None:
        while not self._stopped.wait(POLL_S):
            if self.parent is not None and os.getppid() != self.parent:
                _exit(EXIT_ORPHANED, f"error: rank {self.rank}: the launcher (pid "
                      f"{self.parent}) died; stopping this worker instead of training on "
                      "as an orphan (the last complete checkpoint is kept)")
            idle = time.monotonic() - self._last
            if self.timeout_s > 0 and idle > self.timeout_s:
                self._report_hang(idle)

    def _report_hang(self, idle: float) -> None:
        print(f"error: rank {self.rank}: no training step finished in {idle:.0f} s "
              f"(train.hang_timeout_minutes = {self.timeout_s / 60:g}); stacks of every "
              "thread follow, then this rank exits", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        if self.backend == "nccl":
            print(FLIGHT_RECORDER_HINT, file=sys.stderr, flush=True)
        _exit(EXIT_HANG, "")


def _exit(code: int, message: str) -> None:
    if message:
        print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    for child in multiprocessing.active_children():
        child.terminate()
    # os._exit: the main thread may be blocked in a collective that would never return.
    os._exit(code)
