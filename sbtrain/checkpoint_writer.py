"""The trainer's checkpoint saves: synchronous or asynchronous, optionally fully parallel,
through megatron-core's own machinery, and the time each one blocks training.

``checkpoint.async_save``: ``dist_checkpointing.save(..., async_sharded_save=True)`` returns an
``AsyncRequest``; megatron's ``AsyncCallsQueue`` forks a writer process per save
(``TemporalAsyncCaller``) and, once every rank's writer is done, runs the request's finalize
functions on every rank: the metadata, then ``sbtrain.checkpoint.commit_checkpoint``
(``iter_N.partial`` -> ``iter_N``, ``latest``, pruning). Training goes on meanwhile; the next
save, ``wait()`` (end of run, SIGTERM exit) or the per-step ``poll()`` finalize it.

``checkpoint.fully_parallel_save``: ``FullyParallelSaveStrategyWrapper`` spreads the writes of
shards replicated over data-parallel ranks across those ranks instead of the first replica
writing them all.

A writer process belongs to the rank that forked it: it asks the kernel to kill it when that
rank dies (a killed rank cannot commit the save, so nothing would read what it writes).
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import time

from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelSaveStrategyWrapper,
)

from sbtrain.checkpoint import save_checkpoint, save_checkpoint_async
from sbtrain.errors import CheckpointError


_PR_SET_PDEATHSIG = 1


class CheckpointWriter:
    """Saves of one run's ``save_dir``; every method is collective (all ranks call it)."""

    def __init__(self, save_dir: str, keep_last: int, async_save: bool, fully_parallel: bool,
                 dp_group) -> None:
        self.save_dir, self.keep_last, self.async_save = save_dir, keep_last, async_save
        self.fully_parallel, self.dp_group = fully_parallel, dp_group
        self._queue = None
        self.pending: list[int] = []
        """Steps whose asynchronous save is not committed yet, oldest first."""

    def save(self, step: int, model, optimizer, scheduler) -> float:
        """Save ``step``; returns the seconds training was blocked. An asynchronous save first
        finalizes the one before it (one save in flight at a time)."""
        start = time.perf_counter()
        if not self.async_save:
            save_checkpoint(self.save_dir, step, model, optimizer, scheduler, self.keep_last,
                            strategy=self._strategy())
            return time.perf_counter() - start
        self.wait()
        request = save_checkpoint_async(self.save_dir, step, model, optimizer, scheduler,
                                        self.keep_last, strategy=self._strategy())
        if request.async_fn is not None:
            request = request._replace(async_fn=functools.partial(
                _die_with_parent, request.async_fn, os.getpid()))
        self._calls_queue().schedule_async_request(request)
        self.pending.append(step)
        return time.perf_counter() - start

    def poll(self) -> float:
        """Commit the saves whose writers have finished on every rank (a one-int all-reduce when
        a save is in flight, nothing otherwise); returns the seconds spent."""
        return self._finalize(blocking=False) if self.pending else 0.0

    def wait(self) -> float:
        """Block until every save in flight is committed; returns the seconds waited."""
        return self._finalize(blocking=True) if self.pending else 0.0

    def abort(self) -> None:
        """Kill the writers of uncommitted saves (their ``.partial`` directories stay)."""
        if self._queue is not None:
            for active in self._queue.async_calls:
                active.async_caller.close(abort=True)
            self._queue.async_calls.clear()
        self.pending.clear()

    def _finalize(self, blocking: bool) -> float:
        start = time.perf_counter()
        try:
            done = self._queue.maybe_finalize_async_calls(blocking=blocking)
        except CheckpointError:
            raise
        except BaseException as exc:  # a writer failed (full disk, ...): gathered from all ranks
            step = self.pending[0]
            self.abort()
            raise CheckpointError(f"asynchronous save of step {step} into {self.save_dir} "
                                  f"failed: {type(exc).__name__}: {str(exc)[:300]} (the "
                                  "previous complete checkpoint is kept)") from exc
        del self.pending[:len(done)]
        return time.perf_counter() - start

    def _calls_queue(self):
        if self._queue is None:
            # persistent=False: one forked writer per save, gone when the save is written
            # (megatron's persistent worker outlives a killed run).
            self._queue = AsyncCallsQueue(persistent=False)
        return self._queue

    def _strategy(self):
        if not self.fully_parallel:
            return None
        return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(),
                                                self.dp_group)


def _die_with_parent(async_fn, parent_pid: int, *args, **kwargs):
    """Run megatron's writer function in the forked process, after asking Linux to SIGKILL this
    process when the rank that forked it dies (best effort elsewhere)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the rank died before prctl took effect
        os._exit(1)
    return async_fn(*args, **kwargs)
