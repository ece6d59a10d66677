"""What a child forked by a test fork server (tests/parallel/rank_server.py,
tests/maca_compat/probes.py) does first and last: output into files, and a python-like exit."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys

CHILD_GRACE_S = 2.0
"""How long a started process gets to stop after SIGTERM."""


def redirect_stdio(stdout: str, stderr: str, *, append: bool) -> None:
    """fd 1 and 2 into the given files (appended to, or truncated), stdin from /dev/null."""
    mode = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, mode, 0o644)
        os.dup2(target, fd)
        os.close(target)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)


def exit_code(exc: SystemExit) -> int:
    """The status python gives ``sys.exit(x)``: an int as is, None 0, anything else 1."""
    return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)


def flush_and_exit(code: int) -> None:
    """Stop the processes this one started, flush what was written and leave without the
    parent's exit handlers (never returns).

    os._exit skips the interpreter's exit handlers, which would have stopped the processes the
    job started through multiprocessing (megatron's persistent async-save worker, spawned by
    every checkpoint save): without this each such job leaves an orphaned worker of ~270 MiB
    (9 per run of tests/maca_compat/test_patches.py were found)."""
    for child in multiprocessing.active_children():
        with contextlib.suppress(Exception):
            child.terminate()
            child.join(timeout=CHILD_GRACE_S)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)
